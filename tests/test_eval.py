"""eval.py: adapters checked against the model before anything is evaluated; --show."""
import json
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


# ----------------------------------------------------------------------------- --seq-len and the model's context

@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory, tiny_checkpoint):
    """A tiny GPT-2 of 64 positions with the tiny checkpoint's byte-level tokenizer."""
    import checkpoints as ck
    path = ck.write_safetensors_dir(tmp_path_factory.mktemp("gpt2") / "m", ck.gpt2_hf_config(259, 32, 2, 4, 64),
                                    ck.gpt2_hf_tensors(0, vocab_size=259))
    (path / "tokenizer.json").write_bytes((tiny_checkpoint / "tokenizer.json").read_bytes())
    return path


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A plain-text file and a .jsonl of texts, each longer than 64 tokens."""
    root = tmp_path_factory.mktemp("held_out")
    text = "Plain words for a perplexity check, in windows of the model's context. " * 8
    (root / "prose.txt").write_text(text)
    (root / "texts.jsonl").write_text(json.dumps({"text": text}) + "\n")
    return root


@pytest.mark.parametrize("source", ["--text", "--data"])
def test_perplexity_windows_default_to_the_models_context(gpt2_checkpoint, held_out, source):
    """Without --seq-len, the windows are 512 tokens or the model's context where it is shorter: every
    window of a 64-position GPT-2 is 64 tokens, and its perplexity is the one --seq-len 64 gives."""
    path = held_out / ("prose.txt" if source == "--text" else "texts.jsonl")
    rows = evaluate.main(["--model", str(gpt2_checkpoint), source, str(path)])
    assert rows[0]["perplexity"] == evaluate.main(["--model", str(gpt2_checkpoint), source, str(path),
                                                   "--seq-len", "64"])[0]["perplexity"]


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_a_seq_len_beyond_the_models_context_is_refused(gpt2_checkpoint, tiny_checkpoint, held_out, model):
    """A --seq-len past the model's positions (64 for the GPT-2, 512 for the Llama, whose RoPE would
    score them without complaint) is one sentence naming the context, before any row."""
    path, context = (gpt2_checkpoint, 64) if model == "gpt2" else (tiny_checkpoint, 512)
    r = subprocess.run([sys.executable, "eval.py", "--model", str(path), "--text", str(held_out / "prose.txt"),
                        "--seq-len", str(context + 1)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"exceeds the model's context of {context} tokens" in r.stderr and "base" not in r.stdout


# ----------------------------------------------------------------------------- --json

def test_json_replaces_only_a_results_file(adapter, tiny_checkpoint, tmp_path, no_evaluation):
    """--json never replaces a file eval.py did not write (an adapter's config.json, any other file,
    a link): refused before anything is evaluated, the file left as it was."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link.json").symlink_to(tmp_path / "notes.txt")
    before = (adapter / "config.json").read_bytes()
    for target in (adapter / "config.json", tmp_path / "notes.txt", tmp_path / "link.json"):
        with pytest.raises(ValueError, match="--json .* not a results file"):
            evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(adapter), "--limit", "1",
                           "--json", str(target)])
    assert (adapter / "config.json").read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "link.json").is_symlink()


def test_json_replaces_its_own_results(adapter, tiny_checkpoint, tmp_path):
    rows = tmp_path / "rows.json"
    args = ["--model", str(tiny_checkpoint), "--limit", "1", "--max-new-tokens", "1", "--json", str(rows)]
    evaluate.main(args)
    first = json.loads(rows.read_text())
    again = evaluate.main([*args, "--adapter", str(adapter)])
    assert json.loads(rows.read_text()) == again and len(again) == len(first) + 1
