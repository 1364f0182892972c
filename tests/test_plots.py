"""eval.py --plot and --markdown (plots.py) on adapters trained for a few steps on a tiny checkpoint."""
import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import data
import eval as evaluate
import methods
import models
import plots
import train
import training
from helpers import FAST, ROOT

PNG = b"\x89PNG\r\n\x1a\n"
SHORT = [*FAST, "--steps", "6", "--log-every", "2"]  # every ALoRA, AdaLoRA, SoRA figure still happens
EXTRA = {"lora": ["--r", "4", "--lr", "0.01"], "sara": ["--threshold", "0.3"], "mosara": ["--heads", "3"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint):
    """{method: adapter dir}, one short run each; lora and mosara with non-default flags."""
    root = tmp_path_factory.mktemp("runs")
    for name in methods.NAMES:
        train.main(["--method", name, "--model", str(tiny_checkpoint), "--out", str(root / name),
                    *SHORT, *EXTRA.get(name, [])])
    return {name: root / name for name in methods.NAMES}


@pytest.fixture(scope="module")
def plotted(runs, tiny_checkpoint, tmp_path_factory):
    """eval.py --plot over every run, with each drawing function's arguments recorded on the way."""
    out, calls = tmp_path_factory.mktemp("figs"), []
    with pytest.MonkeyPatch.context() as mp:
        for fn in ("rank_heatmap", "threshold_lines", "router_heatmap", "curves"):
            real = getattr(plots, fn)
            mp.setattr(plots, fn, lambda *a, _fn=fn, _real=real, **kw: (calls.append((_fn, a, kw)), _real(*a, **kw)))
        rows = evaluate.main(["--model", str(tiny_checkpoint), "--plot", str(out), "--limit", "4",
                              "--adapter", *map(str, runs.values())])
    return out, calls, rows


def received(calls, fn, path):
    return next(args for name, args, _ in calls if name == fn and args[-1] == path)


def loaded(checkpoint, adapter_dir):
    model, tok = models.load(checkpoint)
    return adapters.load_adapter(model, adapter_dir)[0].eval(), tok


def test_plot_writes_a_png_per_figure_and_no_rows(plotted):
    out, _, rows = plotted
    expected = {f"ranks_{m}.png" for m in methods.NAMES if m != "lora"} | {
        "sara_thresholds_sara.png", "router_mosara.png", "loss.png", "val_loss.png", "live_rank.png"}
    assert rows == [] and {p.name for p in out.iterdir()} == expected
    for p in out.iterdir():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 2000, p


def test_rank_heatmaps_get_each_methods_ranks(plotted, runs, tiny_checkpoint):
    out, calls, _ = plotted
    for name in methods.NAMES[1:]:
        model, _ = loaded(tiny_checkpoint, runs[name])
        ranks = methods.get(name).ranks(model)
        grid = received(calls, "rank_heatmap", out / f"ranks_{name}.png")[0]
        assert set(grid) == {"q", "v"} and all(len(row) == model.cfg.n_layers for row in grid.values())
        assert grid == {m: [ranks[f"model.layers.{i}.self_attn.{m}_proj"] for i in range(model.cfg.n_layers)]
                        for m in ("q", "v")}
        assert ranks == json.loads((runs[name] / "summary.json").read_text())["ranks"]


def test_sara_sweep_is_rank_for_on_the_base_weights(plotted, tiny_checkpoint):
    out, calls, _ = plotted
    sweep = received(calls, "threshold_lines", out / "sara_thresholds_sara.png")[0]
    assert sorted(sweep) == sorted({*plots.THRESHOLDS, 0.3})  # the adapter's own threshold joins the sweep
    base, _ = models.load(tiny_checkpoint)
    sara = methods.get("sara")
    for t, grid in sweep.items():
        for m, ks in grid.items():
            assert ks == [sara.rank_for(base.get_submodule(f"model.layers.{i}.self_attn.{m}_proj").weight, t)
                          for i in range(len(ks))]
    ordered = [sweep[t] for t in sorted(sweep)]
    assert all(a[m][i] <= b[m][i] for a, b in zip(ordered, ordered[1:]) for m in a for i in range(len(a[m])))


def test_router_heatmap_gets_mean_gates_of_the_test_prompts(plotted, runs, tiny_checkpoint):
    out, calls, _ = plotted
    grid = received(calls, "router_heatmap", out / "router_mosara.png")[0]
    gates = [g for row in grid.values() for g in row]
    assert len(gates) == 4 and all(len(g) == 3 for g in gates)  # 2 layers x (q, v), --heads 3
    assert all(abs(sum(g) - 1) < 1e-5 for g in gates)  # means of softmax gates
    model, tok = loaded(tiny_checkpoint, runs["mosara"])
    ex = data.arithmetic("test", 1)[0]
    one = plots.router_means(model, tok, [ex])
    model(torch.tensor([data.encode(tok, ex, 512)[0]]))  # the same forward, read directly
    assert one == methods.get("mosara").router_weights(model)


def test_curves_get_the_logged_losses_and_live_ranks(plotted, runs):
    out, calls, _ = plotted
    lines = received(calls, "curves", out / "loss.png")[0]
    assert len(lines) == len(methods.NAMES)
    for name, d in runs.items():
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        steps, losses = lines[plots.label(name, name)]
        assert steps == [r["step"] for r in log] and losses == [r["loss"] for r in log]
    val = received(calls, "curves", out / "val_loss.png")[0]
    assert len(val) == len(methods.NAMES)
    for name, d in runs.items():
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        assert val[plots.label(name, name)] == ([r["step"] for r in log if "val_loss" in r],
                                                [r["val_loss"] for r in log if "val_loss" in r])
    live = received(calls, "curves", out / "live_rank.png")[0]
    assert set(live) == {plots.label(m, m) for m in ("sora", "adalora", "alora")}  # those that log it


def test_markdown_rows_parse_back_to_the_json_rows(runs, tiny_checkpoint, tmp_path, capsys):
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--limit", "2", "--max-new-tokens", "2",
                          "--markdown", "--json", str(tmp_path / "rows.json"),
                          "--adapter", *(str(runs[m]) for m in ("lora", "sora", "mosara"))])
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| method | trainable params | live params | % of base | final total rank | accuracy | train time |"
    by_name = {methods.get(n).TITLE: n for n in methods.NAMES} | {"base model": "base"}
    for line, row in zip(table[2:], rows, strict=True):
        label, params, live, share, rank, acc, seconds = [c.strip() for c in line.strip("|").split("|")]
        name, _, flags = label.partition(" `")
        assert by_name[name] == row["method"] and flags.rstrip("`") == row.get("flags", "")
        assert int(params.replace(",", "")) == row["trainable_params"]
        assert float(share) == round(row["share"], 3) and float(acc.rstrip("%")) == round(100 * row["accuracy"], 1)
        if row["method"] == "base":
            assert rank == seconds == live == "–"
        else:
            assert int(rank.replace(",", "")) == row["total_rank"]
            assert int(live.replace(",", "")) == row["live_params"]
            m, s = re.fullmatch(r"(\d+)m(\d\d)s", seconds).groups()
            assert int(m) * 60 + int(s) == int(row["train_seconds"])


@settings(max_examples=30, deadline=None)
@given(accs=st.lists(st.floats(0, 1), min_size=1, max_size=4), other=st.floats(0, 1))
def test_runs_that_differ_only_in_seed_are_one_line_mean_and_sd(accs, other):
    seeded = [{"method": "sora", "flags": f"--dtype bf16 --seed {i}" if i else "--dtype bf16", "accuracy": a,
               "trainable_params": 10, "share": 0.1, "total_rank": 4 + i, "live_params": 8, "train_seconds": 60 + i}
              for i, a in enumerate(accs)]
    lone = {"method": "sora", "flags": "--lam 1", "accuracy": other, "trainable_params": 10, "share": 0.1}
    lines = plots.markdown_table([*seeded, lone])
    assert len(lines) == 4  # head, rule, the seeds' line, the other recipe's
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    mean = sum(accs) / len(accs)
    assert cells[0] == "SoRA `--dtype bf16`" + (f" ({len(accs)} seeds)" if len(accs) > 1 else "")
    score, _, sd = cells[5].partition(" ± ")
    assert float(score.rstrip("%")) == pytest.approx(100 * mean, abs=0.051)
    if len(accs) > 1:
        expected = (sum((100 * a - 100 * mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
        assert float(sd) == pytest.approx(expected, abs=0.051)
    else:
        assert sd == ""
    assert cells[4] == f"{round(4 + (len(accs) - 1) / 2):,}" and cells[2] == "8"
    assert lines[3].startswith("| SoRA `--lam 1` |") and lines[3].split("|")[3].strip() == "–"


def test_the_recorded_recipe_is_the_non_defaults_and_trains_the_same_run(runs):
    meta = adapters.read_config(runs["lora"])
    flags = meta["recipe"]
    # --dtype auto (the default) is recorded as what it resolved to: float32 in the tests
    assert flags == "--steps 6 --batch-size 2 --seq-len 512 --lr 0.01 --val-size 2 --dtype fp32 --r 4"
    assert plots.run_facts(runs["lora"], meta)["flags"] == flags  # the table shows what train.py recorded
    args, _, cfg, _ = train.parse_args(["--method", "lora", *flags.split()])
    assert adapters.config_from_dict(methods.get("lora"), meta["config"]) == cfg
    same = {f.name for f in dataclasses.fields(args) if f.metadata["recipe"]}
    assert {k: meta["train_args"][k] for k in same} == {k: getattr(args, k) for k in same}
    assert set(meta["train_args"]) == {f.name for f in dataclasses.fields(args)}  # the Config: in "config" alone
    sora = adapters.read_config(runs["sora"])["recipe"]
    assert sora == "--steps 6 --batch-size 2 --seq-len 512 --val-size 2 --dtype fp32"


@pytest.mark.parametrize("data_flags, prompt, shown", [
    ([], "chat", ""), ([], "alpaca", "--prompt alpaca"),
    (["--task", "commonsense"], "alpaca", ""), (["--task", "commonsense"], "chat", "--prompt chat"),
    (["--data", "math"], "alpaca", ""), (["--task", "shakespeare"], None, ""),
    (["--steps", "40"], None, "--steps 40"),  # the default warmup follows --steps: not a flag of its own
    (["--method", "alora", "--r", "4"], None, "--r 4"),  # rmax follows r: not a flag of its own
])
def test_the_recipe_holds_only_flags_that_are_not_defaults_for_this_data_and_length(data_flags, prompt, shown):
    args, _, cfg, plain = train.parse_args(["--method", "lora", *data_flags, *(["--prompt", prompt] if prompt else [])])
    assert training.recipe(args, cfg, plain) == shown


@pytest.mark.parametrize("bench", ["builtin", "long", "math", "commonsense", "shakespeare"])
def test_results_sh_gives_the_clis_flags_they_accept(bench, tmp_path):
    """Every train.py and eval.py call of `bash results.sh BENCH`, recorded by a stand-in `python`."""
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / "python"
    shim.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    shim.chmod(0o755)
    (tmp_path / "results.sh").write_text((ROOT / "results.sh").read_text())
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "MATH_DATA": "math-dir"}
    subprocess.run(["bash", str(tmp_path / "results.sh"), bench], env=env, check=True)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    *trains, last = calls
    assert len(trains) == {"builtin": 3 * 8, "long": 5, "shakespeare": 1}.get(bench, 7)  # builtin: 3 seeds
    assert len({argv[argv.index("--out") + 1] for argv in trains}) == len(trains)  # a directory each
    for argv in trains:
        assert argv[0] == "train.py"
        train.parse_args(argv[1:])
        assert ("--steps" in argv) == (bench in ("long", "math", "commonsense", "shakespeare"))
    assert last[0] == "eval.py"
    at = last.index("--adapter")
    dirs = last[at + 1:at + 1 + len(trains)]
    assert dirs == [argv[argv.index("--out") + 1] for argv in trains]
    evaluate.parse_args(last[1:at] + last[at + 1 + len(trains):])


def test_results_sh_refuses_an_unknown_benchmark():
    done = subprocess.run(["bash", str(ROOT / "results.sh"), "gsm9k"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash results.sh") and not done.stdout


@given(st.dictionaries(st.tuples(st.sampled_from("qvo"), st.integers(0, 40)), st.integers(0, 99), min_size=1))
def test_by_layer_places_every_value_once(cells):
    table = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "k": "self_attn.k_proj"}  # no "o": named as is
    names = {(m, i): f"model.layers.{i}." + table.get(m, "self_attn." + m) for m, i in cells}
    grid = plots.by_layer({names[c]: v for c, v in cells.items()}, table)
    n = 1 + max(i for _, i in cells)
    assert list(grid) == [m for m in "qvo" if any(c[0] == m for c in cells)]  # the table's order, then the rest
    assert grid == {m: [cells.get((m, i)) for i in range(n)] for m in grid}


@given(st.lists(st.integers(1, 5), min_size=1, max_size=30), st.integers(1, 12))
def test_window_mean_stays_within_the_window(gaps, n):
    steps = [sum(gaps[:i + 1]) for i in range(len(gaps))]
    values = [float((7 * s) % 11) for s in steps]
    means = plots.window_mean(steps, values, n)
    for s, mean in zip(steps, means):
        window = [v for t, v in zip(steps, values) if s - n < t <= s]
        assert min(window) - 1e-9 <= mean <= max(window) + 1e-9
    if min(gaps) >= n:  # logged no more often than every n steps: the logged values themselves
        assert means == values


@settings(max_examples=300, deadline=None)
@given(lo=st.floats(1e-4, 1e4), ratio=st.floats(1.001, 1e4))
def test_a_log_axis_labels_three_or_more_distinct_values_inside_any_range(lo, ratio):
    hi = lo * ratio
    ticks = plots.log_tick_values(lo, hi)
    assert len(ticks) >= 3 and ticks == sorted(ticks) and len({f"{t:g}" for t in ticks}) == len(ticks)
    assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks)


@pytest.fixture
def figures(monkeypatch):
    """The figures plots.save is given, drawn and kept open instead of written."""
    kept = []
    monkeypatch.setattr(plots, "save", lambda fig, path: (fig.canvas.draw(), kept.append(fig)))
    yield kept
    for fig in kept:
        plots.pyplot().close(fig)


def test_loss_plots_over_a_narrow_range_have_three_labelled_ticks(tmp_path, figures):
    for name, base in (("a", 2.1), ("b", 2.2)):  # losses between 2.1 and 2.5: inside one 1-2-5 step
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"method": "lora", "config": {}}))
        log = [{"step": s, "loss": base + 0.3 / s, "val_loss": base + 0.2 / s} for s in range(1, 21)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    written = plots.training_figures(tmp_path / "figs", [tmp_path / "a", tmp_path / "b"], "tiny")
    assert [p.name for p in written] == ["loss.png", "val_loss.png"] and len(figures) == 2
    for fig in figures:
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        shown = [float(t.get_text()) for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
        assert ax.get_yscale() == "log" and len(shown) >= 3 and len(set(shown)) == len(shown)


def test_without_matplotlib_plot_is_one_line_and_exit_2(tmp_path):
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # None in sys.modules: the import fails
            f"sys.argv = ['eval.py', '--plot', {str(tmp_path)!r}, '--adapter', 'nowhere']; "
            "runpy.run_path('eval.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: --plot needs matplotlib, an optional extra: pip install {plots.MATPLOTLIB}"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args", [["--text", "prose.txt"], []])
def test_plot_needs_adapters_and_no_text_file(runs, args):
    with pytest.raises(ValueError, match="give at least one and leave out --text"):
        evaluate.parse_args(["--plot", "figs", *args] + (["--adapter", str(runs["lora"])] if args else []))


def test_markdown_has_a_column_per_test_set_then_the_average():
    rows = [{"name": "base", "method": "base", "trainable_params": 0, "share": 0.0,
             "sets": {"svamp": 0.25, "aqua": 0.5}, "accuracy": 0.375},
            {"name": "sora", "method": "sora", "trainable_params": 1234, "share": 0.01, "flags": "--lam 3",
             "total_rank": 7, "train_seconds": 61.2, "sets": {"svamp": 0.5, "aqua": 1.0}, "accuracy": 0.75}]
    table = plots.markdown_table(rows)
    assert table[0] == ("| method | trainable params | live params | % of base | final total rank | svamp | aqua | avg "
                        "| train time |")
    assert table[2] == "| base model | 0 | – | 0.000 | – | 25.0% | 50.0% | 37.5% | – |"
    assert table[3] == "| SoRA `--lam 3` | 1,234 | – | 0.010 | 7 | 50.0% | 100.0% | 75.0% | 1m01s |"
