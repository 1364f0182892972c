"""Planted ranks: does each method put its rank where the task needs it?

    python planted.py                          # every method at its defaults: a table and out/planted/ranks.png
    python planted.py --methods lora,sora --seed 1 --steps 300

A synthetic model of frozen linear modules y_i = x_i W0_iᵀ (random W0, `dim` x `dim`) whose targets
come from W0_i + ΔW*_i, with ΔW*_i of a known rank per module (PLANTED: some zero), anisotropic inputs
(the input variance along dimension k falls as 1/k) and Gaussian label noise. Each method trains its
adapter on it at its default Config through training.train_step — the very step train.py runs, with its
warmup + cosine schedule, clipping, and ALoRA's validation closure — and is then scored on fresh data:

- loss: the test loss over that of ΔW = 0 (1.0: nothing learnt; the label noise is the floor),
  and that loss over LoRA's;
- ranks: the live rank each module ends with, and ρ, their Spearman correlation with the planted ranks
  (undefined where every module ends with the same rank, as LoRA's and SARA's do by construction);
- closed: the share of the ranks the method started with that it switched off; live: the total rank
  at the end (LoRA's is 8 per module).

The methods' defaults are what train.py gives them, so the figures say what a user gets; they are
tiny problems (seconds a method on a CPU), not a claim about large models.
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

import cli
import methods
import training

PLANTED = (0, 0, 1, 2, 4, 4, 8, 8)  # the rank of the update each module needs


class Planted(nn.Module):
    """len(ranks) frozen linear modules, `m{i}.proj`, each fed its own input: x (B, M, dim) -> (B, M, dim)."""

    def __init__(self, dim, n_modules):
        super().__init__()
        self.m = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(dim, dim, bias=False)}) for _ in range(n_modules))
        for block in self.m:
            nn.init.normal_(block.proj.weight, std=dim ** -0.5)
        self.requires_grad_(False)
        self.register_buffer("null", torch.ones(n_modules))  # per module: the test loss of ΔW = 0

    def forward(self, x):
        return torch.stack([block.proj(x[:, i]) for i, block in enumerate(self.m)], 1)

    def loss(self, x, y):
        """Squared error summed over modules, over that of ΔW = 0: 1.0 means nothing learnt."""
        per_module = ((self(x) - y) ** 2).sum(-1).mean(0)  # (M,)
        return per_module.sum() / self.null.sum()


def planted_updates(dim, ranks, generator, size=1.0):
    """ΔW*_i = U diag(size) Vᵀ with random orthonormal U, V of rank ranks[i] (a zero matrix for 0)."""
    out = []
    for r in ranks:
        u = torch.linalg.qr(torch.randn(dim, max(r, 1), generator=generator))[0][:, :r]
        v = torch.linalg.qr(torch.randn(dim, max(r, 1), generator=generator))[0][:, :r]
        out.append(size * u @ v.T)
    return torch.stack(out)  # (M, dim, dim)


class Problem:
    """The frozen model, the planted updates and a sampler of (x, y) batches."""

    def __init__(self, dim=256, ranks=PLANTED, noise=0.03, seed=0):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = Planted(dim, len(ranks))
        self.delta = planted_updates(dim, ranks, g)
        self.scale = torch.arange(1, dim + 1, dtype=torch.float32) ** -0.5 * math.sqrt(dim / math.log(dim))
        self.noise, self.seed, self.ranks = noise, seed, ranks
        x, y = self.batch(4096, "test")
        with torch.no_grad():
            self.model.null.copy_(((self.model(x) - y) ** 2).sum(-1).mean(0))

    def batch(self, n, split, step=0):
        """n examples of every module: anisotropic inputs, targets from W0 + ΔW* plus noise."""
        offset = {"train": 0, "val": 1, "test": 2}[split]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 3 * step + offset)
        M, dim = self.delta.shape[:2]
        x = torch.randn(n, M, dim, generator=g) * self.scale
        w = torch.stack([b.proj.weight for b in self.model.m]) + self.delta  # (M, dim, dim)
        y = torch.einsum("bmi,moi->bmo", x, w) + self.noise * torch.randn(n, M, dim, generator=g)
        return x, y


def spearman(a, b):
    """Spearman's ρ (average ranks for ties); None where either side is constant."""
    def ranked(v):
        v = torch.tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    ra, rb = ranked(a), ranked(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_method(name, problem, steps=150, batch_size=64, lr=None):
    """Train `name` at its defaults on `problem` (which it adapts for good); the figures of one table row.
    lr None: the method's TRAINING lr, else train.py's default, as train.py would."""
    method = methods.get(name)
    lr = training.method_training(method).get("lr", training.LR) if lr is None else lr
    model = problem.model
    torch.manual_seed(problem.seed)
    method.apply(model, method.Config(targets=("proj",)))
    model.train()
    start_rank = sum(method.ranks(model).values())
    opt = torch.optim.AdamW(method.param_groups(model, lr, 0.0), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.lr_lambda(max(1, steps // 20), steps, "cosine"))
    val_loss = training.val_closure(model, problem.batch(256, "val"))
    for step in range(1, steps + 1):
        training.train_step(model, method, opt, sched, [problem.batch(batch_size, "train", step)], step, steps,
                         val_loss=val_loss)
    model.eval()
    with torch.no_grad():
        loss = model.loss(*problem.batch(4096, "test")).item()
    found = [method.ranks(model)[f"m.{i}.proj"] for i in range(len(problem.ranks))]
    return {"method": name, "loss": loss, "ranks": found, "rho": spearman(problem.ranks, found),
            "closed": 1 - sum(found) / start_rank, "live": sum(found), "lr": lr}


def table(rows):
    lora = next((r["loss"] for r in rows if r["method"] == "lora"), None)
    lines = [f"{'method':8} {'loss':>7} {'/LoRA':>6} {'rho':>6} {'closed':>7} {'live':>5}  ranks per module"]
    for r in rows:
        rho = "-" if r["rho"] is None else f"{r['rho']:.2f}"
        ratio = "-" if lora is None else f"{r['loss'] / lora:.2f}"
        lines.append(f"{r['method']:8} {r['loss']:7.4f} {ratio:>6} {rho:>6} {r['closed']:7.0%} {r['live']:5d}  "
                     f"{' '.join(f'{k:2d}' for k in r['ranks'])}")
    return "\n".join(lines)


def rank_norm(grid):
    """The colour scale of a grid of ranks: linear from 0 to 1, logarithmic above, so that one row of
    large ranks (Mo-SARA's 71) leaves a row of 0 to 16 in distinct colours."""
    from matplotlib.colors import SymLogNorm
    return SymLogNorm(linthresh=1, linscale=1, base=2, vmin=0, vmax=max(2, max(map(max, grid))))


def draw(rows, planted, path):
    """One heatmap: the planted ranks on top, each method's ranks below, a row per method."""
    import plots
    plt = plots.pyplot()
    grid = [list(planted)] + [r["ranks"] for r in rows]
    names = ["planted"] + [methods.get(r["method"]).TITLE for r in rows]
    norm = rank_norm(grid)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(planted), 0.8 + 0.4 * len(grid)))
    im = ax.imshow(grid, cmap="viridis", norm=norm, aspect="auto")
    for i, row in enumerate(grid):
        for j, k in enumerate(row):
            ax.text(j, i, str(k), ha="center", va="center", color="w" if norm(k) < 0.6 else "k", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(planted)), [f"m{i}" for i in range(len(planted))])
    ax.set_xlabel("module")
    ax.set_title("Live rank per module after training (planted ranks on top)")
    ticks = [0] + [2 ** e for e in range(int(math.log2(norm.vmax)) + 1)]
    fig.colorbar(im, ax=ax, label="rank (log scale above 1)", ticks=ticks, format="%d")
    plots.save(fig, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(methods.NAMES),
                   help="comma-separated (default: all; LoRA first, for the loss ratio)")
    p.add_argument("--steps", type=int, default=150, help="training steps of every method")
    p.add_argument("--batch-size", type=int, default=64, help="examples per step")
    p.add_argument("--lr", type=training.finite, default=None, help="AdamW's learning rate, for every method (default: each "
                   "method's own, as in train.py: its TRAINING lr, else 1e-3)")
    p.add_argument("--dim", type=int, default=256, help="each module is dim x dim")
    p.add_argument("--noise", type=training.finite, default=0.03, help="label noise, standard deviation per output")
    p.add_argument("--seed", type=int, default=0, help="seeds the modules, the data and the adapters")
    p.add_argument("--out", default="out/planted", help="where planted.json and ranks.png go")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in methods.NAMES]
    if unknown:
        raise ValueError(f"unknown method {', '.join(unknown)}: choose from {', '.join(methods.NAMES)}")
    cli.positive(args, "steps", "batch_size", "lr", "dim")
    if args.dim < max(PLANTED):
        raise ValueError(f"--dim must be at least {max(PLANTED)}, the largest planted rank, got {args.dim}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = []
    for name in args.methods:  # each on a fresh copy of the same problem
        rows.append(run_method(name, Problem(args.dim, PLANTED, args.noise, args.seed), args.steps,
                               args.batch_size, args.lr))
        print(f"{name}: loss {rows[-1]['loss']:.4f}, ranks {rows[-1]['ranks']}", flush=True)
    print(f"planted ranks {list(PLANTED)}; {args.dim}x{args.dim} modules, {args.steps} steps of {args.batch_size}, "
          f"lr {'per method' if args.lr is None else f'{args.lr:g}'}, noise {args.noise:g}, seed {args.seed}")
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planted.json").write_text(json.dumps({"planted": list(PLANTED), "args": vars(args), "rows": rows},
                                                 indent=1))
    try:
        draw(rows, PLANTED, out / "ranks.png")
        print(f"wrote {out}/planted.json and {out}/ranks.png")
    except ValueError as e:  # matplotlib is an optional extra
        print(f"wrote {out}/planted.json ({e})")
    return rows


if __name__ == "__main__":
    cli.run(main)
