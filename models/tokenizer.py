"""Tokenizers built offline from what a checkpoint ships.

Byte-level BPE runs as a tiktoken Encoding: a GGUF vocabulary, a Hugging Face `tokenizer.json` or
GPT-2's `vocab.json` + `merges.txt`, and a Llama-3 `tokenizer.model` (tiktoken format). Byte-level
vocabularies list tokens as printable strings through GPT-2's byte<->unicode map, and their ids
follow merge order, so a token's id is its tiktoken rank. SentencePiece-style BPE (Llama 2, Mistral
7B, TinyLlama, Phi-3: '▁' for spaces, <0xNN> byte fallback) merges characters, not bytes, so it runs
here in Python (SentencePieceBPE), as Hugging Face's `tokenizers` runs its tokenizer.json. Unigram
and WordPiece are refused with what they are. Chat prompts render the checkpoint's own Jinja chat
template as transformers does (jinja2 imported only then), else a built-in ChatML or Llama-3 format.
"""
import base64
import contextvars
import datetime
import functools
import heapq
import importlib.util
import itertools
import json
import operator
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

# Pre-tokenizer regexes. SmolLM splits digits one by one before GPT-2's byte-level split, which
# is GPT-2's pattern with ` ?\p{N}+` replaced by `\p{N}` (the space then stands alone, as in HF),
# and a digit ending a whitespace run as the end of the text does (HF splits the digit off first).
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PAT, "smollm": SMOLLM_PAT, "llama-bpe": LLAMA3_PAT}


PLAIN = "\ue000"  # a private-use character: marks a special-token string inside a message (escape)


@dataclass
class Tokenizer:
    """A tiktoken Encoding plus what prompting needs: the chat format and the stop tokens."""
    enc: tiktoken.Encoding
    chat: str | None = None  # "chatml", "llama3" or None (plain text)
    system: str | None = None  # ChatML's default system message, when the template has one
    stop: list[int] = field(default_factory=list)
    missing: bytes = b""  # bytes the vocabulary has no token for (SmolLM2 lacks 21 of them)
    normalize: str | None = None  # the tokenizer.json's unicode normalization ("NFC" for Qwen2)
    template: str | None = None  # the checkpoint's own chat template (Jinja), rendered where jinja2 is
    template_from: str = "the model's tokenizer"  # where it was read: errors name it
    names: dict = field(default_factory=dict)  # what templates read besides messages: bos_token, eos_token
    bos: list[int] = field(default_factory=list)  # what the model expects before a text (Llama 2's <s>)

    def spellable(self, text):
        """`text` normalized as the tokenizer.json says, less the characters whose UTF-8 holds a
        byte the vocabulary cannot spell, as HF's BPE without byte fallback drops them (tiktoken
        would panic on them)."""
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        if self.missing:
            raw = text.encode("utf-8")
            if raw.translate(None, self.missing) != raw:
                text = "".join(c for c in text if not set(c.encode("utf-8")).intersection(self.missing))
        return text

    def encode(self, text):
        """Ordinary text: special-token strings in it are treated as plain text."""
        return self.enc.encode_ordinary(self.spellable(text))

    def decode(self, ids):
        return self.enc.decode(ids)

    def turn_end(self):
        """The special token the checkpoint's chat template writes right after an assistant's
        message, whitespace between allowed (Phi-3's <|end|>, Mistral's </s>), or None where it
        writes none or cannot render: where the model ends its turn."""
        mark = "\ue001"  # a private-use character, as PLAIN: no template writes it
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}])
        except ValueError:
            return None
        after = text.partition(mark)[2].lstrip()
        return next((t for t in self.plain[1:] if after.startswith(t)), None)

    def add_stops(self, ids):
        """More ids that end generation (the checkpoint's end-of-sequence and end-of-turn ids), after those found."""
        self.stop += [i for i in dict.fromkeys(ids) if i not in self.stop]

    def special(self, name):
        return self.enc.encode_single_token(name)

    @functools.cached_property
    def plain(self):
        """The strings escape() hides: PLAIN, then the special tokens, longest first."""
        return [PLAIN, *sorted(self.enc.special_tokens_set, key=len, reverse=True)]

    def escape(self, content):
        """Message content with every special-token string (and PLAIN itself) written as PLAIN,
        its index, PLAIN: encode_chat spells those as plain text, so no message forges a token."""
        found = re.compile("|".join(map(re.escape, self.plain)))
        return found.sub(lambda m: f"{PLAIN}{self.plain.index(m.group())}{PLAIN}", content)

    def chat_parts(self, text):
        """Chat text (render's) as encode_chat reads it: text, escape, text, ... with the text
        spellable() and each escape (PLAIN, index, PLAIN) as it is."""
        parts = re.split(f"({PLAIN}\\d+{PLAIN})", text)
        return [p if i % 2 else self.spellable(p) for i, p in enumerate(parts)]

    def encode_chat(self, text, offsets=False):
        """Chat text (render's): the special-token strings of the format are special tokens, as
        transformers' apply_chat_template tokenizes them; escaped content stays plain text. With
        `offsets`, also the index of each token's first character in "".join(chat_parts(text)), the
        text it tokenizes (normalized, unspellable characters dropped)."""
        ids, starts, at = [], [], 0
        for i, part in enumerate(self.chat_parts(text)):
            if i % 2:
                new = self.encode(self.plain[int(part[1:-1])])
                starts += [at] * len(new)
            else:
                new = self.enc.encode(part, allowed_special="all")
                char = [j for j, c in enumerate(part) for _ in c.encode("utf-8")]  # byte -> character
                byte = 0
                for t in new:
                    starts.append(at + char[byte])
                    byte += len(self.enc.decode_single_token_bytes(t))
            at += len(part)
            ids += new
        return (ids, starts) if offsets else ids

    def render(self, messages, add_generation_prompt=False):
        """The chat text of `messages` ([{"role", "content"}, ...]), ending with the header of the
        assistant's turn when add_generation_prompt: the checkpoint's template as transformers'
        apply_chat_template renders it, else (no template, or no jinja2) the built-in format."""
        msgs = [{**m, "content": self.escape(m["content"])} for m in messages]
        if self.template and (jinja_installed() or self.chat is None):
            return self.render_template(messages=msgs, add_generation_prompt=add_generation_prompt, **self.names)
        if self.chat == "chatml":
            if self.system and not (msgs and msgs[0]["role"] == "system"):
                msgs = [{"role": "system", "content": self.system}, *msgs]
            turn = lambda role, content="": f"<|im_start|>{role}\n{content}"  # noqa: E731
            return "".join(turn(m["role"], m["content"]) + "<|im_end|>\n" for m in msgs) + (
                turn("assistant") if add_generation_prompt else "")
        if self.chat == "llama3":
            head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
            return "<|begin_of_text|>" + "".join(head(m["role"]) + m["content"] + "<|eot_id|>" for m in msgs) + (
                head("assistant") if add_generation_prompt else "")
        raise ValueError("this model's tokenizer has no chat format: use --prompt alpaca, or plain text")

    def render_template(self, **context):
        """The checkpoint's template rendered; what fails in it (an undefined name, an operation the
        sandbox forbids, a type error) is the template's fault, said in one sentence."""
        template = compile_template(self.template)
        import jinja2  # compile_template has imported it

        budget = WORK_LEFT.set([TEMPLATE_WORK])
        try:
            return template.render(**context)
        except TooMuchWork:
            raise ValueError(f"the chat template in {self.template_from} does more than {TEMPLATE_WORK:,} steps of "
                             "work on one chat (loop iterations, range and repeat sizes): refused, as a template "
                             "that may never end") from None
        except (jinja2.TemplateError, TypeError, ArithmeticError, RecursionError) as e:
            reason = " ".join(str(e).split()).rstrip(".")
            raise ValueError(f"the chat template in {self.template_from} failed on the messages "
                             f"({type(e).__name__}: {reason})") from None
        finally:
            WORK_LEFT.reset(budget)

    def prompt(self, user):
        """Token ids of a one-turn chat prompt that ends where the assistant's answer starts."""
        if self.chat is None and self.template is None:
            return self.bos + self.encode(user)
        return self.encode_chat(self.render([{"role": "user", "content": user}], add_generation_prompt=True))


def jinja_installed():
    return importlib.util.find_spec("jinja2") is not None


# The work one render of a chat template may do, counted in loop iterations (a recursive loop's
# too), items of the ranges it makes and items of the strings and lists it repeats with `*` (and
# the exponent of a `**`): the sandbox bounds what a template may call, this how long it may run.
# A chat template loops over the messages a few times; nested loops over range(100000) would
# never end.
TEMPLATE_WORK = 1_000_000
WORK_LEFT = contextvars.ContextVar("the work the render in progress may still do")  # [steps]


class TooMuchWork(Exception):
    """A chat template's render went past TEMPLATE_WORK."""


def spend(steps):
    left = WORK_LEFT.get()
    left[0] -= steps
    if left[0] < 0:
        raise TooMuchWork


def bound_loops(tree, nodes):
    """The parsed template with every loop's iterable, and every recursive loop's `loop(...)`
    argument, passed through the `_counted` filter: each item it yields spends one step."""
    def counted(node):
        return nodes.Filter(node, "_counted", [], [], None, None, lineno=node.lineno)
    for loop in tree.find_all(nodes.For):
        loop.iter = counted(loop.iter)
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Name) and call.node.name == "loop" and call.args:
            call.args[0] = counted(call.args[0])
    return tree


@functools.lru_cache(maxsize=8)
def compile_template(source):
    """A chat template compiled as transformers compiles it: a sandbox (templates come from the
    hub: untrusted), trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and
    strftime_now, and `{% generation %}` blocks rendered as their content; and its work bounded
    (TEMPLATE_WORK)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
    except ImportError:
        raise ValueError("this model's chat template needs jinja2: pip install jinja2") from None

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":  # a string or list times n holds len * n items
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        spend(len(seq) * max(n, 0))
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                spend(abs(right))  # an integer power's digits grow with its exponent
            return super().call_binop(context, operator, left, right)

    @jinja2.pass_context  # never called at compile time, where the optimizer folds constants
    def counted(context, iterable):
        for item in iterable:
            spend(1)
            yield item

    def bounded_range(*args):
        r = safe_range(*args)
        spend(len(r))
        return r

    class Generation(jinja2.ext.Extension):  # marks assistant text for transformers; no-op here
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["_counted"] = counted
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, range=bounded_range,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(bound_loops(env.parse(source), jinja2.nodes))
    except jinja2.TemplateError as e:
        raise ValueError(f"the model's chat template does not compile: {e}") from None


def byte_decoder():
    """GPT-2's map from the printable stand-in characters back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def from_vocab(name, vocab, specials, pattern, template=None, names=None):
    """vocab: byte-level token string -> id; specials: special token string -> id."""
    dec = byte_decoder()
    check_ids(vocab.items())  # else tiktoken panics (a BaseException)
    check_specials(specials, lambda t: len(t) == 1 and t in dec)
    ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if tok not in specials}
    enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    tok = with_chat(enc, template, names)
    tok.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
    return tok


def with_chat(enc, template=None, names=None, kind=Tokenizer):
    """The `kind` of Tokenizer of `enc`: the checkpoint's template and its token names (bos_token, eos_token),
    the built-in format the special tokens allow (ChatML, Llama 3), and the stop tokens: the format's
    end of turn first (what training appends to a response), then the end-of-text tokens and eos."""
    sp, names = enc.special_tokens_set, {k: v for k, v in (names or {}).items() if v}
    if "<|im_start|>" in sp and "<|im_end|>" in sp:
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template or "")
        chat, system, ends = "chatml", m.group(1) if m else None, ["<|im_end|>"]
    elif "<|eot_id|>" in sp and "<|start_header_id|>" in sp:
        chat, system, ends = "llama3", None, ["<|eot_id|>", "<|end_of_text|>"]
    else:
        chat, system, ends = None, None, ["<|endoftext|>", "</s>", "<|end_of_text|>"]
    ends.append(names.get("eos_token"))
    stop = [enc.encode_single_token(t) for t in dict.fromkeys(ends) if t in sp]
    tok = kind(enc, chat, system, stop, template=template, names=names)
    end = tok.turn_end() if chat is None and template else None
    if end is not None:  # first: what training appends to a response
        first = enc.encode_single_token(end)
        tok.stop = [first, *(i for i in stop if i != first)]
    return tok


def check_specials(specials, is_byte):
    """Refuses a special token (string -> id) that is the token of a byte (`is_byte`): text needs
    that byte, and as a special token it would never be spelt."""
    for t, i in specials.items():
        if is_byte(t):
            raise ValueError(f"its special token {t!r} (id {i}) is the token of a byte, which text needs")


def check_ids(pairs):
    """Refuses a vocabulary (token string, id pairs: its tokens and its added tokens) that gives one
    id to two different tokens: which one the id stands for would be a guess."""
    seen = {}
    for t, i in pairs:
        if seen.setdefault(i, t) != t:
            raise ValueError(f"it gives id {i} to two tokens, {seen[i]!r} and {t!r}")


def gguf_list(fields, key, n):
    """The GGUF tokenizer list `key`, checked to hold one entry per token (n)."""
    values = fields[f"tokenizer.ggml.{key}"]
    if len(values) != n:
        raise ValueError(f"its {key} list has {len(values)} entries for {n} tokens")
    return values


def from_gguf(fields):
    """fields: the GGUF key -> value metadata (already decoded to Python values). Byte-level BPE
    ("gpt2") runs in tiktoken, SentencePiece BPE ("llama") as SentencePieceBPE."""
    tokens = fields["tokenizer.ggml.tokens"]
    try:
        return gguf_tokenizer(fields, tokens, gguf_list(fields, "token_type", len(tokens)))
    except ValueError as e:
        raise ValueError(f"the GGUF tokenizer cannot be read: {e}") from None


def gguf_tokenizer(fields, tokens, types):
    """from_gguf's tokenizer of its (checked) tokens and token types; every end-of-sequence, end-of-turn
    and end-of-message id the file names stops generation, and its BOS goes first where add_bos_token
    says (absent: a SentencePiece vocabulary's yes, a byte-level one's no, as llama.cpp and transformers read it)."""
    model = fields.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise ValueError(f"its model {model!r} is neither byte-level BPE ('gpt2') nor SentencePiece BPE ('llama')")
    is_byte = BYTE_TOKEN.fullmatch if model == "llama" else lambda t: len(t) == 1 and t in byte_decoder()
    ids = {}
    for key in ("bos", "eos", "eot", "eom"):  # llama.cpp's names for these ids
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"its {key} token id {i} is not one of its {len(tokens)} tokens")
        if i is not None:
            check_specials({tokens[i]: i}, is_byte)
            ids[key] = i
    names = {f"{k}_token": tokens[ids[k]] for k in ("bos", "eos") if k in ids}
    if model == "llama":
        tok = gguf_sentencepiece(fields, tokens, types, names)
    else:
        pre = fields.get("tokenizer.ggml.pre", "gpt2")
        if pre not in PATTERNS:
            raise ValueError(f"its pre-tokenizer {pre!r} is not supported (known: {', '.join(PATTERNS)})")
        specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = from_vocab(f"gguf-{pre}", vocab, specials, PATTERNS[pre], fields.get("tokenizer.chat_template"), names)
    tok.add_stops(ids[k] for k in ("eos", "eot", "eom") if k in ids)
    if "bos" in ids and fields.get("tokenizer.ggml.add_bos_token", model == "llama"):  # llama.cpp's default
        tok.bos = [ids["bos"]]
    return tok


def gguf_sentencepiece(fields, tokens, types, names):
    """A SentencePieceTokenizer of a GGUF SentencePiece BPE vocabulary (Llama 2, Mistral 7B,
    TinyLlama), read as transformers reads such a file: LlamaTokenizer's pipeline; the merges the
    file lists, else every split of a piece into two pieces, the best-scored piece first (as
    llama.cpp merges: the pair whose merged piece scores best); the unknown, control and
    user-defined tokens as added tokens."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in fields:
        merges = [m.split(" ") for m in fields["tokenizer.ggml.merges"]]
    else:
        merges = sentencepiece_merges(vocab, dict(zip(tokens, gguf_list(fields, "scores", len(tokens)))))
    added = [{"id": i, "content": t} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in SP_ADDED]
    enc = SentencePieceBPE("gguf-llama", {"vocab": vocab, "merges": merges}, added, *llama_pipeline({}),
                           llama_class=True)
    return with_chat(enc, fields.get("tokenizer.chat_template"), names, SentencePieceTokenizer)


def hf_pattern(pre):
    """The regex a tokenizer.json pre_tokenizer applies (the byte-level families we know)."""
    parts = pre.get("pretokenizers", [pre]) if pre else []
    for p in parts:
        if p.get("type") == "Split" and "Regex" in p.get("pattern", {}):
            return p["pattern"]["Regex"]
    if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return SMOLLM_PAT
    return GPT2_PAT


NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")  # unicodedata's own


def not_byte_level(tj):
    """What a tokenizer.json is, in words, when it is not byte-level BPE as tiktoken reads it (nor
    SentencePiece-style BPE, which SentencePieceBPE reads); None when it is."""
    model = tj.get("model") or {}
    parts = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")], ensure_ascii=False)
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return f"a {model.get('type')} tokenizer"
    if '"ByteLevel"' not in parts:
        return "BPE over characters, not bytes"
    if '"add_prefix_space": true' in json.dumps(tj.get("pre_tokenizer")):
        return "byte-level BPE that adds a space before the text (add_prefix_space)"
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") not in NORMALIZERS:
        return f"byte-level BPE with a {norm.get('type')} normalizer (only {', '.join(NORMALIZERS)} are applied)"
    return None


READABLE = ("only BPE tokenizers can be read, byte-level (GPT-2, Llama 3, SmolLM, Qwen2 and the like) or "
            "SentencePiece-style (Llama 2, Mistral 7B, TinyLlama, Phi-3): Unigram's most likely segmentation "
            "under its piece scores and WordPiece's longest-match are not implemented")


def hf_config(path):
    """tokenizer_config.json of a checkpoint directory, {} when there is none."""
    if (path / "tokenizer_config.json").exists():
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {}


def hf_chat(path, config):
    """(chat template or None, the file it is in, {bos_token, eos_token}) of a checkpoint directory:
    the template from tokenizer_config.json (a string, or a list of named ones: "default") or
    chat_template.jinja, where transformers 5 saves it."""
    template, source = config.get("chat_template"), path / "tokenizer_config.json"
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) and (path / "chat_template.jinja").exists():
        source = path / "chat_template.jinja"
        template = source.read_text(encoding="utf-8")
    names = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        names[key] = value.get("content") if isinstance(value, dict) else value
    return template if isinstance(template, str) else None, source, names


def from_hf_dir(path):
    """A tokenizer from a checkpoint directory, or None when it ships none we can read."""
    path = Path(path)
    config = hf_config(path)
    template, source, names = hf_chat(path, config)
    tok = from_hf_files(path, config, template, names)
    if tok is not None:
        tok.template_from = str(source)
        tok.add_stops(generation_eos(path, tok.enc.n_vocab))
    return tok


def generation_eos(path, n_vocab):
    """The ids a checkpoint's generation_config.json ends generation at (eos_token_id: an id or a
    list of them, Phi-3's end of text, its assistant's header and its end of turn), [] without one."""
    file = path / "generation_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(type(i) is int and 0 <= i < n_vocab for i in ids):
        raise ValueError(f"{file}: its eos_token_id {eos!r} is not one of the tokenizer's {n_vocab} ids, "
                         "nor a list of them")
    return ids


def from_hf_files(path, config, template, names):
    """from_hf_dir's tokenizer, from whichever files the directory ships."""
    if (path / "tokenizer.json").exists():
        return from_tokenizer_json(path / "tokenizer.json", config, template, names)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        specials = {t: i for t, i in vocab.items() if t == "<|endoftext|>"}
        try:
            return from_vocab(path.name, vocab, specials, GPT2_PAT, template, names)
        except ValueError as e:
            raise ValueError(f"{path / 'vocab.json'} cannot be read: {e}") from None
    if (path / "tokenizer.model").exists() or (path / "original" / "tokenizer.model").exists():
        model_file = path / "tokenizer.model"
        model_file = model_file if model_file.exists() else path / "original" / "tokenizer.model"
        if model_file.read_bytes()[:1] == b"\n":  # a protobuf's first field, never a base64 line
            enc = from_sentencepiece_model(model_file, config)
            tok = with_chat(enc, template, names, SentencePieceTokenizer)
            bos = names["bos_token"] or "<s>"  # LlamaTokenizer's default
            tok.bos = [enc.encode_single_token(bos)] if config.get("add_bos_token") else []
            return tok
        return from_llama3_model(model_file, template, names)
    return None


def from_tokenizer_json(file, config, template, names):
    """The tokenizer of a tokenizer.json: byte-level BPE in tiktoken, SentencePiece-style BPE in
    SentencePieceBPE; anything else is refused with what it is."""
    tj = json.loads(file.read_text(encoding="utf-8"))
    if sentencepiece_style(tj):
        try:
            enc = from_sentencepiece_json(file.parent.name, tj, config)
        except ValueError as e:
            raise ValueError(f"{file} is SentencePiece-style BPE, but {e}") from None
        tok = with_chat(enc, template, names, SentencePieceTokenizer)
        tok.bos = post_processor_bos(tj.get("post_processor"))
        return tok
    unreadable = not_byte_level(tj)
    if unreadable:
        raise ValueError(f"{file} is {unreadable}: {READABLE}")
    vocab = dict(tj["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(specials)
    try:
        tok = from_vocab(file.parent.name, vocab, specials, hf_pattern(tj.get("pre_tokenizer")), template, names)
    except ValueError as e:
        raise ValueError(f"{file} cannot be read: {e}") from None
    tok.normalize = (tj.get("normalizer") or {}).get("type")
    tok.bos = post_processor_bos(tj.get("post_processor"))
    return tok


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(LLAMA3_SPECIALS))]  # 3.1's


def from_llama3_model(model_file, template=None, names=None):
    """Llama 3's tokenizer.model: base64 token + rank per line, then 256 special tokens. Read here,
    not with tiktoken.load, which caches a file by its path (a changed file would read stale)."""
    try:
        lines = Path(model_file).read_bytes().splitlines()
        ranks = {base64.b64decode(token, validate=True): int(rank)
                 for token, rank in (line.split() for line in lines if line)}
    except ValueError:  # a line that is not "base64 rank" (binascii.Error is one too)
        raise ValueError(f"{model_file} is neither a tiktoken BPE file nor a SentencePiece model") from None
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    return with_chat(tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                                       special_tokens=specials), template, names)


# ----------------------------------------------------------------------------- SentencePiece-style BPE

SPACE = "▁"  # SentencePiece's stand-in for a space
WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Rust's char::is_whitespace
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
NO_MERGE = 1 << 62  # a pair's rank when no merge joins it: above every rank * 2^32 + id
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # transformers 5 rebuilds their pipeline (llama_pipeline)


class SentencePieceBPE:
    """SentencePiece-style BPE as Hugging Face's `tokenizers` runs a tokenizer.json, with the methods
    of a tiktoken Encoding that Tokenizer uses. A text splits at the added tokens into runs; each
    run is normalized (spaces -> '▁', a '▁' put before it) and cut into words, and each word is
    merged: starting from its characters (a character outside the vocabulary becomes its UTF-8
    byte tokens <0xNN> with byte_fallback, else <unk>), the adjacent pair with the lowest merge rank,
    the leftmost of equals, merges until none is left. Words are cached, so common text costs a
    dict lookup per word, done in C for a whole run (encode_run).

    `tokenizers` merges a whole run when no pre-tokenizer splits it (Llama 2's tokenizer.json), so
    words here are cut only where no merge can cross: between two characters that no token holds
    side by side (a merge makes a token, so none joins them), the second one in the vocabulary (a
    waiting <unk> goes no further). Runs are cut so before a '▁' by a regex, and a word missing
    from the cache again into pieces, each merged alone and cached: the same tokens as the run's.
    Merges track ids only; where a token starts is found afterwards (starts()), for chat text."""

    def __init__(self, name, model, added, normalizer, metaspace, decoder, llama_class=False):
        """model: tokenizer.json's "model"; added: its added_tokens; normalizer: ("prepend", s) and
        ("replace", a, b) steps; metaspace: (prepend_scheme, split) or None; decoder: decoder_steps'."""
        self.name, self.normalizer, self.metaspace, self.decode_steps = name, normalizer, metaspace, decoder
        self.split = bool(metaspace and metaspace[1])
        self.vocab = dict(model["vocab"])
        unk = model.get("unk_token")
        self.unk = None if llama_class or unk is None else self.vocab[unk]  # LlamaTokenizer passes no unk
        self.byte_fallback = llama_class or bool(model.get("byte_fallback"))
        self.fuse_unk = llama_class or bool(model.get("fuse_unk"))
        self.ignore_merges = not llama_class and bool(model.get("ignore_merges"))
        self.merges = {}  # (left id, right id) -> (rank, merged id); a repeated pair keeps its last rank
        for rank, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ") if isinstance(m, str) else m
            self.merges[self.vocab[a], self.vocab[b]] = (rank, self.vocab[a + b])
        self.added = {t["content"]: t["id"] for t in added}
        check_ids([*self.vocab.items(), *self.added.items()])
        self.lstrip = {t["id"] for t in added if t.get("lstrip")}
        self.rstrip = {t["id"] for t in added if t.get("rstrip")}
        self.tokens = {i: t for t, i in self.vocab.items()} | {i: t for t, i in self.added.items()}
        self.n_vocab = max(self.tokens) + 1
        self.pairs = {a * self.n_vocab + b: rank << 32 | new for (a, b), (rank, new) in self.merges.items()}
        self.special_tokens_set = set(self.added)
        self.added_re = re.compile("|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))) \
            if self.added else None
        self.split_re = re.compile(f"{SPACE}[^{SPACE}]*|[^{SPACE}]+")
        self.bigrams = self.joins()
        self.cut = self.cut_before_space()
        self.whole = self.ignore_merges and self.split  # a word of the vocabulary is its token
        self.cache = {}  # word or piece -> its ids

    def joins(self):
        """The pairs of adjacent characters some token holds (the only places a merge can join
        two words), or None when merges could join what no token spells: a merge with a byte
        token or <unk> (such a vocabulary is merged a run at a time, as `tokenizers` does)."""
        special = {i for t, i in self.vocab.items() if BYTE_TOKEN.fullmatch(t)} | {self.unk}
        if any(a in special or b in special for a, b in self.merges):
            return None
        return {t[i:i + 2] for t in self.vocab for i in range(len(t) - 1)}

    def cut_before_space(self):
        """The regex whose matches are a run cut before each '▁' no token joins to the character
        before it (a word: '▁'s, other characters, and again '▁'s where one of `before` precedes
        them ...), or None."""
        if self.bigrams is None or SPACE not in self.vocab:
            return None
        before = "".join(sorted({re.escape(a) for a, b in self.bigrams if b == SPACE and a != SPACE}))
        more = f"(?:(?<=[{before}]){SPACE}+[^{SPACE}]*)*" if before else ""
        return re.compile(f"{SPACE}+[^{SPACE}]*{more}|[^{SPACE}]+{more}")

    def pieces(self, word):
        """`word` cut between each two characters no token holds together, where the second is
        in the vocabulary (before one that is not, an <unk> may be waiting to fuse with it). A
        word of letters and digits after its '▁'s is taken whole: it seldom has such a cut, and
        looking costs more."""
        if self.bigrams is None or word.lstrip(SPACE).isalnum():
            return [word]
        apart = map(operator.not_, map(self.bigrams.__contains__, map(operator.add, word, word[1:])))
        cuts = list(itertools.compress(range(1, len(word)), map(operator.and_, apart,
                                                                 map(self.vocab.__contains__, word[1:]))))
        return [word[a:b] for a, b in zip([0, *cuts], [*cuts, len(word)])]

    def normalize(self, run, first):
        """(text, n): a run as the normalizer and the Metaspace pre-tokenizer leave it, and how many
        characters they put before it. `first`: the run starts the text (Metaspace's "first")."""
        text, n = run, 0
        for step in self.normalizer:
            if step[0] == "prepend" and text:
                text, n = step[1] + text, n + len(step[1])
            elif step[0] == "replace":
                text = text.replace(step[1], step[2])
        if self.metaspace:
            scheme = self.metaspace[0]
            text = text.replace(" ", SPACE)
            if (scheme == "always" or scheme == "first" and first) and not text.startswith(SPACE):
                text, n = SPACE + text, n + 1
        return text, n

    def words(self, text):
        """The words of a normalized run."""
        if self.split:  # Metaspace's split: each '▁' starts a word
            return self.split_re.findall(text)
        return self.cut.findall(text) if self.cut else [text]

    def symbols(self, word):
        """(id, index of its character) of each character of `word`, as `tokenizers` starts a word:
        a character outside the vocabulary is its byte tokens, else <unk> (runs of them fused with
        fuse_unk), else dropped. An <unk> waits for the next character in the vocabulary, so byte
        tokens that come first go before it, as there."""
        out, unk = [], None
        for i, c in enumerate(word):
            t = self.vocab.get(c)
            if t is not None:
                if unk:
                    out.append(unk)
                    unk = None
                out.append((t, i))
                continue
            if self.byte_fallback:
                ids = [self.vocab.get(f"<0x{b:02X}>") for b in c.encode("utf-8")]
                if None not in ids:
                    out += [(t, i) for t in ids]
                    continue
            if self.unk is not None:
                if unk and not self.fuse_unk:
                    out.append(unk)
                    unk = None
                unk = unk or (self.unk, i)
        return out + [unk] if unk else out

    def bpe(self, word):
        """The ids of one word: the merges as `tokenizers`' Word::merge_all makes them, which is
        always the adjacent pair of lowest rank, the leftmost of equals, until none is left."""
        ids = list(map(self.vocab.get, word))
        if None in ids:
            ids = [t for t, _ in self.symbols(word)]
        return self.merge_short(ids) if len(ids) <= 256 else self.merge_heap(ids)

    def merge_short(self, ids):
        """bpe's merges on a short word: the ranks of its adjacent pairs in a list that each merge
        updates, the lowest found by min() (quadratic in the length, but in C). A pair is keyed
        left * n_vocab + right, and its rank * 2^32 + merged id sorts as its rank."""
        get, v = self.pairs.get, self.n_vocab
        ranks = [get(a * v + b, NO_MERGE) for a, b in zip(ids, ids[1:])]
        while ranks and (best := min(ranks)) != NO_MERGE:
            i = ranks.index(best)  # the leftmost
            ids[i] = new = best & 0xFFFFFFFF
            del ids[i + 1], ranks[i]
            if i < len(ranks):
                ranks[i] = get(new * v + ids[i + 1], NO_MERGE)
            if i:
                ranks[i - 1] = get(ids[i - 1] * v + new, NO_MERGE)
        return tuple(ids)

    def merge_heap(self, ids):
        """bpe's merges on a long word as `tokenizers` makes them: a heap of (rank, position)."""
        n, merges = len(ids), self.merges
        nxt, prv = list(range(1, n)) + [-1], list(range(-1, n - 1))
        heap = [(m[0], i, m[1]) for i in range(n - 1) if (m := merges.get((ids[i], ids[i + 1])))]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j < 0 or (m := merges.get((ids[i], ids[j]))) is None or m[1] != new:
                continue  # a pair that merged away since
            ids[i], ids[j] = new, None
            nxt[i] = k = nxt[j]
            if k >= 0:
                prv[k] = i
            for a, b in ((prv[i], i), (i, k)):
                if a >= 0 and b >= 0 and (m := merges.get((ids[a], ids[b]))):
                    heapq.heappush(heap, (m[0], a, m[1]))
        return tuple(t for t in ids if t is not None)

    def learn(self, words):
        """Cache the ids of `words` (a set, none of them cached): those of their pieces (pieces()),
        each merged alone and cached too; with ignore_merges and split, a word of the vocabulary is
        its token. In bulk, so a text's new words cost little beyond their merges."""
        cache = self.cache
        if self.whole:  # no pieces: a piece in the vocabulary may merge into other tokens than itself
            cache.update((w, (self.vocab[w],) if w in self.vocab else self.bpe(w)) for w in words)
            return
        pieces = {w: self.pieces(w) for w in words}
        for p in set(itertools.chain.from_iterable(pieces.values())).difference(cache):
            cache[p] = self.bpe(p)
        for w, ps in pieces.items():
            if len(ps) > 1:
                cache[w] = tuple(itertools.chain.from_iterable(map(cache.__getitem__, ps)))

    def word(self, w):
        """The ids of a word (learn())."""
        if w not in self.cache:
            self.learn({w})
        return self.cache[w]

    def starts(self, word, ids):
        """The index in `word` of the first character of each of its tokens `ids`: a token spells
        the symbols (symbols()) it merged, one after another, so it takes as many as its length needs."""
        symbols, out, k = self.symbols(word), [], 0
        for t in ids:
            out.append(symbols[k][1])
            n = len(self.tokens[t])
            while n > 0:
                n -= len(self.tokens[symbols[k][0]])
                k += 1
        return out

    def encode_run(self, run, first, offsets=False):
        """ids of a run of text holding no added token (with `offsets`: and the index in `run` of
        each token's first character; a '▁' put before the run counts as its first character). The
        cache is emptied when it holds 2^17 words, before a run: a run's words stay in it."""
        if not run:
            return ([], []) if offsets else []
        text, n = self.normalize(run, first)
        if self.ignore_merges and not self.split and text in self.vocab:
            return ([self.vocab[text]], [0]) if offsets else [self.vocab[text]]
        if len(self.cache) >= 1 << 17:
            self.cache.clear()
        words = self.words(text)
        if not offsets:
            self.learn(set(words).difference(self.cache))
            return list(itertools.chain.from_iterable(map(self.cache.__getitem__, words)))
        ids, starts, at = [], [], 0
        for w in words:
            got = self.word(w)
            ids += got
            starts += [max(at + s - n, 0) for s in self.starts(w, got)]
            at += len(w)
        return ids, starts

    def encode_ordinary(self, text):
        """The whole text as one run: added-token strings in it are text."""
        return self.encode_run(text, True)

    def split_added(self, text):
        """[(text, None) or (token string, id)]: `text` cut at its added tokens, leftmost-longest
        first, a token marked lstrip/rstrip taking the whitespace beside it, as `tokenizers` does."""
        out, at = [], 0
        for m in self.added_re.finditer(text) if self.added_re else ():
            start, stop, tid = m.start(), m.end(), self.added[m.group()]
            if tid in self.lstrip:
                start = max(at, len(re.sub(f"[{WHITESPACE}]*$", "", text[:start])))
            if tid in self.rstrip:
                stop += re.match(f"[{WHITESPACE}]*", text[stop:]).end()
            if at < start:
                out.append((text[at:start], None))
            out.append((text[start:stop], tid))
            at = stop
        return out + [(text[at:], None)] if at < len(text) else out

    def decode_single_token_bytes(self, token):
        """The bytes one token stands for, as a stream of tokens writes them: a byte token its byte,
        a '▁' a space (the Strip of a text's first space is the whole decode's)."""
        t = self.tokens[token]
        m = BYTE_TOKEN.fullmatch(t)
        return bytes([int(m.group(1), 16)]) if m else t.replace(SPACE, " ").encode("utf-8")

    def encode_single_token(self, token):
        if token in self.added:
            return self.added[token]
        if token in self.vocab:
            return self.vocab[token]
        raise KeyError(token)

    def decode(self, ids):
        """The decoder's text of the tokens (ids it does not know are skipped, as `tokenizers` does)."""
        tokens = [self.tokens[i] for i in ids if i in self.tokens]
        for step in self.decode_steps:
            tokens = step(tokens)
        return "".join(tokens)


class SentencePieceTokenizer(Tokenizer):
    """A Tokenizer on a SentencePieceBPE: chat text splits at the format's special tokens only, so
    a special-token string escaped in a message is text inside the run around it, as transformers
    reads that text (a run of its own would get a '▁' of its own)."""

    def encode_chat(self, text, offsets=False):
        runs, chars, where, at = [], [], [], 0  # runs: (id, start) or (text, its characters' starts)
        for i, part in enumerate(self.chat_parts(text)):
            if i % 2:
                s = self.plain[int(part[1:-1])]
                chars.append(s)
                where += [at] * len(s)
            else:
                k = at
                for piece, tid in self.enc.split_added(part):
                    if tid is None:
                        chars.append(piece)
                        where += range(k, k + len(piece))
                    else:
                        runs += [("".join(chars), where)] if chars else []
                        runs.append((tid, k))
                        chars, where = [], []
                    k += len(piece)
            at += len(part)
        runs += [("".join(chars), where)] if chars else []
        ids, starts = [], []
        for run, place in runs:
            if isinstance(run, int):
                ids.append(run)
                starts.append(place)
            else:
                got, first = self.enc.encode_run(run, place[0] == 0, offsets=True)
                ids += got
                starts += [place[j] for j in first]
        return (ids, starts) if offsets else ids


def decoder_steps(spec):
    """The functions (list of token strings -> list) a tokenizer.json decoder applies, in order."""
    kind = (spec or {}).get("type")
    if kind == "Sequence":
        return [f for d in spec["decoders"] for f in decoder_steps(d)]
    if kind == "Replace" and "String" in spec["pattern"]:
        a, b = spec["pattern"]["String"], spec["content"]
        return [lambda tokens: [t.replace(a, b) for t in tokens]]
    if kind == "ByteFallback":
        return [byte_fallback]
    if kind == "Fuse":
        return [lambda tokens: ["".join(tokens)]]
    if kind == "Strip":
        c, start, stop = spec["content"], spec["start"], spec["stop"]
        return [lambda tokens: [strip(t, c, start, stop) for t in tokens]]
    if kind == "Metaspace":
        drop = metaspace_scheme(spec) != "never"  # the first token loses every '▁', as in `tokenizers`
        return [lambda tokens: [t.replace(SPACE, "" if i == 0 and drop else " ") for i, t in enumerate(tokens)]]
    raise ValueError(f"its decoder {kind or 'none'} is not one a SentencePiece-style tokenizer uses "
                     "(Replace, ByteFallback, Fuse, Strip, Metaspace)")


def byte_fallback(tokens):
    """Runs of <0xNN> tokens as the text of their bytes; bytes that are not UTF-8 are one U+FFFD each."""
    out, run = [], bytearray()
    for t in tokens + [None]:
        m = BYTE_TOKEN.fullmatch(t) if t is not None else None
        if m:
            run.append(int(m.group(1), 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = bytearray()
        if t is not None:
            out.append(t)
    return out


def strip(token, c, start, stop):
    """`tokenizers`' Strip: up to `start` leading and `stop` trailing `c` removed."""
    head = len(token) - len(token.lstrip(c))
    tail = len(token) - len(token.rstrip(c))
    return token[min(head, start):len(token) - min(tail, stop)]


def metaspace_scheme(spec):
    """A Metaspace's prepend_scheme, older files' add_prefix_space read as `tokenizers` reads it."""
    return "never" if spec.get("add_prefix_space") is False else spec.get("prepend_scheme", "always")


def normalizer_steps(spec):
    """("prepend", s) and ("replace", a, b) steps of a tokenizer.json normalizer."""
    kind = (spec or {}).get("type")
    if kind is None:
        return []
    if kind == "Sequence":
        return [s for n in spec["normalizers"] for s in normalizer_steps(n)]
    if kind == "Prepend":
        return [("prepend", spec["prepend"])]
    if kind == "Replace" and len(spec["pattern"].get("String", "")) == 1 == len(spec["content"]):
        return [("replace", spec["pattern"]["String"], spec["content"])]
    raise ValueError(f"its {kind} normalizer is not one a SentencePiece-style tokenizer uses (Prepend, "
                     "Replace of one character)")


def metaspace_of(spec):
    """(prepend_scheme, split) of a tokenizer.json pre-tokenizer that is a Metaspace, None when there is none."""
    parts = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    if parts in ([None], []):
        return None
    if len(parts) == 1 and parts[0].get("type") == "Metaspace" and parts[0].get("replacement", SPACE) == SPACE:
        return metaspace_scheme(parts[0]), parts[0].get("split", True)
    raise ValueError(f"its pre-tokenizer {json.dumps(spec)[:80]} is not a Metaspace")


def sentencepiece_style(tj):
    """Whether a tokenizer.json is SentencePiece-style BPE ('▁' for spaces, byte fallback)."""
    model = tj.get("model") or {}
    parts = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback") or "Metaspace" in parts or SPACE in parts)


def llama_pipeline(config):
    """(normalizer, metaspace, decoder) of transformers 5's LlamaTokenizer, which replaces the
    tokenizer.json's own: no normalizer, a Metaspace that prepends '▁' to the text's start
    ("first"; "always" with legacy, "never" without add_prefix_space) and does not split."""
    prefix = config.get("add_prefix_space") is not False
    scheme = ("always" if config.get("legacy") else "first") if prefix else "never"
    decoder = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    return [], (scheme, False), decoder_steps({"type": "Sequence", "decoders": decoder})


def from_sentencepiece_json(name, tj, config):
    """A SentencePieceBPE of a tokenizer.json (and its tokenizer_config.json, `config`)."""
    model = tj["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"its BPE sets {key}, which SentencePiece-style BPE does not use")
    llama_class = config.get("tokenizer_class") in LLAMA_CLASSES
    if llama_class:
        normalizer, metaspace, decoder = llama_pipeline(config)
    else:
        normalizer, metaspace = normalizer_steps(tj.get("normalizer")), metaspace_of(tj.get("pre_tokenizer"))
        decoder = decoder_steps(tj.get("decoder"))
    return SentencePieceBPE(name, model, tj.get("added_tokens", []), normalizer, metaspace, decoder, llama_class)


def protobuf_fields(buf):
    """(field number, value) of each field of a protobuf message: an int for a varint, bytes for
    the rest (length-delimited, fixed32, fixed64). Reads bytes only: nothing in them runs."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if i > len(buf) or field == 0:
            raise ValueError("a truncated or malformed protobuf")
        yield field, value


def varint(buf, i):
    """(the protobuf varint at buf[i], the index after it)."""
    value = shift = 0
    while i < len(buf):
        value |= (buf[i] & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if buf[i - 1] < 0x80:
            return value, i
    raise ValueError("a truncated protobuf varint")


SP_ADDED = (2, 3, 4)  # sentencepiece_model.proto's SentencePiece.Type: UNKNOWN, CONTROL, USER_DEFINED


def read_sentencepiece_model(model_file):
    """(pieces [(piece, type)], trainer {field number: value}, normalizer name) of a SentencePiece
    ModelProto: its pieces (field 1: piece 1, type 3), trainer_spec (2) and normalizer_spec (3)."""
    pieces, trainer, normalizer = [], {}, "identity"
    for number, value in protobuf_fields(Path(model_file).read_bytes()):
        if number == 1:
            parts = dict(protobuf_fields(value))
            pieces.append((parts.get(1, b"").decode("utf-8"), parts.get(3, 1)))
        elif number == 2:
            trainer = dict(protobuf_fields(value))
        elif number == 3:
            normalizer = dict(protobuf_fields(value)).get(1, b"identity").decode("utf-8")
    return pieces, trainer, normalizer


def sentencepiece_merges(vocab, scores=None):
    """The merges transformers 5 makes of a SentencePiece BPE vocabulary (generate_merges): every
    split of a piece into two pieces, in the order of the piece's id, then the left part's and the
    right part's length, then their ids; with `scores` (piece -> score, a GGUF file's): the best
    score first, then the longer left part, then the longer right part, then their ids."""
    merges = []
    for piece, key in (scores or vocab).items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(key, a, b) for a, b in sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=scores is not None)  # stable: ids stay in order
    return [(a, b) for _, a, b in merges]


def from_sentencepiece_model(model_file, config):
    """A SentencePieceBPE of a SentencePiece tokenizer.model (Llama 2's, where a checkpoint ships no
    tokenizer.json), read as transformers 5 reads it: LlamaTokenizer's pipeline, merges from the
    vocabulary, the unknown, control and user-defined pieces as added tokens."""
    try:
        pieces, trainer, normalizer = read_sentencepiece_model(model_file)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{model_file} is not a SentencePiece model ({e})") from None
    kind = {1: "Unigram", 2: "BPE", 3: "word", 4: "character"}.get(trainer.get(3, 1), "unknown")
    if kind != "BPE":
        raise ValueError(f"{model_file} is a SentencePiece {kind} model: only SentencePiece BPE (Llama 2, "
                         "Mistral 7B, TinyLlama) can be read")
    if normalizer != "identity":
        raise ValueError(f"{model_file} normalizes text with SentencePiece's {normalizer!r} rules, "
                         "which are not implemented here")
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    added = [{"id": i, "content": p} for i, (p, t) in enumerate(pieces) if t in SP_ADDED]
    model = {"vocab": vocab, "merges": sentencepiece_merges(vocab)}
    return SentencePieceBPE(model_file.parent.name, model, added, *llama_pipeline(config), llama_class=True)


def post_processor_bos(post):
    """The ids a tokenizer.json's post-processor puts before a text (transformers 5 reads them
    there, and ignores tokenizer_config.json's add_bos_token beside a tokenizer.json)."""
    for p in (post or {}).get("processors", [post or {}]):
        if p.get("type") == "TemplateProcessing":
            before = []
            for item in p["single"]:
                if "Sequence" in item:
                    return before
                before += p["special_tokens"][item["SpecialToken"]["id"]]["ids"]
    return []


def gguf_to_hf(fields):
    """tokenizer.json and tokenizer_config.json for a GGUF byte-level BPE vocabulary: what a Hugging
    Face export of a GGUF model ships, read back by from_hf_dir and by transformers alike.

    The pre-tokenizer is our own regex as a Split, so both sides split text the same way."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if fields.get("tokenizer.ggml.model") != "gpt2" or pre not in PATTERNS:
        raise ValueError(f"the GGUF tokenizer ({fields.get('tokenizer.ggml.model')!r}, pre-tokenizer "
                         f"{pre!r}) cannot be written as a byte-level BPE tokenizer.json")
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = [{"id": i, "content": t, **flags} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PATTERNS[pre]}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(fields["tokenizer.ggml.merges"])}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "unknown", "padding"):
        i = fields.get(f"tokenizer.ggml.{role}_token_id")
        if i is not None:
            config[{"unknown": "unk", "padding": "pad"}.get(role, role) + "_token"] = tokens[i]
    if fields.get("tokenizer.chat_template"):
        config["chat_template"] = fields["tokenizer.chat_template"]
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}
