"""Fine-tune a model with one LoRA-family method.

    python train.py --method sora --rmax 16                  # the default model and built-in task
    python train.py --method lora --model DIR --data train.json --steps 1000 --out out/mine
    python train.py --method sara --data MATH_DIR --seq-len 512      # LLM-Adapters' layout (benchmarks.py)
    python train.py --method lora --task commonsense --limit 500                 # see benchmarks.py

Every field of the method's Config is a flag (`init_r` -> `--init-r`); `--help` after
`--method NAME` lists them. Writes into --out (default out/METHOD): adapter.safetensors,
config.json, log.jsonl (one line per logged step), summary.json; with --save-every N also
checkpoint.pt, from which --resume continues.

Data parallel: `torchrun --nproc_per_node N train.py ...` (gloo on CPU, NCCL on GPUs). --batch-size
stays the global batch; each process takes its share of every micro-batch, the adapter's gradients
(and nothing else) are summed across processes, and process 0 alone writes files and progress.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shlex
import sys
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist

import benchmarks
import cli
import data
import methods
import models


# ----------------------------------------------------------------------------- command line

def add_config_flags(parser, config_cls):
    """One flag per dataclass field; the type comes from the annotation, the default from the field."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help="(default: %(default)s)")
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x),
                                default=f.default, metavar="A,B,...", help=f"(default: {','.join(f.default)})")
        else:
            kind = args[0] if args else hint  # `int | None` -> int
            parser.add_argument(flag, type=kind, default=f.default, help="(default: %(default)s)")


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="lora")
    known, _ = pre.parse_known_args(argv)
    method = methods.get(known.method)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lora", choices=methods.NAMES)
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help="a .json/.jsonl file of LLM-Adapters records, "
                        '{"messages": [...]} chats or {"text": ...} texts, or a directory holding train.json '
                        "(default: the built-in task)")
    source.add_argument("--task", choices=benchmarks.TASKS, default=None, help="a paper benchmark (see benchmarks.py)")
    p.add_argument("--limit", type=int, default=None, help="train on a seeded sample of N examples per set "
                   "(per task with --task commonsense; chunks with --task shakespeare)")
    p.add_argument("--prompt", choices=data.PROMPTS, default=None, help="prompt template (default: chat for "
                   "the built-in task, LLM-Adapters' alpaca for --data and --task commonsense)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (all micro-batches)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="longest example in tokens; longer ones are skipped "
                   "(texts are cut into chunks of this length)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--val-size", type=int, default=16, help="held-out examples for methods that score on them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: out/METHOD)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="write checkpoint.pt every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", *models.DTYPES], default="auto", help="the frozen base's dtype; "
                   "the adapter stays float32 (auto: the fastest of them on this device, measured; fp16: CUDA or "
                   "AVX512-FP16 only)")
    group = p.add_argument_group(f"{known.method} method flags")
    add_config_flags(group, method.Config)
    args = p.parse_args(argv)
    cfg_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(method.Config)}
    cli.positive(args, "steps", "batch_size", "grad_accum", "seq_len", "log_every", "val_size", "lr", "limit")
    if args.batch_size % args.grad_accum:
        raise ValueError("--batch-size must be a multiple of --grad-accum")
    cli.non_negative(args, "clip", "weight_decay", "warmup")  # a negative clip would ascend the loss
    cli.check_device(args.device)
    args.prompt = args.prompt or benchmarks.default_prompt(args.data, args.task)  # recorded for eval.py
    args.out = Path(args.out or f"out/{args.method}")
    if args.model and Path(args.model).exists() and cli.overlaps(args.out, args.model):
        raise ValueError(f"--out {args.out} is, holds or lies inside the model {args.model}: a run never "
                         "writes into a model's directory")
    args.warmup = max(1, args.steps // 20) if args.warmup is None else args.warmup
    return args, method, method.Config(**cfg_kwargs)


NOT_RECIPE = {"method", "out", "model", "data", "task", "resume", "save_every", "log_every", "device"}


def recipe(args):
    """The flags of this run that differ from their defaults, as one would type them: config.json's
    "recipe", which the results table shows. A default that follows another flag (the prompt follows
    --data and --task, the warmup --steps) is that of a run on the same data and of the same length."""
    context = ["--method", args.method]
    for key in ("data", "task"):
        if getattr(args, key):
            context += [f"--{key}", str(getattr(args, key))]
    plain = vars(parse_args([*context, "--steps", str(args.steps)])[0])
    plain["steps"] = parse_args(context)[0].steps
    flags = []
    for key, value in vars(args).items():
        if key in NOT_RECIPE or value == plain[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            text = ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value
            flags.append(f"{flag} {text}")
    return " ".join(flags)


# ----------------------------------------------------------------------------- pieces of the run

def lr_lambda(args):
    def f(step):  # the multiplier of the base lr after `step` optimizer steps
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress
    return f


def load_data(args, tok):
    data.need_tokenizer(tok)
    train = benchmarks.train_set(tok, args.data, args.task, args.prompt, args.seq_len, args.limit, args.seed)
    if args.data is None and args.task is None:
        val = data.encode_all(tok, data.arithmetic("val", args.val_size), args.seq_len, args.prompt)
    else:  # hold out the last examples; they never train
        if len(train) <= args.val_size:
            raise data.DataError(f"{args.data or args.task} has {len(train)} usable examples: fewer than --val-size + 1")
        train, val = train[:-args.val_size], train[-args.val_size:]
    return train, data.collate(val)


def val_closure(model, val_batch):
    @torch.no_grad()
    def val_loss():
        was_training = model.training
        model.eval()
        loss = model.loss(*val_batch).item()
        model.train(was_training)
        return loss
    return val_loss


def method_state(model, base_buffers):
    """Buffers the method added that are not in the adapter file: gates, EMAs, λ ... (its training state)."""
    adapter = methods.adapter_state(model)
    return {k: v.detach().cpu().clone() for k, v in model.named_buffers()
            if k not in base_buffers and k not in adapter}


# what save_checkpoint writes (besides cuda_rng and scaler, which depend on the hardware) -> its type
CHECKPOINT = {"adapter": dict, "method_state": dict, "optimizer": dict, "scheduler": dict, "step": int,
              "rng": torch.Tensor, "train_args": dict, "model_config": dict}


def save_checkpoint(path, model, opt, sched, step, base_buffers, run_args, scaler=None):
    state = {"adapter": methods.adapter_state(model), "method_state": method_state(model, base_buffers),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "train_args": run_args, "model_config": dataclasses.asdict(model.cfg)}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if scaler:
        state["scaler"] = scaler.state_dict()
    methods.atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path, model, opt, sched, run_args, base_buffers, scaler=None):
    """Restore everything save_checkpoint wrote, once it is checked to be what this run would have
    written: its keys and types, its flags, its model, the adapter's tensors and the method's own
    buffers (no others: a base weight is never written from a checkpoint). Returns its step."""
    try:
        state = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
        wrong = sorted(k for k, kind in CHECKPOINT.items() if not isinstance(state.get(k), kind))
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint {path} ({type(e).__name__}): delete it to start over") from None
    if wrong or not 0 < state["step"] < run_args["steps"]:
        raise ValueError(f"{path} is not a checkpoint of this run ({', '.join(wrong) or 'step'} missing or "
                         "wrong): delete it to start over")
    saved_args = state["train_args"]
    changed = sorted(k for k in run_args.keys() | saved_args.keys() if run_args.get(k) != saved_args.get(k))
    if changed:
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed)}): "
                         "resume with the same flags or choose another --out")
    if state["model_config"] != dataclasses.asdict(model.cfg):
        raise ValueError(f"{path} was written for another model than {run_args['model'] or 'the default'}: "
                         "resume with the model the run started with")
    methods.check_tensors(state["adapter"], methods.adapter_state(model), f"{path} (adapter)")
    methods.check_tensors(state["method_state"], method_state(model, base_buffers), f"{path} (method state)")
    try:
        model.load_state_dict(state["adapter"], strict=False)
        for k, v in state["method_state"].items():
            mod, _, attr = k.rpartition(".")
            getattr(model.get_submodule(mod), attr).copy_(v)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if scaler and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
    except Exception as e:  # checked above as far as a file can be; what is left is the optimizer's to judge
        raise ValueError(f"{path} does not fit this run ({type(e).__name__}): delete it to start over") from None
    return state["step"]


def trim_log(path, step):
    """Drop log records after `step`: a killed run may have logged steps the checkpoint does not
    hold, and a partial last line (the disk filled, or the run died mid-write) goes with a note."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    steps = [log_step(line) for line in lines]
    if steps and steps[-1] is None:
        print(f"note: {path} ended in a partial line; dropped it")
        lines, steps = lines[:-1], steps[:-1]
    if None in steps:
        raise ValueError(f"{path} line {steps.index(None) + 1} is not a log record: repair or delete the file")
    keep = [line for line, s in zip(lines, steps) if s <= step]
    methods.atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in keep)))


def log_step(line):
    """The step of a log.jsonl record, or None where the line is not one."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError, RecursionError):
        return None
    return step if type(step) is int else None


def resume_args(args):
    """The flags a resumed run must share with the run it continues."""
    skip = {"resume", "out", "log_every", "save_every", "device"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}


# ----------------------------------------------------------------------------- the output directory

RUN_FILES = ("adapter.safetensors", "config.json", "log.jsonl", "summary.json", "checkpoint.pt")


@contextlib.contextmanager
def hold(out):
    """This process's claim on --out for as long as the run lasts: an exclusive flock on the
    directory itself (the kernel drops it when the process dies, so a killed run leaves no stale
    lock). A directory made here for a run that then wrote nothing is removed again."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another run is writing into {out}: wait for it to end, or choose another --out") from None
        yield
    finally:
        os.close(fd)
        if made and not any(out.iterdir()):
            out.rmdir()


def check_out(args):
    """Refuse an --out that is not this run's to write: it must be empty, or hold this run unfinished
    (a checkpoint, or the files of a run stopped before its first one) and --resume be given.
    Returns the summary of a finished run that --resume finds, else None."""
    out = args.out
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    names -= {n for n in names if n.endswith(".tmp") and n.startswith(RUN_FILES)}  # atomic_write's, left by a kill
    if not names:
        return None
    foreign = sorted(names - set(RUN_FILES))
    if foreign:
        raise ValueError(f"--out {out} holds files that are not a train.py run's ({', '.join(foreign[:3])}): "
                         "choose an empty or new directory")
    if "checkpoint.pt" in names:
        if not args.resume:
            raise ValueError(f"{out / 'checkpoint.pt'} holds an unfinished run: add --resume to continue it, "
                             "or choose another --out")
        return None  # load_checkpoint checks its flags
    if "summary.json" in names:
        if not args.resume:
            raise ValueError(f"{out} holds a finished run: choose another --out (or delete it to train again)")
        return read_summary(out / "summary.json")
    if not args.resume:
        raise ValueError(f"{out} holds a run that stopped before its first checkpoint: add --resume to "
                         "start it over, or choose another --out")
    return None


def read_summary(path):
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): repair or delete it") from None


def interrupted(argv=None):
    """Ctrl-C's one line: the command that continues the run (from its last checkpoint, if any)."""
    argv = sys.argv[1:] if argv is None else argv
    world = int(os.environ.get("WORLD_SIZE", 1))
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    resume = [] if "--resume" in argv else ["--resume"]
    return f"interrupted: continue with `{launch} train.py {shlex.join([*argv, *resume])}`"


# ----------------------------------------------------------------------------- data parallel

def init_distributed(device):
    """(rank, world_size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device(device)
        dist.init_process_group("gloo")
    return rank, world, device


def all_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def reduce_grads(params, world):
    """Sum the adapter's gradients across processes in one flat buffer (the base has none)."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, r in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(r.view_as(g))


def to_device(t, device):
    """To a GPU through pinned memory, so the copy does not wait for the host; elsewhere as is."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def step_batches(train_set, args, step, rank, world, device):
    """This process's micro-batches of optimizer step `step`: each global micro-batch is cut into
    `world` row blocks, so N processes see exactly the examples one process would."""
    micro = args.batch_size // args.grad_accum
    out = []
    for k in range(args.grad_accum):
        x, y = data.batch(train_set, micro, args.seed, (step - 1) * args.grad_accum + k)
        x, y = x[rank::world], y[rank::world]
        width = int((y != -100).nonzero()[:, 1].max()) + 1  # this share's padding-only columns go
        out.append((to_device(x[:, :width], device), to_device(y[:, :width], device)))
    return out


def train_step(model, method, opt, sched, batches, step, total_steps, clip=1.0, val_loss=None, world=1, scaler=None):
    """One optimizer step over this process's micro-batches [(x, y), ...], every method hook in the
    order each method file's Usage block states: forward, task loss + extra_loss, backward,
    after_backward (raw gradients), clip, optimizer.step, after_step, scheduler.step. `step` counts
    from 1 to total_steps. With fp16, `scaler` (a GradScaler) scales the loss; the gradients are
    unscaled before the hooks see them, and a step whose gradients overflowed runs no hook at all.
    Returns ((the step's task loss, its penalty: the sum of extra_loss), the figures after_step
    reports): the two apart, so a regulariser does not pass for a worse fit. bench.py times this very
    function."""
    trainable = [p for g in opt.param_groups for p in g["params"]]
    # every target token of the global batch weighs the same, however the batch is split
    n_targets = all_sum(sum((y != -100).sum() for _, y in batches).float(), world)
    losses = torch.zeros(2, device=n_targets.device)  # (task, penalty), summed over micro-batches
    for x, y in batches:
        task = model.loss(x, y) * ((y != -100).sum() / n_targets)
        penalty = method.extra_loss(model) / (len(batches) * world)
        loss = task + penalty
        (scaler.scale(loss) if scaler else loss).backward()
        losses += torch.stack([task.detach(), penalty.detach().float()])
    task_loss, penalty = all_sum(losses, world).tolist()
    if not math.isfinite(task_loss + penalty):
        raise FloatingPointError(f"the loss became {task_loss + penalty} at step {step}: lower --lr "
                                 "(the last checkpoint, if any, is kept)")
    reduce_grads(trainable, world)
    if scaler:
        scaler.unscale_(opt)
    # an fp16 overflow: scaler.step skips the update and shrinks the scale; no hook may see the inf
    # (AdaLoRA's EMAs would turn NaN for good)
    overflow = scaler is not None and not all(p.grad is None or p.grad.isfinite().all() for p in trainable)
    if not overflow:
        method.after_backward(model, step, total_steps)
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if not all(p.isfinite().all() for p in trainable):  # a finite loss can still step into inf
        raise FloatingPointError(f"the adapter's weights became non-finite at step {step}: lower --lr "
                                 "(the last checkpoint, if any, is kept)")
    figures = {} if overflow else method.after_step(model, opt, step, total_steps, val_loss=val_loss)
    sched.step()  # after after_step, which reads the lr this step used
    opt.zero_grad(set_to_none=True)
    return (task_loss, penalty), figures


def scalars(figures):
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in figures.items() if isinstance(v, (int, float)))


def live_params(method, model, n_trainable):
    """The adapter's numbers still in use at the end: those of its LoRA form, without the ranks it
    switched off; a method with no LoRA form (Mo-SARA with several heads) uses all it trained."""
    try:
        pairs = method.to_lora(model)
    except ValueError:
        return n_trainable
    return sum(a.numel() + b.numel() for a, b in pairs.values())


def next_commands(args):
    """The last line of a run: how to evaluate and export what it wrote."""
    model = f" --model {args.model}" if args.model else ""
    test = f" --task {args.task}" if args.task else f" --data {args.data}" if args.data and Path(args.data).is_dir() else ""
    return (f"next: python eval.py --adapter {args.out}{model}{test}   |   "
            f"python export.py --format peft --adapter {args.out}{model} --out {args.out}-peft")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    """The run, with --out held by process 0 from the first check of what it holds to the last write
    (every process checks: they all see the same files, and none has written yet)."""
    args, method, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    first = int(os.environ.get("RANK", 0)) == 0
    with hold(args.out) if first else contextlib.nullcontext():
        finished = check_out(args)
        if finished is None:
            return train(args, method, cfg)
        if first:
            print(f"{args.out} holds a finished run: nothing to resume")
        return finished


def train(args, method, cfg):
    rank, world, device = init_distributed(args.device)
    if (args.batch_size // args.grad_accum) % world:
        raise ValueError(f"--batch-size / --grad-accum = {args.batch_size // args.grad_accum} examples per "
                         f"micro-batch do not split evenly over {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)  # process 0 speaks for all
    dtype, why = models.pick_dtype(args.dtype, device)
    args.dtype = next(k for k, v in models.DTYPES.items() if v == dtype)  # recorded (and resumed) as resolved
    if world > 1:  # auto measures per process: process 0's choice holds for all
        choice = torch.tensor([list(models.DTYPES).index(args.dtype)], device=device)
        dist.broadcast(choice, 0)
        args.dtype = list(models.DTYPES)[int(choice)]
        dtype = models.DTYPES[args.dtype]
    say(f"dtype: {str(dtype).removeprefix('torch.')} for the frozen base, float32 for the adapter ({why})")
    ckpt, run_args = args.out / "checkpoint.pt", resume_args(args)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = models.load(args.model, dtype)
    if args.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    base_params = sum(p.numel() for p in model.parameters())
    base_buffers = {k for k, _ in model.named_buffers()}
    train_set, val_batch = load_data(args, tok)
    model.to(device)
    val_batch = tuple(t.to(device) for t in val_batch)
    torch.manual_seed(args.seed)  # the adapter's init does not depend on how loading went
    method.apply(model, cfg)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{args.method}: {n_trainable:,} trainable parameters ({100 * n_trainable / base_params:.3f}% of "
        f"{base_params:,}); {len(train_set)} training examples; {world} process(es) on {device}; "
        f"loaded in {time.time() - t0:.1f}s")
    say(f"config: {json.dumps(dataclasses.asdict(cfg))}")

    opt = torch.optim.AdamW(method.param_groups(model, args.lr, args.weight_decay), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    val_loss = val_closure(model, val_batch)
    start = load_checkpoint(ckpt, model, opt, sched, run_args, base_buffers, scaler) if args.resume and ckpt.exists() else 0
    if args.resume and not start:
        say(f"no checkpoint in {args.out}: starting from step 0")
    info = {"base_model": models.resolve(args.model), "model_config": dataclasses.asdict(model.cfg),
            "train_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "recipe": recipe(args)}
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        if start:
            trim_log(args.out / "log.jsonl", start)
        log = open(args.out / "log.jsonl", "a" if start else "w")

    t_start, tokens, loss_avg = time.time(), 0, None
    for step in range(start + 1, args.steps + 1):
        batches = step_batches(train_set, args, step, rank, world, device)
        lr = opt.param_groups[0]["lr"]  # the lr this step uses (the scheduler steps at its end)
        (task_loss, penalty), figures = train_step(model, method, opt, sched, batches, step, args.steps, args.clip,
                                                   val_loss, world, scaler)
        tokens += sum(x.numel() for x, _ in batches) * world

        loss_avg = task_loss if loss_avg is None else 0.9 * loss_avg + 0.1 * task_loss
        progress = step % args.log_every == 0 or step == args.steps
        elapsed = time.time() - t_start
        if progress:  # every process computes it: val_loss is a forward like any other
            figures["val_loss"] = val_loss()
        if rank == 0 and (figures or progress):  # a method's figures (e.g. an ALoRA round) are never dropped
            rec = {"step": step, "loss": task_loss, "penalty": penalty, "lr": lr,
                   "tokens_per_s": tokens / elapsed, **figures}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if progress:
            eta = elapsed / (step - start) * (args.steps - step)
            extra = scalars({k: v for k, v in figures.items() if k != "val_loss"})
            say(f"step {step}/{args.steps} | loss {loss_avg:.4f} | val loss {figures['val_loss']:.4f} | "
                f"lr {lr:.2e} | {tokens / elapsed:.0f} tok/s | ETA {cli.fmt_time(eta)}"
                + (f" | {extra}" if extra else ""), flush=True)
        if rank == 0 and args.save_every and step % args.save_every == 0 and step < args.steps:
            methods.save_adapter(model, args.out, args.method, cfg, **info)
            save_checkpoint(ckpt, model, opt, sched, step, base_buffers, run_args, scaler)

    model.eval()
    ranks = method.ranks(model)
    summary = {"method": args.method, "trainable_params": n_trainable,
               "live_params": live_params(method, model, n_trainable), "base_params": base_params,
               "steps": args.steps, "processes": world, "seconds": round(time.time() - t_start, 1),
               "final_loss": loss_avg, "final_penalty": penalty, "val_loss": val_loss(), "ranks": ranks,
               "total_rank": sum(ranks.values())}
    if rank == 0:
        log.close()
        methods.save_adapter(model, args.out, args.method, cfg, **info)
        methods.write_json(args.out / "summary.json", summary)
        if ckpt.exists():
            os.remove(ckpt)  # the run is complete: the adapter is what remains
    say(f"done in {cli.fmt_time(summary['seconds'])}: task loss {loss_avg:.4f}, val loss {summary['val_loss']:.4f}, "
        f"total rank {summary['total_rank']}; wrote {args.out}/adapter.safetensors")
    say(next_commands(args))
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    cli.run(main, interrupted)
