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
(SmolLM2-135M, q and v: 460,889 trainable numbers against LoRA r=8's 460,800).

Where this file departs from the paper (METHODS.md decisions):
- Algorithm 1 as printed compares the running sum with `threshold` instead of `threshold * total`;
  we use the target, and count the prefix that *reaches* it, so k >= 1 always. Singular values
  below the numerical-rank tolerance (as torch.linalg.matrix_rank) count as zero, so k never
  exceeds the numerical rank and threshold = 1 gives exactly that rank. A zero matrix raises.
- Init. The paper says the truncated matrix is "randomly initialized" (Kaiming-uniform), which
  read literally makes ΔW != 0 at the start (init="paper"). Default init="lambda0": lora_U and
  lora_V Kaiming-uniform, lora_lam = 0, so ΔW = 0 and the first gradient reaches lora_lam
  (∂L/∂lam_r = u_rᵀ G v_r). init="v0" is the paper's "V=0" ablation (Table 4): a zero
  up-projection and a random lora_lam. The paper writes h = x W, so its V is the output side,
  which is lora_U here. Zeroing the up-projection *and* lora_lam is refused: no factor could ever
  get a gradient.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("lambda0", "v0", "paper")


@dataclass
class Config:
    threshold: float = 0.0615  # share of the singular-value sum that sets each layer's rank k
    init: str = "lambda0"  # lambda0: lam = 0 (ΔW = 0); v0: up-projection lora_U = 0; paper: all random
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
    """nn.Dropout's output, but what backward keeps of it is a bool mask (1 byte an entry) where
    nn.Dropout keeps its float noise (4 bytes): ~100 MB less per step at batch 8 x 128 tokens on the
    default model (bench.py), and the uniform draw is cheaper than a Bernoulli one on a CPU."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) / (1 - p)


class SARALinear(nn.Linear):
    """An nn.Linear that shares the wrapped layer's weight and bias and adds U diag(lam) V x."""

    def __init__(self, base: nn.Linear, k, init, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: base keys unchanged
        self.p = dropout
        self.train(base.training)  # wrapping does not change the model's train/eval mode
        dev = base.weight.device
        self.lora_U = nn.Parameter(torch.empty(self.out_features, k, device=dev))  # up-projection
        self.lora_lam = nn.Parameter(torch.empty(k, device=dev))  # the trainable singular values
        self.lora_V = nn.Parameter(torch.empty(k, self.in_features, device=dev))  # down-projection
        nn.init.kaiming_uniform_(self.lora_U, a=math.sqrt(5))  # U(±1/√k), nn.Linear(k, out)'s init
        nn.init.kaiming_uniform_(self.lora_V, a=math.sqrt(5))  # U(±1/√in), LoRA's A
        nn.init.uniform_(self.lora_lam, -1, 1)  # Kaiming-uniform (a=√5) of a (k, 1) column: fan_in 1
        if init == "lambda0":
            nn.init.zeros_(self.lora_lam)
        elif init == "v0":
            nn.init.zeros_(self.lora_U)
        self.w0 = None  # a copy of W0 while merged, so unmerge restores it bit for bit

    def delta_weight(self):
        return self.lora_U @ (self.lora_lam[:, None] * self.lora_V)  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        return y + F.linear(F.linear(dropout(x, self.p, self.training), self.lora_V) * self.lora_lam, self.lora_U)

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
    """Give every target layer its own rank k from W0's spectrum, wrap it, freeze all but adapters."""
    for name, linear in find_targets(model, cfg.targets).items():
        k = rank_for(linear.weight, cfg.threshold)
        replace(model, name, SARALinear(linear, k, cfg.init, cfg.dropout))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SARALinear)}


# --- training hooks: k is fixed at init, so SARA needs none of them -----------------------------

def param_groups(model, lr, weight_decay):
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay}]


def extra_loss(model):
    return torch.zeros((), device=next(model.parameters()).device)


def after_backward(model, step, total_steps):
    pass


def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    return {}


def ranks(model):
    """Module name -> k, the rank Algorithm 1 chose for it."""
    return {n: m.lora_lam.shape[0] for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') = (diag(lam) V, U), so ΔW = B' A'."""
    return {n: (m.lora_lam[:, None] * m.lora_V, m.lora_U.detach().clone()) for n, m in layers(model).items()}


@torch.no_grad()
def merge(model):
    """Fold ΔW into W0 and put plain nn.Linear layers back: zero inference overhead."""
    for name, m in layers(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
        plain.weight, plain.bias = m.weight, m.bias
        replace(model, name, plain)
    return model
