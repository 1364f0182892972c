"""A run's settings and the training loop's pieces: what train.py runs, importable by bench.py,
planted.py and the tests without running a script.

RunConfig holds one run's settings; add_flags turns it, like a method's Config, into command-line
flags (`seq_len` -> `--seq-len`). Each setting's metadata says whether it is part of the recipe (the
flags the results table shows when not their defaults) and whether a resumed run must keep it:
recipe(), fixed() (what a checkpoint records and a resume checks) and recorded() (config.json's
train_args) are derived from it, and from nothing else.
"""
import argparse
import dataclasses
import inspect
import keyword
import math
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import adapters
import benchmarks
import data
import files
import methods
import models
from data import PROMPTS  # `data` is a setting's name


# ----------------------------------------------------------------------------- the run's settings

def setting(default, help=None, *, choices=None, group=None, recipe=True, fixed=True):
    """A RunConfig field. `help` and `choices` go to its flag; flags of one `group` exclude each other.
    `recipe`: shown in the recipe when not its default; `fixed`: a resumed run must keep its value."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group,
                                                        "recipe": recipe, "fixed": fixed})


@dataclass
class RunConfig:
    """One train.py run. A setting left None whose default follows other settings (the prompt, the
    warmup, --out) gets it from defaults() through resolved()."""
    method: str = setting("lora", "the method to train: methods/METHOD.py", choices=methods.NAMES, recipe=False)
    model: str | None = setting(None, "a .gguf file or HF checkpoint directory (default: SmolLM2-135M-Instruct)",
                                recipe=False)
    data: str | None = setting(None, "a .json/.jsonl file of LLM-Adapters records, "
                               '{"messages": [...]} chats or {"text": ...} texts, or a directory holding train.json '
                               "(default: the built-in task)", group="source", recipe=False)
    task: str | None = setting(None, "a paper benchmark (see benchmarks.py; default: none)", choices=benchmarks.TASKS,
                               group="source", recipe=False)
    limit: int | None = setting(None, "train on a seeded sample of N examples per set "
                                "(per task with --task commonsense; chunks with --task shakespeare); default: all")
    prompt: str | None = setting(None, "prompt template (default: chat for the built-in task, LLM-Adapters' "
                                 "alpaca for --data and --task commonsense)", choices=PROMPTS)
    steps: int = setting(150, "optimizer steps")
    batch_size: int = setting(8, "examples per optimizer step (all micro-batches)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    seq_len: int = setting(256, "longest example in tokens; longer ones are skipped "
                           "(texts are cut into chunks of this length)")
    lr: float | None = setting(None, "AdamW's learning rate, the peak of the schedule (default: the method's "
                               "TRAINING lr where it sets one, else 1e-3)")
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay of the adapter's parameters")
    warmup: int | None = setting(None, "warmup steps (default: 5%% of --steps)")
    schedule: str = setting("cosine", "the lr's decay to 0 after the warmup", choices=("cosine", "linear"))
    clip: float = setting(1.0, "gradient-norm clip (0: off)")
    val_size: int = setting(16, "held-out examples for methods that score on them")
    seed: int = setting(0, "seeds the adapter's init, the order of the examples and the dropout")
    out: Path | None = setting(None, "output directory (default: out/METHOD)", recipe=False, fixed=False)
    log_every: int = setting(10, "a progress line and a validation loss every N steps", recipe=False, fixed=False)
    save_every: int = setting(0, "write checkpoint.pt every N steps (0: only at the end)", recipe=False, fixed=False)
    resume: bool = setting(False, "continue from OUT/checkpoint.pt", recipe=False, fixed=False)
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda when available)", recipe=False,
                                 fixed=False)
    dtype: str = setting("auto", "the frozen base's dtype; the adapter stays float32 (auto: the fastest of them "
                         "on this device, measured; fp16: CUDA or AVX512-FP16 only)", choices=("auto", *models.DTYPES))


def finite(text):
    """A float flag's type: a number, never NaN or ±inf, refused as the flag is parsed (argparse names
    it), so a non-finite value never reaches a run to surface as a non-finite loss."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_flags(parser, config_cls):
    """One flag per dataclass field (`init_r` -> `--init-r`): the type comes from the annotation (a
    float's is finite()), the default from the field; help, choices and groups of flags that exclude each other from the
    field's metadata where it has them (RunConfig's do), else the help is the comment on the field's
    line (a method's Config documents its fields so); cli.HelpFormatter adds the default."""
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    groups = {}
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if meta.get("group") and meta["group"] not in groups:
            groups[meta["group"]] = parser.add_mutually_exclusive_group()
        where = groups.get(meta.get("group"), parser)
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        help = meta.get("help") or comments.get(f.name, "").replace("%", "%%").replace("None -> ", "default: ").replace("None: ", "default: ")
        if hint is bool:
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif typing.get_origin(hint) is tuple:
            where.add_argument(flag, type=lambda s: tuple(x for x in s.split(",") if x),
                               default=f.default, metavar="A,B,...", help=f"{help} (default: {','.join(f.default)})")
        else:
            kind = args[0] if args else hint  # `int | None` -> int
            where.add_argument(flag, type=finite if kind is float else kind, default=f.default, choices=meta.get("choices"), help=help)


def field_comments(cls):
    """{field name: the comment on the line that declares it, and on the lines below it that hold a
    comment alone, indented past the fields} in a dataclass's source."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines(keepends=True)
    except (OSError, TypeError):  # no source (a class built at run time): no help
        return {}
    comments, name, last = {}, None, None
    for tok in tokenize.generate_tokens(iter(lines).__next__):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:  # a field, or a def
            name = last = "" if keyword.iskeyword(tok.string) else tok.string
        elif tok.type == tokenize.COMMENT and name:
            comments[name] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.COMMENT and last in comments and tok.start[1] > 4:  # the comment goes on
            comments[last] += " " + tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NEWLINE:
            name = None
        elif tok.type == tokenize.NL and name is None and tok.start[1] == 0:
            last = None  # a blank line ends a comment
    return comments


LR = 1e-3  # --lr where neither the command line nor the method's TRAINING sets it


def method_training(method):
    """The training settings a method file states in TRAINING (Mo-SARA's lr): defaults of this run,
    for the settings whose default is worked out per run (None in RunConfig)."""
    given = getattr(method, "TRAINING", {})
    per_run = {f.name for f in dataclasses.fields(RunConfig) if f.default is None}
    wrong = sorted(set(given) - per_run)
    if wrong:
        raise ValueError(f"{method.NAME}'s TRAINING names {', '.join(wrong)}: only {', '.join(sorted(per_run))} "
                         "take a method's default")
    return dict(given)


def defaults(run, data_prompt, method_training):
    """Every setting's default for this run: its field's, but for those that follow other settings:
    the prompt follows --data and --task (`data_prompt`: benchmarks.default_prompt's, which reads the
    data file), the warmup --steps (5% of them), --out --method (out/METHOD), and the lr the method
    (`method_training`: its TRAINING, else LR)."""
    return {**{f.name: f.default for f in dataclasses.fields(RunConfig)},
            "prompt": data_prompt, "warmup": max(1, run.steps // 20), "out": Path(f"out/{run.method}"),
            "lr": LR, **method_training}


def default_run(method):
    """The settings of `train.py --method NAME` with no other flag (bench.py times such runs)."""
    run = RunConfig(method=method.NAME)
    return resolved(run, defaults(run, benchmarks.default_prompt(None, None), method_training(method)))


def resolved(run, plain):
    """`run` with each setting left None given its default for this run (`plain`: defaults())."""
    return dataclasses.replace(run, **{k: v for k, v in plain.items() if getattr(run, k) is None})


def config_default(cfg, f):
    """The default of the Config field `f` beside cfg's other fields: the field's own, or, where that
    is None (the value follows other fields, as ALoRA's rmax follows r), what the Config makes of None."""
    return getattr(dataclasses.replace(cfg, **{f.name: None}), f.name) if f.default is None else f.default


def recipe(run, cfg, plain):
    """The settings of this run and of its method's Config that differ from their defaults, as one
    would type them: config.json's "recipe", which the results table shows. `plain` is defaults() of
    this run: a default that follows other settings is that of a run on the same data and of the
    same length."""
    settings = [(f.name, getattr(run, f.name), plain[f.name]) for f in dataclasses.fields(run) if f.metadata["recipe"]]
    settings += [(f.name, getattr(cfg, f.name), config_default(cfg, f)) for f in dataclasses.fields(cfg)]
    flags = []
    for key, value, default in settings:
        if value == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            text = ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value
            flags.append(f"{flag} {text}")
    return " ".join(flags)


def fixed(run, cfg):
    """What a resumed run must share with the run it continues, as a checkpoint records it: the
    settings marked fixed, the model and data paths as the places they lead to (`dir/../dir` is
    `dir`), and the method's Config."""
    paths = {"model": str(Path(models.resolve(run.model)).resolve()),
             "data": run.data and str(Path(run.data).resolve())}
    return {**{f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.metadata["fixed"]},
            **paths, **dataclasses.asdict(cfg)}


def recorded(run):
    """Every setting, as config.json's train_args records it (paths as text)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(run).items()}


# ----------------------------------------------------------------------------- pieces of the run

def lr_lambda(warmup, steps, schedule):
    """The multiplier of the base lr after `step` optimizer steps: a linear warmup over `warmup` steps,
    then `schedule` ("cosine" or "linear") down to 0 at `steps`."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return f


def load_data(args, tok):
    """(the encoded training items, the validation batch): the built-in task's own validation split,
    or the last --val-size items of the data, held out."""
    data.need_tokenizer(tok)
    train = benchmarks.train_set(tok, args.data, args.task, args.prompt, args.seq_len, args.limit, args.seed)
    if args.data is None and args.task is None:
        val = data.encode_all(tok, data.arithmetic("val", args.val_size), args.seq_len, args.prompt)
    else:  # hold out the last examples; they never train
        if len(train) <= args.val_size:
            raise data.DataError(f"{args.data or args.task} has {len(train)} usable examples: fewer than --val-size + 1")
        train, val = train[:-args.val_size], train[-args.val_size:]
    return train, data.collate(val)


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


def val_closure(model, val_batch):
    def val_loss(grad=False):
        """The loss on val_batch in eval mode: a float, or (grad=True) a tensor to backward from."""
        was_training = model.training
        model.eval()
        with torch.set_grad_enabled(grad):
            loss = model.loss(*val_batch)
        model.train(was_training)
        return loss if grad else loss.item()
    return val_loss


def method_state(model, base_buffers):
    """Buffers the method added that are not in the adapter file: gates, EMAs, λ ... (its training state)."""
    adapter = adapters.adapter_state(model)
    return {k: v.detach().cpu().clone() for k, v in model.named_buffers()
            if k not in base_buffers and k not in adapter}


# what save_checkpoint writes (besides cuda_rng and scaler, which depend on the hardware) -> its type
CHECKPOINT = {"adapter": dict, "method_state": dict, "optimizer": dict, "scheduler": dict, "step": int,
              "rng": torch.Tensor, "train_args": dict, "model_config": dict, "inputs": dict}


def inputs(run, train_set, val_batch):
    """The fingerprints of what a run reads, which a resume compares by content: the model's files
    (models.fingerprint) and the tokens it trains and validates on (data.fingerprint)."""
    return {"model": models.fingerprint(run.model), "data": data.fingerprint([*train_set, val_batch])}


def save_checkpoint(path, model, opt, sched, base_buffers, settings, inputs, step, scaler=None):
    state = {"adapter": adapters.adapter_state(model), "method_state": method_state(model, base_buffers),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
             "rng": torch.get_rng_state(), "train_args": settings, "model_config": dataclasses.asdict(model.cfg),
             "inputs": inputs}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    if scaler:
        state["scaler"] = scaler.state_dict()
    files.atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path, model, opt, sched, base_buffers, settings, inputs, scaler=None):
    """Restore everything save_checkpoint wrote, once it is checked to be what this run would have
    written: its keys and types, its flags, its model (its shape, then its files' content), its data
    (the tokens), the adapter's tensors and the method's own buffers (no others: a base weight is
    never written from a checkpoint). Returns its step."""
    try:
        state = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
        wrong = sorted(k for k, kind in CHECKPOINT.items() if not isinstance(state.get(k), kind))
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint {path} ({type(e).__name__}): delete it to start over") from None
    if wrong or not 0 < state["step"] < settings["steps"]:
        raise ValueError(f"{path} is not a checkpoint of this run ({', '.join(wrong) or 'step'} missing or "
                         "wrong): delete it to start over")
    saved_args = state["train_args"]
    changed = sorted(k for k in settings.keys() | saved_args.keys() if settings.get(k) != saved_args.get(k))
    if changed:
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed)}): "
                         "resume with the same flags or choose another --out")
    if state["model_config"] != dataclasses.asdict(model.cfg):
        raise ValueError(f"{path} was written for another model than {settings['model']}: "
                         "resume with the model the run started with")
    if state["inputs"].get("model") != inputs["model"]:
        raise ValueError(f"--model {settings['model']} holds other files than when {path} was written (other "
                         "weights or config at the same path): resume with the model the run started with")
    if state["inputs"].get("data") != inputs["data"]:
        source = (f"--data {settings['data']}" if settings["data"] else
                  f"--task {settings['task']}" if settings["task"] else "the built-in task")
        raise ValueError(f"the training data ({source}) is not what {path} was written with (the data or "
                         "the tokenizer changed since): resume with the data the run started with")
    adapters.check_tensors(state["adapter"], adapters.adapter_state(model), f"{path} (adapter)")
    adapters.check_tensors(state["method_state"], method_state(model, base_buffers), f"{path} (method state)")
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


# ----------------------------------------------------------------------------- one optimizer step

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


def train_step(model, method, opt, sched, batches, step, total_steps, *, clip=1.0, val_loss=None, world=1,
               scaler=None):
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


# ----------------------------------------------------------------------------- transformers models

class HFLoss(nn.Module):
    """A transformers causal LM behind our model's forward and `loss(idx, targets)`, so train_step drives it."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx):
        return self.hf(input_ids=idx).logits

    def loss(self, idx, targets):
        logits = self(idx)  # (B, T, vocab), the same positions as ours
        # log-softmax in float32, as ours and transformers' own loss compute it in any dtype
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
