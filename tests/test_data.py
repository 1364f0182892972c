"""The built-in task, the loaders, prompts and answer extraction."""
import json
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import data
from helpers import write_jsonl
from models.tokenizer import Tokenizer


def test_splits_are_disjoint_and_deterministic():
    train, test, val = data.arithmetic("train"), data.arithmetic("test"), data.arithmetic("val")
    tq, sq, vq = ({e.question for e in s} for s in (train, test, val))
    assert len(tq) == len(train) and len(sq) == len(test)  # no duplicates inside a split
    assert not tq & sq and not vq & sq and not vq & tq
    assert data.arithmetic("test") == test


def test_builtin_answers_are_right():
    """Every worked solution's equations hold and end with the gold answer."""
    for ex in data.arithmetic("train")[:1000] + data.arithmetic("test"):
        assert ex.response.endswith(f"The answer is {ex.answer}.")
        for lhs, rhs in (eq.split(" = ") for eq in ex.response.split(". ")[:-1]):
            a, op, b = lhs.split(" ")
            assert eval(f"{a}{op}{b}") == int(rhs)  # the generator's own arithmetic, not user input
        assert int(ex.answer) >= 0
        assert data.is_correct(ex.response, ex.answer)


@settings(max_examples=200)
@given(st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=5),
       st.text(alphabet="abc xyz!?\n", min_size=1, max_size=20), st.sampled_from(["", ".", " dollars."]))
def test_last_number_wins(numbers, sep, end):
    text = sep.join(f"{n:,}" for n in numbers) + end
    assert data.extract_answer(text) == str(numbers[-1])
    assert data.is_correct(text, str(numbers[-1]))


@given(st.text(alphabet="abcdefg ,.!?\n", max_size=40))
def test_no_number_is_wrong(text):
    assert data.extract_answer(text) is None
    assert not data.is_correct(text, "3")


@pytest.mark.parametrize("text,answer,ok", [
    ("The answer is 1,250.", "1250", True),
    ("5 - 8 = -3. The answer is -3.", "-3", True),
    ("it costs 2.50 dollars", "2.5", True),
    ("The answer is 12. Then 7", "12", False),
    ("The answer is C.", "C", True),
    ("A or B? I pick D", "D", True),
    ("Answer: E", "A", False),
])
def test_tricky_answers(text, answer, ok):
    assert data.is_correct(text, answer) is ok


def test_load_llm_adapters_json_and_jsonl(tmp_path):
    recs = [{"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"},
            {"instruction": "Pick one.", "input": "A) x B) y", "output": "The answer is B", "answer": "B"}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    for f in ("d.json", "d.jsonl"):
        ex = data.load_examples(tmp_path / f)
        assert len(ex) == 2
        assert (ex[1].question, ex[1].input, ex[1].answer) == ("Pick one.", "A) x B) y", "B")


@pytest.mark.parametrize("records,message", [
    ([{"instruction": "a", "output": "b"}, {"no_instruction": 1}], "record 2 has no 'instruction'"),
    ([{"text": "a b"}, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     "record 2 holds chat conversations, record 1 plain text"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "record 1 has no assistant message"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], "record 1's 'messages' must be a list"),
    ([{"messages": "hi"}], "record 1's 'messages' must be a list"),
    ([{"text": ["a"]}], "record 1's 'text' is not a string"),
    ([], "holds no records"),
])
def test_a_file_of_no_one_kind_is_refused_in_one_sentence(tmp_path, records, message):
    with pytest.raises(data.DataError, match=message):
        data.load_items(write_jsonl(tmp_path / "d.jsonl", records))


def test_test_sets_must_be_llm_adapters_records(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "some prose"}])
    assert len(data.load_sets(path, "train")[path.stem]) == 1  # plain text trains
    with pytest.raises(data.DataError, match="eval.py --text"):
        data.load_sets(path, "test")


@settings(max_examples=50)
@given(st.binary(max_size=200))
def test_loader_rejects_garbage_with_data_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("g") / "x.json"
    path.write_bytes(blob)
    try:
        data.load_examples(path)
    except data.DataError:
        pass


def byte_tokenizer(normalize=None, missing=b""):
    """One token per byte, ChatML's two specials; `missing`: bytes it has no token for."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256) if i not in missing}
    enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|im_start|>": 256, "<|im_end|>": 257})
    return Tokenizer(enc, "chatml", None, [257], missing=missing, normalize=normalize)


def test_loss_only_on_response_and_stop_token():
    tok = byte_tokenizer()
    ex = data.Example("What is 2+2?", "2 + 2 = 4. The answer is 4.", "4")
    ids, targets = data.encode(tok, ex, 512)
    prompt = tok.prompt(ex.question)
    assert len(ids) == len(targets) == len(prompt) + len(ex.response)
    learned = [t for t in targets if t != -100]
    assert learned == tok.encode(ex.response) + [257]
    assert targets[:len(prompt) - 1] == [-100] * (len(prompt) - 1)
    assert data.encode(tok, ex, 10) is None  # too long: skipped
    with pytest.raises(data.DataError, match="seq-len"):
        data.encode_all(tok, [ex], 10)


def test_batches_are_a_pure_function_of_index():
    enc = [([i, i], [i, -100]) for i in range(10)]
    a = [data.batch(enc, 4, 0, i)[0] for i in range(5)]
    b = [data.batch(enc, 4, 0, i)[0] for i in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    seen = torch.cat(a[:2] + [a[2][:2]])[:, 0].tolist()  # the first epoch: each example once
    assert sorted(seen) == list(range(10))


def test_prompt_templates():
    """Alpaca as LLM-Adapters wraps examples (with and without an input); chat joins the input."""
    tok = byte_tokenizer()
    plain = data.Example("Add 2 and 3.", "2 + 3 = 5. The answer is 5.", "5")
    extra = data.Example("Pick one.", "The answer is B", "B", input="A) x B) y")
    assert tok.decode(data.prompt(tok, plain, "alpaca")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    assert tok.decode(data.prompt(tok, extra, "alpaca")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nPick one.\n\n"
        "### Input:\nA) x B) y\n\n### Response:\n")
    assert data.prompt(tok, extra, "chat") == tok.prompt("Pick one.\n\nA) x B) y")
    ids, targets = data.encode(tok, plain, 512, "alpaca")
    assert [t for t in targets if t != -100] == tok.encode(plain.response) + [257]
    assert ids[:len(data.prompt(tok, plain, "alpaca"))] == data.prompt(tok, plain, "alpaca")
    with pytest.raises(ValueError, match="prompt style"):
        data.prompt(tok, plain, "llama2")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=40), min_size=1, max_size=4), st.integers(1, 9))
def test_text_chunks_make_every_token_a_target_once(texts, seq_len):
    tok = byte_tokenizer()
    if all(len(t) < 2 for t in texts):
        with pytest.raises(data.DataError):
            data.chunks(tok, texts, seq_len)
        return
    pairs = iter(data.chunks(tok, texts, seq_len))
    for text in texts:  # windows come text by text, none crossing two
        ids = tok.encode(text)
        seen = []
        for _ in range(-(-(len(ids) - 1) // seq_len)):
            x, y = next(pairs)
            assert len(x) == len(y) <= seq_len and x[1:] == y[:-1]
            assert x[0] == ids[len(seen)]
            seen += y
        assert seen == ids[1:]
    assert next(pairs, None) is None


@given(st.lists(st.integers(0, 99), max_size=30, unique=True), st.integers(0, 40), st.integers(0, 3))
def test_subset_is_seeded_and_keeps_order(items, n, seed):
    got = data.subset(items, n, seed)
    assert got == data.subset(items, n, seed) and len(got) == min(n, len(items))
    assert got == [x for x in items if x in set(got)]  # original order
    assert data.subset(items, None, seed) == items


KEYWORD_SETS = [["true", "false"], ["solution1", "solution2"], ["answer1", "answer2", "answer3", "answer4", "answer5"],
                ["ending1", "ending2", "ending3", "ending4"], ["option1", "option2"]]


@given(st.sampled_from(KEYWORD_SETS).flatmap(lambda ks: st.lists(st.sampled_from(ks), min_size=1, max_size=4)),
       st.text(alphabet=" .,!?\n", max_size=5))
def test_first_commonsense_keyword_wins(said, sep):
    text = "the correct answer is " + sep.join(said)
    assert data.is_correct(text, said[0])
    assert not any(data.is_correct(text, k) for k in set(said) - {said[0]})


@given(st.sampled_from([k for ks in KEYWORD_SETS for k in ks]), st.text(alphabet="xyz .,!?\n", max_size=30))
def test_no_keyword_is_wrong(answer, text):
    assert not data.is_correct(text, answer)


@pytest.mark.parametrize("text,answer,ok", [
    ("the correct answer is true", "true", True),
    ("false, though true at first", "true", False),  # the first keyword, not the last
    ("The correct answer is Answer2", "answer2", False),  # case matters, as in LLM-Adapters
    ("ending5 is not a choice; ending2", "ending2", True),  # only the task's keywords count
    ("solution2solution1", "solution2", True),
    ("untrue", "true", True),  # a keyword inside a word counts, as in LLM-Adapters
    ("Rationale: 0.56 + 0.74 = 1.30. The answer is (B).", "B", True),
    ("Answer: C", "C", True),  # LLM-Adapters' first-capital rule would read A here
    ("He pays $1,250.50 in all.", "1250.5", True),
    ("The answer is 480.0", "480", True),
    ("The answer is 480.0", "480.01", False),
])
def test_tricky_benchmark_answers(text, answer, ok):
    assert data.is_correct(text, answer) is ok


# ----------------------------------------------------------------------------- chat messages and text

roles = st.sampled_from(["user", "assistant", "system"])
contents = st.text(alphabet="ab 12\n", max_size=12) | st.sampled_from(["<|im_end|>", "x<|im_start|>y", "\ue000"])


def chats(contents):
    """Conversations with at least one assistant turn, the messages' contents drawn from `contents`."""
    return st.lists(st.tuples(roles, contents), min_size=1, max_size=6).filter(lambda c: any(
        r == "assistant" for r, _ in c)).map(lambda c: data.Chat(tuple({"role": r, "content": t} for r, t in c)))


conversations = chats(contents)


@settings(max_examples=150)
@given(chat=conversations)
def test_chat_targets_are_the_assistant_turns_and_their_stop_token(chat):
    """The learnt tokens spell every assistant message followed by <|im_end|>, in order, and
    nothing else; the ids are the whole rendered conversation; special-token strings inside a
    message stay text (only the format's own <|im_start|>/<|im_end|> are special ids)."""
    tok = byte_tokenizer()
    ids, targets = data.encode_chat(tok, chat, 10_000)
    learnt = [t for t in targets if t != -100]
    assert learnt == [t for m in chat.messages if m["role"] == "assistant" for t in tok.encode(m["content"]) + [257]]
    full = ids + tok.encode("\n")  # the closing newline is the last token: nobody's target, no input
    assert targets[-1] == -100
    assert tok.decode(full) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat.messages)
    assert full.count(256) == full.count(257) == len(chat.messages)
    assert all(t == -100 or t == full[i + 1] for i, t in enumerate(targets))
    assert data.encode_chat(tok, chat, len(full) - 2) is None  # too long: skipped


# text a tokenizer changes: NFC composes e + U+0301 into é, and a vocabulary without the byte 0xCC
# (U+0301's first) drops the accent
changed = contents | st.text(alphabet="e\u0301\u00e9 a\n", max_size=10) | st.just("cafe\u0301 " * 4)


@pytest.mark.parametrize("tok", [byte_tokenizer(normalize="NFC"), byte_tokenizer(missing=b"\xcc")],
                         ids=["nfc", "missing"])
@settings(max_examples=150)
@given(chat=chats(changed))
@example(chat=data.Chat(({"role": "user", "content": "cafe\u0301 " * 4}, {"role": "assistant", "content": "ok"})))
def test_chat_targets_stay_the_assistant_turns_where_the_tokenizer_changes_the_text(tok, chat):
    ids, targets = data.encode_chat(tok, chat, 10_000)
    learnt = [t for t in targets if t != -100]
    assert learnt == [t for m in chat.messages if m["role"] == "assistant" for t in tok.encode(m["content"]) + [257]]


def test_chat_prompt_at_inference_is_the_trained_context():
    """The tokens before the first assistant turn are what tok.prompt gives eval.py."""
    tok = byte_tokenizer()
    chat = data.Chat(({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}))
    ids, targets = data.encode_chat(tok, chat, 512)
    first = next(i for i, t in enumerate(targets) if t != -100)
    assert ids[:first + 1] == tok.prompt("What is 2+2?")


def test_training_items_of_every_kind(tmp_path):
    tok = byte_tokenizer()
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "abcdefghij"}, {"text": "x"}])
    (items,) = data.load_sets(chat, "train").values()
    assert items == [data.Chat(({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}))]
    assert data.encode_all(tok, items, 64) == [data.encode_chat(tok, items[0], 64)]
    with pytest.raises(data.DataError, match="drop --prompt alpaca"):
        data.encode_all(tok, items, 64, "alpaca")
    (texts,) = data.load_sets(text, "train").values()
    assert data.encode_all(tok, texts, 4, None) == data.chunks(tok, ["abcdefghij"], 4)  # "x": no target
    assert [data.kind_of(p) for p in (chat, text, tmp_path / "none.json")] == ["messages", "text", None]


@pytest.mark.parametrize("kind", ["messages", "text"])
def test_train_py_takes_chat_and_text_jsonl(tmp_path, tiny_checkpoint, kind):
    import benchmarks
    import models
    import train

    if kind == "messages":
        records = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                 {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(6)]
    else:
        records = [{"text": f"Line {i}: the quick brown fox jumps over the lazy dog. " * 3} for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    summary = train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--data", str(path), "--out",
                          str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "64",
                          "--val-size", "2", "--log-every", "1"])
    assert summary["steps"] == 2
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train_args"]["prompt"]
    assert recorded == {"messages": "chat", "text": None}[kind]
    tok = models.load(tiny_checkpoint)[1]
    encoded = benchmarks.train_set(tok, str(path), None, recorded, 64)
    items = data.load_items(path)
    want = ([data.encode_chat(tok, c, 64) for c in items] if kind == "messages" else data.chunks(tok, items, 64))
    assert encoded == want


@pytest.mark.parametrize("kind", ["messages", "text"])
def test_eval_py_scores_held_out_chats_and_texts_by_their_loss(tmp_path, tiny_checkpoint, kind, capsys):
    """eval.py --data on chats or texts: the mean loss per target token (a chat's assistant turns,
    every token of a text) and its perplexity, for the base model and each adapter; train.py's last
    line on such data points there."""
    import eval as evaluate
    import models
    import train

    if kind == "messages":
        records = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                 {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(9)]
    else:
        records = [{"text": f"Line {i}: the quick brown fox jumps over the lazy dog. " * 3} for i in range(9)]
    train_file, held_out = write_jsonl(tmp_path / "d.jsonl", records[:6]), write_jsonl(tmp_path / "h.jsonl", records[6:])
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--data", str(train_file), "--out",
                str(tmp_path / "run"), "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--val-size", "2"])
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"next: python eval.py --adapter {tmp_path / 'run'} --model {tiny_checkpoint} --data HELD_OUT.jsonl")
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--data", str(held_out), "--adapter",
                          str(tmp_path / "run"), "--seq-len", "64", "--batch-size", "2"])
    assert [r["name"] for r in rows] == ["base", "run"] and "loss" in capsys.readouterr().out
    model, tok = models.load(tiny_checkpoint)
    pairs = data.encode_all(tok, data.load_items(held_out), 64)
    with torch.no_grad():  # one pair at a time, weighted by its targets: the mean over all target tokens
        sums = [model.loss(*data.collate([p])).item() * sum(t != -100 for t in p[1]) for p in pairs]
    want = sum(sums) / sum(sum(t != -100 for t in p[1]) for p in pairs)
    torch.testing.assert_close(rows[0]["loss"], want, rtol=1e-5, atol=0)
    assert abs(rows[0]["perplexity"] - math.exp(want)) < 1e-6 * math.exp(want)
    assert rows[1]["loss"] != rows[0]["loss"]  # the adapter is scored, not the base twice


def test_train_py_on_a_template_that_fails_as_it_renders_says_so_in_one_line(tmp_path, tiny_checkpoint):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    (model / "chat_template.jinja").write_text("{{ messages[0]['content'] + tools.name }}")
    chat = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}] * 4)
    r = subprocess.run([sys.executable, "train.py", "--model", str(model), "--data", str(chat), "--out",
                        str(tmp_path / "run"), "--steps", "1"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"the chat template in {model / 'chat_template.jinja'} failed on the messages" in r.stderr


def test_a_template_that_refuses_the_roles_is_a_data_error():
    tok = byte_tokenizer()
    tok.template = "{{ raise_exception('no system role') }}"
    with pytest.raises(data.DataError, match="cannot render chat messages: the chat template refused"):
        data.encode_chat(tok, data.Chat(({"role": "assistant", "content": "x"},)), 64)
