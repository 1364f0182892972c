"""Figures of trained adapters and the README's results table; eval.py's --plot and --markdown.

    python eval.py --plot figs --adapter runs/sara runs/sora runs/mosara   # PNGs into figs/, no evaluation
    python eval.py --adapter runs/lora runs/sora --limit 200 --markdown    # rows for the README's table

The drawing functions take plain data (dicts and lists) and a path and write one PNG each; the
functions above them gather that data from adapter directories and the base model. matplotlib is
an optional extra, imported only when something is drawn.
"""
import copy
import itertools
import json
import math
import re
from pathlib import Path

import torch

import adapters
import cli
import data
import files
import methods

MATPLOTLIB = "matplotlib==3.11.2"
THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.5)  # SARA's sweep (its paper's Fig. 2), plus the adapter's own
ROUTER_EXAMPLES = 8


def pyplot():
    """matplotlib.pyplot on the file-only backend; a one-sentence error when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(f"--plot needs matplotlib, an optional extra: pip install {MATPLOTLIB}") from None
    matplotlib.use("Agg")  # no display here, and none needed
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- reading runs

def read_log(adapter_dir):
    """log.jsonl as a list of records ([] when the run left none)."""
    path = Path(adapter_dir) / "log.jsonl"
    if not path.exists():
        return []
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise adapters.AdapterError(f"{path} is not JSON lines ({e})") from None


def series(log, key):
    """(steps, values) of the records that carry `key`."""
    recs = [r for r in log if key in r]
    return [r["step"] for r in recs], [r[key] for r in recs]


def run_facts(adapter_dir, meta):
    """Row fields from the adapter's training run: train seconds, total rank, steps, and its recipe
    (the train.py flags that differ from their defaults, as train.py recorded them in config.json,
    whose content `meta` is)."""
    summary = adapters.read_summary(adapter_dir)
    facts = {"flags": meta.get("recipe", "")}
    for key, src in (("train_seconds", "seconds"), ("total_rank", "total_rank"), ("live_params", "live_params"),
                     ("steps", "steps")):
        if src in summary:
            facts[key] = summary[src]
    return facts


# ----------------------------------------------------------------------------- data from models

def by_layer(per_module, targets):
    """{module name: value} -> {matrix: [value per layer]} (None where a layer has no such module).

    `targets` is the model's TARGETS table (logical name -> module-name suffix); a module no entry
    matches keeps its last name component as its matrix name.
    """
    cells = {}
    for name, value in per_module.items():
        layer = re.search(r"\.(\d+)\.", name)
        if layer is None:
            raise ValueError(f"{name}: no layer number in the module name")
        matrix = next((t for t, suffix in targets.items() if name.endswith("." + suffix)), name.rsplit(".", 1)[-1])
        cells[matrix, int(layer.group(1))] = value
    n_layers = 1 + max(layer for _, layer in cells)
    found = {m for m, _ in cells}
    order = [t for t in targets if t in found] + sorted(found - set(targets))
    return {m: [cells.get((m, i)) for i in range(n_layers)] for m in order}


def sara_sweep(base, targets, thresholds):
    """{threshold: {module: k}}: the rank SARA gives each layer at each threshold (svdvals of W0)."""
    sara = methods.get("sara")
    return {t: sara.ranks(sara.apply(copy.deepcopy(base), sara.Config(threshold=t, targets=targets)))
            for t in thresholds}


@torch.no_grad()
def router_means(model, tok, examples, style="chat"):
    """{module: [mean gate per head]} of a Mo-SARA model over the prompt and response tokens of each
    example, averaged over the examples (one forward each: no padding tokens in the means)."""
    mosara = methods.get("mosara")
    encoded = data.encode_all(tok, examples, model.cfg.max_seq_len, style)
    total = {}
    for ids, _ in encoded:
        model(torch.tensor([ids]))
        for name, gates in mosara.router_weights(model).items():
            total[name] = total.get(name, 0) + torch.tensor(gates)
    return {name: (g / len(encoded)).tolist() for name, g in total.items()}


# ----------------------------------------------------------------------------- drawing

def save(fig, path):
    files.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    pyplot().close(fig)  # pyplot keeps every open figure alive otherwise


def layer_axis(ax, n_layers):
    ax.set_xticks(range(n_layers))
    ax.set_xticklabels([str(i) if i % 5 == 0 or n_layers <= 12 else "" for i in range(n_layers)])
    ax.set_xlabel("layer")


def log_tick_values(lo, hi):
    """The labelled ticks of a log axis over [lo, hi] (0 < lo < hi): 1, 2, 5, 10, 20, … where three
    of them fall inside; else the multiples of the largest round step (5, 2 or 1 times a power of
    ten) of which three do, so that a narrow range (a loss between 2.1 and 2.6) reads 2.1, 2.2, …"""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    steps = (m * 10.0 ** e for e in itertools.count(math.floor(math.log10(hi - lo)), -1) for m in (5, 2, 1))
    while len(ticks) < 3:
        step = next(steps)
        ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return ticks


def log_ticks(ax):
    """A log y axis labelled in plain numbers at log_tick_values of its range (set once the data is drawn)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(log_tick_values(*ax.get_ylim())))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def rank_heatmap(grid, title, path):
    """grid {matrix: [rank per layer]}: one row per matrix, one column per layer, the rank written in."""
    plt = pyplot()
    rows = list(grid)
    n_layers = len(next(iter(grid.values())))
    values = torch.tensor([[float("nan") if v is None else v for v in grid[m]] for m in rows])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.38 * n_layers + 2), 1.3 + 0.45 * len(rows)))
    im = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0)
    top = float(values.nan_to_num(0).max()) or 1.0
    for r, m in enumerate(rows):
        for i, v in enumerate(grid[m]):
            if v is not None:
                ax.text(i, r, str(v), ha="center", va="center", fontsize=7, color="white" if v < 0.6 * top else "black")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.set_ylabel("matrix")
    layer_axis(ax, n_layers)
    fig.colorbar(im, ax=ax, label="rank", pad=0.01, fraction=0.03)
    ax.set_title(title, fontsize=10)
    save(fig, path)


def threshold_lines(sweep, title, path, mark=None):
    """sweep {threshold: {matrix: [k per layer]}}: k against layer, one line per threshold, a panel per
    matrix; the threshold `mark` (the adapter's) drawn bold."""
    plt = pyplot()
    matrices = list(next(iter(sweep.values())))
    n_layers = len(next(iter(sweep.values()))[matrices[0]])
    fig, axes = plt.subplots(len(matrices), 1, figsize=(9, 2.6 * len(matrices) + 0.6), sharex=True, squeeze=False)
    for ax, m in zip(axes[:, 0], matrices):
        for t, grid in sorted(sweep.items()):
            ax.plot(range(n_layers), grid[m], marker="o", markersize=3, linewidth=2.5 if t == mark else 1,
                    label=f"{t:g} (this adapter)" if t == mark else f"{t:g}")
        log_ticks(ax)
        ax.set_ylabel(f"k ({m})")
        ax.grid(True, which="both", alpha=0.3)
    layer_axis(axes[-1, 0], n_layers)
    axes[0, 0].legend(title="threshold", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[0, 0].set_title(title, fontsize=10)
    save(fig, path)


def router_heatmap(grid, title, path):
    """grid {matrix: [[mean gate per head] per layer]}: heads as rows, layers as columns, a panel per
    matrix; the colour scale is centred on the uniform gate 1/heads."""
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    matrices = list(grid)
    n_layers, heads = len(grid[matrices[0]]), len(next(g for g in grid[matrices[0]] if g is not None))
    values = {m: torch.tensor([[float("nan")] * heads if g is None else g for g in grid[m]]).T for m in matrices}
    top = max(float(v.nan_to_num(0).max()) for v in values.values())
    norm = TwoSlopeNorm(vcenter=1 / heads, vmin=0, vmax=max(top, 1.5 / heads))
    fig, axes = plt.subplots(len(matrices), 1, figsize=(max(6.0, 0.32 * n_layers + 2), 1.2 + 1.4 * len(matrices)),
                             sharex=True, squeeze=False)
    for ax, m in zip(axes[:, 0], matrices):
        im = ax.imshow(values[m].numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_yticks(range(heads))
        ax.set_yticklabels([f"head {h}" for h in range(heads)], fontsize=7)
        ax.set_ylabel(m)
    layer_axis(axes[-1, 0], n_layers)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label=f"mean gate (uniform = {1 / heads:.2g})", pad=0.01, fraction=0.03)
    axes[0, 0].set_title(title, fontsize=10)
    save(fig, path)


def window_mean(steps, values, n):
    """At each logged step s, the mean of the values logged in the steps (s - n, s]."""
    return [sum(w) / len(w) for w in ([v for t, v in zip(steps, values) if s - n < t <= s] for s in steps)]


def curves(lines, title, ylabel, path, log_y=False, smooth=1):
    """lines {label: (steps, values)} on one axis. With smooth=n each series is drawn faint as logged
    and solid as its mean over the last n steps, so runs logged every step compare with runs logged
    every n steps (whose solid line is the logged one)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (steps, values) in lines.items():
        line, = ax.plot(steps, window_mean(steps, values, smooth), label=label, linewidth=1.4,
                        marker="o" if len(steps) < 30 else None, markersize=3)  # sparse logs: show each point
        if smooth > 1:
            ax.plot(steps, values, linewidth=0.6, alpha=0.3, color=line.get_color())
    if log_y:
        log_ticks(ax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    save(fig, path)


# ----------------------------------------------------------------------------- every figure

def title(method):
    """The method's name as its paper writes it (its file's TITLE); a name the registry lacks as it is."""
    return methods.get(method).TITLE if method in methods.NAMES else method


def label(name, method):
    """The adapter's directory name with its method, or the method alone where they agree."""
    pretty = title(method)
    return pretty if name == method else f"{name} ({pretty})"


def adapter_figures(out, base, tok, adapter_dir, examples, model_name):
    """One adapter's figures: its ranks; SARA's threshold sweep; Mo-SARA's router. The paths written."""
    model, meta = adapters.load_adapter(copy.deepcopy(base), adapter_dir)
    model.eval()
    name, kind = Path(adapter_dir).name, meta["method"]
    who = label(name, kind)
    if kind == "lora":  # one fixed rank everywhere: nothing to draw
        return []
    targets = getattr(base, "TARGETS", {})
    ranks = methods.get(kind).ranks(model)
    what = {"sara": "k per layer, set at init from the spectrum of W0",
            "mosara": "k per layer (frozen singular directions)"}.get(kind, "final rank per layer")
    written = [out / f"ranks_{name}.png"]
    rank_heatmap(by_layer(ranks, targets), f"{who}: {what}, total {sum(ranks.values()):,}\n{model_name}", written[-1])
    if kind == "sara":
        cfg = meta["config"]
        sweep = sara_sweep(base, tuple(cfg["targets"]), sorted({*THRESHOLDS, cfg["threshold"]}))
        written.append(out / f"sara_thresholds_{name}.png")
        threshold_lines({t: by_layer(k, targets) for t, k in sweep.items()},
                        f"SARA: k per layer from the spectrum of W0 at each threshold\n{model_name}", written[-1],
                        mark=cfg["threshold"])
    if kind == "mosara":
        examples = examples[:ROUTER_EXAMPLES]
        written.append(out / f"router_{name}.png")
        style = meta.get("train_args", {}).get("prompt") or "chat"  # the prompts it was trained on
        gates = by_layer(router_means(model, tok, examples, style), targets)
        router_heatmap(gates, f"{who}: mean router gate per head, over {len(examples)} test examples\n{model_name}",
                       written[-1])
    return written


def training_figures(out, adapter_dirs, model_name):
    """Loss and live-rank curves of all the adapters from their log.jsonl. The paths written."""
    logs = {label(Path(d).name, adapters.read_config(d)["method"]): read_log(d) for d in adapter_dirs}
    written = []
    losses = {k: series(log, "loss") for k, log in logs.items() if series(log, "loss")[0]}
    if losses:
        written.append(out / "loss.png")
        curves(losses, f"Training task loss (without the methods' regularisers)\nfaint: each logged step; "
               f"solid: mean over the last 10 steps. {model_name}", "task loss", written[-1], log_y=True, smooth=10)
    val = {k: series(log, "val_loss") for k, log in logs.items() if series(log, "val_loss")[0]}
    if val:
        written.append(out / "val_loss.png")
        curves(val, f"Validation loss during training (every --log-every steps)\n{model_name}", "validation loss",
               written[-1], log_y=True)
    live = {k: series(log, "live_rank") for k, log in logs.items() if series(log, "live_rank")[0]}
    if live:
        written.append(out / "live_rank.png")
        curves(live, f"Live total rank during training\n{model_name}", "live rank (all modules)", written[-1])
    return written


def write_all(out_dir, base, tok, adapter_dirs, examples, model_name):
    """Every figure for the adapters into out_dir; returns the paths written."""
    names = [Path(d).name for d in adapter_dirs]
    if len(set(names)) < len(names):
        raise ValueError(f"figures are named after the adapter directories, and two share a name: {names}")
    out = Path(out_dir)
    written = [p for d in adapter_dirs for p in adapter_figures(out, base, tok, d, examples, model_name)]
    return written + training_figures(out, adapter_dirs, model_name)


# ----------------------------------------------------------------------------- the results table

COLUMNS = ("method", "trainable params", "live params", "% of base", "final total rank", "{metric}", "train time")


def by_recipe(rows):
    """Rows that differ only in their --seed, grouped, in first-seen order: [[row, ...], ...]."""
    groups = {}
    for row in rows:
        flags = re.sub(r"(^| )--seed \S+", "", row.get("flags", "")).strip()
        groups.setdefault((row["method"], flags), []).append({**row, "flags": flags})
    return list(groups.values())


def mean_sd(values):
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, sd


def markdown_table(rows):
    """eval.py's rows as the README's results table (header, rule, one line per row); with several
    test sets, a column per set and then their average, as the papers' tables have. Runs that differ
    only in their seed make one line: the mean ± the standard deviation over the seeds (scores), the
    mean (ranks, live parameters, times)."""
    metric = "perplexity" if rows and "perplexity" in rows[0] else "accuracy"
    sets = list(rows[0]["sets"]) if rows and len(rows[0].get("sets", {})) > 1 else []
    scale, unit, digits = (1, "", 3) if metric == "perplexity" else (100, "%", 1)
    scores = [*sets, "all" if metric == "perplexity" else "avg"] if sets else [metric]
    head = [*COLUMNS[:5], *scores, COLUMNS[6]]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]

    def shown(values):
        mean, sd = mean_sd([scale * v for v in values])
        return f"{mean:.{digits}f}{unit}" + ("" if sd is None else f" ± {sd:.{digits}f}")

    def average(group, key, fmt):
        return fmt(mean_sd([r[key] for r in group])[0]) if all(key in r for r in group) else "–"

    for group in by_recipe(rows):
        row = group[0]
        name = "base model" if row["method"] == "base" else title(row["method"])
        if row["flags"]:
            name += f" `{row['flags']}`"
        if len(group) > 1:
            name += f" ({len(group)} seeds)"
        values = [shown([r["sets"][s] for r in group]) for s in sets] + [shown([r[metric] for r in group])]
        cells = [name, f"{row['trainable_params']:,}", average(group, "live_params", lambda v: f"{round(v):,}"),
                 f"{row['share']:.3f}", average(group, "total_rank", lambda v: f"{round(v):,}"), *values,
                 average(group, "train_seconds", cli.fmt_time)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
