"""eval.py: adapters checked against the model before anything is evaluated; --show."""
import subprocess
import sys
from pathlib import Path

import pytest

import adapters
import data
import eval as evaluate
import export
import models
import train
from conftest import tiny_llama, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "2", "--seq-len", "512", "--log-every", "1", "--val-size", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("run") / "lora"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), *TINY, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("other") / "m", tiny_llama(vocab_size=259, max_seq_len=512, dim=48))


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fails the test if any row starts to be evaluated."""
    def refuse(*args, **kwargs):
        raise AssertionError("a row was evaluated before the adapters were checked")
    monkeypatch.setattr(evaluate, "accuracy", refuse)


def test_an_adapter_of_another_model_fails_before_any_row(adapter, other_model, tiny_checkpoint, no_evaluation):
    with pytest.raises(adapters.AdapterError, match=f"trained on another model, {tiny_checkpoint}.*dim 32, "
                                                   "here 48.*pass that model as --model"):
        evaluate.main(["--model", str(other_model), "--adapter", str(adapter), "--limit", "1"])


def test_a_peft_adapter_of_another_model_fails_before_any_row(adapter, other_model, tiny_checkpoint, tmp_path,
                                                                no_evaluation):
    export.main(["--format", "peft", "--adapter", str(adapter), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "peft")])
    with pytest.raises(adapters.AdapterError, match="does not fit the model's layer: pass the model"):
        evaluate.main(["--model", str(other_model), "--adapter", str(tmp_path / "peft"), "--limit", "1"])


def test_the_cli_says_it_in_one_line_with_status_2(adapter, other_model):
    r = subprocess.run([sys.executable, "eval.py", "--model", str(other_model), "--adapter", str(adapter),
                        "--limit", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--model" in r.stderr
    assert "base" not in r.stdout  # no row was printed


def test_show_prints_the_completions_of_every_row(adapter, tiny_checkpoint, capsys):
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(adapter), "--limit", "3",
                          "--max-new-tokens", "5", "--show", "2"])
    out = capsys.readouterr().out
    examples = data.arithmetic("test", 3)
    model, tok = models.load(tiny_checkpoint)
    want = [tok.decode(o) for o in model.generate([data.prompt(tok, ex, "chat") for ex in examples[:2]], 5,
                                                  stop_tokens=tok.stop)]
    assert len(rows) == 2
    for i, (ex, completion) in enumerate(zip(examples[:2], want), 1):
        assert out.count(f"arithmetic #{i} (") == 2  # the base row and the adapter's
        assert f"{ex.question!r}\n    -> {completion!r}" in out  # the base model's own completion
    assert "arithmetic #3 (" not in out


@pytest.mark.parametrize("args,message", [(["--show", "0"], "--show must be positive"),
                                          (["--show", "2", "--text", "x.txt"], "perplexity generates none")])
def test_show_is_refused_where_it_cannot_apply(args, message):
    with pytest.raises(ValueError, match=message):
        evaluate.main(args)
