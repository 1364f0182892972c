"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang, Chen, Bukharin,
Karampatziakis, He, Cheng, Chen, Zhao; ICLR 2023, arXiv 2303.10512).

The idea: write each update in SVD form, P Λ Q, so that a rank is one triplet (a column of P, a
singular value, a row of Q) and can be switched off by zeroing its singular value alone. Start every
module at init_r triplets; during training, score each triplet by a smoothed weight x gradient
sensitivity and shrink the total rank over all modules to target_r per module on a cubic schedule,
so the important modules keep more ranks than the others.

    y = x W0ᵀ + b + scale * ((dropout(x) lora_Aᵀ) ⊙ lora_Eᵀ) lora_Bᵀ      scale = alpha / init_r
    ΔW = scale * lora_B diag(lora_E) lora_A;  lora_A (r, in) = Q, lora_E (r, 1) = Λ, lora_B (out, r) = P
    init: lora_A, lora_B ~ N(0, 0.02²), lora_E = 0 -> ΔW = 0 (peft's init)
    extra_loss = orth_reg_weight * mean over all lora_A, lora_B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F
    per entry w of A, E, B:  I = |w ∂L/∂w|;  i_bar ← β1 i_bar + (1−β1) I;  u_bar ← β2 u_bar + (1−β2) |I − i_bar|
    triplet score S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk),  s = i_bar * u_bar
    budget b(t): init_r*n for t ≤ tinit; target_r*n for t ≥ T − tfinal;
                 else int(target + (init − target) (1 − (t − tinit)/(T − tfinal − tinit))³)
    masking: keep the b highest-scoring triplets over all modules, zero the others' lora_E.

Hyperparameters (peft's AdaLoraConfig): init_r = 12, target_r = 8, delta_t = 1,
beta1 = beta2 = 0.85; orth_reg_weight = 0.1 (the authors' code; peft's default is 0.5). alpha = 32
(peft's example and most of the authors' GLUE scripts; 16 in the others); dropout = 0.05 as this
library's LoRA.
tinit = 0.1 and tfinal = 0.3 of the run's steps: peft's example uses 200 and 1000 of ~3900 steps
(5% / 26%), the authors' README 500 and 1500 of 3000 (17% / 50%), their GLUE scripts ~10–15% / ~50%;
10% / 30% sits between them and leaves 60% of the run for the budget to fall.

Run-length rule: the budget's phases are fractions of the run (tinit, tfinal; steps = fraction *
total_steps, rounded), so the same Config falls on the same curve at any length. Two settings stay
per step, because what they measure is per step: delta_t (an allocation every delta_t steps; at the
default 1, every step, at any length) and beta1 / beta2 (the EMAs smooth one step's noisy
sensitivity over the last ~1 / (1 - beta) steps, the paper's and peft's 0.85).

Where this file departs from the paper or peft (huggingface/peft src/peft/tuners/adalora):
- scale = alpha / init_r; peft divides by ranknum + 1e-5 (ranknum = init_r, never updated). The
  epsilon only guards a zero rank, which Config forbids; the relative difference is 1e-6 / init_r.
- Scoring happens in after_backward, before the optimizer step (the paper's Algorithm 1): I = |w ∇w|
  is then the first-order loss change of removing w at the very point where ∇w was taken. peft (and
  the authors' code) score after optimizer.step, pairing the updated w with the old gradient. The
  gradient is the raw one (train.py clips after this hook); clipping rescales a whole step's entries
  by one factor, so it changes only how much each step weighs in the EMAs, not a step's ranking.
- Steps are 1-based (train.py's `step`, the number of optimizer steps done); peft's global_step is
  0-based, so every phase boundary here sits one step later: immaterial.
- The mask keeps exactly b triplets: a stable sort breaks ties by position (the earlier module, then
  the lower triplet index, wins). peft zeroes every triplet with S ≤ the k-th smallest score, so ties
  can prune more than asked, and k = init − target = 0 crashes its kthvalue. Here init_r == target_r
  is allowed and simply masks nothing (AdaLoRA's SVD form with a fixed rank).
- The EMAs are updated while t ≤ T − tfinal, so the forced mask at t = T − tfinal uses that step's
  gradient too; after it the pattern is fixed and only re-applied (peft: the same, via rank_pattern).
- The mask is also kept as a bool buffer lora_mask (r,), saved with the adapter, so ranks(), to_lora
  and merge know the live triplets even where a live lora_E happens to be 0 (all of them at init).
- Masking zeroes lora_E, as peft does; the forward does not multiply by the mask. A masked E_k still
  gets a gradient (∂L/∂E_k does not depend on E_k), so AdamW moves it again before the next masking
  and the triplet can revive at the next allocation: that is AdaLoRA's design, kept. From
  t = T − tfinal on, the fixed mask is re-applied after every step, and the last step always masks,
  so the trained adapter holds exact zeros there. to_lora and merge use E ⊙ lora_mask: exact after
  any masking step, which includes the end of training.
- orth_reg_weight = 0 turns the regulariser off (peft refuses 0).
- lora_E trains at e_lr_scale = 10 times the lr of lora_A and lora_B (its own optimizer group; the
  paper and peft use one lr). With E = 0 and A, B ~ N(0, 0.02²) the update starts as a product of
  three small factors, so at one lr it grows cubically slowly, and the orthogonality penalty keeps
  A's and B's Adam moments busy with the penalty's gradient. Set with planted.py at 150 steps, with
  orth_reg_weight 0.1 (docs/methods.md has the figures).

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import adalora as method
    method.apply(model, method.Config(init_r=12, target_r=8))  # the budget falls from 12 to 8 per module
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total_steps)
    model.train()
    for step in range(1, total_steps + 1):
        loss = task_loss(model, next(batches)) + method.extra_loss(model)
        loss.backward()
        method.after_backward(model, step, total_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        method.after_step(model, opt, step, total_steps)  # masks to the budget
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


NAME, TITLE = "adalora", "AdaLoRA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("init_r",)  # the Config fields that size the tensors apply() allocates

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    init_r: int = 12  # triplets per module at the start
    target_r: int = 8  # average triplets per module at the end: the total budget is target_r * modules
    tinit: float = 0.1  # share of the steps at the full budget first, no masking
    tfinal: float = 0.3  # share of the steps at the target budget last, pattern fixed
    delta_t: int = 1  # steps between two allocations while the budget falls
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.1  # weight of the orthogonality loss on lora_A, lora_B (the authors' code)
    e_lr_scale: float = 10.0  # lora_E's learning rate over that of lora_A and lora_B (see above)
    alpha: float = 32.0  # ΔW is scaled by alpha / init_r, fixed while ranks are masked
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.target_r < 1:
            raise ValueError(f"target_r must be positive, got {self.target_r}")
        if self.init_r < self.target_r:
            raise ValueError(f"init_r must be at least target_r, got init_r={self.init_r} < target_r={self.target_r}")
        if not (0 <= self.tinit and 0 <= self.tfinal and self.tinit + self.tfinal < 1):
            raise ValueError(f"tinit and tfinal are shares of the run, >= 0 and summing below 1, got {self.tinit} "
                             f"and {self.tfinal}")
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be positive, got {self.delta_t}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0 <= self.orth_reg_weight < math.inf:
            raise ValueError(f"orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 < self.e_lr_scale < math.inf:
            raise ValueError(f"e_lr_scale must be a positive number, got {self.e_lr_scale}")
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


class SVDLinear(nn.Module):
    """Wraps a linear layer and adds scale * P diag(Λ) Q x. Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.scale = cfg.alpha / cfg.init_r
        self.p = cfg.dropout
        r, dev = cfg.init_r, base.weight.device
        self.lora_A = nn.Parameter(0.02 * torch.randn(r, self.in_features, device=dev))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.lora_B = nn.Parameter(0.02 * torch.randn(self.out_features, r, device=dev))
        self.register_buffer("lora_mask", torch.ones(r, dtype=torch.bool, device=dev))  # live triplets
        for f in "AEB":  # training-only state: smoothed sensitivity and uncertainty per entry
            shape = getattr(self, "lora_" + f).shape
            self.register_buffer("i_bar_" + f, torch.zeros(shape, device=dev), persistent=False)
            self.register_buffer("u_bar_" + f, torch.zeros(shape, device=dev), persistent=False)
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def live_factors(self):
        """(A', B') over the live triplets, ΔW = B' A'."""
        keep = self.lora_mask
        return (self.lora_A * self.lora_E)[keep], self.scale * self.lora_B[:, keep]  # (k, in), (out, k)

    def delta_weight(self):
        A, B = self.live_factors()
        return B @ A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        h = F.linear(x, self.lora_A.to(dt)) * (self.scale * self.lora_E[:, 0]).to(dt)  # (..., r)
        return y + F.linear(h, self.lora_B.to(dt))

    @torch.no_grad()
    def update_importance(self):
        """Fold this step's sensitivity |w ∂L/∂w| into the EMAs (grads must be present)."""
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for f in "AEB":
            p = getattr(self, "lora_" + f)
            if p.grad is None:
                raise ValueError("AdaLoRA's after_backward needs the gradients: call it after loss.backward() "
                                 "and before optimizer.zero_grad()")
            i_bar, u_bar = getattr(self, "i_bar_" + f), getattr(self, "u_bar_" + f)
            ipt = (p * p.grad).abs_()
            i_bar.lerp_(ipt, 1 - b1)  # β1 i_bar + (1 − β1) ipt
            u_bar.lerp_((ipt - i_bar).abs_(), 1 - b2)  # against the fresh i_bar, as peft

    def triplet_scores(self):
        """S_k = s(E_k) + mean_j s(A_kj) + mean_j s(B_jk), s = i_bar * u_bar.  (r,)"""
        s_A, s_E, s_B = (getattr(self, "i_bar_" + f) * getattr(self, "u_bar_" + f) for f in "AEB")
        return s_E[:, 0] + s_A.mean(1) + s_B.mean(0)

    @torch.no_grad()
    def set_mask(self, keep):
        self.lora_mask.copy_(keep)
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self):
        self.lora_E.masked_fill_(~self.lora_mask[:, None], 0.0)

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
        replace(model, name, SVDLinear(layer, cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- the budget schedule: pure functions of the step ---------------------------------------------

def phases(cfg, total_steps):
    """(tinit, tfinal) in steps for a run of total_steps: the Config's shares of it, rounded."""
    tinit, tfinal = (int(f * total_steps + 0.5) for f in (cfg.tinit, cfg.tfinal))
    if tinit + tfinal >= total_steps:
        raise ValueError(f"total_steps = {total_steps} leaves no steps for AdaLoRA's budget to fall (tinit {tinit} + "
                         f"tfinal {tfinal} >= it): pass the run's true length, or smaller tinit / tfinal")
    return tinit, tfinal


def budget(step, total_steps, cfg, n_modules):
    """Total live triplets allowed after optimizer step `step` (1-based): cubic fall from init to target."""
    tinit, tfinal = phases(cfg, total_steps)
    b0, b_T = cfg.init_r * n_modules, cfg.target_r * n_modules
    if step <= tinit:
        return b0
    if step >= total_steps - tfinal:
        return b_T
    progress = (step - tinit) / (total_steps - tfinal - tinit)
    return int(b_T + (b0 - b_T) * (1 - progress) ** 3)


def top_budget(scores, b):
    """Bool mask keeping exactly the b highest scores; ties go to the lower index (a stable sort)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[scores.argsort(descending=True, stable=True)[:b]] = True
    return keep


# --- training hooks ------------------------------------------------------------------------------

def param_groups(model, lr, weight_decay):
    """lora_A and lora_B at lr; the singular values lora_E in a group of their own at e_lr_scale * lr."""
    cfg, ls = config(model), layers(model).values()
    return [{"params": [p for m in ls for p in (m.lora_A, m.lora_B)], "lr": lr, "weight_decay": weight_decay},
            {"params": [m.lora_E for m in ls], "lr": cfg.e_lr_scale * lr, "weight_decay": weight_decay}]


def orth_loss(m):
    """‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F: zero iff A has orthonormal rows and B orthonormal columns."""
    eye = torch.eye(m.lora_A.shape[0], dtype=m.lora_A.dtype, device=m.lora_A.device)
    return (torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - eye)
            + torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - eye))


def extra_loss(model):
    mods = list(layers(model).values())
    weight = config(model).orth_reg_weight
    if weight == 0:
        return torch.zeros((), device=next(model.parameters()).device)
    return weight * sum(orth_loss(m) for m in mods) / (2 * len(mods))  # mean over the A's and B's


def after_backward(model, step, total_steps):
    """Update the sensitivity EMAs while the scores can still change the mask (t ≤ T − tfinal)."""
    check_step(step, total_steps)
    mods = list(layers(model).values())
    _, tfinal = phases(config(model), total_steps)
    if step <= total_steps - tfinal:
        for m in mods:
            m.update_importance()


@torch.no_grad()
def mask_to_budget(mods, b):
    """Keep the b best triplets over all modules; zero lora_E of the others."""
    keep = top_budget(torch.cat([m.triplet_scores() for m in mods]), b)  # (n_modules * init_r,)
    for m, k in zip(mods, keep.split(mods[0].lora_E.shape[0])):  # init_r triplets each
        m.set_mask(k)


def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    """Mask to the budget every delta_t steps while it falls, at T − tfinal, and re-apply the fixed
    pattern after every later step. Returns {"budget": b(step), "live_rank": live triplets}."""
    check_step(step, total_steps)
    mods, cfg = list(layers(model).values()), config(model)
    tinit, tfinal = phases(cfg, total_steps)
    b = budget(step, total_steps, cfg, len(mods))
    if step > total_steps - tfinal:
        for m in mods:
            m.apply_mask()
    elif step == total_steps - tfinal or (step > tinit and step % cfg.delta_t == 0):
        mask_to_budget(mods, b)
    return {"budget": b, "live_rank": int(sum(m.lora_mask.sum() for m in mods))}


def val_loss_steps(model, total_steps):
    """The steps whose after_step calls val_loss (a scoring round's validation passes), in order, so a
    trainer can count them in its ETA: none here."""
    return []


def ranks(model):
    """Module name -> live triplets (the rank pattern)."""
    return {n: int(m.lora_mask.sum()) for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A' over the live triplets: A' = (A ⊙ E)[keep],
    B' = scale * B[:, keep]. A module masked to rank 0 gives (0, in) and (out, 0) factors."""
    return {n: tuple(t.detach().clone() for t in m.live_factors()) for n, m in layers(model).items()}


def can_merge(model):
    """None when the adapter reduces to a LoRA (to_lora) and merge(model) can fold it into this model's
    weights; else the reason it cannot."""
    for n, m in layers(model).items():
        if not m.weight.is_floating_point():
            return f"{n} holds a {m.weight.dtype} weight (a quantised layer), which takes no merge"
    return None


@torch.no_grad()
def merge(model):
    """Fold ΔW (live triplets) into W0 and put the original layers back: zero inference overhead."""
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
