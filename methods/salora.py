"""SaLoRA: Structure-Aware Low-Rank Adaptation for Parameter-Efficient Fine-Tuning
(Hu, Zhang, Liu, Wang, Jiang, Zhang, Zhou and Zhang 2023, Mathematics 11(20):4317; no arXiv id).

The idea: give every rank of a LoRA update a Hard-Concrete gate g_j in [0, 1] and learn the gates'
parameters log α with an expected-L0 cost, so ranks that do not pay for themselves close; a
Lagrange multiplier λ steers the expected density of the adapter to a target b.

    y = x W0ᵀ + b + scale * ((dropout(x) lora_Aᵀ) * g) lora_Bᵀ        ΔW = scale lora_B diag(g) lora_A
    train: u ~ U(0, 1) once per forward (one mask shared by the batch's examples),
           g = clamp(sigmoid((log u - log(1 - u) + lora_logalpha) / tau) * (ZETA - GAMMA) + GAMMA, 0, 1)
    eval:  g = clamp(sigmoid(lora_logalpha) * (ZETA - GAMMA) + GAMMA, 0, 1)         (deterministic)
    E‖g‖0 = Σ_j sigmoid(lora_logalpha_j - tau log(-GAMMA / ZETA))                         [eq. 8]
    density C = Σ_i E‖g_i‖0 (out_i + in_i) / Σ_i rmax (out_i + in_i)                      [eq. 11]
    loss = task + beta Σ_i (‖BᵢᵀBᵢ - I‖²_F + ‖AᵢAᵢᵀ - I‖²_F) + lam (C - target_density)²   [eq. 9, 12]
    lam <- max(0, lam + (lagrangian_lr_total / total_steps) (C - target_density)²)    (projected ascent)
    lora_logalpha and lam train only in the window t_start T < step <= t_end T; frozen outside it.
    at step t_end T the gates harden: the ranks most likely open (P(g > 0) >= 1/2), highest log α first,
    as far as their parameters fit in target_density of the adapter's, set log α = +HARD (g = 1), the
    others -HARD (g = 0); from then on every gate is exactly 0 or 1, in training as in eval.

Run-length rule: every quantity is a fraction of the run or a total over it, so one Config means the
same at 150 steps and at 3,000. The window is t_start and t_end times total_steps. log α moves at
gate_lr_t = (gate_lr_total / total_steps) s_t, s_t the run's schedule (the model's lr over its peak):
an Adam step moves a parameter by about its lr, so the travel of log α over the window is a fixed
share of gate_lr_total, whatever the length. param_groups does not know total_steps, so log α sits in
a group at the model's lr and after_step rescales the step the optimizer just took on it by
gate_lr_total / (total_steps * peak lr): for SGD, Adam or AdamW without decay the step is the lr
times a direction independent of it, so this is the step at gate_lr_t (up to float32's rounding of
the small step, ~1e-4 of it at lr 1e-3). λ rises by lagrangian_lr_total / total_steps a step, so its
growth over the window is also a fixed total.

Why the gates harden. The paper's gates are binary (eq. 5, g_j ∈ {0, 1}); the Hard-Concrete
distribution is the relaxation that makes E‖g‖0 differentiable (eq. 7-8), and the Lagrangian steers
that expectation to b. A deterministic gate left between 0 and 1 keeps its rank live at part
strength, and then the rank count, and with it the budget, is not what the expectation promised.
Hardening at t_end ends the relaxation where the Lagrangian stops: a rank stays if its gate is more
likely open than closed, and the budget b is then met exactly, not in expectation (the ranks with
the highest log α first). The rest of the run (1 - t_end) trains A and B under the binary gates
that will be kept, so the kept adapter is the trained one.

Defaults and where each comes from: initial rank 8 and target density b = 0.5 in the paper's Fig. 7;
here rmax = 16 and b = 0.5, so the live budget is LoRA r=8's, allocated where needed (with 8 ranks,
density 0.5 leaves half of LoRA r=8's budget: planted.py, docs/methods.md). GAMMA = -0.1, ZETA = 1.1,
tau = 2/3 (Louizos et al. 2018, as in princeton-nlp/CoFiPruning's l0_module.py); log α ~
N(log(1 - p) - log p, 0.01²) with drop rate p = 0.05 (CoFi's init, with a smaller p so that every
rank starts open: P(g > 0) ≈ 0.99, eval gate 1). alpha = 32 (scale 2, as LoRA's 16 / 8), dropout = 0.05 as LoRA. The
paper gives no beta, window, gate lr or multiplier step: beta = 0.01, t_start = 0.1, t_end = 0.7,
gate_lr_total = 30 (0.2 at 150 steps) and lagrangian_lr_total = 150 (1.0 at 150 steps) are this
library's, set with planted.py and the built-in task at 150 steps (figures in docs/methods.md and
docs/results.md). Why gate_lr_total = 30: AdamW moves log α by about its lr a step, and a gate needs
~5 to go from open (2.94) to closed (below -2.4) inside the window, 60% of the run.

Where this file decides what the paper leaves open:
- scale = alpha / rmax, LoRA style; the paper does not scale. A Kaiming, B zero: ΔW = 0 at init.
- eq. 11 as printed sums per-matrix densities (range [0, K]); C here is normalised over all
  matrices, so b in (0, 1] is the fraction of the adapter's parameters expected to stay.
- The paper's Lagrangian term is purely quadratic, so (C - b)² >= 0 and projected ascent can
  never lower lam: it is a growing penalty, not a true multiplier. Kept as printed.
- The paper does not say what happens outside [T_start, T_end]. Here log α and lam train only in
  the window, and the gates are sampled only there: before it a training forward uses the
  deterministic eval gates, after it the hardened ones, so the last part of the run fits the adapter
  that will be kept. after_backward drops log α's gradient outside the window (grad = None: the
  optimizer skips it), and after_step sets whether the next step samples.
- The orthogonality penalty is averaged over the adapted modules, as AdaLoRA's is, where the paper
  sums it: B starts at 0, so every module adds ‖BᵀB − I‖² = rmax at init, and summed it outweighs
  the task loss many times over on a 60-module adapter; it pulls B towards orthonormal columns
  whatever the task needs, so it is kept small.
- log α is in its own optimizer group without weight decay (decay would pull every gate to
  P(g > 0) ≈ 0.83).

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import salora as method
    method.apply(model, method.Config(rmax=16, target_density=0.5))  # Hard-Concrete gates, an L0 budget
    opt = torch.optim.AdamW(method.param_groups(model, lr=1e-3, weight_decay=0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total_steps)
    model.train()
    for step in range(1, total_steps + 1):
        loss = task_loss(model, next(batches)) + method.extra_loss(model)
        loss.backward()
        method.after_backward(model, step, total_steps)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        method.after_step(model, opt, step, total_steps)  # λ's ascent; hard gates from the window's end
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

GAMMA, ZETA = -0.1, 1.1  # the stretch interval (GAMMA, ZETA) puts probability mass on exactly 0 and 1
HARD = 10.0  # |log α| of a hardened gate: its eval gate is exactly 0 or 1 (beyond log 11 ≈ 2.4 either way)
EPS = 1e-6  # keeps log u and log(1 - u) finite


NAME, TITLE = "salora", "SaLoRA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("rmax",)  # the Config fields that size the tensors apply() allocates

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


@dataclass
class Config:
    rmax: int = 16  # initial rank of every update; gates close some of them
    target_density: float = 0.5  # b: fraction of the adapter's parameters expected to stay
    beta: float = 0.01  # weight of the orthogonality regulariser
    temperature: float = 2 / 3  # tau of the Hard-Concrete distribution
    t_start: float = 0.1  # gates and lam train at steps t_start T < step <= t_end T (T = total_steps),
    t_end: float = 0.7  # and the gates harden to 0 or 1 at step t_end T
    lagrangian_lr_total: float = 150.0  # the ascent's step size on lam times total_steps (1.0 at 150 steps)
    gate_lr_total: float = 30.0  # log α's peak lr times total_steps (0.2 at 150 steps), on the run's schedule
    droprate_init: float = 0.05  # p: log α starts at log(1 - p) - log p
    alpha: float = 32.0  # ΔW is scaled by alpha / rmax
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if self.rmax <= 0:
            raise ValueError(f"rmax must be positive, got {self.rmax}")
        if not 0 < self.target_density <= 1:
            raise ValueError(f"target_density must be in (0, 1], got {self.target_density}")
        if not 0 <= self.beta < math.inf:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0 <= self.t_start < self.t_end <= 1:
            raise ValueError(f"t_start and t_end are fractions of the run with 0 <= t_start < t_end <= 1, got "
                             f"{self.t_start} and {self.t_end}")
        if not 0 <= self.lagrangian_lr_total < math.inf:
            raise ValueError(f"lagrangian_lr_total must be a finite number >= 0, got {self.lagrangian_lr_total}")
        if not 0 < self.gate_lr_total < math.inf:
            raise ValueError(f"gate_lr_total must be a positive number, got {self.gate_lr_total}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 < self.droprate_init < 1:
            raise ValueError(f"droprate_init must be in (0, 1), got {self.droprate_init}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


# --- the Hard-Concrete gate ------------------------------------------------------------------------

def sample_gates(logalpha, tau):
    """One draw of g per entry of logalpha, differentiable in logalpha (reparameterised)."""
    u = torch.rand_like(logalpha).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logalpha) / tau) * (ZETA - GAMMA) + GAMMA
    return s.clamp(0, 1)


def eval_gates(logalpha):
    return (torch.sigmoid(logalpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def expected_l0(logalpha, tau):
    """P(g > 0) per gate, in closed form [eq. 8]."""
    return torch.sigmoid(logalpha - tau * math.log(-GAMMA / ZETA))


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


class SaLoRALinear(nn.Module):
    """Wraps a linear layer and adds scale B diag(g) A x. Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.scale, self.tau = cfg.alpha / cfg.rmax, cfg.temperature
        self.p = cfg.dropout
        rmax, dev = cfg.rmax, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rmax, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rmax, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        mean = math.log(1 - cfg.droprate_init) - math.log(cfg.droprate_init)
        self.lora_logalpha = nn.Parameter(torch.normal(mean, 0.01, (rmax,), device=dev))
        # whether training forwards sample the gates: only inside the window (after_step sets it for
        # the next step); training state, saved in checkpoints, not in the adapter
        self.register_buffer("sampling", torch.zeros((), dtype=torch.bool, device=dev), persistent=False)
        self.logalpha_before = None  # log α as the optimizer step found it (see after_step)
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def gates(self):
        if self.training and self.sampling:
            return sample_gates(self.lora_logalpha, self.tau)
        return eval_gates(self.lora_logalpha)

    def delta_weight(self):
        return self.scale * (self.lora_B * eval_gates(self.lora_logalpha)) @ self.lora_A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        x, dt = dropout(x, self.p, self.training), x.dtype  # matmuls in the model's dtype (autocast's rule)
        h = F.linear(x, self.lora_A.to(dt)) * (self.scale * self.gates()).to(dt)  # (..., rmax), one gate mask a batch
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
        replace(model, name, SaLoRALinear(layer, cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    # the Lagrange multiplier, one number for the whole adapter: kept on the first adapted layer
    # (nothing is added to the model's root), training state only, so not saved with the adapter
    first = next(iter(layers(model).values()))
    first.register_buffer("lam", torch.zeros((), device=first.lora_A.device), persistent=False)
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SaLoRALinear)}


def multiplier(model):
    """λ, the Lagrange multiplier (a 0-d buffer of the first adapted layer)."""
    config(model)
    return next(iter(layers(model).values())).lam


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- training hooks --------------------------------------------------------------------------------

def param_groups(model, lr, weight_decay):
    """A and B at lr; log α in a group of its own at lr too (after_step rescales its step to
    gate_lr_t), without weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    config(model)
    factors = [p for n, p in params if not n.endswith("lora_logalpha")]
    gates = [p for n, p in params if n.endswith("lora_logalpha")]
    return [{"params": factors, "lr": lr, "weight_decay": weight_decay},
            {"params": gates, "lr": lr, "weight_decay": 0.0}]


def density(model):
    """C: the expected fraction of the adapter's parameters whose gate is open [eq. 11, normalised]."""
    kept = total = 0
    for m in layers(model).values():
        size = m.in_features + m.out_features  # parameters of one rank: a row of A, a column of B
        kept = kept + expected_l0(m.lora_logalpha, m.tau).sum() * size
        total += m.lora_A.shape[0] * size
    return kept / total


def orthogonality(m):
    eye = torch.eye(m.lora_A.shape[0], device=m.lora_A.device)
    return ((m.lora_B.T @ m.lora_B - eye) ** 2).sum() + ((m.lora_A @ m.lora_A.T - eye) ** 2).sum()


def extra_loss(model):
    cfg = config(model)
    mods = list(layers(model).values())
    orth = sum(orthogonality(m) for m in mods) / len(mods)  # a mean: see the docstring
    return cfg.beta * orth + multiplier(model) * (density(model) - cfg.target_density) ** 2


def window(cfg, total_steps):
    """(t_start, t_end) in steps: log α and lam train at steps t_start < step <= t_end."""
    t_start, t_end = (int(f * total_steps + 0.5) for f in (cfg.t_start, cfg.t_end))
    if t_start >= t_end:
        raise ValueError(f"total_steps = {total_steps} leaves SaLoRA's gates no steps to train (window "
                         f"{t_start} < step <= {t_end}): pass the run's true length, or widen t_start / t_end")
    return t_start, t_end


def in_window(model, step, total_steps):
    check_step(step, total_steps)
    t_start, t_end = window(config(model), total_steps)
    return t_start < step <= t_end


@torch.no_grad()
def after_backward(model, step, total_steps):
    """Outside the window drop log α's gradient; inside it keep log α as the optimizer step finds it,
    for after_step to rescale that step."""
    inside = in_window(model, step, total_steps)
    for m in layers(model).values():
        if inside:
            m.logalpha_before = m.lora_logalpha.detach().clone()
        else:
            m.lora_logalpha.grad = None  # the optimizer skips a parameter without a gradient


def gate_lr(cfg, group, total_steps):
    """log α's lr for the step just taken: gate_lr_total / total_steps times the schedule's factor,
    group lr over the lr it started from (initial_lr, which torch's schedulers set; without a
    scheduler the lr is constant)."""
    return cfg.gate_lr_total / total_steps * group["lr"] / group.get("initial_lr", group["lr"])


@torch.no_grad()
def rescale_gate_step(model, optimizer, total_steps):
    """Turn the step the optimizer took on log α at the group's lr into the step at gate_lr_t; returns gate_lr_t."""
    lr_t, group_of = 0.0, {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for m in layers(model).values():
        if m.logalpha_before is None:
            raise ValueError("after_step rescales log α's step from where after_backward saw it: call "
                             "after_backward before the optimizer step, every step (see the Usage block)")
        group = group_of[id(m.lora_logalpha)]
        lr_t = gate_lr(m.cfg, group, total_steps)
        ratio = lr_t / group["lr"] if group["lr"] else 0.0  # an lr of 0 moved nothing
        m.lora_logalpha.copy_(m.logalpha_before + (m.lora_logalpha - m.logalpha_before) * ratio)
        m.logalpha_before = None
    return lr_t


@torch.no_grad()
def harden(model):
    """Every gate to exactly 0 or 1 (log α = ∓HARD): open stay the ranks more likely open than closed
    (P(g > 0) >= 1/2), highest log α first, as far as their parameters (a row of A and a column of
    B each) fit in target_density of the adapter's; the others close."""
    cfg, mods = config(model), list(layers(model).values())
    logalpha = torch.cat([m.lora_logalpha for m in mods])
    sizes = torch.cat([torch.full((m.cfg.rmax,), m.in_features + m.out_features, dtype=torch.float64,
                                  device=logalpha.device) for m in mods])  # float64: the budget exactly
    order = logalpha.argsort(descending=True, stable=True)
    fits = sizes[order].cumsum(0) <= cfg.target_density * sizes.sum()
    likely = expected_l0(logalpha[order], cfg.temperature) >= 0.5
    keep = torch.zeros_like(logalpha, dtype=torch.bool)
    keep[order] = fits & likely  # both hold on a prefix of the order: the kept are the highest log α
    for m, k in zip(mods, keep.split(cfg.rmax)):
        m.lora_logalpha.copy_(torch.where(k, HARD, -HARD))


@torch.no_grad()
def after_step(model, optimizer, step, total_steps, *, val_loss=None):
    """In the window: rescale log α's step, ascend on lam, and at its last step harden the gates.
    Then set whether the next step samples its gates (iff it lies in the window)."""
    cfg, lam, lr_t = config(model), multiplier(model), 0.0
    t_start, t_end = window(cfg, total_steps)
    if in_window(model, step, total_steps):
        lr_t = rescale_gate_step(model, optimizer, total_steps)
        # d/d lam of lam (C - b)² is (C - b)²: ascend, then project onto lam >= 0
        lam.add_(cfg.lagrangian_lr_total / total_steps * (density(model) - cfg.target_density) ** 2).clamp_(min=0)
        if step == t_end:
            harden(model)
    for m in layers(model).values():
        m.sampling.fill_(t_start < step + 1 <= t_end)
    c, lam = torch.stack((density(model), lam)).tolist()  # one device sync for the log
    return {"density": c, "lam": lam, "gate_lr": lr_t}


def val_loss_steps(model, total_steps):
    """The steps whose after_step calls val_loss (a scoring round's validation passes), in order, so a
    trainer can count them in its ETA: none here."""
    return []


def ranks(model):
    return {n: int((eval_gates(m.lora_logalpha) > 0).sum()) for n, m in layers(model).items()}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') with ΔW = B' A': eval gates, closed ranks dropped, gate and scale in B'."""
    out = {}
    for n, m in layers(model).items():
        g = eval_gates(m.lora_logalpha)
        keep = g > 0
        out[n] = (m.lora_A[keep].clone(), m.scale * m.lora_B[:, keep] * g[keep])
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
    """Fold ΔW (eval gates) into W0 and put the original layers back: zero inference overhead."""
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
