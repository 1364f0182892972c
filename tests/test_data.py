"""The built-in task, the loaders, prompts and answer extraction."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
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
            {"instruction": "Pick one.", "input": "A) x B) y", "output": "The answer is B", "answer": "B"},
            {"no_instruction": 1}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    for f in ("d.json", "d.jsonl"):
        ex = data.load_examples(tmp_path / f)
        assert len(ex) == 2
        assert ex[1].question == "Pick one.\n\nA) x B) y" and ex[1].answer == "B"


@settings(max_examples=50)
@given(st.binary(max_size=200))
def test_loader_rejects_garbage_with_data_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("g") / "x.json"
    path.write_bytes(blob)
    try:
        data.load_examples(path)
    except data.DataError:
        pass


def byte_tokenizer():
    import tiktoken
    enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|im_start|>": 256, "<|im_end|>": 257})
    return Tokenizer(enc, "chatml", None, [257])


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
