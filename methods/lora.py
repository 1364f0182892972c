"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

The idea: freeze the pretrained weight W0 and learn its update as a product of two thin matrices,
so a layer trains r * (in + out) numbers instead of in * out. Because the update is a plain
matrix, it folds into W0 after training and inference costs nothing extra.

    y = x W0ᵀ + b + (alpha / r) * dropout(x) lora_Aᵀ lora_Bᵀ        ΔW = (alpha / r) lora_B lora_A
    lora_A (r, in): Kaiming-uniform (a=√5, nn.Linear's default);  lora_B (out, r): zeros -> ΔW = 0

Hyperparameters (paper / loralib / the SARA paper's LoRA baseline): r = 8, alpha = 16,
dropout = 0.05, targets = the q and v projections.

Usage:
    cfg = Config(r=8); apply(model, cfg)           # wraps model's q/v nn.Linear layers, freezes the rest
    ... train: loss = task_loss + extra_loss(model); after_backward(...); opt.step(); after_step(...)
    merge(model)                                   # plain nn.Linear layers again, W = W0 + ΔW
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    r: int = 8  # rank of the update
    alpha: float = 16.0  # ΔW is scaled by alpha / r, so changing r keeps the update's size
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def dropout(x, p, training):
    """nn.Dropout's output, but what backward keeps of it is a bool mask (1 byte an entry) where
    nn.Dropout keeps its float noise (4 bytes): ~100 MB less per step at batch 8 x 128 tokens on the
    default model (bench.py), and the uniform draw is cheaper than a Bernoulli one on a CPU."""
    if not training or p == 0:
        return x
    return x * (torch.rand_like(x) >= p) / (1 - p)


class LoRALinear(nn.Linear):
    """An nn.Linear that shares the wrapped layer's weight and bias and adds (alpha/r) B A x."""

    def __init__(self, base: nn.Linear, r, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: base keys unchanged
        self.scale = alpha / r
        self.p = dropout
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.w0 = None  # a copy of W0 while merged, so unmerge restores it bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        h = F.linear(dropout(x, self.p, self.training), self.lora_A) * self.scale  # (..., r): scale r numbers, not out
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
        replace(model, name, LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# --- training hooks: LoRA needs none of them, but every method defines them --------------------

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
    return {n: m.lora_A.shape[0] for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A' (the scale folded into B')."""
    return {n: (m.lora_A.detach().clone(), m.scale * m.lora_B.detach()) for n, m in layers(model).items()}


@torch.no_grad()
def merge(model):
    """Fold ΔW into W0 and put plain nn.Linear layers back: zero inference overhead."""
    for name, m in layers(model).items():
        m.merge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device)
        plain.weight, plain.bias = m.weight, m.bias
        replace(model, name, plain)
    return model
