"""The registry: method name -> module, and saving / loading adapters for any method.

Every method module follows one contract (DESIGN.md): Config, apply, param_groups, extra_loss,
after_backward, after_step, ranks, to_lora, merge. This is the only file that knows them all.
Adapter tensors carry `lora_` in their names in every method, so one filter saves them all.
"""
import dataclasses
import importlib
import json
import os
import tempfile
import typing
from pathlib import Path

import torch

NAMES = ("lora", "sara", "mosara", "sora", "adalora", "alora", "salora")


class AdapterError(Exception):
    """An adapter directory that cannot be used; the message says why."""


def get(name):
    if name not in NAMES:
        raise ValueError(f"unknown method {name!r} (choose from {', '.join(NAMES)})")
    return importlib.import_module(f"methods.{name}")


def config_from_dict(method, d):
    """A method's Config from JSON values (lists back to tuples where the field is a tuple)."""
    cls = method.Config
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            kwargs[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return cls(**kwargs)


def adapter_state(model):
    """The adapter tensors (parameters and persistent buffers named lora_*), detached on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def umask_mode(mode=0o666):
    """`mode` less the umask: what open() gives a new file (mkstemp, and safetensors, give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write(path, write):
    """write(tmp_path) then rename: a crash never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def save_adapter(model, out_dir, method_name, cfg, **info):
    """adapter.safetensors + config.json (method, its Config, and what `info` adds)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    meta = {"method": method_name, "config": dataclasses.asdict(cfg), **info}
    atomic_write(out / "adapter.safetensors", lambda p: save_file(adapter_state(model), p))
    write_json(out / "config.json", meta)


def read_config(adapter_dir):
    path = Path(adapter_dir) / "config.json"
    try:
        meta = json.loads(path.read_text())
        meta["method"], meta["config"]
    except FileNotFoundError:
        raise AdapterError(f"{path} does not exist: not an adapter directory") from None
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path} is not an adapter config ({e})") from None
    return meta


def load_adapter(model, adapter_dir):
    """Apply the saved method and Config to `model` and load its tensors (strictly)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_config(adapter_dir)
    base = meta.get("model_config")
    if base is not None and base != dataclasses.asdict(model.cfg):
        raise AdapterError(f"{adapter_dir} was trained on another model ({meta.get('base_model', '?')})")
    try:
        method = get(meta["method"])
        method.apply(model, config_from_dict(method, meta["config"]))
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{adapter_dir}/config.json: {e}") from None
    try:
        saved = load_file(Path(adapter_dir) / "adapter.safetensors")
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"cannot read {adapter_dir}/adapter.safetensors: {e}") from None
    own = adapter_state(model)
    if saved.keys() != own.keys():
        missing, extra = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        raise AdapterError(f"{adapter_dir}/adapter.safetensors does not fit the {meta['method']} "
                           f"adapter (missing {missing[:3]}, unexpected {extra[:3]})")
    resize_to(model, saved)
    model.load_state_dict(saved, strict=False)
    return model


def resize_to(model, saved):
    """Give adapter tensors the saved shapes: ALoRA, for one, grows and shrinks ranks per module."""
    for key, tensor in saved.items():
        mod_name, _, attr = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        cur = getattr(mod, attr)
        if cur.shape == tensor.shape:
            continue
        new = torch.empty(tensor.shape, dtype=cur.dtype, device=cur.device)
        if isinstance(cur, torch.nn.Parameter):
            setattr(mod, attr, torch.nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            setattr(mod, attr, new)
