"""train.py and eval.py end to end on a tiny checkpoint, for every method; the CLI's errors."""
import json
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import eval as evaluate
import methods
import models
import train
import training
from helpers import FAST, run

SHORT = ["--steps", "24", *FAST]


@pytest.mark.parametrize("name", methods.NAMES)
def test_train_then_eval_every_method(tmp_path, tiny_checkpoint, name):
    out = tmp_path / name
    summary = train.main(["--method", name, "--model", str(tiny_checkpoint), "--out", str(out), *SHORT])
    for f in ("adapter.safetensors", "config.json", "log.jsonl", "summary.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("method", "trainable_params", "live_params", "base_params", "steps", "seconds", "final_loss",
                "final_penalty", "val_loss", "ranks"):
        assert key in summary
    assert summary["ranks"] and all(r >= 0 for r in summary["ranks"].values())
    assert 0 < summary["live_params"] <= summary["trainable_params"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 24 and all({"step", "loss", "penalty", "lr", "tokens_per_s"} <= rec.keys() for rec in log)
    assert [r["step"] for r in log if "val_loss" in r] == [5, 10, 15, 20, 24]  # every --log-every steps, and the last
    assert (max(r["penalty"] for r in log) > 0) == (name in ("adalora", "salora"))  # apart from the task loss

    model, _ = models.load(tiny_checkpoint)
    model, meta = adapters.load_adapter(model, out)
    assert meta["method"] == name and meta["train_args"]["steps"] == 24
    assert sum(t.numel() for k, t in model.named_parameters() if "lora_" in k) > 0
    alone = methods.get(name).load(models.load(tiny_checkpoint)[0], out / "adapter.safetensors")  # the method file's own loader
    probe = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(alone.eval()(probe), model.eval()(probe))
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(out), "--limit", "3",
                          "--max-new-tokens", "4", "--json", str(tmp_path / "rows.json")])
    assert [r["name"] for r in rows] == ["base", name]
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == 3 for r in rows)


def test_resume_continues_to_the_same_adapter(tmp_path, tiny_checkpoint, monkeypatch):
    from safetensors.torch import load_file

    args = ["--method", "lora", "--model", str(tiny_checkpoint), *SHORT, "--steps", "10", "--save-every", "4"]
    train.main([*args, "--out", str(tmp_path / "full")])
    assert not (tmp_path / "full" / "checkpoint.pt").exists()  # removed once the run completes

    lora, real_after_step = methods.get("lora"), methods.get("lora").after_step

    def crash_at_9(model, opt, step, total, **kw):
        if step == 9:
            raise KeyboardInterrupt  # the run dies between checkpoints
        return real_after_step(model, opt, step, total, **kw)

    monkeypatch.setattr(lora, "after_step", crash_at_9)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "--out", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    monkeypatch.setattr(lora, "after_step", real_after_step)
    train.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_perplexity_of_a_text_file(tmp_path, tiny_checkpoint):
    text = tmp_path / "t.txt"
    text.write_text("Plain words for a perplexity check. " * 20)
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--text", str(text), "--seq-len", "64"])
    assert 1 < rows[0]["perplexity"] < 1000  # a random 259-token model: near uniform


@pytest.mark.parametrize("args,message", [
    (["train.py", "--method", "nope"], "unknown method"),
    (["train.py", "--method", "lora", "--r", "0"], "r must be positive"),
    (["train.py", "--method", "lora", "--steps", "0"], "--steps must be positive"),
    (["train.py", "--model", "/no/such/model.gguf"], "does not exist"),
    (["eval.py", "--adapter", "/no/such/adapter"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_run_ends_with_its_validation_loss_and_the_commands_to_use_it(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "run"
    summary = train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--out", str(out), *SHORT])
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(" | val loss " in line for line in lines if line.startswith("step "))
    assert f"val loss {summary['val_loss']:.4f}" in lines[-2]
    assert lines[-1] == (f"next: python eval.py --adapter {out} --model {tiny_checkpoint}   |   python export.py "
                         f"--format peft --adapter {out} --model {tiny_checkpoint} --out {out}-peft")


def test_the_log_gives_the_lr_each_step_used_and_sora_shrinks_by_it(tmp_path, tiny_checkpoint, monkeypatch):
    """The scheduler steps after after_step: step 1 runs at lr / warmup, and SoRA's gates move at that
    step's gate_lr_total / total_steps times the schedule's factor (lr / peak lr)."""
    out = tmp_path / "run"
    train.main(["--method", "sora", "--model", str(tiny_checkpoint), "--out", str(out), "--steps", "6", "--warmup", "4",
                "--lr", "0.01", "--gate-lr-total", "0.12", "--batch-size", "2", "--seq-len", "512", "--log-every", "1",
                "--val-size", "2"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in log]
    assert logged[:4] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert [0.12 / 6 * lr / 0.01 for lr in logged] == pytest.approx([r["gate_lr"] for r in log])


# ----------------------------------------------------------------------------- the ETA and scoring rounds

@settings(max_examples=50, deadline=None)
@given(kinds=st.lists(st.booleans(), min_size=2, max_size=40), ordinary=st.integers(1, 30),
       scoring=st.integers(1, 600), done=st.integers(0, 40), into=st.integers(0, 700))
def test_the_eta_is_the_time_left_when_each_kind_of_step_takes_a_constant_time(kinds, ordinary, scoring, done, into):
    """Once a step of each kind still to come has been timed, the ETA is the sum of their times, less
    the `into` seconds already spent in the step in flight; a kind not timed yet is counted instead."""
    total, done = len(kinds), min(done, len(kinds) - 1)
    took = [scoring if k else ordinary for k in kinds]  # seconds, whole: the sums are exact
    eta = train.Eta([s for s, k in enumerate(kinds, 1) if k])
    for step in range(1, done + 1):
        eta.add(step, float(took[step - 1]))
    left = kinds[done:]
    timed = {k for k in kinds[:done]}
    into = min(into, took[done])
    expected = sum(t for t, k in zip(took[done:], left) if k in timed) - (into if kinds[done] in timed else 0)
    untimed = "".join(f" + {n} {what}{'s' if n > 1 else ''}" for k, what in ((False, "step"), (True, "scoring round"))
                      if k not in timed and (n := left.count(k)))
    assert eta.left(done, total, float(into)) == f"{expected // 60}m{expected % 60:02d}s{untimed}"


def test_a_scoring_round_prints_progress_and_the_eta_counts_the_rounds_to_come(tmp_path, tiny_checkpoint,
                                                                                 monkeypatch, capsys):
    """ALoRA's rounds at steps 10, 12 and 14: during each, lines say how far it got; until the first
    is timed, the ETA counts the rounds still to come, and from then on it holds them in its time."""
    monkeypatch.setattr(train, "PROGRESS_EVERY", 0.0)  # a line at every validation pass of a round
    train.main(["--method", "alora", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "run"), "--steps", "20",
                "--k1", "10", "--k2", "2", "--rounds", "3", *FAST])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    scoring = [line for line in lines if " | scoring: " in line]
    assert {int(line.split()[1].split("/")[0]) for line in scoring} == {10, 12, 14}
    for step in (10, 12, 14):
        passes = [int(line.split("validation pass ")[1].split(",")[0]) for line in scoring
                  if line.startswith(f"step {step}/")]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3  # two backwards and the exact scores
        first_round = step == 10
        assert all(("+ 3 scoring rounds" in line) == first_round for line in scoring if line.startswith(f"step {step}/"))
    logged = {int(line.split()[1].split("/")[0]): line for line in lines if " | loss " in line}
    assert logged.keys() == {5, 10, 15, 20}
    assert "+ 3 scoring rounds" in logged[5]
    assert all(" + " not in logged[s].split("ETA ")[1].split(" | ")[0] for s in (10, 15, 20))


# ----------------------------------------------------------------------------- a method's training defaults

@pytest.mark.parametrize("name", methods.NAMES)
def test_a_methods_training_settings_apply_where_the_command_line_gives_none(name):
    """TRAINING (in the method file, e.g. Mo-SARA's lr) names train.py settings whose default is
    worked out per run: with no flag given all of them apply, and --lr defaults to 1e-3 where no
    method sets it."""
    method = methods.get(name)
    trained = training.method_training(method)
    assert trained == getattr(method, "TRAINING", {})
    args = train.parse_args(["--method", name])[0]
    assert all(getattr(args, k) == v for k, v in trained.items())
    assert args.lr == trained.get("lr", training.LR)


def test_a_training_setting_without_a_per_run_default_is_refused():
    fake = types.SimpleNamespace(NAME="fake", TRAINING={"steps": 10})
    with pytest.raises(ValueError, match="fake's TRAINING names steps"):
        training.method_training(fake)


@settings(max_examples=20, deadline=None)
@given(lr=st.floats(1e-6, 1.0))
def test_a_users_lr_wins_over_the_methods(lr):
    args, method, cfg, plain = train.parse_args(["--method", "mosara", "--lr", repr(lr)])
    assert args.lr == lr
    assert (f"--lr {lr:g}" in training.recipe(args, cfg, plain)) == (lr != methods.get("mosara").TRAINING["lr"])


def test_mosara_trains_at_its_own_lr_says_so_and_records_it(tmp_path, tiny_checkpoint, capsys):
    common = ["--method", "mosara", "--model", str(tiny_checkpoint), *FAST, "--steps", "2"]
    train.main([*common, "--out", str(tmp_path / "default")])
    said = capsys.readouterr().out.splitlines()
    assert "mosara: lr 0.03 (the method's default; --lr to override)" in said
    meta = json.loads((tmp_path / "default" / "config.json").read_text())
    assert meta["train_args"]["lr"] == 0.03 and meta["method_defaults"] == {"lr": 0.03}
    assert "--lr" not in meta["recipe"]  # the method's default is no departure from the defaults
    log = [json.loads(line) for line in (tmp_path / "default" / "log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log) == pytest.approx(0.03)

    train.main([*common, "--lr", "0.01", "--out", str(tmp_path / "mine")])
    assert not any("the method's default" in line for line in capsys.readouterr().out.splitlines())
    meta = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert meta["train_args"]["lr"] == 0.01 and meta["method_defaults"] == {}
    assert "--lr 0.01" in meta["recipe"]
