"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

The idea: freeze the pretrained weight W0 and learn its update as a product of two thin matrices,
so a layer trains r * (in + out) numbers instead of in * out. Because the update is a plain
matrix, it folds into W0 after training and inference costs nothing extra.

    y = base(x) + (alpha / r) * dropout(x) lora_Aᵀ lora_Bᵀ        ΔW = (alpha / r) lora_B lora_A
    lora_A (r, in): Kaiming-uniform (a=√5, nn.Linear's default);  lora_B (out, r): zeros -> ΔW = 0

Hyperparameters (paper / loralib / the SARA paper's LoRA baseline): r = 8, alpha = 16,
dropout = 0.05, targets = the q and v projections.

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import lora as method
    method.apply(model, method.Config(r=8))          # wraps the target layers, freezes all the rest
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total_steps)
    model.train()
    for step in range(1, total_steps + 1):
        loss = task_loss(model, next(batches)) + method.extra_loss(model)
        loss.backward()
        method.after_backward(model, step, total_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        method.after_step(model, opt, step, total_steps)
        sched.step()
        opt.zero_grad()
    method.merge(model)                               # the original layers again, W = W0 + ΔW
"""
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME, TITLE = "lora", "LoRA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("r",)  # the Config fields that size the tensors apply() allocates

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    r: int = 8  # rank of the update
    alpha: float = 16.0  # ΔW is scaled by alpha / r, so changing r keeps the update's size
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0 < self.alpha < math.inf:  # 0 scales ΔW and both gradients to nothing: nothing would train
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def dropout(x, p, training):
    """nn.Dropout's output, with a mask that does not depend on who computes it: each entry's is a
    hash of (one seed drawn from torch's RNG per call, the example's row in the global batch, the
    entry's place in the example). So N data-parallel processes (torch.distributed: process r of N
    holds rows r, r + N, ... of the batch, as train.py splits it) drop what one process drops, every
    process's RNG stays in step (a resume restores any one's), and trimming padding columns changes
    no other entry. Backward keeps a bool mask (1 byte an entry) where nn.Dropout keeps 4 bytes."""
    if not training or p == 0:
        return x
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    seed = int(torch.randint(2**31 - 1, ()))
    rows = torch.arange(x.shape[0], device=x.device) * world + rank
    row_key = ((rows * 0x7FEB352D + seed) & 0xFFFFFFFF).view(-1, *[1] * (x.dim() - 1))
    h = torch.arange(x[0].numel(), device=x.device).view(x.shape[1:]) ^ row_key
    # a 32-bit multiply-xorshift hash, in place; its multipliers are below 2**31, so no product
    # overflows int64 on any device
    h.mul_(0x7FEB352D).bitwise_and_(0xFFFFFFFF)
    h.bitwise_xor_(h >> 15)
    h.mul_(0x1B873593).bitwise_and_(0xFFFFFFFF)
    return x * (h >= int(p * 2**32)) / (1 - p)


def is_conv1d(layer):
    """transformers' GPT-2 Conv1D: a linear layer that stores its weight as (in, out)."""
    return type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None


class LoRALinear(nn.Module):
    """Wraps a linear layer and adds (alpha/r) B A x. The wrapped layer computes y as before; its
    weight and bias are registered here under their own names, so the model's keys do not change."""

    def __init__(self, base, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.scale = cfg.alpha / cfg.r
        self.p = cfg.dropout
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        h = F.linear(x, self.lora_A.to(dt)) * self.scale  # (..., r): scale r numbers, not out
        return y + F.linear(h, self.lora_B.to(dt))

    @torch.no_grad()
    def merge(self):
        if self.w0 is None:
            if not self.weight.is_floating_point():
                raise ValueError(f"cannot merge into a {self.weight.dtype} weight (a quantised layer): "
                                 "use to_lora() and keep the adapter separate")
            delta = self.delta_weight()
            wide = torch.promote_types(self.weight.dtype, delta.dtype)  # W0 + ΔW in float32 (at least),
            merged = (self.weight.to(wide) + (delta.T if self.transposed else delta)).to(self.weight.dtype)  # rounded
            # a new tensor, not an add in place: a weight tied to another (an lm_head to the embeddings)
            # leaves the other as it was; w0 is the original Parameter, kept out of the state dict
            object.__setattr__(self, "w0", self.weight)
            self.weight = self.base.weight = nn.Parameter(merged, requires_grad=False)

    @torch.no_grad()
    def unmerge(self):
        if self.w0 is not None:
            self.weight = self.base.weight = self.w0  # the very Parameter: a tie holds again
            self.w0 = None


def adaptable(layer):
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def find_targets(model, targets):
    """Module name -> layer for the layers `targets` names. A logical name maps through the model's
    TARGETS dict when it has one (this library's models do), else through HF_TARGETS; every name
    also matches as a module-name suffix itself, e.g. "self_attn.q_proj"."""
    table = getattr(model, "TARGETS", HF_TARGETS)
    mapped = [table.get(t, ()) for t in targets]  # a suffix (our TARGETS) or a tuple of them (HF_TARGETS)
    names = [*targets, *(n for m in mapped for n in ((m,) if isinstance(m, str) else m))]
    suffixes = tuple("." + n for n in names)
    found = {n: m for n, m in model.named_modules() if ("." + n).endswith(suffixes)}
    for n, m in found.items():
        if not adaptable(m):
            raise ValueError(f"{n} is a {type(m).__name__}: only nn.Linear layers (or subclasses) and "
                             "transformers' Conv1D can be adapted")
    if not found:
        have = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if adaptable(m)})
        raise ValueError(f"no layer matches targets {list(targets)}: give module-name suffixes; this "
                         f"model's linear layers are named {', '.join(have[:12]) or '(none)'}")
    return found


def replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def apply(model, cfg: Config):
    """Wrap every target layer in place and freeze everything but the adapter tensors."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model already has an adapter: apply() once, to a model without one")
    for name, layer in find_targets(model, cfg.targets).items():
        replace(model, name, LoRALinear(layer, cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- training hooks: LoRA needs none of them, but every method defines them --------------------

def param_groups(model, lr, weight_decay):
    config(model)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay}]


def extra_loss(model):
    return torch.zeros((), device=next(model.parameters()).device)


def after_backward(model, step, total_steps):
    check_step(step, total_steps)


def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    check_step(step, total_steps)
    return {}


def val_loss_steps(model, total_steps):
    """The steps whose after_step calls val_loss (a scoring round's validation passes), in order, so a
    trainer can count them in its ETA: none here."""
    return []


def ranks(model):
    return {n: m.lora_A.shape[0] for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A' (the scale folded into B')."""
    return {n: (m.lora_A.detach().clone(), m.scale * m.lora_B.detach()) for n, m in layers(model).items()}


def can_merge(model):
    """None when the adapter reduces to a LoRA (to_lora) and merge(model) can fold it into this model's
    weights; else the reason it cannot."""
    for n, m in layers(model).items():
        if not m.weight.is_floating_point():
            return f"{n} holds a {m.weight.dtype} weight (a quantised layer), which takes no merge"
    return None


@torch.no_grad()
def merge(model):
    """Fold ΔW into W0 and put the original layers back: zero inference overhead."""
    for name, m in layers(model).items():
        m.merge()
        replace(model, name, m.base)
    return model


# --- the adapter alone, on disk ------------------------------------------------------------------

def save(model, path):
    """Write the adapter alone -- its lora_* tensors and its Config, not the base model -- to `path`:
    a .pt / .pth / .bin path is written by torch.save (plain tensors and a JSON string, which
    torch.load(weights_only=True) reads back), any other path as safetensors (the package must be
    installed; the Config goes in the file's header)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    cfg = json.dumps(asdict(config(model)))
    if str(path).endswith((".pt", ".pth", ".bin")):
        torch.save({"config": cfg, "tensors": tensors}, path)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata={"config": cfg})


def load(model, path):
    """apply() the Config save() wrote to `model` -- the base the adapter was trained on, with no
    adapter yet -- and load the saved tensors into it: the names and shapes must be exactly the ones
    apply() makes. Returns the model."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's archive; safetensors starts with a length
    if zipped:
        saved = torch.load(path, weights_only=True)
        cfg, tensors = saved.get("config"), saved.get("tensors", {})
    else:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            cfg, tensors = (f.metadata() or {}).get("config"), {k: f.get_tensor(k) for k in f.keys()}
    if not isinstance(cfg, str):
        raise ValueError(f"{path} holds no adapter Config: it was not written by save()")
    apply(model, Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg).items()}))
    own = {k: v.shape for k, v in model.state_dict().items() if "lora_" in k}
    wrong = sorted(k for k in own.keys() | tensors.keys() if k not in tensors or own.get(k) != tensors[k].shape)
    if wrong:
        raise ValueError(f"{path} does not fit this model: {wrong[:3]} differ in name or shape")
    model.load_state_dict(tensors, strict=False)
    return model
