"""The registry: method name -> module, and saving / loading adapters for any method.

Every method module follows one contract: Config, apply, config, param_groups, extra_loss,
after_backward, after_step, ranks, to_lora, merge (the hook order is in each file's Usage block).
This is the only file that knows them all.
Adapter tensors carry `lora_` in their names in every method, so one filter saves them all.
A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) loads as a LoRA.
"""
import dataclasses
import importlib
import json
import math
import os
import re
import tempfile
import typing
from pathlib import Path

import torch

NAMES = ("lora", "sara", "mosara", "sora", "adalora", "alora", "salora")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# PEFT LoRA options that change the forward beyond B A x; such adapters are refused
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "alora_invocation_tokens", "modules_to_save")


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
    if not path.exists() and (Path(adapter_dir) / PEFT_CONFIG).exists():
        return read_peft_config(adapter_dir)
    try:
        meta = json.loads(path.read_text())
        meta["method"], meta["config"]
    except FileNotFoundError:
        raise AdapterError(f"{path} does not exist: not an adapter directory") from None
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"{path} is not an adapter config ({e})") from None
    return meta


def load_adapter(model, adapter_dir):
    """Apply the saved method and Config to `model` and load its tensors (strictly).
    Returns (model, meta): meta is config.json's content (method, config, and what train.py
    recorded: base_model, model_config, train_args, recipe)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_config(adapter_dir)
    if "peft" in meta:
        return load_peft(model, adapter_dir, meta["peft"]), meta
    same_model(model, adapter_dir, meta)
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
    return model, meta


def check_adapter(model, adapter_dir):
    """Refuse an adapter that does not fit `model`, before anything runs on it: one train.py
    recorded on a model of another shape, or a PEFT adapter of modules the model lacks or of
    other sizes. Returns config.json's content, as read_config does."""
    meta = read_config(adapter_dir)
    if "peft" in meta:
        peft_fits(model, adapter_dir, peft_factors(adapter_dir, meta["peft"]))
    else:
        same_model(model, adapter_dir, meta)
    return meta


def same_model(model, adapter_dir, meta):
    """Refuse an adapter whose recorded model_config is not `model`'s (fields added to the config
    class since it was written count as their defaults)."""
    saved = meta.get("model_config")
    if saved is None:  # saved by save_adapter without one (e.g. on a transformers model)
        return
    ours = dataclasses.asdict(model.cfg)
    saved = {**dataclasses.asdict(type(model.cfg)()), **saved}
    differ = [f"{k} {saved.get(k)}, here {ours.get(k)}" for k in sorted(saved.keys() | ours.keys())
              if saved.get(k) != ours.get(k)]
    if differ:
        raise AdapterError(f"{adapter_dir} was trained on another model, {meta.get('base_model', '?')} "
                           f"({'; '.join(differ[:3])}): pass that model as --model")


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


# ----------------------------------------------------------------------------- PEFT LoRA adapters

def read_peft_config(adapter_dir):
    """A PEFT adapter_config.json as this library's adapter metadata: method lora."""
    path = Path(adapter_dir) / PEFT_CONFIG
    try:
        c = json.loads(path.read_text())
        kind = c.get("peft_type")
    except (ValueError, AttributeError) as e:
        raise AdapterError(f"{path} is not a PEFT adapter config ({e})") from None
    if kind != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r} cannot be loaded (only LORA)")
    used = [k for k in PEFT_UNSUPPORTED if c.get(k)] + (["bias"] if c.get("bias", "none") != "none" else [])
    if used:
        raise AdapterError(f"{path} uses {', '.join(used)}: only plain LoRA adapters can be loaded")
    return {"method": "lora", "config": {"dropout": c.get("lora_dropout", 0.0)}, "peft": c,
            "base_model": c.get("base_model_name_or_path")}


def peft_scale(c, name, r):
    """PEFT's scaling of module `name`: alpha / r (alpha / √r with rsLoRA), alpha_pattern first.
    The pattern match is PEFT's own (`get_pattern_key`): the key ends the name at a dot boundary."""
    alpha = c.get("lora_alpha", 8)
    for key, a in (c.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            alpha = a
            break
    return alpha / (math.sqrt(r) if c.get("use_rslora") else r)


def peft_factors(adapter_dir, c):
    """{our module name: (A (r, in), B (out, r))} of a PEFT adapter, PEFT's scaling folded into B;
    GPT-2's fused c_attn LoRA split over q/k/v."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.weights import our_lora

    path = Path(adapter_dir) / PEFT_WEIGHTS
    try:
        saved = load_file(path)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"cannot read {path}: {e}") from None
    pairs = {}
    for key, t in saved.items():
        m = PEFT_KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{path} holds {key}: only LoRA A/B weights can be loaded")
        pairs.setdefault(m[1], {})[m[2]] = t.float()
    factors = {}
    for name, ab in pairs.items():
        if ab.keys() != {"A", "B"}:
            raise AdapterError(f"{path} has lora_{next(iter(ab))} for {name} but not its pair")
        factors[name] = (ab["A"], peft_scale(c, name, ab["A"].shape[0]) * ab["B"])
    return our_lora(factors)


def peft_fits(model, adapter_dir, factors):
    """Refuse LoRA factors of a module the model lacks, or of another size than its layer."""
    for name, (A, B) in factors.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{adapter_dir} adapts {name}, which this model does not have: "
                               "pass the model it was trained on as --model") from None
        if not isinstance(layer, torch.nn.Linear) or layer.weight.shape != (B.shape[0], A.shape[1]):
            raise AdapterError(f"{adapter_dir}: the LoRA of {name} does not fit the model's layer: "
                               "pass the model it was trained on as --model")


@torch.no_grad()
def load_peft(model, adapter_dir, c):
    """Wrap each module the PEFT adapter names in a LoRA of its own rank, PEFT's scaling folded
    into lora_B (so alpha = r here). Each module has its own rank, so the layers are wrapped one
    by one rather than by one apply()."""
    factors = peft_factors(adapter_dir, c)
    peft_fits(model, adapter_dir, factors)
    lora = get("lora")
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise AdapterError(f"{adapter_dir}: the model already has an adapter")
    for name, (A, B) in factors.items():
        r = A.shape[0]
        wrapped = lora.LoRALinear(model.get_submodule(name),
                                  lora.Config(r=r, alpha=r, dropout=c.get("lora_dropout", 0.0), targets=(name,)))
        wrapped.lora_A.copy_(A)
        wrapped.lora_B.copy_(B)
        lora.replace(model, name, wrapped)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    return model
