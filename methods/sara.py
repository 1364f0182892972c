"""SARA: Singular-Value Based Adaptive Low-Rank Adaption (Gu et al. 2024, arXiv 2408.03290, §4.2).

The idea: a layer's rank should follow how much of its pretrained weight's spectrum matters. At
initialisation each target layer takes k = the fewest singular values of W0 whose sum reaches
`threshold` of the total (Algorithm 1), then trains a rank-k update in singular-value form.

    k = min{j >= 1 : σ1 + ... + σj >= threshold * Σσ}           σ = svdvals(W0), per layer
    y = x W0ᵀ + b + ((dropout(x) lora_Vᵀ) * lora_lam) lora_Uᵀ       ΔW = lora_U diag(lora_lam) lora_V
    lora_U (out, k), lora_lam (k,), lora_V (k, in): all three train; no alpha/r scale (lora_lam is
    the learnable, per-direction scale)

Hyperparameters (paper): threshold 0.01 (LLaMA-7B math), 0.09 / 0.075 (commonsense, LLaMA-7B /
13B), 0.012 (E2E, GPT-2 M): each picked so that the trainable count matches LoRA's; dropout 0.05;
lr 1e-3; targets q and v. Our default threshold 0.0615 does the same on the default model
(SmolLM2-135M, q and v: 460,889 trainable numbers against LoRA r=8's 460,800). The default init
"v0" is this library's choice (below). Run-length rule: k is fixed at init and SARA has no schedule,
so nothing depends on the number of steps; it trains at the model's lr (TRAINING is empty).

Where this file departs from the paper:
- Algorithm 1 as printed compares the running sum with `threshold` instead of `threshold * total`;
  we use the target, and count the prefix that *reaches* it, so k >= 1 always. Singular values
  below the numerical-rank tolerance (as torch.linalg.matrix_rank) count as zero, so k never
  exceeds the numerical rank and threshold = 1 gives exactly that rank. A zero matrix raises.
- Init (Config.init). "paper" is the paper's: the truncated matrix is "randomly initialized",
  Kaiming-uniform (its Appendix): lora_U, lora_V Kaiming-uniform and lora_lam U(-1, 1) (Kaiming-uniform
  of a (k, 1) column), so ΔW != 0 at step 0 and the model's outputs move before any training.
  The default "v0" is the paper's Table 4 ablation "V=0" (the paper writes h = x W, so its V is the
  output side, lora_U here), which the paper scores below SARA (58.85 against 62.18, LLaMA-7B, math):
  lora_U = 0, lora_V Kaiming-uniform, and lora_lam = 2 where the ablation draws it at random. It is
  the default because it keeps this library's rule that every method starts from the base model
  exactly (ΔW = 0, as LoRA's B = 0), and on the built-in task at 150 steps it trains as fast as LoRA
  (this library's measurement: docs/methods.md). Why lam = 2: U's gradient is G (V x)ᵀ diag(lam), so a
  lam near 0 would stall it, and 2 makes ΔW move as fast as LoRA's at its default alpha / r = 2.
  "lambda0" (U, V Kaiming-uniform, lam = 0) also keeps ΔW = 0, but at step 0 only lam gets a
  gradient and U's random output directions barely move: it learns far slower at these lengths.
  Zeroing the up-projection *and* lora_lam is refused: no factor could ever get a gradient.

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import sara as method
    method.apply(model, method.Config(threshold=0.0615))  # each layer's rank k from W0's spectrum
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

INITS = ("lambda0", "v0", "paper")


NAME, TITLE = "sara", "SARA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ()  # the Config fields that size apply()'s tensors: none, k comes from each spectrum

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    threshold: float = 0.0615  # share of the singular-value sum that sets each layer's rank k
    init: str = "v0"  # v0: lora_U = 0, lam = 2 (ΔW = 0); lambda0: lam = 0 (ΔW = 0); paper: all random (ΔW != 0)
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)} (there is no option zeroing both "
                             f"the up-projection and lam: nothing could train), got {self.init!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def rank_for(weight, threshold):
    """Algorithm 1: the fewest singular values of `weight` whose sum reaches threshold * total."""
    w = weight.detach()
    if not torch.isfinite(w).all():
        raise ValueError("the weight has non-finite entries: its spectrum is undefined")
    s = torch.linalg.svdvals(w.double())  # values only: half the cost of a full SVD here
    if s[0] == 0:
        raise ValueError("the weight is a zero matrix: it has no spectrum to choose k from")
    s = torch.where(s > s[0] * max(w.shape) * torch.finfo(s.dtype).eps, s, 0)  # rounding noise is rank 0
    cum = torch.cumsum(s, 0)
    # threshold <= 1 keeps the target <= cum[-1], so the search always lands inside: 1 <= k <= n
    return int(torch.searchsorted(cum, threshold * cum[-1])) + 1


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


class SARALinear(nn.Module):
    """Wraps a linear layer and adds U diag(lam) V x. Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base, k, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.p = cfg.dropout
        dev = base.weight.device
        self.lora_U = nn.Parameter(torch.empty(self.out_features, k, device=dev))  # up-projection
        self.lora_lam = nn.Parameter(torch.empty(k, device=dev))  # the trainable singular values
        self.lora_V = nn.Parameter(torch.empty(k, self.in_features, device=dev))  # down-projection
        nn.init.kaiming_uniform_(self.lora_U, a=math.sqrt(5))  # U(±1/√k), nn.Linear(k, out)'s init
        nn.init.kaiming_uniform_(self.lora_V, a=math.sqrt(5))  # U(±1/√in), LoRA's A
        nn.init.uniform_(self.lora_lam, -1, 1)  # Kaiming-uniform (a=√5) of a (k, 1) column: fan_in 1
        if cfg.init == "lambda0":
            nn.init.zeros_(self.lora_lam)
        elif cfg.init == "v0":  # LoRA's init: U's gradient is G (V x)ᵀ diag(lam), so no lam near 0 stalls it
            nn.init.zeros_(self.lora_U)
            nn.init.constant_(self.lora_lam, 2.0)  # LoRA's alpha / r at its defaults
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def delta_weight(self):
        return self.lora_U @ (self.lora_lam[:, None] * self.lora_V)  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        return y + F.linear(F.linear(x, self.lora_V.to(dt)) * self.lora_lam.to(dt), self.lora_U.to(dt))

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
    """Give every target layer its own rank k from W0's spectrum, wrap it, freeze all but adapters."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model already has an adapter: apply() once, to a model without one")
    targets = find_targets(model, cfg.targets)
    # every k first, so a weight without a spectrum fails before any layer is wrapped
    ks = {name: rank_for(layer.weight, cfg.threshold) for name, layer in targets.items()}  # W0 or W0ᵀ: the same
    for name, layer in targets.items():
        replace(model, name, SARALinear(layer, ks[name], cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SARALinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- training hooks: k is fixed at init, so SARA needs none of them -----------------------------

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
    """Module name -> k, the rank Algorithm 1 chose for it."""
    return {n: m.lora_lam.shape[0] for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') = (diag(lam) V, U), so ΔW = B' A'."""
    return {n: (m.lora_lam[:, None] * m.lora_V, m.lora_U.detach().clone()) for n, m in layers(model).items()}


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
