"""Mo-SARA: Mixture-of-SARA (Gu et al. 2024, "SARA: Singular-Value Based Adaptive Low-Rank
Adaption", arXiv 2408.03290, §4.3, Eq. 5-6).

The idea: keep the top-k singular vectors of W0 frozen and train only singular values: m parallel
sets of them, mixed per token by a tiny router, and a vector v after the truncated matrix that
starts at zero. A layer trains m*k + out + k + m numbers, orders of magnitude fewer than LoRA.

    W0 = U diag(σ) V (SVD);  lora_U (out, k), lora_V (k, in): its top-k vectors, frozen buffers
    z = dropout(x) lora_Vᵀ                                   (..., k)
    g = softmax((z lora_w1) lora_w2)                         (..., m)   lora_w1 (k, 1), lora_w2 (1, m)
    y = x W0ᵀ + b + ((z * (g lora_lam)) lora_Uᵀ) * lora_v     lora_lam (m, k), lora_v (out,) = 0 at init

Hyperparameters (paper): threshold 0.5 (math; commonsense 0.8 / 0.5), heads m = 5 (3 on E2E),
dropout 0.05, lr 3e-2 (7e-2 on E2E), targets q and v. All defaults here are the paper's math ones.

Training settings: TRAINING below holds the ones Mo-SARA depends on, for any loop to use: lr 3e-2,
the paper's, 30 times LoRA's 1e-3: it trains only singular values, a router and a zero-initialised
output vector (m*k + out + k + m numbers a layer). train.py applies TRAINING where the command line
does not set the value, and says so.
Run-length rule: Mo-SARA has no schedule of its own; nothing depends on the number of steps.

Notes and decisions:
- k comes from Algorithm 1 as in SARA. One full float32 SVD gives both k and the vectors. A
  truncated factorisation (torch.svd_lowrank) only pays for small k, which Mo-SARA's thresholds do
  not give (at 0.5, k is a fifth to a third of min(in, out)): to be as accurate it needs so many
  power iterations, plus svdvals to find k first, that it is slower (timings in docs/methods.md).
- The router has a one-unit bottleneck: the logits are s * w2 for a scalar s per token, so only the
  heads at the extremes of w2 (argmax or argmin) can ever dominate a token. That is the published
  design; router_weights() exposes the mean gates for a heatmap (the paper's Fig. 7).
- Initialisation (the paper says "randomly", Kaiming-uniform): each head of lora_lam U(-1, 1) (Kaiming
  of a (k, 1) column), lora_w1 U(±1/√k) and lora_w2 U(-1, 1) (bias-free nn.Linear(k, 1) and
  nn.Linear(1, m)); the router and the adapter share z = dropout(x) lora_Vᵀ.
- The frozen vectors are saved with the adapter (they carry `lora_`), so a reload never depends on
  which SVD routine or device produced them.
- Not mergeable when m > 1: the mixture of singular values depends on the token. With m = 1 the
  gate is exactly 1 and Mo-SARA is a LoRA with A' = diag(lam_1) V, B' = diag(v) U.

Usage: this file needs only torch. `model` is any PyTorch model whose target layers are nn.Linear
(or a subclass) or transformers' GPT-2 Conv1D: this library's models, transformers' Llama, Mistral,
Qwen2 or GPT-2. `task_loss(model, batch)` is yours. The hook order is the contract of every method
file: forward, loss + extra_loss, backward, after_backward (raw gradients), clip, optimizer.step,
after_step, scheduler.step. `step` counts optimizer steps from 1; `total_steps` is the run's length.
On a bf16 or fp16 model the adapter's parameters (and so their gradients and optimizer state)
stay float32; its matmuls run in the model's dtype, as autocast's would; merge rounds W0 + ΔW once.

    import torch
    import mosara as method
    method.apply(model, method.Config(threshold=0.5, heads=5))  # frozen singular vectors
    opt = torch.optim.AdamW(method.param_groups(model, lr=method.TRAINING["lr"], weight_decay=0.0))
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
    method.router_weights(model)                      # mean gate per head (merge needs heads=1)
"""
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


NAME, TITLE = "mosara", "Mo-SARA"  # the registry's name (config.json's "method"), the paper's
SIZE_FIELDS = ("heads",)  # the Config fields that size the tensors apply() allocates

# logical target name -> module-name suffixes, for models without a TARGETS table of their own:
# transformers' Llama / Mistral / Qwen2 layouts, and GPT-2, whose one c_attn holds q, k and v
HF_TARGETS = {"q": ("q_proj", "attn.c_attn"), "k": ("k_proj", "attn.c_attn"), "v": ("v_proj", "attn.c_attn"),
              "o": ("o_proj", "attn.c_proj"), "gate": ("gate_proj",), "up": ("up_proj",),
              "down": ("down_proj",), "fc": ("mlp.c_fc",), "proj": ("mlp.c_proj",)}


# training settings this method depends on (the paper's lr); train.py uses them unless told otherwise
TRAINING = {"lr": 3e-2}


@dataclass
class Config:
    threshold: float = 0.5  # share of the singular-value sum that sets each layer's rank k
    heads: int = 5  # m parallel singular-value vectors mixed by the router
    dropout: float = 0.05  # on the adapter's (and router's) input only
    targets: tuple[str, ...] = ("q", "v")  # logical names (q k v o gate up down fc proj) or module suffixes

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.heads < 1:
            raise ValueError(f"heads must be at least 1, got {self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def top_singular(weight, threshold):
    """(U_k (out, k), V_k (k, in)) of weight = U diag(σ) V, k from Algorithm 1 (see sara.py)."""
    w = weight.detach()
    if not torch.isfinite(w).all():
        raise ValueError("the weight has non-finite entries: its spectrum is undefined")
    U, s, V = torch.linalg.svd(w.float(), full_matrices=False)  # float32 vectors are plenty
    if s[0] == 0:
        raise ValueError("the weight is a zero matrix: it has no spectrum to choose k from")
    s = torch.where(s > s[0] * max(w.shape) * torch.finfo(s.dtype).eps, s, 0).double()  # noise is rank 0
    cum = torch.cumsum(s, 0)
    k = int(torch.searchsorted(cum, threshold * cum[-1])) + 1  # 1 <= k <= n since threshold <= 1
    return U[:, :k].contiguous(), V[:k].contiguous()


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


class MoSARALinear(nn.Module):
    """Wraps a linear layer and adds the routed SARA branch. Its weight and bias are registered here
    under their own names, so the model's keys do not change; the wrapped layer still computes y."""

    def __init__(self, base, U, V, cfg: Config):
        super().__init__()
        object.__setattr__(self, "base", base)  # called, not registered: merge() puts it back
        self.weight, self.bias = base.weight, base.bias
        self.transposed = is_conv1d(base)
        self.out_features, self.in_features = base.weight.T.shape if self.transposed else base.weight.shape
        self.cfg = cfg  # every layer holds the Config; config(model) reads it back
        self.p = cfg.dropout
        k, heads, dev = U.shape[1], cfg.heads, base.weight.device
        self.register_buffer("lora_U", U)  # (out, k) frozen
        self.register_buffer("lora_V", V)  # (k, in) frozen
        self.lora_lam = nn.Parameter(torch.empty(heads, k, device=dev).uniform_(-1, 1))
        self.lora_w1 = nn.Parameter(torch.empty(k, 1, device=dev).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k)))
        self.lora_w2 = nn.Parameter(torch.empty(1, heads, device=dev).uniform_(-1, 1))
        self.lora_v = nn.Parameter(torch.zeros(self.out_features, device=dev))  # ΔW = 0 at init
        self.gate_mean = None  # (m,) mean gate over the last forward's tokens, for router_weights
        self.w0 = None  # W0's Parameter while merged, so unmerge puts it back, bit for bit
        self.train(base.training)  # a new module starts in training mode; keep the model's mode

    def gates(self, z):
        return torch.softmax((z @ self.lora_w1) * self.lora_w2, dim=-1)  # (..., 1) * (1, m) -> (..., m)

    def check_mergeable(self):
        if self.lora_lam.shape[0] > 1:
            raise ValueError(f"Mo-SARA with {self.lora_lam.shape[0]} heads has no ΔW: the router mixes "
                             "the singular values per token (only heads = 1 merges)")

    def delta_weight(self):
        self.check_mergeable()
        return (self.lora_v[:, None] * self.lora_U) @ (self.lora_lam[0][:, None] * self.lora_V)  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if self.w0 is not None:  # merged: ΔW is already inside weight
            return y
        dt = x.dtype  # matmuls in the model's dtype (autocast's rule); the tiny router in float32
        z = F.linear(dropout(x, self.p, self.training), self.lora_V.to(dt))  # (..., k)
        g = self.gates(z.to(self.lora_w1.dtype))
        self.gate_mean = g.detach().reshape(-1, g.shape[-1]).mean(0)  # a tiny reduction, kept for the heatmap
        return y + F.linear(z * (g @ self.lora_lam).to(dt), self.lora_U.to(dt)) * self.lora_v.to(dt)

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
    """Freeze each target layer's top-k singular vectors, wrap it, freeze all but the adapters."""
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model already has an adapter: apply() once, to a model without one")
    targets = find_targets(model, cfg.targets)
    # every SVD first, so a weight without a spectrum fails before any layer is wrapped
    bases = {name: top_singular(layer.weight.T if is_conv1d(layer) else layer.weight, cfg.threshold)  # W0 (out, in)
             for name, layer in targets.items()}
    for name, layer in targets.items():
        replace(model, name, MoSARALinear(layer, *bases[name], cfg))
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MoSARALinear)}


def config(model):
    """The Config apply() was given (every adapted layer holds it)."""
    for m in layers(model).values():
        return m.cfg
    raise ValueError(f"the model has no {TITLE} adapter: call apply(model, cfg) first")


def check_step(step, total_steps):
    if not 1 <= step <= total_steps:
        raise ValueError(f"step {step} is outside 1..{total_steps}: steps count optimizer steps from 1, "
                         "and total_steps must be the run's true length")


# --- training hooks: Mo-SARA needs none of them -------------------------------------------------

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
    """Module name -> k, the number of frozen singular directions it tunes."""
    return {n: m.lora_U.shape[1] for n, m in layers(model).items()}


def router_weights(model):
    """Module name -> mean gate per head over the tokens of the most recent forward pass."""
    return {n: m.gate_mean.tolist() for n, m in layers(model).items() if m.gate_mean is not None}


# --- after training ------------------------------------------------------------------------------

@torch.no_grad()
def to_lora(model):
    """Module name -> (A', B') = (diag(lam_1) V, diag(v) U) with ΔW = B' A'; heads = 1 only."""
    mods = layers(model)
    for m in mods.values():
        m.check_mergeable()
    return {n: (m.lora_lam[0][:, None] * m.lora_V, m.lora_v[:, None] * m.lora_U) for n, m in mods.items()}


def can_merge(model):
    """None when the adapter reduces to a LoRA (to_lora) and merge(model) can fold it into this model's
    weights; else the reason it cannot: with heads > 1 the router mixes the singular values per token."""
    for n, m in layers(model).items():
        if m.lora_lam.shape[0] > 1:
            return (f"Mo-SARA with {m.lora_lam.shape[0]} heads has no ΔW: the router mixes the singular values "
                    "per token")
        if not m.weight.is_floating_point():
            return f"{n} holds a {m.weight.dtype} weight (a quantised layer), which takes no merge"
    return None


@torch.no_grad()
def merge(model):
    """Fold ΔW into W0 and put the original layers back (heads = 1 only)."""
    mods = layers(model)
    for m in mods.values():
        m.check_mergeable()  # before touching any layer, so a refusal leaves the model as it was
    for name, m in mods.items():
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
