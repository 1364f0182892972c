"""ALoRA: Allocating Low-Rank Adaptation for Fine-tuning Large Language Models
(Liu, Lyn, Zhu, Tian, Graham; NAACL 2024, arXiv 2403.16187). Not PEFT's "aLoRA", which is
*Activated* LoRA, an unrelated method; this file is *Allocating* LoRA.

The idea: train a LoRA whose ranks each sit behind a fixed 0/1 gate. Every few steps score each live
rank by ablation on a validation batch (AB-LoRA), switch off the n_A least useful ones and give the
same number of new ranks to the modules that lost none, so the total rank budget stays put.

    y = x W0ᵀ + b + scale * ((dropout(x) lora_Aᵀ) ⊙ lora_gate) lora_Bᵀ      scale = alpha / r
    ΔW = scale * (lora_B ⊙ lora_gate) lora_A
    lora_A (rmax, in): Kaiming-uniform; lora_B (out, rmax): zeros; lora_gate (rmax,): 1 for the first r
    IS(rank) = S(M) − S(M∖rank) + S(M_rank),   S = −val_loss()              (paper Eq. 6)
      M∖rank: that rank's gate 0;  M_rank: that rank alone live, in the whole adapter

Algorithm 1 (§3.4): train k1 steps; then `rounds` times: score every live rank, prune the
`prune_per_round` lowest (gate -> 0), hand as many new ranks to the modules that lost none (spread as
evenly as possible, the remainder to the highest mean IS; footnote 3), train k2 steps.
A new rank gets a fresh Kaiming row of lora_A and a zero column of lora_B, so the output does not
jump, and its AdamW state is zeroed.

Hyperparameters (paper §4.3, App. E; LLaMA-2 7B): r = 8 per module (the budget itself, no larger
initial rank), n_A = adapted module types per block (7 there), |B_val| = 32 examples, K1 = 1 epoch,
K2 = 0.25 epoch, N_A <= 8, over at most 10 epochs. LoRA part as PEFT: alpha = 16, dropout = 0.05.

Where this file departs from the paper, and why:
- Fixed slots instead of appending rows: each module owns `rmax` slots (default 2r) and the gate
  says which are live. Parameter shapes never change, so the optimizer state stays tied to the same
  tensors and DDP sees fixed shapes. A module already at rmax cannot receive; if no module that lost
  none has a free slot, the budget shrinks by what could not be placed (as in footnote 4).
- The scale is alpha / r, fixed per module (not alpha / live rank), so adding ranks rescales nothing.
- Steps, not epochs: when not given, k1 = 10% of the steps, k2 = 2.5%, rounds = as many as fit
  before the end, at most 8 (the paper's 1 / 0.25 / 8 over 10 epochs), so any run of 20 steps or
  more holds rounds. prune_per_round defaults to len(targets), the paper's n_A = types per block.
- Scoring where it decides (scoring = "candidates", the default; "exact" scores every live rank as
  the paper does). Only the prune_per_round lowest IS are pruned, so only ranks that can be among
  them need Eq. 6 exactly. A round (1) estimates IS for every live rank to first order in the gates
  from two backwards of the validation loss: one at the live gates (val_loss(M∖r) ≈ val_loss(M) −
  ∂/∂gate_r) and one at all gates 0, the base model (val_loss(M_r) ≈ val_loss(base) + ∂/∂gate_r);
  (2) scores exactly the 2 · prune_per_round lowest estimates; (3) widens: every rank whose
  estimate, less the largest |exact − estimate| seen on a scored rank, is at or below the
  prune_per_round-th lowest exact score is scored too, lowest estimates first, until none is left
  or max_exact ranks are scored. The ranks pruned are the lowest exact scores among those scored,
  so no rank is pruned on an estimate. They equal full exact scoring's whenever the round settles
  before the cap and no unscored rank's estimate errs by more than the worst scored one's (an
  assumption, not a bound: the estimate has no error bound short of scoring everything).
  Why a cap: on a bf16 or fp16 base, Eq. 6's differences of two losses carry the rounding of the
  low-precision forwards, which exceeds the gaps between the lowest scores of many small ranks;
  the estimates, from gradients, carry no such difference, so |exact − estimate| is then mostly
  rounding, and the widening runs on over ranks that only rounding tells apart. A better estimate
  costs more than it saves: the first-order error is ½(∂²/∂gate_r² at M − at the base) + O(3),
  a per-rank curvature the two backwards do not hold; a trapezoid (the gradient also at M∖r and
  at M_r) costs 2 gradient passes a rank, more than Eq. 6's 2 forwards.
  Footnote 3's module means, which only order the modules that receive, use the estimates: exact
  means would need every rank of the leading modules scored, 2 · r forwards each.
- Cost of a round, in forwards F of the validation batch (F grows with its V examples, about in
  proportion), R live ranks, C ranks scored exactly, G a gate-gradient pass (forward keeping
  activations + backward to the gates, a few F): "exact" (1 + 2 R) F; "candidates" 2 G + 2 C F,
  C from 2 · prune_per_round up to max_exact (never below prune_per_round, never above R). Starting
  at 2 · prune_per_round gives the error estimate more than the ranks to be pruned to learn from; each
  rank the widening adds costs 2 F. max_exact's default: the paper's Table 4 spends 1.42x LoRA's
  time, so a run of T steps with N_A rounds may spend 0.42 T / N_A steps a round, C ≤ (0.42 T /
  N_A − 2 G) / 2 F; at the default schedule (T = 150, N_A = 8) with the units measured on the
  default model (F ≈ 0.26 step, G ≈ 2.5 F: docs/bench.md) that is (7.9 − 1.3) / 0.52 ≈ 12.
  Measured units, run ratios and what the paper's own setting (|B_val| = 32, every rank exact)
  would cost here: docs/bench.md. The ablations cannot be batched into fewer calls: val_loss
  returns one number for the whole batch, and on a CPU a forward over k copies of the batch costs
  about k forwards anyway.
- Zeroing a new rank's AdamW moments leaves the tensor's shared step count as it is, so Adam's
  bias correction is already ~1 for those entries: their first updates are somewhat larger than
  a fresh optimizer's would be.
- Every decision depends only on val_loss values (and, scoring "candidates", their gradients) and a
  generator seeded with the step, so DDP processes agree as long as val_loss returns the same on each.

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import alora as method
    method.apply(model, method.Config(r=8))          # ranks pruned and reallocated in rounds
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total_steps)
    def val_loss(grad=False):                        # ALoRA scores ranks on held-out data
        model.eval()                                 # dropout off while scoring
        with torch.set_grad_enabled(grad):           # grad=True: a tensor, for the first-order estimates
            loss = task_loss(model, val_batch)
        model.train()
        return loss if grad else loss.item()
    model.train()
    for step in range(1, total_steps + 1):
        loss = task_loss(model, next(batches)) + method.extra_loss(model)
        loss.backward()
        method.after_backward(model, step, total_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        method.after_step(model, opt, step, total_steps, val_loss=val_loss)
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


NAME, TITLE = "alora", "ALoRA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("rmax",)  # the Config fields that size the tensors apply() allocates (r <= rmax)

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    r: int = 8  # live ranks per module at start: the budget per module
    rmax: int | None = None  # rank slots per module, the most a module can grow to; None -> 2 r
    alpha: float = 16.0  # ΔW is scaled by alpha / r, fixed per module
    dropout: float = 0.05  # on the adapter's input only
    k1: int | None = None  # steps before the first round; None -> 10% of the steps
    k2: int | None = None  # recovery steps between rounds; None -> 2.5% of the steps
    rounds: int | None = None  # N_A, prune/reallocate rounds; None -> as many as fit, at most 8
    prune_per_round: int | None = None  # n_A, ranks pruned (and reallocated) per round;
                                        # None -> one per target name, fewer than the modules
    scoring: str = "candidates"  # "exact": Eq. 6 for every live rank (the paper); "candidates": where it decides
    max_exact: int | None = 12  # "candidates": at most this many ranks scored exactly a round (never fewer than
                                # prune_per_round), uncapped if None; 12 keeps a default run within 1.42x LoRA's time
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if self.rmax is None:
            self.rmax = 2 * self.r
        if self.rmax < self.r:
            raise ValueError(f"rmax must be at least r = {self.r}, got {self.rmax}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("k1", "k2", "prune_per_round"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rounds is not None and self.rounds < 0:
            raise ValueError(f"rounds must be zero or more, got {self.rounds}")
        if self.max_exact is not None and self.max_exact <= 0:
            raise ValueError(f"max_exact must be positive or None, got {self.max_exact}")
        if self.scoring not in ("candidates", "exact"):
            raise ValueError(f"scoring must be 'candidates' or 'exact', got {self.scoring!r}")


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


class ALoRALinear(nn.Module):
    """Wraps a linear layer and adds scale B (gate ⊙ A x). Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.scale = cfg.alpha / cfg.r
        self.p = cfg.dropout
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(cfg.rmax, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rmax, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        gate = (torch.arange(cfg.rmax, device=device) < cfg.r).float()
        self.register_buffer("lora_gate", gate)  # persistent: it says which slots the adapter uses
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def delta_weight(self):
        return self.scale * (self.lora_B * self.lora_gate) @ self.lora_A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        # gating (and scaling) B's columns equals gating A x, and costs (out, rmax) instead of (B, T, rmax)
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        B = (self.lora_B * (self.scale * self.lora_gate)).to(dt)
        return y + F.linear(F.linear(x, self.lora_A.to(dt)), B)

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
    targets = find_targets(model, cfg.targets)
    if cfg.prune_per_round is not None and cfg.prune_per_round >= cfg.r * len(targets):  # the budget is known here
        raise ValueError(f"prune_per_round must be below the total rank, r x modules = {cfg.r * len(targets)} "
                         f"(a round would prune every rank), got {cfg.prune_per_round}")
    for name, layer in targets.items():
        replace(model, name, ALoRALinear(layer, cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ALoRALinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- the round schedule -------------------------------------------------------------------------

def schedule(cfg, total_steps):
    """(k1, k2, rounds) for a run of total_steps; rounds at steps k1, k1 + k2, ..."""
    k1 = cfg.k1 if cfg.k1 is not None else max(1, total_steps // 10)
    k2 = cfg.k2 if cfg.k2 is not None else max(1, total_steps // 40)
    rounds = cfg.rounds if cfg.rounds is not None else min(8, max(0, (total_steps - k1) // k2))
    if rounds and k1 + (rounds - 1) * k2 > total_steps:
        raise ValueError(f"total_steps = {total_steps} is too short for ALoRA's {rounds} rounds (k1 {k1}, "
                         f"k2 {k2}): pass the run's true length, or fewer rounds")
    return k1, k2, rounds


def round_at(cfg, step, total_steps):
    """The 1-based round that ends `step`, or 0 when this step holds none."""
    k1, k2, rounds = schedule(cfg, total_steps)
    k, rest = divmod(step - k1, k2)
    return k + 1 if step >= k1 and rest == 0 and k < rounds else 0


# --- AB-LoRA importance -------------------------------------------------------------------------

def live_slots(mods):
    """[(module name, slot), ...] of every live rank, in module order."""
    return [(name, j) for name, m in mods.items() for j in m.lora_gate.nonzero().flatten().tolist()]


@torch.no_grad()
def exact_scores(mods, val_loss, base, slots):
    """{(name, slot): IS} for `slots` by Eq. 6: IS = S(M) − S(M∖slot) + S(M_slot), S = −val_loss(),
    base = val_loss(M); two calls of val_loss per slot. M∖slot: that rank off, every other on;
    M_slot: that rank alone on, in the whole adapter. The gates are restored afterwards."""
    live = {name: m.lora_gate.clone() for name, m in mods.items()}
    without, alone = {}, {}
    try:
        for name, j in slots:
            mods[name].lora_gate[j] = 0
            without[name, j] = val_loss()  # M∖slot
            mods[name].lora_gate[j] = 1
        for m in mods.values():
            m.lora_gate.zero_()
        for name, j in slots:
            mods[name].lora_gate[j] = 1
            alone[name, j] = val_loss()  # M_slot
            mods[name].lora_gate[j] = 0
    finally:
        for name, m in mods.items():
            m.lora_gate.copy_(live[name])
    return {k: -base + without[k] - alone[k] for k in slots}


@torch.no_grad()
def importance(model, val_loss):
    """(val_loss(M), {(module name, slot): IS}) of every live rank, exactly: 1 + 2 · (live ranks)
    calls of val_loss."""
    mods = layers(model)
    base = val_loss()
    return base, exact_scores(mods, val_loss, base, live_slots(mods))


def gate_grads(mods, val_loss, gates):
    """(val_loss, {name: ∂val_loss/∂lora_gate (rmax,)}) with the gates set to `gates` (name ->
    (rmax,)): one val_loss(grad=True) and one backward to the gates alone, so no parameter's .grad
    changes. The gates are restored afterwards."""
    saved = {name: m.lora_gate for name, m in mods.items()}
    leaves = {name: g.clone().requires_grad_() for name, g in gates.items()}
    try:
        for name, m in mods.items():
            m.lora_gate = leaves[name]  # the buffer, for this one forward and backward
        with torch.enable_grad():
            loss = val_loss(grad=True)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # a layer the loss skips
    finally:
        for name, m in mods.items():
            m.lora_gate = saved[name]
    return loss.item(), {name: torch.zeros_like(gates[name]) if g is None else g.detach()
                         for name, g in zip(leaves, grads)}


def estimates(mods, val_loss):
    """(val_loss(M), {(name, slot): first-order IS}) of every live rank, from two backwards: at the
    live gates, val_loss(M∖slot) ≈ val_loss(M) − g_M[slot]; at all gates 0 (the base model),
    val_loss(M_slot) ≈ val_loss(base) + g_0[slot]; so IS ≈ −g_M − val_loss(base) − g_0."""
    live = {name: m.lora_gate.detach().clone() for name, m in mods.items()}
    base, g_m = gate_grads(mods, val_loss, live)
    empty, g_0 = gate_grads(mods, val_loss, {name: torch.zeros_like(g) for name, g in live.items()})
    est = {(name, j): -float(g_m[name][j]) - empty - float(g_0[name][j]) for name, j in live_slots(mods)}
    # an overflow (fp16) is scored first: its error, infinite, then widens the round to every rank
    return base, {k: v if math.isfinite(v) else -math.inf for k, v in est.items()}


def certified_lowest(mods, val_loss, n_prune, max_exact=None):
    """(val_loss(M), first-order IS of every live rank, exact IS of the ranks scored): scores exactly
    the 2 · n_prune lowest estimates, then every rank whose estimate, less the largest |exact −
    estimate| seen so far, is at or below the n_prune-th lowest exact score, until none is left: a
    rank left unscored can then be among the n_prune lowest only if its estimate errs by more than
    every scored rank's did. max_exact (None: no cap; never below n_prune) stops the widening once
    that many ranks are scored, the lowest estimates first."""
    base, est = estimates(mods, val_loss)
    order = sorted(est, key=lambda k: (est[k], k))
    cap = len(order) if max_exact is None else max(max_exact, n_prune)
    exact, batch = {}, order[:2 * n_prune]
    while batch and len(exact) < cap:
        exact.update(exact_scores(mods, val_loss, base, batch[:cap - len(exact)]))
        err = max(abs(exact[k] - est[k]) for k in exact)
        kth = sorted(exact.values())[min(n_prune, len(exact)) - 1]
        batch = [k for k in order if k not in exact and est[k] - err <= kth]
    return base, est, exact


# --- pruning and reallocation -------------------------------------------------------------------

def spread(n, capacity):
    """n new ranks over modules listed by importance: as even as possible, the remainder to the
    first ones (footnote 3), none beyond a module's free slots. Returns the count per module."""
    counts = [0] * len(capacity)
    while n and any(c < cap for c, cap in zip(counts, capacity)):
        for i, cap in enumerate(capacity):
            if n and counts[i] < cap:
                counts[i] += 1
                n -= 1
    return counts


def reset_state(optimizer, p, index):
    """Zero the optimizer's per-entry state (AdamW: exp_avg, exp_avg_sq) of p[index]."""
    for v in optimizer.state.get(p, {}).values():
        if torch.is_tensor(v) and v.shape == p.shape:
            v[index] = 0


@torch.no_grad()
def grow(m, n, optimizer, generator=None):
    """Turn on n dead slots of m: Kaiming row of A, zero column of B, so the output is unchanged."""
    slots = (m.lora_gate == 0).nonzero().flatten()[:n]
    rows = torch.empty(len(slots), m.in_features)  # fan_in = in, as for the whole lora_A
    nn.init.kaiming_uniform_(rows, a=math.sqrt(5), generator=generator)
    m.lora_A[slots] = rows.to(m.lora_A)
    m.lora_B[:, slots] = 0
    m.lora_gate[slots] = 1
    reset_state(optimizer, m.lora_A, (slots,))
    reset_state(optimizer, m.lora_B, (slice(None), slots))


def allocation_round(model, optimizer, val_loss, n_prune, scoring="exact", generator=None, max_exact=None):
    """Score, prune the n_prune lowest, reallocate to the modules that lost none. scoring "exact":
    every live rank by Eq. 6; "candidates": first-order estimates, confirmed exactly where they
    decide, at most max_exact of them (certified_lowest). Returns (val_loss(M), pruned module names,
    grown module names, ranks scored exactly)."""
    mods = layers(model)
    if scoring == "exact":
        base, exact = importance(model, val_loss)
        means = exact
    else:
        base, means, exact = certified_lowest(mods, val_loss, n_prune, max_exact)
    ranked = sorted((s, name, j) for (name, j), s in exact.items())
    pruned = ranked[:n_prune]
    with torch.no_grad():
        for _, name, j in pruned:
            mods[name].lora_gate[j] = 0
    lost = {name for _, name, _ in pruned}
    per_module = {}
    for (name, _), s in means.items():
        per_module.setdefault(name, []).append(s)
    mean = {name: sum(per_module[name]) / len(per_module[name]) if name in per_module else -math.inf
            for name in mods}
    receivers = sorted((n for n in mods if n not in lost), key=lambda n: -mean[n])
    free = [int((mods[n].lora_gate == 0).sum()) for n in receivers]
    grown = []
    for name, count in zip(receivers, spread(len(pruned), free)):
        if count:
            grow(mods[name], count, optimizer, generator)
            grown += [name] * count
    return base, [name for _, name, _ in pruned], grown, len(exact)


def default_prune(cfg, n_modules):
    """n_A when not given: one rank per target name (q, v -> 2), but fewer than the modules, so a
    round always leaves a module that lost none to take the ranks (where q and v are one module,
    as GPT-2's c_attn, two prunes on a two-module model would shrink the budget: footnote 4)."""
    return min(len(cfg.targets), max(1, n_modules - 1))


# --- training hooks ------------------------------------------------------------------------------

def param_groups(model, lr, weight_decay):
    config(model)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
             "weight_decay": weight_decay}]


def extra_loss(model):
    return torch.zeros((), device=next(model.parameters()).device)


def after_backward(model, step, total_steps):
    check_step(step, total_steps)


def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    """On round steps: one AB-LoRA prune/reallocate round; figures of it. Otherwise {}.

    val_loss: val_loss() returns the validation loss as a float, computed in eval mode (dropout off)
    under torch.no_grad(); val_loss(grad=True) returns the same loss as a tensor with its autograd
    graph (eval mode, gradients on), for one backward. Either leaves the model's mode as it found it.
    A round calls it with the gates changed in between: scoring "exact", 1 + 2 · (live ranks) times;
    "candidates", twice with grad=True and 2 · (ranks scored exactly, at most max_exact) times without."""
    check_step(step, total_steps)
    cfg = config(model)
    k = round_at(cfg, step, total_steps)
    if not k:
        return {}
    if val_loss is None:
        raise ValueError("ALoRA's rounds need val_loss=, a function returning the validation loss (see "
                         "after_step's docstring)")
    n_prune = cfg.prune_per_round or default_prune(cfg, len(layers(model)))
    generator = torch.Generator().manual_seed(step)  # the same choices on every DDP process
    base, pruned, grown, scored = allocation_round(model, optimizer, val_loss, n_prune, cfg.scoring, generator,
                                                   cfg.max_exact)
    r = ranks(model)
    return {"round": k, "scored_val_loss": base, "live_rank": sum(r.values()), "scored": scored, "pruned": pruned,
            "added": grown, "ranks": r}


def val_loss_steps(model, total_steps):
    """The steps whose after_step calls val_loss (a scoring round's validation passes), in order, so a
    trainer can count them in its ETA: the rounds' k1, k1 + k2, ..."""
    k1, k2, rounds = schedule(config(model), total_steps)
    return [k1 + i * k2 for i in range(rounds)]


def ranks(model):
    return {n: int(m.lora_gate.sum()) for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A': the live slots only, the scale folded into B'."""
    out = {}
    for n, m in layers(model).items():
        keep = m.lora_gate.nonzero().flatten()
        out[n] = (m.lora_A[keep].detach().clone(), m.scale * m.lora_B[:, keep].detach())
    return out


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
