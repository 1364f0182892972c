"""Adapter storage: an adapter directory on disk <-> an adapter on a model, in this library's format
and in PEFT's.

Ours: adapter.safetensors (every tensor named lora_*, in every method, so one filter saves them all)
+ config.json (the method's name and Config, and what train.py records: base_model, model_config,
train_args, recipe). PEFT's LoRA: adapter_config.json + adapter_model.safetensors; it loads as a
LoRA of each module's own rank, and every method that reduces to a LoRA (`to_lora`) exports as one.
GPT-2's fused c_attn is one PEFT module and three of ours (q, k, v): hf_lora / our_lora map between them.
Everything read is checked before it is used; a file that does not fit is an AdapterError that says why.
"""
import dataclasses
import json
import math
import re
import types
import typing
from collections import Counter
from pathlib import Path

import torch

import files
import methods
from models.gpt import GPTConfig
from models.weights import GPT2_QKV

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# PEFT LoRA options that change the forward beyond B A x; such adapters are refused
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "alora_invocation_tokens", "modules_to_save",
                    "exclude_modules", "target_parameters")
# recorded train.py metadata (config.json) that eval.py and plots.py read: name -> the types it may have
META_TYPES = {"base_model": str, "model_config": dict, "train_args": dict, "recipe": str}


class AdapterError(Exception):
    """An adapter directory that cannot be used; the message says why."""


def config_from_dict(method, d):
    """A method's Config from JSON values (lists back to tuples where the field is a tuple); a value
    not of its field's type (a string rank, a NaN alpha, a bool where a number goes) is refused."""
    cls = method.Config
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            if not fits(v, hints[f.name]):
                raise TypeError(f"{f.name} = {v!r} is not a {hints[f.name]}")
            kwargs[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return cls(**kwargs)


def fits(value, hint):
    """Whether a JSON value is of a Config annotation: int, float (finite), bool, str,
    tuple[str, ...], or `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if hint is float:
        return _number(value)
    if hint is int:
        return _count(value)
    return isinstance(value, hint)


def _number(v):
    """A finite JSON number (JSON's true and false are Python ints: not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v, least=-math.inf):
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def adapter_state(model):
    """The adapter tensors (parameters and persistent buffers named lora_*), detached on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def save_adapter(model, out_dir, method_name, cfg, **info):
    """adapter.safetensors (the method file's own save(): its Config in the header, so the file
    alone loads with the method file's load()) + config.json (method, its Config, and what `info`
    adds)."""
    out = Path(out_dir)
    meta = {"method": method_name, "config": dataclasses.asdict(cfg), **info}
    files.atomic_write(out / "adapter.safetensors", lambda p: methods.get(method_name).save(model, p))
    files.write_json(out / "config.json", meta)


def read_config(adapter_dir):
    """config.json's content, its recorded fields of the types their readers expect (a dict of
    train arguments, a prompt name ...), or a PEFT adapter's config as the same."""
    path = Path(adapter_dir) / "config.json"
    if not path.exists() and (Path(adapter_dir) / PEFT_CONFIG).exists():
        return read_peft_config(adapter_dir)
    try:
        meta = json.loads(path.read_text())
        meta["method"], meta["config"]
    except FileNotFoundError:
        raise AdapterError(f"{path} does not exist: not an adapter directory") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise AdapterError(f"{path} is not an adapter config ({e})") from None
    wrong = [k for k, kind in META_TYPES.items() if k in meta and not isinstance(meta[k], kind)]
    prompt = meta.get("train_args", {}).get("prompt") if not wrong else None
    if not isinstance(meta["config"], dict) or wrong or not isinstance(prompt, (str, type(None))):
        raise AdapterError(f"{path} is not an adapter config ({', '.join(wrong) or 'config or prompt'} "
                           "of the wrong type)")
    return meta


# the summary.json fields the results table reads (plots.run_facts) -> whether a value is one train.py writes
SUMMARY_FIELDS = {"seconds": lambda v: _number(v) and v >= 0, "total_rank": lambda v: _count(v, 0),
                  "live_params": lambda v: _count(v, 0), "steps": lambda v: _count(v, 1)}


def read_summary(adapter_dir):
    """summary.json's content ({} where the directory has none, as a PEFT adapter has not), its
    fields the results table reads of the types train.py writes them in."""
    path = Path(adapter_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{path} is not JSON ({' '.join(str(e).split())[:80]})") from None
    if not isinstance(summary, dict):
        raise AdapterError(f"{path} is not a run summary (a {type(summary).__name__}, not an object)")
    wrong = [k for k, ok in SUMMARY_FIELDS.items() if k in summary and not ok(summary[k])]
    if wrong:
        raise AdapterError(f"{path}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the type "
                           "train.py writes")
    return summary


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
    path = Path(adapter_dir) / "adapter.safetensors"
    try:
        saved = load_file(path)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"cannot read {path}: {e}") from None
    try:
        method = methods.get(meta["method"])
        cfg = config_from_dict(method, meta["config"])
        largest = max((n for t in saved.values() for n in t.shape), default=0)
        for name in method.SIZE_FIELDS:  # before apply() allocates what the config asks for
            if getattr(cfg, name) > largest:
                raise ValueError(f"{name} = {getattr(cfg, name)} is larger than any tensor of {path.name}")
        method.apply(model, cfg)
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{adapter_dir}/config.json: {e}") from None
    check_tensors(saved, adapter_state(model), path)
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


def check_tensors(saved, own, where):
    """Refuse saved adapter tensors that are not exactly the ones apply() made for this model and
    Config (`own`): the same names and shapes (a rank-8 tensor under `r: 4` would double ΔW, a 1-D
    lora_A would broadcast), and finite."""
    if saved.keys() != own.keys():
        missing, extra = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        raise AdapterError(f"{where} does not fit the adapter this config makes for this model "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key in sorted(own):
        t = saved[key]
        if not isinstance(t, torch.Tensor) or t.shape != own[key].shape:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise AdapterError(f"{where}: {key} is {shape} where this model and config make "
                               f"{list(own[key].shape)}")
        if t.is_floating_point() and not t.isfinite().all():
            raise AdapterError(f"{where}: {key} holds NaN or inf")


# ----------------------------------------------------------------------------- PEFT LoRA adapters

def read_peft_config(adapter_dir):
    """A PEFT adapter_config.json as this library's adapter metadata: method lora. Every field used
    is of the type and range PEFT gives it, and every pattern compiles and matches in bounded time."""
    path = Path(adapter_dir) / PEFT_CONFIG
    try:
        c = json.loads(path.read_text())
        kind = c.get("peft_type")
    except (ValueError, AttributeError, RecursionError) as e:
        raise AdapterError(f"{path} is not a PEFT adapter config ({e})") from None
    if kind != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r} cannot be loaded (only LORA)")
    used = [k for k in PEFT_UNSUPPORTED if c.get(k)] + (["bias"] if c.get("bias", "none") != "none" else [])
    if used:
        raise AdapterError(f"{path} uses {', '.join(used)}: only plain LoRA adapters can be loaded")
    wrong = [k for k, ok in PEFT_FIELDS.items() if k in c and not ok(c[k])]
    if wrong:
        raise AdapterError(f"{path}: {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of "
                           "the type and range PEFT gives them")
    for pattern in peft_patterns(c):
        check_pattern(pattern, path)
    return {"method": "lora", "config": {"dropout": c.get("lora_dropout", 0.0)}, "peft": c,
            "base_model": c.get("base_model_name_or_path")}


def _names(v):
    return v is None or isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)


# the adapter_config.json fields this loader reads -> whether a value is one PEFT could have written
PEFT_FIELDS = {
    "r": lambda v: _count(v, 1), "lora_alpha": _number, "lora_dropout": lambda v: _number(v) and 0 <= v < 1,
    "use_rslora": lambda v: isinstance(v, bool), "fan_in_fan_out": lambda v: isinstance(v, bool),
    "alpha_pattern": lambda v: v is None or isinstance(v, dict) and all(map(_number, v.values())),
    "rank_pattern": lambda v: v is None or isinstance(v, dict) and all(_count(r, 1) for r in v.values()),
    "target_modules": _names, "layers_pattern": _names,
    "layers_to_transform": lambda v: v is None or _count(v, 0) or isinstance(v, list) and all(_count(i, 0) for i in v),
}
REPEATS = (re._constants.MAX_REPEAT, re._constants.MIN_REPEAT, re._constants.POSSESSIVE_REPEAT)
ONE_CHARACTER = (re._constants.LITERAL, re._constants.NOT_LITERAL, re._constants.ANY, re._constants.IN)


def peft_patterns(c):
    """The regular expressions of a PEFT config: target_modules as a string, the keys of
    alpha_pattern and rank_pattern, layers_pattern."""
    layers = c.get("layers_pattern")
    return ([c["target_modules"]] if isinstance(c.get("target_modules"), str) else []) + \
        list(c.get("alpha_pattern") or {}) + list(c.get("rank_pattern") or {}) + \
        ([layers] if isinstance(layers, str) else layers or [])


def check_pattern(pattern, path):
    """Refuse a regular expression that does not compile, or whose match could take exponential
    time on a module name (Python's re backtracks): at most 4 repetitions, each of one character
    (`.*`, `[0-9]+`, `\\d+`), and nothing but groups, alternatives and anchors around them."""
    try:
        parsed = re._parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{path}: the pattern {pattern!r} is not a regular expression ({e})") from None
    todo, repeats = [parsed], 0
    while todo:
        for op, av in todo.pop():
            if op in REPEATS:
                repeats += 1
                ok = len(av[2]) == 1 and av[2][0][0] in ONE_CHARACTER
            elif op is re._constants.SUBPATTERN:
                todo.append(av[3])
                ok = True
            elif op is re._constants.BRANCH:
                todo.extend(av[1])
                ok = True
            else:
                ok = op in (*ONE_CHARACTER, re._constants.AT)
            if not ok or repeats > 4:
                raise AdapterError(f"{path}: the pattern {pattern!r} is too complex to match safely "
                                   "(at most 4 repetitions, each of one character: .* [0-9]+ \\d+)")


def peft_key(patterns, name):
    """The key of `patterns` (alpha_pattern, rank_pattern) that PEFT's get_pattern_key picks for
    module `name`: the first that ends the name at a dot boundary; None where none does."""
    return next((key for key in patterns or {} if re.match(rf"(.*\.)?({key})$", name)), None)


def peft_targets(c, name):
    """Whether PEFT puts a LoRA on module `name` (its check_target_module_exists): target_modules
    as a full-match regex, or as names that end the module's name, then layers_to_transform."""
    targets = c.get("target_modules")
    if targets is None:  # PEFT's defaults for the model type: the file's tensors name them
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not (name in targets or any(name.endswith("." + t) for t in targets)):
        return False
    layers = c.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = c.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] if patterns else [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    found = next((m for regex in regexes if (m := re.match(regex, name))), None)
    return found is not None and int(found["idx"]) in ([layers] if isinstance(layers, int) else layers)


def peft_scale(c, name, r):
    """PEFT's scaling of module `name`: alpha / r (alpha / √r with rsLoRA), alpha_pattern first."""
    key = peft_key(c.get("alpha_pattern"), name)
    alpha = c.get("lora_alpha", 8) if key is None else c["alpha_pattern"][key]
    return alpha / (math.sqrt(r) if c.get("use_rslora") else r)


def peft_factors(adapter_dir, c):
    """{our module name: (A (r, in), B (out, r))} of a PEFT adapter, PEFT's scaling folded into B;
    GPT-2's fused c_attn LoRA split over q/k/v."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
        if t.dim() != 2 or not t.isfinite().all():
            raise AdapterError(f"{path}: {key} is not a finite matrix")
        pairs.setdefault(m[1], {})[m[2]] = t.float()
    factors = {}
    for name, ab in pairs.items():
        if ab.keys() != {"A", "B"}:
            raise AdapterError(f"{path} has lora_{next(iter(ab))} for {name} but not its pair")
        if not peft_targets(c, name):
            raise AdapterError(f"{path} holds a LoRA for {name}, which target_modules / layers_to_transform "
                               "leave out: PEFT would not load it")
        key = peft_key(c.get("rank_pattern"), name)
        r = c.get("r", 8) if key is None else c["rank_pattern"][key]
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise AdapterError(f"{path}: the LoRA of {name} has ranks {ab['A'].shape[0]} (A) and "
                               f"{ab['B'].shape[1]} (B) where its config gives {r}")
        scale = peft_scale(c, name, r)
        # every entry of ΔW = scale B A is at most r |scale| max|B| max|A| (in float64, where 1e308 stays a number)
        if not r * abs(scale) * float(ab["B"].abs().max()) * float(ab["A"].abs().max()) < torch.finfo().max:
            raise AdapterError(f"{path}: lora_alpha / r gives {name} the scale {scale:g}, which makes its update "
                               "overflow float32")
        factors[name] = (ab["A"], scale * ab["B"])
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
    lora = methods.get("lora")
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


# ----------------------------------------------------------------------------- PEFT LoRA adapters: writing

def hf_lora(factors):
    """{our module: (A (r, in), B (out, r))} -> the same under Hugging Face module names.

    GPT-2's q/k/v LoRAs of one layer become one LoRA on the fused c_attn: A stacks their rows and
    B is block-diagonal over the thirds of c_attn's output (zero for a third with no adapter), so
    B A is exactly the three ΔW stacked. Rank-0 factors are dropped."""
    out, fused = {}, {}
    for name, (A, B) in factors.items():
        if A.shape[0] == 0:
            continue
        m = GPT2_QKV.fullmatch(name)
        if m:
            fused.setdefault(m[1] + "c_attn", {})["qkv".index(m[2])] = (A, B)
        else:
            out[name] = (A, B)
    for name, parts in fused.items():
        A = torch.cat([parts[i][0] for i in sorted(parts)])  # (sum r, C)
        C = next(iter(parts.values()))[1].shape[0]
        B = A.new_zeros(3 * C, A.shape[0])  # (3C, sum r)
        col = 0
        for i in sorted(parts):
            r = parts[i][0].shape[0]
            B[i * C:(i + 1) * C, col:col + r] = parts[i][1]
            col += r
        out[name] = (A, B)
    return out


def our_lora(factors):
    """The inverse of hf_lora: a c_attn LoRA is split into q/k/v by the thirds of B; the ranks
    whose B column is zero in a third are dropped there, and a third with none left gets no LoRA."""
    out = {}
    for name, (A, B) in factors.items():
        if not name.endswith(".attn.c_attn"):
            out[name] = (A, B)
            continue
        for p, Bp in zip("qkv", B.chunk(3, dim=0)):  # (C, r) each
            keep = Bp.abs().sum(0) != 0
            if keep.any():
                out[name.removesuffix("c_attn") + f"{p}_proj"] = (A[keep], Bp[:, keep])
    return out


def peft_config(factors, base_name, fan_in_fan_out):
    """adapter_config.json for LoRA factors {HF module: (A, B)} whose scale is already in B.

    Target modules are full names, so no pruned module of the same kind is caught by a suffix;
    the most common rank is `r` and the others go to rank_pattern, with alpha = r everywhere."""
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern,
            "alpha_pattern": pattern, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "fan_in_fan_out": fan_in_fan_out, "inference_mode": True}


def write_peft(out, model, factors, base_name):
    """adapter_model.safetensors under PEFT's key names, and adapter_config.json."""
    from safetensors.torch import save_file

    factors = hf_lora({n: (A.detach().float(), B.detach().float()) for n, (A, B) in factors.items()})
    if not factors:
        raise ValueError("every module of the adapter is pruned to rank 0: there is no LoRA to export")
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()  # (r, in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()  # (out, r)
    files.atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    gpt2 = isinstance(model.cfg, GPTConfig)  # HF GPT-2's Conv1D stores weights (in, out)
    files.write_json(out / PEFT_CONFIG, peft_config(factors, base_name, gpt2))
