"""generate.py: a prompt (or a conversation) in, text streamed out, with an adapter or none."""
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adapters
import checkpoints as ck
import export
import generate
import methods
import models
from conftest import tiny_llama, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is 2 + 3?"


def reference(model, prompt, n, stop):
    """Greedy decoding the slow way (the whole forward again for every token, no cache): (the new ids,
    the smallest gap between the chosen token's logit and the runner-up's over the steps)."""
    seq, out, gap = list(prompt), [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            top = model(torch.tensor([seq]))[0, -1].float().topk(2)
            gap = min(gap, (top.values[0] - top.values[1]).item())
            token = top.indices[0].item()
            if token in stop:
                break
            out.append(token)
            seq.append(token)
    return out, gap


def chat_ids(tok, messages):
    return tok.encode_chat(tok.render(messages, add_generation_prompt=True))


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return models.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint, tiny):
    """A LoRA on q and v of the tiny checkpoint with random A and B (std 1): it changes what the model says."""
    model, _ = models.load(tiny_checkpoint)
    lora = methods.get("lora")
    cfg = lora.Config(r=4)
    lora.apply(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("adapter") / "lora"
    adapters.save_adapter(model, out, "lora", cfg, base_model=str(tiny_checkpoint),
                         model_config=dataclasses.asdict(tiny[0].cfg))
    return out


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint with a tokenizer that has no chat tokens: no chat template."""
    path = tmp_path_factory.mktemp("plain") / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] == "<|endoftext|>"]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


@pytest.fixture
def prompts_seen(monkeypatch):
    """The prompts the model is asked to continue, recorded."""
    seen, real = [], models.Llama.generate

    def recorded(self, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(self, prompts, *args, **kwargs)
    monkeypatch.setattr(models.Llama, "generate", recorded)
    return seen


def test_greedy_text_is_the_models_argmax_continuation_in_its_chat_template(tiny_checkpoint, tiny, capsys,
                                                                             prompts_seen):
    text = generate.main(["--model", str(tiny_checkpoint), "--max-new-tokens", "12", QUESTION])
    model, tok = tiny
    prompt = chat_ids(tok, [{"role": "user", "content": QUESTION}])
    assert prompts_seen == [prompt] and tok.special("<|im_start|>") in prompt
    want, gap = reference(model, prompt, 12, tok.stop)
    assert gap > 1e-4 and len(want) > 0  # the argmax is clear at every step: no rounding decides it
    assert text == tok.decode(want)
    out, err = capsys.readouterr()
    assert out == text + "\n" and "template: chat" in err  # stdout holds the text alone


def test_raw_sends_the_prompt_as_it_is(tiny_checkpoint, tiny, capsys, prompts_seen):
    text = generate.main(["--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--raw", QUESTION])
    model, tok = tiny
    assert prompts_seen == [tok.encode(QUESTION)]
    assert text == tok.decode(reference(model, tok.encode(QUESTION), 8, tok.stop)[0])


def test_a_model_without_a_chat_template_gets_the_prompt_as_it_is(plain_checkpoint, prompts_seen, capsys):
    generate.main(["--model", str(plain_checkpoint), "--max-new-tokens", "2", QUESTION])
    _, tok = models.load(plain_checkpoint)
    assert tok.chat is None and prompts_seen == [tok.encode(QUESTION)]
    assert "template: none (the model has no chat template)" in capsys.readouterr().err


class Pieces(io.StringIO):
    """stdout that keeps every write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_streamed_pieces_are_whole_characters_that_add_up_to_the_decoded_text(tiny):
    _, tok = tiny
    text = "héllo → 日本 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one byte a token: every non-ASCII character spans several
    out = Pieces()
    stream = generate.Stream(tok, out)
    for i in ids:
        stream(0, i)
    assert stream.close() == text and out.getvalue() == text + "\n"
    assert "\ufffd" not in out.getvalue() and "日" in out.writes and "🙂" in out.writes


def test_the_generated_text_is_written_token_by_token(tiny_checkpoint, tiny, monkeypatch):
    out = Pieces()
    monkeypatch.setattr(sys, "stdout", out)
    text = generate.main(["--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--raw", QUESTION])
    model, tok = tiny
    ids = reference(model, tok.encode(QUESTION), 12, tok.stop)[0]
    assert len(out.writes) > 2 and "".join(out.writes) == text + "\n" and text == tok.decode(ids)


def test_sampling_is_repeatable_with_a_seed_and_top_k_1_is_greedy(tiny_checkpoint):
    run = ["--model", str(tiny_checkpoint), "--max-new-tokens", "12", "--raw", QUESTION]
    hot = [*run, "--temperature", "5"]
    first = generate.main([*hot, "--seed", "3"])
    assert first == generate.main([*hot, "--seed", "3"]) != generate.main([*hot, "--seed", "4"])
    assert generate.main([*hot, "--seed", "3", "--top-k", "1"]) == generate.main(run)


def test_chat_over_a_pipe_keeps_the_conversation_in_the_template(tiny_checkpoint, tiny):
    """Two turns (a blank line between them is skipped): the second is answered after the first and its answer."""
    r = subprocess.run([sys.executable, "generate.py", "--model", str(tiny_checkpoint), "--chat",
                        "--max-new-tokens", "10"], input=f"{QUESTION}\n\nAnd 4 + 4?\n".encode(), cwd=ROOT,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    model, tok = tiny
    messages, want = [], []
    for turn in (QUESTION, "And 4 + 4?"):
        messages.append({"role": "user", "content": turn})
        ids, gap = reference(model, chat_ids(tok, messages), 10, tok.stop)
        assert gap > 1e-4
        want.append(tok.decode(ids))
        messages.append({"role": "assistant", "content": want[-1]})
    assert r.stdout.decode() == "".join(a + "\n" for a in want)


class Interrupted(io.StringIO):
    """stdin that gives its lines, then a Ctrl-C where the next line would come."""

    def readline(self, *a):
        line = super().readline(*a)
        if not line:
            raise KeyboardInterrupt
        return line


def test_ctrl_c_ends_the_chat_quietly(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", Interrupted(f"{QUESTION}\n"))
    messages = generate.main(["--model", str(tiny_checkpoint), "--chat", "--max-new-tokens", "4"])
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert capsys.readouterr().out == messages[1]["content"] + "\n"


def test_chat_drops_the_oldest_exchange_when_the_conversation_outgrows_the_context(tiny_checkpoint, tiny,
                                                                                       monkeypatch, capsys,
                                                                                       prompts_seen):
    long = "x" * 200  # 200 byte tokens a turn; 512 - 100 new tokens leave room for two turns, not three
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n{long}\n{long}\n"))
    messages = generate.main(["--model", str(tiny_checkpoint), "--chat", "--max-new-tokens", "100"])
    _, tok = tiny
    assert len(prompts_seen) == 3 and all(len(p) <= 512 - 100 for p in prompts_seen)
    assert prompts_seen[-1] == chat_ids(tok, messages[:-1]) and len(messages) < 6
    assert "oldest exchange was dropped" in capsys.readouterr().err


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(tiny_checkpoint, tiny, monkeypatch,
                                                                             capsys, prompts_seen):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n{'x' * 450}\nAnd 4 + 4?\n"))
    messages = generate.main(["--model", str(tiny_checkpoint), "--chat", "--max-new-tokens", "100"])
    _, tok = tiny
    assert [m["content"] for m in messages[::2]] == [QUESTION, "And 4 + 4?"]  # the first exchange is kept
    assert len(prompts_seen) == 2 and prompts_seen[-1] == chat_ids(tok, messages[:-1])
    err = capsys.readouterr().err
    assert "error: this message takes 4" in err and "shorten it" in err


def test_an_adapter_changes_the_text_merged_or_not_and_as_a_peft_export(tiny_checkpoint, adapter, tmp_path):
    run = ["--model", str(tiny_checkpoint), "--max-new-tokens", "12", QUESTION]
    base = generate.main(run)
    ours = generate.main([*run, "--adapter", str(adapter)])  # merged, as eval.py merges a LoRA
    model, tok = models.load(tiny_checkpoint)
    unmerged, _ = adapters.load_adapter(model, adapter)
    want, gap = reference(unmerged.eval(), chat_ids(tok, [{"role": "user", "content": QUESTION}]), 12, tok.stop)
    assert gap > 1e-4
    assert ours == tok.decode(want) != base
    export.main(["--format", "peft", "--adapter", str(adapter), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "peft")])
    assert generate.main([*run, "--adapter", str(tmp_path / "peft")]) == ours


@pytest.mark.parametrize("args,message", [
    ([], "give a prompt"),
    (["--chat", QUESTION], "--chat reads the user's turns from stdin"),
    (["--chat", "--raw"], "leave out --raw"),
    (["--top-k", "5", QUESTION], "give a temperature above 0"),
    (["--temperature", "-1", QUESTION], "--temperature must be 0 or more"),
    (["--max-new-tokens", "0", QUESTION], "--max-new-tokens must be positive"),
    (["--adapter", "no/such/dir", QUESTION], "not an adapter directory"),
])
def test_bad_flags_are_refused_before_the_model_loads(args, message, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises((ValueError, adapters.AdapterError), match=message):
        generate.main(args)


def test_what_the_model_cannot_do_is_refused(tiny_checkpoint, plain_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="exceeds the model's context of 512 tokens"):
        generate.main(["--model", str(tiny_checkpoint), "--max-new-tokens", "600", QUESTION])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n"))
    with pytest.raises(ValueError, match="no room in the model's context"):
        generate.main(["--model", str(tiny_checkpoint), "--chat", "--max-new-tokens", "600"])
    with pytest.raises(ValueError, match="this model has no chat template"):
        generate.main(["--model", str(plain_checkpoint), "--chat"])


def test_the_cli_refuses_in_one_line_with_status_2(tiny_checkpoint, adapter, tmp_path):
    other = write_checkpoint(tmp_path / "other", tiny_llama(vocab_size=259, max_seq_len=512, dim=48))
    for args, message in (([], "give a prompt"), (["--model", str(other), "--adapter", str(adapter), QUESTION],
                                                   "trained on another model")):
        r = subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and r.stderr.strip().endswith(errors[0])


def test_the_default_model_answers_in_its_chat_template(monkeypatch, capsys):
    """One short run on SmolLM2-135M-Instruct (loaded once per test process, as the other tests share it)."""
    model, tok = ck.default_model()

    def default(source, dtype):
        assert source is None and dtype == torch.float32
        return model, tok
    monkeypatch.setattr(models, "load", default)
    text = generate.main(["--max-new-tokens", "8", "What is the capital of France?"])
    (want,) = model.generate([tok.prompt("What is the capital of France?")], 8, stop_tokens=tok.stop)
    assert text == tok.decode(want) and "Paris" in text
    assert capsys.readouterr().out == text + "\n"
