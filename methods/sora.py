"""SoRA: Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al. 2023, arXiv 2311.11696).

The idea: start from a LoRA of a generous rank rmax with a gate vector between the two projections,
and train the gate with an ℓ1 proximal step, so whole ranks reach exactly zero. After training the
zero ranks are cut out and each module is a plain LoRA of its own, smaller rank.

    y = x W0ᵀ + b + (alpha / rmax) * ((dropout(x) lora_Aᵀ) ⊙ lora_gate) lora_Bᵀ
    ΔW = (alpha / rmax) lora_B diag(lora_gate) lora_A
    lora_A (rmax, in): Kaiming-uniform;  lora_B (out, rmax): zeros -> ΔW = 0;  lora_gate (rmax,): N(0, 1)
    after every optimizer step:  lora_gate <- soft_threshold(lora_gate, xi)
    soft_threshold(g, xi) = sign(g) * max(|g| - xi, 0)       (the prox of xi * |g|)
    post-pruning: keep = lora_gate != 0;  A' = lora_A[keep],  B' = (alpha / rmax) lora_B[:, keep] diag(lora_gate[keep])

Two regimes (Config.regime):
- "library" (the default): the gates move at gate_lr_t = (gate_lr_total / total_steps) * s_t, s_t the
  run's schedule (the model's lr_t over its peak), and xi = gate_lr_t * lam (the paper's η_t λ).
- "reference" (TsinghuaC3I/SoRA): the gates move at the model's lr (its `sparse_lr` defaults to it, and
  no script sets it), xi is a constant (`sparse_lambda_2`), and the loss gains l1 * mean|lora_gate|
  over all gates (its trainer's `sparse_lambda` term).

Run-length rule: nothing in the library regime depends on the number of steps. An Adam step moves
a gate by about its lr whatever its gradient, so the distance a gate can travel over a run is
Σ gate_lr_t; with a per-step gate lr that sum grows with the run, and a 600-step run closes far more
than a 150-step one with the same Config. gate_lr_total fixes the sum instead: Σ gate_lr_t =
gate_lr_total * mean(s_t) at any length (≈ 2.2 under train.py's warmup + cosine). param_groups does
not know total_steps, so the gates sit in a group at the model's lr and after_step rescales the step
the optimizer just took on them by gate_lr_total / (total_steps * peak lr): a step of SGD, Adam or
AdamW without decay is its lr times a direction that does not depend on the lr, so this is the step
at gate_lr_t (up to float32's rounding of the small step, ~1e-4 of it at lr 1e-3). The lam_max
stages are fractions of the run. The reference regime is kept as the reference has it, per step:
its travel grows with the run.

Defaults and where each comes from:
- rmax = 16, alpha = 32: scale alpha / rmax = 2, the reference's (lora alpha 16 at r = 8) and this
  library's LoRA's (16 / 8); the scale stays alpha / rmax after pruning. The paper uses rmax = 8.
- gate_lr_total = 4.5 (0.03 at 150 steps) and lam = 0.5: this library's measurement on the built-in
  task at 150 steps (docs/results.md) and planted.py (docs/methods.md); the paper's λ is 0.1 at lr 8e-4
  over 20 epochs of GLUE, the reference's ξ / lr ≈ 0.4. Why lam < 1 with fast gates: a gate gains
  (1 - lam) gate_lr_t a step while its gradient keeps a sign and loses about lam gate_lr_t while its
  gradient is noise, so the prox is an importance test; with lam > 1 no gate can outrun the prox and
  the gates that die are those that started small; with the gates at the model's lr (travel ≈ 0.08
  against |gate| ≈ 0.8 at init) almost nothing closes in a run of hundreds of steps.
- regime "reference": xi = 3e-4 and l1 = 10, the reference's no-schedule script (scripts/
  run_glue_sora_no_schedule.sh: lambda2 3e-4, lambda 10, lr 8e-4, 20 epochs). Its schedule script
  raises xi in 7 stages; here lam_max raises lam in lam_stages = 7 stages (library regime).
- Gates N(0, 1) as in the reference (gate_init="ones" is the alternative); B = 0 keeps ΔW = 0 at init.

Where this file departs from the paper or the reference code:
- The exact soft threshold. The reference's three masked updates also zero gates that start in (ξ, 2ξ].
- Adam on the gates (as the reference; the paper writes plain SGD), then the prox. In the library
  regime no ℓ1 term in the loss (the reference adds one as well): the prox already is the ℓ1 step.
- Modules whose gates are all zero prune to rank 0: to_lora gives them A' (0, in) and B' (out, 0), whose
  product is the zero matrix; formats that forbid rank 0 (PEFT) must skip them.

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import sora as method
    method.apply(model, method.Config(rmax=16))      # a gate per rank; ranks(model) counts live ones
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total_steps)
    model.train()
    for step in range(1, total_steps + 1):
        loss = task_loss(model, next(batches)) + method.extra_loss(model)
        loss.backward()
        method.after_backward(model, step, total_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        method.after_step(model, opt, step, total_steps)  # the ℓ1 prox on the gates
        sched.step()
        opt.zero_grad()
    method.merge(model)                               # zero ranks cut out, W = W0 + ΔW
"""
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


NAME, TITLE = "sora", "SoRA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("rmax",)  # the Config fields that size the tensors apply() allocates

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    rmax: int = 16  # rank before sparsification; each module ends with its own rank <= rmax
    alpha: float = 32.0  # ΔW is scaled by alpha / rmax (2 at the defaults, like the reference)
    dropout: float = 0.05  # on the adapter's input only
    regime: str = "library"  # "library" (run-length invariant) or "reference" (TsinghuaC3I/SoRA's): see above
    gate_lr_total: float = 4.5  # library: the gates' peak lr times total_steps (0.03 at 150 steps)
    lam: float = 0.5  # library: every step shrinks each gate by xi = gate_lr_t * lam
    lam_max: float | None = None  # library: lam rises in lam_stages equal stages from lam to lam_max; None: lam alone
    lam_stages: int = 7  # stages of that schedule (the reference's: 7)
    xi: float = 3e-4  # reference: every step shrinks each gate by this constant (sparse_lambda_2)
    l1: float = 10.0  # reference: extra_loss = l1 * mean|lora_gate| over all gates (sparse_lambda)
    gate_init: str = "randn"  # "randn" (reference: N(0, 1)) or "ones"
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.rmax <= 0:
            raise ValueError(f"rmax must be positive, got {self.rmax}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if self.regime not in ("library", "reference"):
            raise ValueError(f"regime must be 'library' or 'reference', got {self.regime!r}")
        if not 0 < self.gate_lr_total < math.inf:
            raise ValueError(f"gate_lr_total must be a positive number, got {self.gate_lr_total}")
        if not 0 <= self.lam < math.inf:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        if self.lam_max is not None and not self.lam <= self.lam_max < math.inf:
            raise ValueError(f"lam_max must be finite and >= lam ({self.lam}), got {self.lam_max}")
        if self.lam_max is not None and self.regime == "reference":
            raise ValueError("lam_max schedules lam, which the reference regime does not use (its threshold is xi)")
        if self.lam_stages < 2:
            raise ValueError(f"lam_stages must be at least 2, got {self.lam_stages}")
        for name in ("xi", "l1"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.gate_init not in ("randn", "ones"):
            raise ValueError(f"gate_init must be 'randn' or 'ones', got {self.gate_init!r}")


def soft_threshold(g, xi):
    """The prox of xi * |g|: shrink every entry towards zero by xi, to exactly zero where |g| <= xi."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0)


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


class SoRALinear(nn.Module):
    """Wraps a linear layer and adds (alpha/rmax) B diag(g) A x. Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base: nn.Linear, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.scale = cfg.alpha / cfg.rmax  # fixed by rmax: pruned ranks rescale nothing
        self.p = cfg.dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.rmax, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rmax, device=device))
        init = torch.randn if cfg.gate_init == "randn" else torch.ones
        self.lora_gate = nn.Parameter(init(cfg.rmax, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate_before = None  # the gates as the optimizer step found them (library regime; see after_step)
        self.w0 = None  # a copy of W0 while merged, so unmerge restores it bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def pruned(self):
        """(A', B') of rank = number of nonzero gates, with B' A' = ΔW (the paper's post-pruning)."""
        keep = self.lora_gate != 0
        return self.lora_A[keep], self.scale * self.lora_B[:, keep] * self.lora_gate[keep]  # (r', in), (out, r')

    def delta_weight(self):
        A, B = self.pruned()
        return B @ A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        h = F.linear(x, self.lora_A.to(dt)) * (self.scale * self.lora_gate).to(dt)  # (..., rmax)
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
        replace(model, name, SoRALinear(layer, cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SoRALinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- training hooks -------------------------------------------------------------------------------

def param_groups(model, lr, weight_decay):
    """A and B as in LoRA; the gates in a group of their own at the model's lr (the library regime
    rescales their step in after_step), without weight decay (only the ℓ1 prox)."""
    config(model)
    ls = layers(model).values()
    return [{"params": [p for m in ls for p in (m.lora_A, m.lora_B)], "lr": lr, "weight_decay": weight_decay},
            {"params": [m.lora_gate for m in ls], "lr": lr, "weight_decay": 0.0}]


def extra_loss(model):
    """The reference regime's ℓ1 term, l1 * mean|lora_gate| over all gates; zero in the library regime."""
    cfg = config(model)
    if cfg.regime == "library":
        return torch.zeros((), device=next(model.parameters()).device)
    return cfg.l1 * torch.cat([m.lora_gate for m in layers(model).values()]).abs().mean()


@torch.no_grad()
def after_backward(model, step, total_steps):
    """Keep the gates as they are before the optimizer step: after_step rescales that step."""
    check_step(step, total_steps)
    if config(model).regime == "library":
        for m in layers(model).values():
            m.gate_before = m.lora_gate.detach().clone()


def lam_at(cfg, step, total_steps):
    """The sparsifying schedule: lam in stage 0, rising linearly to lam_max in the last stage."""
    if cfg.lam_max is None:
        return cfg.lam
    stage = min((step - 1) * cfg.lam_stages // total_steps, cfg.lam_stages - 1)
    return cfg.lam + (cfg.lam_max - cfg.lam) * stage / (cfg.lam_stages - 1)


def gate_lr(cfg, group, total_steps):
    """The library regime's gate lr for the step just taken: gate_lr_total / total_steps times the
    schedule's factor, group lr over the lr it started from (initial_lr, which torch's schedulers set;
    without a scheduler the lr is constant)."""
    return cfg.gate_lr_total / total_steps * group["lr"] / group.get("initial_lr", group["lr"])


@torch.no_grad()
def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    """Library regime: rescale the step the optimizer took on every gate to gate_lr_t (the step is
    linear in its lr), then the prox with xi = gate_lr_t * lam. Reference regime: the prox with the
    constant xi. The scheduler steps after this hook, so group["lr"] is still the step's."""
    check_step(step, total_steps)
    cfg, ls = config(model), list(layers(model).values())
    if cfg.regime == "reference":
        for m in ls:
            m.lora_gate.copy_(soft_threshold(m.lora_gate, cfg.xi))
        figures = {"xi": cfg.xi}
    else:
        if any(m.gate_before is None for m in ls):
            raise ValueError("after_step rescales the gates' step from where after_backward saw them: call "
                             "after_backward before the optimizer step, every step (see the Usage block)")
        lam, group_of = lam_at(cfg, step, total_steps), {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for m in ls:
            group = group_of[id(m.lora_gate)]
            lr_t = gate_lr(cfg, group, total_steps)
            ratio = lr_t / group["lr"] if group["lr"] else 0.0  # an lr of 0 moved nothing
            m.lora_gate.copy_(soft_threshold(m.gate_before + (m.lora_gate - m.gate_before) * ratio, lr_t * lam))
            m.gate_before = None
        figures = {"lam": lam, "gate_lr": lr_t}
    live = torch.cat([m.lora_gate for m in ls]).count_nonzero()
    return {"live_rank": int(live), **figures}


def val_loss_steps(model, total_steps):
    """The steps whose after_step calls val_loss (a scoring round's validation passes), in order, so a
    trainer can count them in its ETA: none here."""
    return []


def ranks(model):
    ls = layers(model)
    return dict(zip(ls, torch.stack([m.lora_gate.count_nonzero() for m in ls.values()]).tolist()))


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A', zero ranks pruned (rank 0: shapes (0, in), (out, 0))."""
    return {n: m.pruned() for n, m in layers(model).items()}  # boolean indexing copies: nothing aliases


def can_merge(model):
    """None when the adapter reduces to a LoRA (to_lora) and merge(model) can fold it into this model's
    weights; else the reason it cannot."""
    for n, m in layers(model).items():
        if not m.weight.is_floating_point():
            return f"{n} holds a {m.weight.dtype} weight (a quantised layer), which takes no merge"
    return None


@torch.no_grad()
def merge(model):
    """Fold the pruned ΔW into W0 and put the original layers back: zero inference overhead."""
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
