"""SoRA: Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al. 2023, arXiv 2311.11696).

The idea: start from a LoRA of a generous rank rmax with a gate vector between the two projections,
and train the gate with an ℓ1 proximal step, so whole ranks reach exactly zero. After training the
zero ranks are cut out and each module is a plain LoRA of its own, smaller rank.

    y = x W0ᵀ + b + (alpha / rmax) * ((dropout(x) lora_Aᵀ) ⊙ lora_gate) lora_Bᵀ
    ΔW = (alpha / rmax) lora_B diag(lora_gate) lora_A
    lora_A (rmax, in): Kaiming-uniform;  lora_B (out, rmax): zeros -> ΔW = 0;  lora_gate (rmax,): N(0, 1)
    after every optimizer step:  lora_gate <- soft_threshold(lora_gate, xi),  xi = lr * lam
    soft_threshold(g, xi) = sign(g) * max(|g| - xi, 0)       (the prox of xi * |g|)
    post-pruning: keep = lora_gate != 0;  A' = lora_A[keep],  B' = (alpha / rmax) lora_B[:, keep] diag(lora_gate[keep])

Hyperparameters. Paper (GLUE, DeBERTaV3-base): rmax = 8, lr 8e-4, λ = 0.1, 20 epochs. Reference code
(TsinghuaC3I/SoRA): lora alpha 16 with r = 8 (scale 2), gates N(0, 1) trained by Adam at the main lr, a
constant threshold ξ = 3e-4 per step at lr 8e-4 (ξ / lr ≈ 0.4) over tens of thousands of steps; its staged
schedule raises ξ from 0 to 7e-4 in 7 stages.

Where this file departs from the paper or the reference code, and why:
- ξ = lr * lam with lr the gate group's learning rate for the step just taken (the paper's η_t · λ); the
  reference subtracts a constant ξ.
- The exact soft threshold. The reference's three masked updates also zero gates that start in (ξ, 2ξ].
- Adam on the gates (as the reference; the paper writes plain SGD), then the prox. No ℓ1 term in the
  loss (the reference adds one as well): the prox already is the ℓ1 step.
- lam = 2 by default, not the reference's ≈ 0.4. An Adam step moves a gate by at most about lr, so over
  a run a gate travels at most Σ lr ≈ lr * steps / 2 (warmup + cosine): 0.03 to 0.3 for a few hundred
  steps at lr 2e-4 to 1e-3, against |gate| ≈ 0.7 at init. With lam < 1 (the reference's regime, where a
  gate lives while its Adam update beats lr * lam, and dead gates can revive) almost nothing reaches
  zero that soon. With lam > 1 no dead gate revives and every gate shrinks by (lam - 1) * lr to
  (lam + 1) * lr per step, so the gates that die are those that start within (lam ∓ 1) * Σ lr of zero:
  at lam = 2 a few % (lr 2e-4, 300 steps) to a quarter or more (lr 1e-3, 600 steps), the weakest ranks
  first. The price: sparsity keeps growing with the run; for thousands of steps use lam < 1.
- alpha = 32 so the scale alpha / rmax is 2 at the default rmax = 16: the reference's scale (16 / 8) and
  this library's LoRA default (16 / 8). The scale stays alpha / rmax after pruning.
- Gates N(0, 1) as in the reference (gate_init="ones" is the alternative): the spread of |gate| is what
  lets a short run prune the weakest ranks first. B = 0 keeps ΔW = 0 at init either way.
- Modules whose gates are all zero prune to rank 0: to_lora gives them A' (0, in) and B' (out, 0), whose
  product is the zero matrix; formats that forbid rank 0 (PEFT) must skip them.

Usage:
    cfg = Config(rmax=16, lam=2.0); apply(model, cfg)
    opt = torch.optim.AdamW(param_groups(model, lr, weight_decay))     # gates: no weight decay
    ... loss.backward(); opt.step(); after_step(model, opt, step, total_steps)   # the prox
    ranks(model); to_lora(model); merge(model)     # live rank per module; plain LoRA; folded into W0
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    rmax: int = 16  # rank before sparsification; each module ends with its own rank <= rmax
    alpha: float = 32.0  # ΔW is scaled by alpha / rmax (2 at the defaults, like the reference)
    dropout: float = 0.05  # on the adapter's input only
    lam: float = 2.0  # ℓ1 strength: every step shrinks each gate by xi = lr * lam (> 1: see above)
    lam_max: float | None = None  # if set, lam rises in lam_stages equal stages from lam to lam_max
    lam_stages: int = 7  # stages of the sparsifying schedule (the reference: 7)
    gate_init: str = "randn"  # "randn" (reference: N(0, 1)) or "ones"
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.rmax <= 0:
            raise ValueError(f"rmax must be positive, got {self.rmax}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.lam < math.inf:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        if self.lam_max is not None and not self.lam <= self.lam_max < math.inf:
            raise ValueError(f"lam_max must be finite and >= lam ({self.lam}), got {self.lam_max}")
        if self.lam_stages < 2:
            raise ValueError(f"lam_stages must be at least 2, got {self.lam_stages}")
        if self.gate_init not in ("randn", "ones"):
            raise ValueError(f"gate_init must be 'randn' or 'ones', got {self.gate_init!r}")


def soft_threshold(g, xi):
    """The prox of xi * |g|: shrink every entry towards zero by xi, to exactly zero where |g| <= xi."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0)


def dropout(x, p, training):
    """nn.Dropout's output, but what backward keeps of it is a bool mask (1 byte an entry) where
    nn.Dropout keeps its float noise (4 bytes): ~100 MB less per step at batch 8 x 128 tokens on the
    default model (bench.py), and the uniform draw is cheaper than a Bernoulli one on a CPU."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) / (1 - p)


class SoRALinear(nn.Linear):
    """An nn.Linear that shares the wrapped layer's weight and bias and adds (alpha/rmax) B diag(g) A x."""

    def __init__(self, base: nn.Linear, cfg: Config):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: base keys unchanged
        self.cfg = cfg  # after_step reads the lam schedule here
        self.scale = cfg.alpha / cfg.rmax  # fixed by rmax: pruned ranks rescale nothing
        self.p = cfg.dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.rmax, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rmax, device=device))
        init = torch.randn if cfg.gate_init == "randn" else torch.ones
        self.lora_gate = nn.Parameter(init(cfg.rmax, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.w0 = None  # a copy of W0 while merged, so unmerge restores it bit for bit

    def pruned(self):
        """(A', B') of rank = number of nonzero gates, with B' A' = ΔW (the paper's post-pruning)."""
        keep = self.lora_gate != 0
        return self.lora_A[keep], self.scale * self.lora_B[:, keep] * self.lora_gate[keep]  # (r', in), (out, r')

    def delta_weight(self):
        A, B = self.pruned()
        return B @ A  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        h = F.linear(dropout(x, self.p, self.training), self.lora_A) * (self.scale * self.lora_gate)  # (..., rmax)
        return y + F.linear(h, self.lora_B)

    @torch.no_grad()
    def merge(self):
        if self.w0 is None:
            self.w0 = self.weight.detach().clone()
            self.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge(self):
        if self.w0 is not None:
            self.weight.copy_(self.w0)
            self.w0 = None


def find_targets(model, targets):
    """Module name -> nn.Linear for the layers `targets` names.

    A model may map logical names to module-name suffixes in a TARGETS dict (ours do); any other
    model can be given the suffixes themselves, e.g. ("self_attn.q_proj", "self_attn.v_proj").
    """
    table = getattr(model, "TARGETS", {})
    suffixes = tuple("." + table.get(t, t) for t in targets)
    found = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and ("." + n).endswith(suffixes)}
    if not found:
        raise ValueError(f"no nn.Linear layer matches targets {list(targets)}")
    return found


def replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def apply(model, cfg: Config):
    """Wrap every target layer in place and freeze everything but the adapter tensors."""
    for name, linear in find_targets(model, cfg.targets).items():
        replace(model, name, SoRALinear(linear, cfg).train(linear.training))  # a model in eval mode stays so
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SoRALinear)}


# --- training hooks -------------------------------------------------------------------------------

def param_groups(model, lr, weight_decay):
    """A and B as in LoRA; the gates in a group of their own without weight decay (only the ℓ1 prox)."""
    ls = layers(model).values()
    return [{"params": [p for m in ls for p in (m.lora_A, m.lora_B)], "lr": lr, "weight_decay": weight_decay},
            {"params": [m.lora_gate for m in ls], "lr": lr, "weight_decay": 0.0}]


def extra_loss(model):
    return torch.zeros((), device=next(model.parameters()).device)


def after_backward(model, step, total_steps):
    pass


def lam_at(cfg, step, total_steps):
    """The sparsifying schedule: lam in stage 0, rising linearly to lam_max in the last stage."""
    if cfg.lam_max is None:
        return cfg.lam
    stage = min((step - 1) * cfg.lam_stages // total_steps, cfg.lam_stages - 1)
    return cfg.lam + (cfg.lam_max - cfg.lam) * stage / (cfg.lam_stages - 1)


@torch.no_grad()
def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    """The proximal step on every gate, xi = lr * lam with the lr its group's step just used."""
    ls = list(layers(model).values())
    lam = lam_at(ls[0].cfg, step, total_steps)
    gates = {id(m.lora_gate) for m in ls}
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in gates]
        if not mine:
            continue
        # train.py steps the lr scheduler before this hook, so group["lr"] is already the next step's;
        # keep it for the next call (the first call, with nothing kept, uses it as is: a warmup step
        # early). Read as is on every step, a cosine decay to 0 would give xi = 0 on the last step and
        # let every dead gate revive by a hair. The key rides along in the optimizer's state_dict.
        xi = group.get("prox_lr", group["lr"]) * lam
        group["prox_lr"] = group["lr"]
        for p in mine:
            p.copy_(soft_threshold(p, xi))
    live = torch.cat([m.lora_gate for m in ls]).count_nonzero()
    return {"live_rank": int(live), "lam": lam}


def ranks(model):
    ls = layers(model)
    return dict(zip(ls, torch.stack([m.lora_gate.count_nonzero() for m in ls.values()]).tolist()))


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A', zero ranks pruned (rank 0: shapes (0, in), (out, 0))."""
    return {n: m.pruned() for n, m in layers(model).items()}  # boolean indexing copies: nothing aliases


@torch.no_grad()
def merge(model):
    """Fold the pruned ΔW into W0 and put plain nn.Linear layers back: zero inference overhead."""
    for name, m in layers(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
        plain.weight, plain.bias = m.weight, m.bias
        replace(model, name, plain)
    return model
