"""Fine-tune a model with one LoRA-family method.

    python train.py --method sora --rmax 16                  # the default model and built-in task
    python train.py --method lora --model DIR --data train.json --steps 1000 --out out/mine
    python train.py --method sara --data MATH_DIR --seq-len 512      # LLM-Adapters' layout (benchmarks.py)
    python train.py --method lora --task commonsense --limit 500                 # see benchmarks.py

Every field of the method's Config is a flag (`init_r` -> `--init-r`); `--help` after
`--method NAME` lists them. The training settings a method file states in TRAINING (Mo-SARA's lr)
apply where their flag is not given. Writes into --out (default out/METHOD): adapter.safetensors,
config.json, log.jsonl (one line per logged step), summary.json; with --save-every N also
checkpoint.pt, from which --resume continues.

Data parallel: `torchrun --nproc_per_node N train.py ...` (gloo on CPU, NCCL on GPUs). --batch-size
stays the global batch; each process takes its share of every micro-batch, the adapter's gradients
(and nothing else) are summed across processes, and process 0 alone writes files and progress.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import adapters
import benchmarks
import cli
import data
import files
import methods
import models
import training


# ----------------------------------------------------------------------------- command line

SEEDS = 2**32  # data._order seeds a generator with seed * 100003 + epoch, which must fit in 64 bits


def parse_args(argv):
    """(the run's settings, the method's module, its Config, every setting's default for this run:
    training.defaults, which the recipe compares with) from the command line. A setting whose
    default follows others (the prompt, the warmup, --out) is filled in by training.resolved."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="lora")
    known, _ = pre.parse_known_args(argv)
    method = methods.get(known.method)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    training.add_flags(p, training.RunConfig)
    training.add_flags(p.add_argument_group(f"{known.method} method flags"), method.Config)
    flags = p.parse_args(argv)
    args = training.RunConfig(**{f.name: getattr(flags, f.name) for f in dataclasses.fields(training.RunConfig)})
    cfg_kwargs = {f.name: getattr(flags, f.name) for f in dataclasses.fields(method.Config)}
    cli.positive(args, "steps", "batch_size", "grad_accum", "seq_len", "log_every", "val_size", "lr", "limit")
    if args.batch_size % args.grad_accum:
        raise ValueError("--batch-size must be a multiple of --grad-accum")
    cli.non_negative(args, "clip", "weight_decay", "warmup")  # a negative clip would ascend the loss
    if not 0 <= args.seed < SEEDS:
        raise ValueError(f"--seed must be from 0 to {SEEDS - 1}, got {args.seed}")
    cli.check_device(args.device)
    plain = training.defaults(args, benchmarks.default_prompt(args.data, args.task),  # reads --data once
                              training.method_training(method))
    args = training.resolved(args, plain)
    if args.model and Path(args.model).exists() and files.overlaps(args.out, args.model):
        raise ValueError(f"--out {args.out} is, holds or lies inside the model {args.model}: a run never "
                         "writes into a model's directory")
    return args, method, method.Config(**cfg_kwargs), plain


# ----------------------------------------------------------------------------- pieces of the run

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
    files.atomic_write(path, lambda p: Path(p).write_text("".join(line + "\n" for line in keep)))


def log_step(line):
    """The step of a log.jsonl record, or None where the line is not one."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError, RecursionError):
        return None
    return step if type(step) is int else None


def interrupted(argv=None):
    """Ctrl-C's one line: the command that continues the run (from its last checkpoint, if any)."""
    argv = sys.argv[1:] if argv is None else argv
    world = int(os.environ.get("WORLD_SIZE", 1))
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    resume = [] if "--resume" in argv else ["--resume"]
    return f"interrupted: continue with `{launch} train.py {shlex.join([*argv, *resume])}`"


@contextlib.contextmanager
def finish_the_step():
    """Ctrl-C inside the block is noted (the list it yields gets an entry) instead of raised, so the
    loop can end the step in flight and checkpoint it; a second Ctrl-C raises at once."""
    asked = []
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield asked
        return

    def ask(signum, frame):
        asked.append(signum)
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


class Eta:
    """Time left in a run, from the mean time of each of its two kinds of step, measured apart: those
    whose after_step calls val_loss (`scoring`: ALoRA's rounds, few, long and bunched together) and
    the others. Steps of a kind not yet timed are counted instead ("+ 8 scoring rounds")."""

    def __init__(self, scoring):
        self.scoring = set(scoring)
        self.seconds, self.count = [0.0, 0.0], [0, 0]  # [other steps, scoring steps]

    def add(self, step, seconds):
        kind = step in self.scoring
        self.seconds[kind] += seconds
        self.count[kind] += 1

    def left(self, done, total, into=0.0):
        """The time after step `done` of `total`, `into` seconds into step done + 1, as a line's ETA."""
        scoring = sum(s > done for s in self.scoring)
        in_flight = done + 1 in self.scoring  # the kind of the step `into` seconds in
        seconds, untimed = 0.0, ""
        for kind, n, what in ((False, total - done - scoring, "step"), (True, scoring, "scoring round")):
            if n and self.count[kind]:
                mean = self.seconds[kind] / self.count[kind]
                seconds += n * mean - (min(into, mean) if kind == in_flight else 0.0)
            elif n:
                untimed += f" + {n} {what}{'s' if n > 1 else ''}"
        return cli.fmt_time(seconds) + untimed


PROGRESS_EVERY = 10.0  # seconds between the lines a long scoring round prints


def reporting(val_loss, say, step, eta, total, started):
    """val_loss, saying every PROGRESS_EVERY seconds how far the scoring round of step `step` (begun
    at time.time() `started`) has got: a round on the default model runs for minutes."""
    passes, last = 0, started

    def val_loss_reported(grad=False):
        nonlocal passes, last
        passes, now = passes + 1, time.time()
        if now - last >= PROGRESS_EVERY:
            last = now
            say(f"step {step}/{total} | scoring: validation pass {passes}, {cli.fmt_time(now - started)} into the "
                f"step | ETA {eta.left(step - 1, total, now - started)}", flush=True)
        return val_loss(grad)
    return val_loss_reported


def stop_asked(asked, world, device):
    """Did Ctrl-C reach any process? All of them stop after the same step."""
    if world == 1:
        return bool(asked)
    return bool(training.all_sum(torch.tensor([float(len(asked))], device=device), world).item())


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


def scalars(figures):
    return " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in figures.items() if isinstance(v, (int, float)))


def live_params(method, model, n_trainable):
    """The adapter's numbers still in use at the end: those of its LoRA form, without the ranks it
    switched off; a method with no LoRA form (Mo-SARA with several heads) uses all it trained."""
    if method.can_merge(model) is not None:
        return n_trainable
    return sum(a.numel() + b.numel() for a, b in method.to_lora(model).values())


def next_commands(args):
    """The last line of a run: how to evaluate and export what it wrote."""
    model = f" --model {args.model}" if args.model else ""
    test = f" --task {args.task}" if args.task else f" --data {args.data}" if args.data and Path(args.data).is_dir() else ""
    if args.data and data.kind_of(args.data) in ("messages", "text"):  # scored by loss on records it did not see
        test = " --data HELD_OUT.jsonl"
    return (f"next: python eval.py --adapter {args.out}{model}{test}   |   "
            f"python export.py --format peft --adapter {args.out}{model} --out {args.out}-peft")


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    """The run, with --out held by process 0 from the first check of what it holds to the last write
    (every process checks: they all see the same files, and none has written yet)."""
    args, method, cfg, plain = parse_args(sys.argv[1:] if argv is None else argv)
    first = int(os.environ.get("RANK", 0)) == 0
    with files.hold(args.out) if first else contextlib.nullcontext():
        finished = files.check_out(args.out, args.resume)
        if finished is None:
            return train(args, method, cfg, plain)
        steps = finished.get("steps") if isinstance(finished, dict) else None
        if steps != args.steps:  # its schedule ended and its optimizer state is gone: nothing to continue
            raise ValueError(f"{args.out} holds a finished run of {steps} steps: --resume continues an unfinished "
                             f"run and cannot extend a finished one to --steps {args.steps}; train into another --out")
        if first:
            print(f"{args.out} holds a finished run: nothing to resume")
        return finished


def train(args, method, cfg, plain):
    rank, world, device = init_distributed(args.device)
    if (args.batch_size // args.grad_accum) % world:
        raise ValueError(f"--batch-size / --grad-accum = {args.batch_size // args.grad_accum} examples per "
                         f"micro-batch do not split evenly over {world} processes")
    say = print if rank == 0 else (lambda *a, **k: None)  # process 0 speaks for all
    dtype, why = models.pick_dtype(args.dtype, device)
    args = dataclasses.replace(args, dtype=next(k for k, v in models.DTYPES.items() if v == dtype))  # recorded
    # (and resumed) as resolved
    if world > 1:  # auto measures per process: process 0's choice holds for all
        choice = torch.tensor([list(models.DTYPES).index(args.dtype)], device=device)
        dist.broadcast(choice, 0)
        args = dataclasses.replace(args, dtype=list(models.DTYPES)[int(choice)])
        dtype = models.DTYPES[args.dtype]
    say(f"dtype: {str(dtype).removeprefix('torch.')} for the frozen base, float32 for the adapter ({why})")
    applied = {k: v for k, v in training.method_training(method).items() if getattr(args, k) == v}
    for key, value in applied.items():
        flag = key.replace("_", "-")
        say(f"{args.method}: {flag} {value:g} (the method's default; --{flag} to override)")
    ckpt, settings = args.out / "checkpoint.pt", training.fixed(args, cfg)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = models.load(args.model, dtype)
    if args.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens")
    base_params = sum(p.numel() for p in model.parameters())
    base_buffers = {k for k, _ in model.named_buffers()}
    train_set, val_batch = training.load_data(args, tok)
    inputs = training.inputs(args, train_set, val_batch)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.lr_lambda(args.warmup, args.steps, args.schedule))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    val_loss = training.val_closure(model, val_batch)
    start = (training.load_checkpoint(ckpt, model, opt, sched, base_buffers, settings, inputs, scaler)
             if args.resume and ckpt.exists() else 0)
    if args.resume and not start:
        say(f"no checkpoint in {args.out}: starting from step 0")
    info = {"base_model": models.resolve(args.model), "model_config": dataclasses.asdict(model.cfg),
            "train_args": training.recorded(args), "method_defaults": applied,
            "recipe": training.recipe(args, cfg, plain)}
    if rank == 0 and start:
        trim_log(args.out / "log.jsonl", start)
    log = None  # opened with its first record: a run that fails before it leaves no empty log behind

    t_start, tokens, loss_avg = time.time(), 0, None
    eta = Eta(method.val_loss_steps(model, args.steps))
    with finish_the_step() as asked:  # Ctrl-C: this step ends and is checkpointed, then the run stops
        for step in range(start + 1, args.steps + 1):
            t_step = time.time()
            batches = training.step_batches(train_set, args, step, rank, world, device)
            lr = opt.param_groups[0]["lr"]  # the lr this step uses (the scheduler steps at its end)
            scored = reporting(val_loss, say, step, eta, args.steps, t_step)
            (task_loss, penalty), figures = training.train_step(model, method, opt, sched, batches, step, args.steps,
                                                                clip=args.clip, val_loss=scored, world=world,
                                                                scaler=scaler)
            tokens += sum(x.numel() for x, _ in batches) * world

            loss_avg = task_loss if loss_avg is None else 0.9 * loss_avg + 0.1 * task_loss
            progress = step % args.log_every == 0 or step == args.steps
            elapsed = time.time() - t_start
            if progress:  # every process computes it: val_loss is a forward like any other
                figures["val_loss"] = val_loss()
            if rank == 0 and (figures or progress):  # a method's figures (e.g. an ALoRA round) are never dropped
                rec = {"step": step, "loss": task_loss, "penalty": penalty, "lr": lr,
                       "tokens_per_s": tokens / elapsed, **figures}
                log = log or open(args.out / "log.jsonl", "a" if start else "w")
                log.write(json.dumps(rec) + "\n")
                log.flush()
            eta.add(step, time.time() - t_step)
            if progress:
                extra = scalars({k: v for k, v in figures.items() if k != "val_loss"})
                say(f"step {step}/{args.steps} | loss {loss_avg:.4f} | val loss {figures['val_loss']:.4f} | "
                    f"lr {lr:.2e} | {tokens / elapsed:.0f} tok/s | ETA {eta.left(step, args.steps)}"
                    + (f" | {extra}" if extra else ""), flush=True)
            stop = stop_asked(asked, world, device)
            if rank == 0 and (stop or args.save_every and step % args.save_every == 0) and step < args.steps:
                adapters.save_adapter(model, args.out, args.method, cfg, **info)
                training.save_checkpoint(ckpt, model, opt, sched, base_buffers, settings, inputs, step, scaler)
            if stop and step < args.steps:
                raise KeyboardInterrupt  # after the checkpoint of this step: --resume continues from it

    model.eval()
    ranks = method.ranks(model)
    summary = {"method": args.method, "trainable_params": n_trainable,
               "live_params": live_params(method, model, n_trainable), "base_params": base_params,
               "steps": args.steps, "processes": world, "seconds": round(time.time() - t_start, 1),
               "final_loss": loss_avg, "final_penalty": penalty, "val_loss": val_loss(), "ranks": ranks,
               "total_rank": sum(ranks.values())}
    if rank == 0:
        log.close()  # the last step always logs
        adapters.save_adapter(model, args.out, args.method, cfg, **info)
        files.write_json(args.out / "summary.json", summary)
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
