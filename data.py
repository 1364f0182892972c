"""Tasks and datasets: the built-in arithmetic task, JSON/JSONL files (LLM-Adapters records, chat
messages, plain text), prompts, answers.

An Example is a question, the response a model should write (a worked solution ending
"The answer is N."), and the gold answer. Training sees the prompt (the model's chat template,
or the Alpaca template LLM-Adapters uses) and learns only the response tokens; evaluation
generates a response and compares the extracted answer. Chat conversations train on their
assistant turns; plain text trains as fixed-length chunks in which every token is a target.
"""
import array
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Example:
    question: str  # what the user asks (LLM-Adapters' `instruction`)
    response: str  # the target completion
    answer: str  # gold answer: a number ("12", "2.5"), an option letter ("C") or a keyword ("answer2")
    input: str = ""  # LLM-Adapters' optional `input`: context that goes with the question


class DataError(Exception):
    """A data source that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- built-in task

NAMES = ["Tom", "Anna", "Luis", "Mei", "Sara", "Omar", "Jack", "Priya", "Ken", "Fatima", "Ben",
         "Lucy", "Ivan", "Nadia", "Sam", "Grace", "Leo", "Zoe", "Raj", "Emma"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "cards", "shells",
         "stamps", "oranges", "balloons", "candies", "toy cars", "flowers", "coins", "eggs"]
PLACES = ["basket", "box", "jar", "bag", "drawer", "crate", "bin", "bowl"]
SHOPS = ["bakery", "shop", "store", "farm stand", "market stall", "school fair"]


def _one_step(r):
    """AddSub-style: one operation."""
    n, n2, it, pl = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS), r.choice(PLACES)
    a, b = r.randint(2, 60), r.randint(2, 40)
    kind = r.randrange(8)
    if kind == 0:
        q = f"{n} had {a} {it}. {n} bought {b} more. How many {it} does {n} have now?"
        return q, f"{a} + {b} = {a + b}.", a + b
    if kind == 1:
        a = a + b
        q = f"{n} had {a} {it} and gave {b} of them to {n2}. How many {it} does {n} have left?"
        return q, f"{a} - {b} = {a - b}.", a - b
    if kind == 2:
        q = f"There are {a} {it} in the {pl}. {n} puts {b} more {it} in the {pl}. How many {it} are in the {pl} now?"
        return q, f"{a} + {b} = {a + b}.", a + b
    if kind == 3:
        a = a + b
        q = f"A {pl} holds {a} {it}. {n} takes out {b} {it}. How many {it} are still in the {pl}?"
        return q, f"{a} - {b} = {a - b}.", a - b
    if kind == 4:
        a, b = r.randint(2, 12), r.randint(2, 12)
        q = f"{n} has {a} {pl}s with {b} {it} in each {pl}. How many {it} does {n} have in all?"
        return q, f"{a} * {b} = {a * b}.", a * b
    if kind == 5:
        b, c = r.randint(2, 9), r.randint(2, 12)
        q = f"{n} shares {b * c} {it} equally among {b} friends. How many {it} does each friend get?"
        return q, f"{b * c} / {b} = {c}.", c
    if kind == 6:
        q = f"{n} found {a} {it} on Monday and {b} {it} on Tuesday. How many {it} did {n} find altogether?"
        return q, f"{a} + {b} = {a + b}.", a + b
    b = r.randint(2, a + 20)
    hi, lo = max(a, b), min(a, b)
    q = f"{n} has {hi} {it} and {n2} has {lo} {it}. How many more {it} does {n} have than {n2}?"
    return q, f"{hi} - {lo} = {hi - lo}.", hi - lo


def _two_step(r):
    """MultiArith-style: two operations."""
    n, n2, it, pl, shop = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS), r.choice(PLACES), r.choice(SHOPS)
    a, b, c = r.randint(2, 40), r.randint(2, 9), r.randint(2, 9)
    kind = r.randrange(6)
    if kind == 0:
        q = f"{n} had {a} {it}. Then {n} bought {b} {pl}s with {c} {it} in each. How many {it} does {n} have now?"
        return q, f"{b} * {c} = {b * c}. {a} + {b * c} = {a + b * c}.", a + b * c
    if kind == 1:
        a, s = a + b + 10, r.randint(2, 30)
        q = f"The {shop} had {a} {it}. It sold {b + 10} of them and then got {s} more. How many {it} does the {shop} have now?"
        return q, f"{a} - {b + 10} = {a - b - 10}. {a - b - 10} + {s} = {a - b - 10 + s}.", a - b - 10 + s
    if kind == 2:
        d = r.choice([10, 20, 50, 100])
        b, c = r.randint(2, 6), r.randint(1, d // 6)
        q = f"{n} bought {b} {it} at the {shop} for {c} dollars each and paid with a {d} dollar bill. How much change did {n} get?"
        return q, f"{b} * {c} = {b * c}. {d} - {b * c} = {d - b * c}.", d - b * c
    if kind == 3:
        w = r.randint(3, 15)
        s = r.randint(1, min(20, w * b))
        q = f"{n} earns {w} dollars every week. After {b} weeks {n} spends {s} dollars on {it}. How many dollars does {n} have left?"
        return q, f"{w} * {b} = {w * b}. {w * b} - {s} = {w * b - s}.", w * b - s
    if kind == 4:
        g = r.randint(1, 20)
        total = b * c + g
        q = f"{n} had {total} {it}. After giving {g} to {n2}, {n} put the rest equally into {b} {pl}s. How many {it} are in each {pl}?"
        return q, f"{total} - {g} = {b * c}. {b * c} / {b} = {c}.", c
    q = f"{n} has {b} {pl}s of {it} with {c} in each, and {n2} has {a} {it}. How many {it} do they have together?"
    return q, f"{b} * {c} = {b * c}. {b * c} + {a} = {b * c + a}.", b * c + a


def _problem(r):
    q, work, ans = (_one_step if r.random() < 0.5 else _two_step)(r)
    return Example(q, f"{work} The answer is {ans}.", str(ans))


def _unique(r, n, exclude=frozenset()):
    seen, out = set(exclude), []
    while len(out) < n:
        ex = _problem(r)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    return out


def arithmetic(split, n=None, seed=1234):
    """The built-in task. The test split is drawn first; train never repeats a test question."""
    test = _unique(random.Random(seed), 500)
    if split == "test":
        return test[:n] if n else test
    if split == "train":
        return _unique(random.Random(seed + 1), n or 4000, {e.question for e in test})
    if split == "val":  # for methods that score on held-out data (ALoRA); disjoint from both
        train_q = {e.question for e in arithmetic("train")}
        return _unique(random.Random(seed + 2), n or 64, train_q | {e.question for e in test})
    raise ValueError(f"unknown split {split!r}")


# ----------------------------------------------------------------------------- files

KINDS = {"instruction": "LLM-Adapters records", "messages": "chat conversations", "text": "plain text"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Chat:
    """A conversation ({"messages": [...]}): the loss covers the assistant's turns only."""
    messages: tuple  # ({"role": "system" | "user" | "assistant", "content": str}, ...)


def read_records(path):
    """(kind, records) of a .json list or .jsonl file whose records are all of one KINDS kind."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of records")
    if not records:
        raise DataError(f"{path} holds no records")
    kinds = [next((k for k in KINDS if isinstance(r, dict) and k in r), None) for r in records]
    for i, kind in enumerate(kinds, 1):
        if kind is None:
            raise DataError(f"{path}: record {i} has no 'instruction' (LLM-Adapters), 'messages' (chat) "
                            "or 'text' (plain text) key")
        if kind != kinds[0]:
            raise DataError(f"{path}: record {i} holds {KINDS[kind]}, record 1 {KINDS[kinds[0]]}: one kind per file")
    return kinds[0], records


def kind_of(source):
    """The KINDS kind of a data file (of a directory's train.json); None where it cannot be read,
    for the loaders to say why."""
    path = Path(source)
    path = path / "train.json" if path.is_dir() else path
    try:
        return read_records(path)[0]
    except DataError:
        return None


def _example(path, i, rec):
    extra, response, answer = rec.get("input"), rec.get("output"), rec.get("answer")
    if not isinstance(rec["instruction"], str):
        raise DataError(f"{path}: record {i}'s 'instruction' is not a string")
    for key in ("input", "output"):  # absent or null: none; anything else would be read as an empty text
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise DataError(f"{path}: record {i}'s '{key}' is not a string")
    extra = extra.strip() if extra is not None else ""
    response = response if response is not None else ""
    if isinstance(answer, list) and len(answer) == 1:  # LLM-Adapters' math files: ["C"], [68.0]
        answer = answer[0]
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if answer is None or isinstance(answer, (dict, list)):
        answer = extract_answer(response) or ""
    return Example(rec["instruction"], response, str(answer).strip(), extra)


def _chat(path, i, rec):
    msgs = rec["messages"]
    if not (isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs)):
        raise DataError(f"{path}: record {i}'s 'messages' must be a list of {{\"role\": {'|'.join(ROLES)}, "
                        "\"content\": string}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{path}: record {i} has no assistant message to learn")
    return Chat(tuple({"role": m["role"], "content": m["content"]} for m in msgs))


def _text(path, i, rec):
    if not isinstance(rec["text"], str):
        raise DataError(f"{path}: record {i}'s 'text' is not a string")
    return rec["text"]


def load_items(path):
    """Training items of a .json / .jsonl file: Examples (LLM-Adapters' `instruction`, `input`,
    `output`, `answer`), Chats (`messages`) or strings (`text`), as encode_all takes them."""
    kind, records = read_records(path)
    read = {"instruction": _example, "messages": _chat, "text": _text}[kind]
    return [read(path, i, rec) for i, rec in enumerate(records, 1)]


def load_examples(path):
    """LLM-Adapters records (`instruction`, `input`, `output`, `answer`) from .json or .jsonl:
    test sets, whose answers are scored."""
    kind, _ = read_records(path)
    if kind != "instruction":
        raise DataError(f"{path} holds {KINDS[kind]}: test sets are LLM-Adapters records with answers "
                        "(for the perplexity of plain text, use eval.py --text)")
    return load_items(path)


def load_sets(source, split):
    """{set name: items} of `split` ("train" or "test") from a .json/.jsonl file (one set, both
    splits) or a directory in LLM-Adapters' layout: train.json, and test_<set>.json per test set.
    Training takes any kind of load_items; tests only LLM-Adapters records."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    load = load_items if split == "train" else load_examples
    if not path.is_dir():
        return {path.stem: load(path)}
    if split == "train":
        return {"train": load(path / "train.json")}
    files = sorted(path.glob("test_*.json"), key=lambda f: _set_order(f.stem[len("test_"):]))
    if not files:
        raise DataError(f"{path} has no test_<set>.json files")
    return {f.stem[len("test_"):]: load(f) for f in files}


MATH_SETS = ["svamp", "aqua", "addsub", "multiarith", "singleeq", "gsm8k"]  # the SARA paper's column order


def _set_order(name):
    return (MATH_SETS.index(name), "") if name in MATH_SETS else (len(MATH_SETS), name)


def subset(examples, n, seed):
    """n examples drawn with a fixed seed, in their original order; all of them when n is None."""
    if n is None or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


# ----------------------------------------------------------------------------- tokens

def need_tokenizer(tok):
    if tok is None:
        raise DataError("this model has no tokenizer: put tokenizer.json next to its weights")


PROMPTS = ("chat", "alpaca")

# The Alpaca template, as LLM-Adapters' finetune.py and evaluate.py wrap every example (quoted in
# the SARA paper's Appendix A), without the stray indentation of their triple-quoted strings.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{question}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{question}\n\n### Input:\n{input}\n\n### Response:\n")


def document(tok, text):
    """Token ids of a text that starts a sequence: the BOS the model expects (Llama 2's <s>, where
    its tokenizer adds one), then the text, as transformers tokenizes it with add_special_tokens."""
    return tok.bos + tok.encode(text)


def prompt(tok, ex, style="chat"):
    """Token ids of the prompt that ends where the response starts. A chat prompt is the model's
    chat format, which holds the BOS where the model expects one."""
    if style == "alpaca":
        return document(tok, (ALPACA_INPUT if ex.input else ALPACA).format(question=ex.question, input=ex.input))
    if style != "chat":
        raise ValueError(f"unknown prompt style {style!r}: one of {', '.join(PROMPTS)}")
    return tok.prompt(ex.question + (f"\n\n{ex.input}" if ex.input else ""))


def encode(tok, ex, seq_len, style="chat"):
    """(ids, targets): the prompt then the response; targets are -100 except on the response
    tokens and the closing stop token, which the model must learn to emit. None for an example
    longer than seq_len, or one with nothing to learn (an empty response and no stop token)."""
    head = prompt(tok, ex, style)
    return shifted([(head, False), (tok.encode(ex.response) + tok.stop[:1], True)], seq_len)


def shifted(pieces, seq_len):
    """(ids, targets) of token pieces [(ids, learnt?), ...]: each learnt token is the target of
    the position before it. None when the whole is longer than seq_len + 1 tokens, or nothing is learnt."""
    ids = [t for piece, _ in pieces for t in piece]
    learnt = [keep for piece, keep in pieces for _ in piece]
    if len(ids) > seq_len + 1 or not any(learnt[1:]):
        return None
    return ids[:-1], [t if keep else -100 for t, keep in zip(ids[1:], learnt[1:])]


def encode_chat(tok, chat, seq_len):
    """(ids, targets) of a conversation in the model's chat format, tokenized whole as transformers
    tokenizes it. The targets are the assistant turns, each from the token holding its first
    character (as transformers' assistant mask counts them) up to and including its stop token;
    the format's text after that is context."""
    msgs = list(chat.messages)

    def read(text):  # what encode_chat tokenizes, normalized: its offsets, and so the spans, count in it
        return "".join(tok.chat_parts(text))

    try:
        text, spans, end = tok.render(msgs), [], 0
        full = read(text)
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            head, turn = read(tok.render(msgs[:k], add_generation_prompt=True)), read(tok.render(msgs[:k + 1]))
            if not (full.startswith(turn) and turn.startswith(head) and len(head) >= end):
                raise DataError("the model's chat template does not render a conversation as its turns one "
                                "after another, so the assistant's turns cannot be told apart")
            spans.append((len(head), len(turn)))
            end = len(turn)
    except ValueError as e:  # no chat format, or the template failed
        raise DataError(f"cannot render chat messages: {e}") from None
    ids, starts = tok.encode_chat(text, offsets=True)
    learnt = [False] * len(ids)
    for a, b in spans:
        first = starts.index(max(s for s in starts if s <= a))  # the first token holding character a
        for j in range(first, len(ids)):
            if starts[j] >= b:
                break
            learnt[j] = True
            if ids[j] in tok.stop:
                break
    return shifted([([t], keep) for t, keep in zip(ids, learnt)], seq_len)


def encode_all(tok, items, seq_len, style="chat"):
    """(ids, targets) pairs of training items (load_items'): Examples in the prompt `style`, Chats
    in the model's chat format, texts as chunks. Examples and Chats longer than seq_len are skipped."""
    encoded = []
    for it in items:
        if isinstance(it, str):
            encoded += windows(document(tok, it), seq_len)
            continue
        if isinstance(it, Chat) and style != "chat":
            raise DataError(f"chat messages are rendered in the model's chat format: drop --prompt {style}")
        e = encode_chat(tok, it, seq_len) if isinstance(it, Chat) else encode(tok, it, seq_len, style)
        if e is not None:
            encoded.append(e)
    if not encoded:
        raise DataError(f"no example fits --seq-len {seq_len} with a response to learn: raise it, "
                        "or give the examples an output")
    return encoded


def windows(ids, seq_len):
    """Windows of seq_len + 1 tokens that overlap by one, as (ids, targets): each token but the
    first is a target exactly once."""
    return [(w[:-1], w[1:]) for w in (ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len))]


def chunks(tok, texts, seq_len):
    """Plain text as (ids, targets) pairs like encode's, with no prompt: windows() of each text
    (none crosses two texts), each text starting with the BOS the model expects (document())."""
    out = [pair for text in texts for pair in windows(document(tok, text), seq_len)]
    if not out:
        raise DataError("the text holds fewer than two tokens")
    return out


def collate(encoded):
    """Right-pad a list of (ids, targets) into (x, y) LongTensors (B, T)."""
    T = max(len(ids) for ids, _ in encoded)
    x = torch.zeros(len(encoded), T, dtype=torch.long)
    y = torch.full((len(encoded), T), -100, dtype=torch.long)
    for b, (ids, tg) in enumerate(encoded):
        x[b, :len(ids)] = torch.tensor(ids)
        y[b, :len(tg)] = torch.tensor(tg)
    return x, y


def fingerprint(pairs):
    """A digest of (ids, targets) pairs, lists or tensors: the tokens a run trains and validates on,
    which a resumed run compares with its checkpoint's (a data file rewritten, another tokenizer).
    Every source (a file, a directory, a benchmark, the built-in task) ends as such pairs."""
    h = hashlib.blake2b(digest_size=16)
    for ids, targets in pairs:
        ids, targets = (t.flatten().tolist() if torch.is_tensor(t) else t for t in (ids, targets))
        h.update(array.array("q", [len(ids), *ids, *targets]).tobytes())
    return h.hexdigest()


def batch(encoded, batch_size, seed, index):
    """Batch number `index` of an endless shuffled stream: a pure function of (seed, index), so a
    resumed run, or any process of a data-parallel run, finds its batch without replaying."""
    n = len(encoded)
    rows = [divmod(i, n) for i in range(index * batch_size, (index + 1) * batch_size)]
    return collate([encoded[_order(seed, epoch, n)[k]] for epoch, k in rows])


@functools.lru_cache(maxsize=4)
def _order(seed, epoch, n):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


# ----------------------------------------------------------------------------- answers

NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_answer(text):
    """The last number in `text` (commas removed), as LLM-Adapters' evaluator reads answers."""
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1].rstrip(".") if found else None


def extract_letter(text):
    """The last option letter A-E standing alone in `text` (multiple choice, e.g. AQuA).
    LLM-Adapters takes the first capital A-E anywhere, which reads "Answer: C" as A."""
    found = re.findall(r"\b([A-E])\b", text)
    return found[-1] if found else None


# LLM-Adapters' commonsense answers: the first of the task's keywords anywhere in the output
KEYWORDS = {"true": "true|false", "false": "true|false", "solution": "solution[12]",
            "answer": "answer[1-5]", "ending": "ending[1-4]", "option": "option[12]"}


def keyword_family(answer):
    """The keyword pattern a commonsense answer belongs to ("answer3" -> "answer[1-5]"), or None."""
    return KEYWORDS.get(answer.rstrip("0123456789")) if re.fullmatch(r"true|false|[a-z]+\d", answer) else None


def extract_keyword(text, pattern):
    found = re.search(pattern, text)
    return found.group(0) if found else None


def is_correct(completion, answer):
    """Numbers match within 0.001; option letters and commonsense keywords match exactly."""
    family = keyword_family(answer)
    if family:
        return extract_keyword(completion, family) == answer
    if re.fullmatch(r"[A-E]", answer):
        return extract_letter(completion) == answer
    pred = extract_answer(completion)
    try:
        return pred is not None and abs(float(pred) - float(answer.replace(",", ""))) < 1e-3
    except ValueError:
        return False
