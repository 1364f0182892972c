"""Speed and memory of every method side by side, measured in one process.

    python bench.py                          # the default model, batch 8 x seq 128, 3 repeats
    python bench.py --quick                  # batch 4 x seq 64, 2 repeats (SVDs: 1), a 1024^2 SVD matrix
    python bench.py --size 1b --json out/bench-1b.json
    python bench.py --model DIR              # any checkpoint models.load reads
    python bench.py --quick --alora-run      # also a default ALoRA run against LoRA r=8's: two runs' time
    python bench.py --memory --dtype bf16    # peak memory alone, float32 and bf16 (no timing: minutes)

Prints a table and, with --json, writes every figure. Each time is the median over repeats that
visit the variants round-robin (each repeat starting one variant later), so a machine that slows
down mid-run slows every variant alike and the ratios stay fair even when the absolute times don't.

- Training step, per method at its default Config: training.train_step itself (forward, task loss +
  extra_loss, backward, after_backward, gradient clipping, AdamW, after_step, the lr scheduler) on random
  tokens, every position a target. The step is number 60 of 150: AdaLoRA is scoring and masking,
  SaLoRA's gates and multiplier train, and ALoRA's after_step holds no scoring round (its rounds, at
  steps 15 to 36 of 150 with the defaults, are timed apart, below). The reference is the frozen
  base: the same forward and backward with no adapter, every weight frozen and the input embeddings
  requiring grad, so the backward runs through every layer as an adapter's does. peft's LoRA on transformers' LlamaForCausalLM, built on the same
  weights, runs through the same train_step where both packages are installed.
- Peak memory of a step (the first, untimed one): the tensors the variant keeps (parameters,
  buffers, optimizer state) plus the most bytes of torch tensors alive at once during the step,
  counted from the profiler's allocation events on a CPU (tracemalloc does not see torch, and the
  RSS high-water mark mixes variants and allocator caching), torch.cuda.max_memory_allocated on a GPU.
- ALoRA's rounds: a validation forward and a gate-gradient pass (forward and backward to the
  gates) over a validation batch of train.py's default --val-size (16) random sequences, timed
  beside the step; by the cost model (alora.py) they price a default round: "exact" 1 + 2 x (live
  ranks) forwards, "candidates" 2 gradient passes + 2 x (ranks scored exactly) forwards, at least
  2 x prune_per_round of them, at most max_exact. --alora-run also times a whole default run: ALoRA's against LoRA
  r=8's, train.py's own data, batch, validation set and --steps, the two runs' steps interleaved.
- Merged inference: the logits of a LoRA merged into the base weights against the base model's.
- The machine's limit: fp32 GEMM throughput of an n x n matmul, and the step's FLOPs counted, not
  measured (matmuls only; N = the sum of in x out over every linear layer, the LM head included):
      forward 2N per token; backward 2N per token for the input gradients. A frozen weight needs no
      weight gradient, so a frozen-base step is 4N per token, not the 6N of full fine-tuning.
      Attention, causal (query i sees i + 1 keys): QKᵀ and PV forward, 2 x 2 x dim x Σ(i + 1) =
      2 dim T (T + 1) per layer and sequence; backward twice that (dP, dV, dQ, dK); in all
      6 dim T (T + 1). Flash attention's recomputation in backward is not counted, nor the loss's
      (models.shared.HeadCrossEntropy: the LM head's logits again in backward, 2 x vocab x dim per
      token).
      A LoRA step adds 6 r (in + out) per adapted module and token (forward 2, input and weight
      gradients 4).
- Mixed precision (--dtype, default auto: what models.pick_dtype takes on this device, the first
  line says which and why; no comparison where that is float32): the frozen base stored and
  computed in that dtype, the adapter in float32. Every step and peak memory above again on that
  base, each over its float32 figure; ours against peft on the same low-precision weights; the
  frozen step's share of that dtype's GEMM rate; greedy generation tokens/s (4 prompts of 16
  random tokens, 32 new tokens each) against float32; and models.load's time and peak RSS per
  dtype, each in a fresh process (an RSS high-water mark belongs to a process), next to a process
  that only imports. --memory: the peak memory alone, in float32 and in --dtype, nothing timed.
- Tokenizers: encoding 1 MB of text with the default model's byte-level tokenizer (tiktoken, in
  Rust) and with the SentencePiece-style BPE (models.tokenizer.SentencePieceBPE, in Python) of the
  same vocabulary and merges: its tokens that are whole UTF-8 text with ' ' written '▁', plus the
  256 byte tokens, as a Llama 2 tokenizer.json lays them out. Each repeat starts the SentencePiece
  word cache empty, as a first pass over a data set does, so its time grows with the number of
  distinct words: two texts, the built-in task's questions and worked answers (few distinct words,
  as in fine-tuning data) and Python's own documentation (pydoc's topics: prose, code and tables,
  many distinct words); the target is on the second.
- SARA and Mo-SARA initialisation: the methods' own apply (SARA: singular values only, in float64;
  Mo-SARA: one float32 SVD, truncated to the top-k vectors) against a full float32
  torch.linalg.svd of the same matrices: the model's target matrices, and (once) a random n x n one.
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

import cli
import files
import methods
import models
import training

STEP, TOTAL_STEPS = 60, 150  # which step of which run the timed step is (see the docstring)
LR = 1e-3
SIZES = {  # --size NAME: a random LLaMA shape
    "1b": (models.LlamaConfig(vocab_size=32000, dim=2048, n_layers=4, n_heads=32, n_kv_heads=8,
                              hidden_dim=8192, rope_theta=500000.0, max_seq_len=2048),
           "Llama-3.2-1B's layer shape (dim 2048, 32 heads, 8 KV heads, SwiGLU 8192), 4 of its 16 layers, "
           "vocab 32000 so the LM head keeps its share of the matmuls (21%), random weights"),
}
TARGETS = {  # name -> (the most the figure may be, what it is)
    "lora_step_over_frozen_step": (1.10, "LoRA step / frozen-base step"),
    "ours_over_peft_step": (1.00, "our LoRA step / peft's"),
    "ours_over_peft_memory": (1.00, "our LoRA peak memory / peft's"),
    "merged_forward_over_base_forward": (1.02, "merged LoRA forward / base forward"),
    "sora_step_over_adalora_step": (0.80, "SoRA step / AdaLoRA step"),
    "alora_run_over_lora_run": (1.42, "ALoRA default run / LoRA r=8's"),
    "frozen_fp32_peak_mb": (1650, "frozen step's fp32 peak MB at 8 x 128"),
    **{f"{n}_low_over_fp32_step": (0.55, f"{n} step, --dtype / fp32") for n in ("frozen", *methods.NAMES)},
    **{f"{n}_low_over_fp32_memory": (0.60, f"{n} peak memory, --dtype / fp32") for n in ("frozen", *methods.NAMES)},
    "ours_over_peft_low_step": (1.00, "our LoRA step / peft's, both --dtype"),
    "ours_over_peft_low_memory": (1.00, "our LoRA memory / peft's, both --dtype"),
    "sentencepiece_over_byte_level_encode": (2.00, "SentencePiece-style / byte-level encode"),
}
# a fresh process loads the model; VmHWM is its own RSS high-water mark (getrusage's ru_maxrss
# would carry over the parent's across exec)
LOAD = """import json, re, sys, time
import models
t = time.perf_counter()
if sys.argv[2] != "none":
    models.load(None if sys.argv[1] == "-" else sys.argv[1], models.DTYPES[sys.argv[2]])
seconds = time.perf_counter() - t
with open("/proc/self/status") as f:
    hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read())[1])
print(json.dumps({"seconds": seconds, "peak_rss_mb": hwm / 1024}))"""


# ----------------------------------------------------------------------------- the machine

def machine(device):
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "load_average_at_start": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns, repeats, device):
    """name -> [seconds of each repeat]; a repeat calls every fn once, starting one later than the last."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(seconds(fns[n], device))
    return times


def gemm_gflops(n, repeats, device, dtype=torch.float32):
    """Median GFLOP/s of an (n, n) @ (n, n) matmul in `dtype`: the most this machine's matmuls reach."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b  # the first call pays for thread pools and workspaces
    times = interleaved({"gemm": lambda: a @ b}, repeats, device)["gemm"]
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- FLOPs

def step_flops(model, batch_size, seq_len):
    """Matmul FLOPs of one frozen-base training step: 4N per token plus causal attention."""
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    c = model.cfg
    return 4 * n * batch_size * seq_len + 6 * c.dim * seq_len * (seq_len + 1) * c.n_layers * batch_size


def adapter_flops(model, method, tokens):
    """What a low-rank adapter adds to a step: 6 r (in + out) per module and token."""
    per_token = 0
    for name, r in method.ranks(model).items():
        m = model.get_submodule(name)
        per_token += 6 * r * (m.in_features + m.out_features)
    return per_token * tokens


# ----------------------------------------------------------------------------- memory

def tensor_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (tied and shared weights count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@contextlib.contextmanager
def quiet_fd2():
    """Silence fd 2: the profiler's C++ side logs there (a line at start and at stop, and a warning
    whenever the step frees a tensor allocated before profiling). An exception still propagates;
    Python warnings raised meanwhile are lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def transient_peak(fn, device):
    """The most bytes of torch tensors that fn() holds alive at once beyond those alive before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with quiet_fd2(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                             profile_memory=True) as prof:
        fn()
    # every allocation and free is a "[memory]" event: +bytes or -bytes, in time order; frees of
    # tensors allocated before the step are not reported, so a step that drops one counts high
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- variants

@dataclass
class Variant:
    model: nn.Module
    step: object  # () -> None: one training step
    opt: torch.optim.Optimizer | None = None

    @property
    def trainable(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def keeps(self):
        """The tensors the variant holds between steps: parameters, buffers, optimizer state."""
        state = [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)] if self.opt else []
        return [*self.model.parameters(), *self.model.buffers(), *state]


def share_base(model):
    """A copy with its own modules but the very same parameter and buffer tensors: a method can
    wrap the copy's layers without touching `model`, and nine variants cost one set of weights."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def frozen_variant(base, batch):
    model = share_base(base).train()
    embed = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    # the embeddings' output requires grad, so backward runs to the first layer; no weight gets a grad
    embed.register_forward_hook(lambda module, inputs, out: out.requires_grad_())

    def step():
        loss = model.loss(*batch)
        loss.backward()
        loss.item()  # train_step reads the loss too: the same synchronisation point
    return Variant(model, step)


# the hooks for an adapter that is not one of ours (peft's): a plain loop, no method work
PLAIN_HOOKS = types.SimpleNamespace(
    param_groups=lambda model, lr, wd: [{"params": [p for p in model.parameters() if p.requires_grad],
                                         "lr": lr, "weight_decay": wd}],
    extra_loss=lambda model: torch.zeros(()), after_backward=lambda model, step, total_steps: None,
    after_step=lambda model, opt, step, total_steps, val_loss=None: {})


def trained_variant(model, method, batch):
    """model (adapter applied) trained by training.train_step at STEP of TOTAL_STEPS."""
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, LR, 0.0), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    val_loss = training.val_closure(model, batch)

    def step():
        training.train_step(model, method, opt, sched, [batch], STEP, TOTAL_STEPS, val_loss=val_loss)
    return Variant(model, step, opt)


def method_variant(base, name, batch):
    method = methods.get(name)
    torch.manual_seed(0)
    model = method.apply(share_base(base), method.Config())
    return trained_variant(model, method, batch)


def hf_llama(model):
    """transformers' LlamaForCausalLM on the same weight tensors (ours carry Hugging Face's names)."""
    import transformers

    c = model.cfg
    rope = {"rope_type": "default"} if c.rope_scaling is None else dict(c.rope_scaling)
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        rope_parameters={**rope, "rope_theta": c.rope_theta}, use_cache=False)
    hf = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    hf.load_state_dict(model.state_dict(), assign=True)  # assign: share our tensors, copy nothing
    return hf.to(model.lm_head.weight.device).requires_grad_(False).eval()  # .to moves the RoPE buffer


def peft_versions():
    """'transformers X, peft Y', or None where either is not installed."""
    try:
        import peft
        import transformers
    except ImportError:
        return None
    return f"transformers {transformers.__version__}, peft {peft.__version__}"


def peft_variant(hf, batch):
    """peft's LoRA (our LoRA Config's defaults) on transformers' Llama, trained by the same train_step."""
    import peft

    lora = methods.get("lora")
    cfg = lora.Config()
    torch.manual_seed(0)
    with warnings.catch_warnings():  # peft calls a transformers method that transformers deprecates
        warnings.simplefilter("ignore", FutureWarning)
        hf = peft.get_peft_model(hf, peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
            target_modules=[models.Llama.TARGETS[t].rpartition(".")[2] for t in cfg.targets]))
    return trained_variant(training.HFLoss(hf), PLAIN_HOOKS, batch)  # the loss is the task loss alone


@torch.no_grad()
def logit_gap(base, hf, idx):
    """Largest |logit difference| between our model and its transformers twin: they must agree."""
    return (base(idx) - hf(input_ids=idx).logits).abs().max().item()


# ----------------------------------------------------------------------------- the sections

def bench_steps(base, batch, repeats, device, hf=None, timed=True):
    """Every method's step, the frozen base's and (given transformers' twin `hf`) peft's: peak
    memory, and (timed) seconds."""
    names = ["frozen", *methods.NAMES] + (["peft"] if hf is not None else [])
    variants = {}
    for name in names:
        print(f"setting up {name}", file=sys.stderr, flush=True)
        if name == "frozen":
            variants[name] = frozen_variant(base, batch)
        elif name == "peft":
            variants[name] = peft_variant(hf, batch)
        else:
            variants[name] = method_variant(base, name, batch)
    out = {}
    for name, v in variants.items():
        print(f"memory of {name}", file=sys.stderr, flush=True)
        # this first step is also the warm-up. The optimizer state it creates is counted in what the
        # variant keeps afterwards, not in the step: AdamW makes it after backward has freed the
        # activations, so it never sits under the peak, which comes at the turn from forward to backward
        step_peak = transient_peak(v.step, device)
        out[name] = {"trainable_params": v.trainable, "peak_bytes": tensor_bytes(v.keeps()) + step_peak}
    if not timed:
        return out
    print(f"timing {len(variants)} variants x {repeats} repeats", file=sys.stderr, flush=True)
    for name, times in interleaved({n: v.step for n, v in variants.items()}, repeats, device).items():
        out[name].update(seconds=times, median_s=statistics.median(times))
    return out


def bench_alora_round(base, batch, val_batch, repeats, device):
    """The units of ALoRA's rounds against the training step, timed interleaved: one validation
    forward and one gate-gradient pass (forward and backward to the gates) over val_batch; with them
    a default round's cost in each scoring mode, by the cost model (alora.py's docstring)."""
    alora = methods.get("alora")
    v = method_variant(base, "alora", batch)
    val_loss = training.val_closure(v.model, val_batch)
    mods = alora.layers(v.model)
    live = {n: m.lora_gate.clone() for n, m in mods.items()}
    v.step()  # warm-up
    fns = {"step": v.step, "forward": val_loss, "gradient": lambda: alora.gate_grads(mods, val_loss, live)}
    t = {n: statistics.median(times) for n, times in interleaved(fns, repeats, device).items()}
    cfg = alora.Config()
    k2, rounds = alora.schedule(cfg, TOTAL_STEPS)[1:]
    ranks, least = sum(alora.ranks(v.model).values()), 2 * len(cfg.targets)  # least: the fewest scored exactly
    most = min(ranks, cfg.max_exact)  # the cap on the ranks a round scores exactly (at least n_A)
    out = {"k2": k2, "rounds": rounds, "val_size": val_batch[0].shape[0], "live_ranks": ranks, "least_scored": least,
           "most_scored": most, "step_s": t["step"], "forward_s": t["forward"], "gradient_s": t["gradient"],
           "exact_round_s": (1 + 2 * ranks) * t["forward"],
           "candidates_round_s": 2 * t["gradient"] + 2 * least * t["forward"],
           "capped_round_s": 2 * t["gradient"] + 2 * most * t["forward"]}
    # a default run: TOTAL_STEPS steps and `rounds` rounds that score the least, or (capped) the most
    for name in ("candidates", "capped"):
        out[f"{name}_run_over_steps"] = 1 + rounds * out[f"{name}_round_s"] / (TOTAL_STEPS * t["step"])
    return out


def bench_alora_run(args):
    """ALoRA's default run against LoRA r=8's: train.py's defaults (its data, batch, validation set,
    schedule and --steps), every step through training.train_step, the two runs' steps interleaved in
    this process (LoRA's first on odd steps, ALoRA's on even) so load that comes and goes hits both.
    Seconds of train_step alone: train.py's progress lines cost both runs the same."""
    targs = training.default_run(methods.get("alora"))
    base, tok = models.load(args.model, models.pick_dtype(args.dtype, args.device)[0])
    base = base.to(args.device)
    train_set, val_batch = training.load_data(targs, tok)
    val_batch = tuple(t.to(args.device) for t in val_batch)
    runs = {}
    for name in ("lora", "alora"):
        method = methods.get(name)
        torch.manual_seed(targs.seed)
        model = method.apply(share_base(base), method.Config()).train()
        opt = torch.optim.AdamW(method.param_groups(model, targs.lr, targs.weight_decay), lr=targs.lr)
        runs[name] = (method, model, opt, torch.optim.lr_scheduler.LambdaLR(
                          opt, training.lr_lambda(targs.warmup, targs.steps, targs.schedule)),
                      training.val_closure(model, val_batch))
    out = {"steps": targs.steps, "lora_s": 0.0, "alora_s": 0.0, "rounds": []}
    for step in range(1, targs.steps + 1):
        batches = training.step_batches(train_set, targs, step, 0, 1, args.device)
        for name in (("lora", "alora") if step % 2 else ("alora", "lora")):
            method, model, opt, sched, val_loss = runs[name]
            figures = {}

            def one():
                figures.update(training.train_step(model, method, opt, sched, batches, step, targs.steps,
                                                   clip=targs.clip, val_loss=val_loss)[1])
            took = seconds(one, args.device)
            out[name + "_s"] += took
            if figures:
                out["rounds"].append({"step": step, "seconds": took, "scored": figures["scored"]})
    return out


def bench_forward(base, idx, repeats, device):
    """Median seconds of the base model's logits and of a merged LoRA's: merging must cost nothing."""
    lora = methods.get("lora")
    merged = lora.merge(lora.apply(copy.deepcopy(base), lora.Config())).eval()
    fns = {"base": lambda: base(idx), "merged": lambda: merged(idx)}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        return {n: statistics.median(t) for n, t in interleaved(fns, repeats, device).items()}


def init_times(model, targets, repeats, device):
    """Median seconds of SARA's and Mo-SARA's apply on `model`, and of a full SVD of every target."""
    sara, mosara = methods.get("sara"), methods.get("mosara")
    weights = [model.get_submodule(n).weight for n in targets]

    def full_svd():
        for w in weights:
            torch.linalg.svd(w.detach().float(), full_matrices=False)
    fns = {"sara": lambda: sara.apply(share_base(model), sara.Config(targets=tuple(targets))),
           "mosara": lambda: mosara.apply(share_base(model), mosara.Config(targets=tuple(targets))),
           "full_svd": full_svd}
    out = {n: statistics.median(t) for n, t in interleaved(fns, repeats, device).items()}
    out.update(matrices=len(weights), shapes=sorted({"x".join(map(str, w.shape)) for w in weights}))
    return out


def random_matrix_holder(n, device):
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(n, n, bias=False, device=device).requires_grad_(False)
    nn.init.normal_(holder.proj.weight, std=n ** -0.5)
    return holder


def bench_generate(bases, repeats, device, new_tokens=32):
    """Greedy generation tokens/s of each model in `bases` (name -> model), interleaved."""
    g = torch.Generator().manual_seed(1)
    vocab = next(iter(bases.values())).cfg.vocab_size
    prompts = [torch.randint(0, vocab, (16,), generator=g).tolist() for _ in range(4)]
    fns = {name: (lambda m=m: m.generate(prompts, new_tokens)) for name, m in bases.items()}
    for fn in fns.values():
        fn()  # warm-up
    return {n: len(prompts) * new_tokens / statistics.median(t) for n, t in interleaved(fns, repeats, device).items()}


def load_costs(source, names):
    """name -> {seconds, peak_rss_mb} of models.load in each dtype ("none": import only), each in a
    fresh process."""
    out = {}
    for name in names:
        r = subprocess.run([sys.executable, "-c", LOAD, source or "-", name], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
        out[name] = json.loads(r.stdout.splitlines()[-1])
    return out


def bench_dtype(args, base, batch, steps32, dtype, with_peft):
    """The step, memory, GEMM, generation and loading figures of a `dtype` base against float32's."""
    low = copy.deepcopy(base).to(dtype)
    hf = hf_llama(low) if with_peft else None
    steps = bench_steps(low, batch, args.repeats, args.device, hf, timed=not args.memory)
    out = {"dtype": str(dtype).removeprefix("torch."), "steps": steps}
    for n in steps:
        out[f"{n}_low_over_fp32_memory"] = steps[n]["peak_bytes"] / steps32[n]["peak_bytes"]
    if "peft" in steps:
        out["ours_over_peft_low_memory"] = steps["lora"]["peak_bytes"] / steps["peft"]["peak_bytes"]
    if args.memory:
        return out
    for n in steps:
        out[f"{n}_low_over_fp32_step"] = steps[n]["median_s"] / steps32[n]["median_s"]
    if "peft" in steps:
        out["ours_over_peft_low_step"] = steps["lora"]["median_s"] / steps["peft"]["median_s"]
    out["gemm_gflops"] = gemm_gflops(args.gemm_size, 5, args.device, dtype)
    out["frozen_step_fraction_of_gemm"] = (step_flops(low, args.batch_size, args.seq_len) / steps["frozen"]["median_s"]
                                           / 1e9 / out["gemm_gflops"])
    print("generation", file=sys.stderr, flush=True)
    out["generate_tokens_per_s"] = bench_generate({"float32": base, out["dtype"]: low}, max(3, args.repeats),
                                                  args.device)
    if not args.size and args.device.type == "cpu" and os.path.exists("/proc/self/status"):  # VmHWM: Linux
        print("loading in fresh processes", file=sys.stderr, flush=True)
        short = next(k for k, v in models.DTYPES.items() if v == dtype)
        out["load"] = load_costs(args.model, ["none", "fp32", short])
    return out


def sentencepiece_twin():
    """A SentencePieceBPE holding the default model's vocabulary and merges, spelt as Llama 2's
    tokenizer.json spells them (see the docstring), and the default model's own tokenizer."""
    import gguf

    from models import tokenizer as mtok

    fields = gguf.GGUFReader(models.resolve()).fields
    tokens, merges = (fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges"))
    dec = mtok.byte_decoder()

    def text(token):
        with contextlib.suppress(KeyError, UnicodeDecodeError):
            return bytes(dec[c] for c in token).decode("utf-8").replace(" ", mtok.SPACE)

    vocab = {t: i for i, t in enumerate(map(text, tokens)) if t}
    vocab.update({f"<0x{b:02X}>": len(tokens) + b for b in range(256)})
    pairs = [(a, b) for a, b in ((text(x), text(y)) for x, y in (m.split(" ") for m in merges))
             if a and b and a + b in vocab]
    spec = {"vocab": vocab, "merges": pairs, "byte_fallback": True, "fuse_unk": True}
    steps = mtok.decoder_steps({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": mtok.SPACE}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]})
    sp = mtok.SentencePieceBPE("smollm2-sentencepiece", spec, [], [("prepend", mtok.SPACE),
                                                                   ("replace", " ", mtok.SPACE)], None, steps)
    return sp, models.load()[1]


def bench_tokenizer(repeats, size=2 ** 20):
    """text -> seconds to encode `size` bytes of it, byte-level and SentencePiece-style, and the tokens."""
    import data
    import pydoc_data.topics

    sp, byte_level = sentencepiece_twin()
    examples = data.arithmetic("train") + data.arithmetic("val") + data.arithmetic("test")
    texts = {"task": "\n\n".join(f"{e.question}\n{e.response}" for e in examples),
             "docs": "\n\n".join(pydoc_data.topics.topics.values())}
    out = {}
    for name, text in texts.items():
        text = (text * (size // len(text.encode()) + 1)).encode()[:size].decode("utf-8", "ignore")

        def sentencepiece():
            sp.cache.clear()
            sp.encode_ordinary(text)

        times = interleaved({"byte_level": lambda: byte_level.encode(text), "sentencepiece": sentencepiece},
                            repeats, torch.device("cpu"))
        out[name] = {k: statistics.median(v) for k, v in times.items()}
        out[name]["tokens"] = {"byte_level": len(byte_level.encode(text)),
                               "sentencepiece": len(sp.encode_ordinary(text))}
    return out


def bench_init(base, svd_size, repeats, device):
    lora = methods.get("lora")  # finds SARA's default targets by name without an SVD
    targets = list(lora.ranks(lora.apply(share_base(base), lora.Config(targets=methods.get("sara").Config().targets))))
    print(f"SARA / Mo-SARA init on {len(targets)} target matrices and one {svd_size}^2", file=sys.stderr, flush=True)
    return {"model": init_times(base, targets, repeats, device),
            "random": init_times(random_matrix_holder(svd_size, device), ["proj"], 1, device)}


# ----------------------------------------------------------------------------- the run

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", choices=sorted(SIZES), default=None,
                     help="a random LLaMA shape instead of the default model (default: none)")
    src.add_argument("--model", default=None,
                     help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", help="smaller batch, fewer repeats, a smaller SVD matrix")
    p.add_argument("--memory", action="store_true",
                   help="peak memory alone: every variant's first step in float32 and in --dtype, nothing timed")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 8; 4 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: 128; 64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default: 3; 2 with --quick)")
    p.add_argument("--svd-size", type=int, default=None,
                   help="side of the random SVD matrix (default: 4096; 1024 with --quick)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the matmul that measures GFLOP/s")
    p.add_argument("--no-peft", action="store_true", help="leave peft out even where it is installed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", *models.DTYPES], default="auto",
                   help="the low-precision base compared with float32 (fp32, or auto choosing it: no comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--alora-run", action="store_true", help="also time a default ALoRA run (train.py's data and "
                   "steps) against LoRA r=8's, in --dtype (fp32: float32): a model with a tokenizer, ~2 runs' time")
    p.add_argument("--json", default=None, help="also write every figure to this file (default: no file)")
    args = p.parse_args(argv)
    quick = {"batch_size": 4, "seq_len": 64, "repeats": 2, "svd_size": 1024}
    full = {"batch_size": 8, "seq_len": 128, "repeats": 3, "svd_size": 4096}
    for name, default in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    cli.positive(args, *quick, "threads")
    if args.alora_run and args.size:
        raise ValueError("--alora-run trains on train.py's data, so it needs a model with a tokenizer: the default "
                         "or --model, not --size")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cli.check_device(args.device)
    args.device = torch.device(args.device)
    return args


def build(args):
    """(frozen base model on the device, a one-line description)."""
    if args.size:
        cfg, about = SIZES[args.size]
        torch.manual_seed(0)
        model = models.Llama(cfg).requires_grad_(False)
    else:
        model, _ = models.load(args.model)
        about = f"{models.resolve(args.model)} ({'the default model' if args.model is None else 'given'})"
    if args.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's {model.cfg.max_seq_len} positions")
    return model.to(args.device).eval(), about


def random_batch(cfg, batch_size, seq_len, device):
    """(idx, targets) (B, T) of random tokens, every position a target: the shapes are all that counts."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


def ratios(steps):
    out = {f"{n}_step_over_frozen_step": steps[n]["median_s"] / steps["frozen"]["median_s"] for n in methods.NAMES}
    out.update({f"{n}_memory_over_frozen_memory": steps[n]["peak_bytes"] / steps["frozen"]["peak_bytes"]
                for n in methods.NAMES})
    out["sora_step_over_adalora_step"] = steps["sora"]["median_s"] / steps["adalora"]["median_s"]
    if "peft" in steps:
        out["ours_over_peft_step"] = steps["lora"]["median_s"] / steps["peft"]["median_s"]
        out["ours_over_peft_memory"] = steps["lora"]["peak_bytes"] / steps["peft"]["peak_bytes"]
    return out


def bench_float32(args, res, base, batch):
    """Into `res`: the step ratios, ALoRA's round (and with --alora-run its default run against
    LoRA's), merged inference, the GEMM rate and the step's share of it, tokenizer speed, SARA and
    Mo-SARA initialisation."""
    res.update(ratios(res["steps"]))
    print("ALoRA's scoring round", file=sys.stderr, flush=True)
    res["alora_round"] = bench_alora_round(base, batch, random_batch(base.cfg, 16, args.seq_len, args.device),
                                           args.repeats, args.device)
    if args.alora_run:
        print("ALoRA's default run and LoRA's, interleaved", file=sys.stderr, flush=True)
        res["alora_run"] = bench_alora_run(args)
        res["alora_run_over_lora_run"] = res["alora_run"]["alora_s"] / res["alora_run"]["lora_s"]
    fwd = bench_forward(base, batch[0], max(5, args.repeats), args.device)  # a forward is cheap: more repeats
    res["forward_s"] = fwd
    res["merged_forward_over_base_forward"] = fwd["merged"] / fwd["base"]

    gemm = gemm_gflops(args.gemm_size, 5, args.device)
    lora = methods.get("lora")
    flops = {"frozen": step_flops(base, args.batch_size, args.seq_len)}
    tokens = args.batch_size * args.seq_len
    flops["lora"] = flops["frozen"] + adapter_flops(lora.apply(share_base(base), lora.Config()), lora, tokens)
    res["gemm"] = {"n": args.gemm_size, "gflops": gemm}
    for n, f in flops.items():
        res[f"{n}_step_gflop"] = f / 1e9
        res[f"{n}_step_fraction_of_gemm"] = f / res["steps"][n]["median_s"] / 1e9 / gemm

    res["tokenizer"] = bench_tokenizer(args.repeats)
    docs = res["tokenizer"]["docs"]
    res["sentencepiece_over_byte_level_encode"] = docs["sentencepiece"] / docs["byte_level"]
    res["init"] = bench_init(base, args.svd_size, 1 if args.quick else args.repeats, args.device)
    for n in ("sara", "mosara"):
        res[f"{n}_init_over_full_svd"] = res["init"]["model"][n] / res["init"]["model"]["full_svd"]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dtype, why = models.pick_dtype(args.dtype, args.device)
    print(f"dtype: {str(dtype).removeprefix('torch.')} against float32 ({why})", flush=True)
    res = {"machine": machine(args.device)}
    base, about = build(args)
    batch = random_batch(base.cfg, args.batch_size, args.seq_len, args.device)
    versions = None if args.no_peft else peft_versions()
    res["setup"] = {"model": about, "base_params": sum(p.numel() for p in base.parameters()),
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
                    "quick": args.quick, "peft": versions or ("left out" if args.no_peft else "not installed")}
    hf = None
    if versions and isinstance(base, models.Llama):
        hf = hf_llama(base)
        res["hf_max_abs_logit_diff"] = logit_gap(base, hf, batch[0][:1])
    elif versions:
        res["setup"]["peft"] = "left out: only LLaMA-family models are built in transformers here"

    res["steps"] = bench_steps(base, batch, args.repeats, args.device, hf, timed=not args.memory)
    if args.model is None and not args.size and (args.batch_size, args.seq_len) == (8, 128):
        res["frozen_fp32_peak_mb"] = res["steps"]["frozen"]["peak_bytes"] / 2 ** 20
    if not args.memory:
        bench_float32(args, res, base, batch)
    if dtype != torch.float32:
        res["dtype"] = bench_dtype(args, base, batch, res["steps"], dtype, hf is not None)
        res.update((k, v) for k, v in res["dtype"].items() if k.endswith(("_step", "_memory")))
    res["targets"] = {k: {"value": res[k], "at_most": limit, "met": res[k] <= limit}
                      for k, (limit, _) in TARGETS.items() if k in res}
    res["machine"]["load_average_at_end"] = os.getloadavg()[0]
    print(memory_report(res) if args.memory else report(res))
    if args.json:
        files.write_json(args.json, res)
    return res


# ----------------------------------------------------------------------------- the table

def header(res):
    """The report's first lines: the machine, the model, how memory is counted."""
    m, s = res["machine"], res["setup"]
    return [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
        f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; load average {m['load_average_at_start']:.2f} at "
        f"start, {m['load_average_at_end']:.2f} at end",
        f"model: {s['model']}; {s['base_params']:,} parameters",
        "memory: parameters + buffers + optimizer state, plus the most bytes of torch tensors alive at once "
        "during the step (" + ("torch.cuda.max_memory_allocated" if m["device"].startswith("cuda")
                               else "profiler allocation events") + ")",
    ]


def goals(res):
    lines = ["", "targets:"]
    for k, t in res["targets"].items():
        value = f"{t['value']:>8.0f}" if t["at_most"] > 10 else f"{t['value']:>8.3f}"  # MB, or a ratio
        lines.append(f"  {TARGETS[k][1]:<38} {value} <= {t['at_most']:g}  {'met' if t['met'] else 'MISSED'}")
    return lines


def memory_report(res):
    """bench.py --memory: every variant's peak in float32 and (where a dtype was compared) in it."""
    s, steps, low = res["setup"], res["steps"], res.get("dtype")
    lines = [*header(res), f"step: the first of each variant, batch {s['batch_size']} x seq {s['seq_len']} "
             f"random tokens, every position a target", "",
             f"{'variant':<8} {'fp32 MB':>9}" + (f" {low['dtype'] + ' MB':>13} {'x fp32':>8}" if low else "")]
    for n, v in steps.items():
        row = f"{n:<8} {v['peak_bytes'] / 2 ** 20:>9.0f}"
        if low:
            row += f" {low['steps'][n]['peak_bytes'] / 2 ** 20:>13.0f} {low[n + '_low_over_fp32_memory']:>8.3f}"
        lines.append(row)
    return "\n".join(lines + goals(res))


def report(res):
    s, steps = res["setup"], res["steps"]
    frozen = steps["frozen"]
    lines = [
        *header(res),
        f"step: batch {s['batch_size']} x seq {s['seq_len']} random tokens, step {STEP} of {TOTAL_STEPS} (ALoRA: "
        f"an ordinary step, no scoring round); median of {s['repeats']} interleaved repeats",
        "",
        f"{'variant':<8} {'trainable':>10} {'step s':>8} {'x frozen':>9} {'peak MB':>9} {'x frozen':>9}",
    ]
    for name, v in steps.items():
        lines.append(f"{name:<8} {v['trainable_params']:>10,} {v['median_s']:>8.3f} "
                     f"{v['median_s'] / frozen['median_s']:>9.3f} {v['peak_bytes'] / 2 ** 20:>9.0f} "
                     f"{v['peak_bytes'] / frozen['peak_bytes']:>9.3f}")
    lines.append(f"peft: {s['peft']}" + (f" (max |logit difference| from ours {res['hf_max_abs_logit_diff']:.1e})"
                                          if "hf_max_abs_logit_diff" in res else ""))
    fwd, g, a = res["forward_s"], res["gemm"], res["alora_round"]
    if "alora_run" in res:
        run = res["alora_run"]
        lines += ["", f"ALoRA default run {run['alora_s']:.1f} s, LoRA r=8 {run['lora_s']:.1f} s ({run['steps']} steps "
                  f"each, interleaved); rounds at steps {', '.join(str(r['step']) for r in run['rounds'])} scored "
                  f"{', '.join(str(r['scored']) for r in run['rounds'])} ranks exactly"]
    lines += [
        "",
        f"ALoRA round at the defaults (val batch {a['val_size']} x seq {s['seq_len']}, {a['live_ranks']} live "
        f"ranks): forward {a['forward_s']:.2f} s, gradient pass {a['gradient_s']:.2f} s, step {a['step_s']:.2f} s; "
        f"exact round {a['exact_round_s']:.1f} s, candidates round scoring the least ({a['least_scored']}) "
        f"{a['candidates_round_s']:.1f} s, the most (max_exact, {a['most_scored']}) {a['capped_round_s']:.1f} s; "
        f"a {TOTAL_STEPS}-step run with {a['rounds']} such rounds {a['candidates_run_over_steps']:.2f}x to "
        f"{a['capped_run_over_steps']:.2f}x its steps alone",
        f"inference: merged LoRA forward {fwd['merged']:.3f} s, base forward {fwd['base']:.3f} s",
        f"GEMM fp32 {g['n']}^3: {g['gflops']:.1f} GFLOP/s; frozen step {res['frozen_step_gflop']:.1f} GFLOP "
        f"({100 * res['frozen_step_fraction_of_gemm']:.0f}% of GEMM), LoRA step {res['lora_step_gflop']:.1f} GFLOP "
        f"({100 * res['lora_step_fraction_of_gemm']:.0f}%)",
    ]
    for name, what in (("task", "the built-in task's text"), ("docs", "Python's documentation")):
        t = res["tokenizer"][name]
        lines.append(f"encode 1 MB of {what}: byte-level {t['byte_level']:.2f} s "
                     f"({t['tokens']['byte_level']:,} tokens), SentencePiece-style {t['sentencepiece']:.2f} s "
                     f"({t['tokens']['sentencepiece']:,} tokens, {t['sentencepiece'] / t['byte_level']:.2f}x)")
    for key, what in (("model", "the model's target matrices"), ("random", "a random matrix")):
        i = res["init"][key]
        lines.append(f"init on {what} ({i['matrices']}: {', '.join(i['shapes'])}): SARA {i['sara']:.2f} s, "
                     f"Mo-SARA {i['mosara']:.2f} s, full SVD {i['full_svd']:.2f} s")
    if "dtype" in res:
        d, name = res["dtype"], res["dtype"]["dtype"]
        lines += ["", f"{name} base, float32 adapter:",
                  f"{'variant':<8} {'step s':>8} {'x fp32':>8} {'peak MB':>9} {'x fp32':>8}"]
        for n, v in d["steps"].items():
            lines.append(f"{n:<8} {v['median_s']:>8.3f} {d[n + '_low_over_fp32_step']:>8.3f} "
                         f"{v['peak_bytes'] / 2 ** 20:>9.0f} {d[n + '_low_over_fp32_memory']:>8.3f}")
        gen = d["generate_tokens_per_s"]
        lines += [f"GEMM {name} {g['n']}^3: {d['gemm_gflops']:.1f} GFLOP/s; frozen step at "
                  f"{100 * d['frozen_step_fraction_of_gemm']:.0f}% of it",
                  f"generation: {gen[name]:.1f} tokens/s in {name}, {gen['float32']:.1f} in float32 "
                  f"({gen[name] / gen['float32']:.2f}x)"]
        if "load" in d:
            lines.append("load (fresh process each): " + "; ".join(
                f"{k} {v['seconds']:.1f} s, peak RSS {v['peak_rss_mb']:.0f} MB" for k, v in d["load"].items()))
    return "\n".join(lines + goals(res))


if __name__ == "__main__":
    cli.run(main)
