"""Tokenizers as tiktoken Encodings, built offline from what a checkpoint ships.

Sources: a GGUF vocabulary (byte-level BPE), a Hugging Face `tokenizer.json` or GPT-2's
`vocab.json` + `merges.txt` (byte-level BPE), and a Llama-3 `tokenizer.model` (tiktoken format).
Anything else (SentencePiece-style BPE as Llama 2 ships it, Unigram, WordPiece) is refused with
what it is (not_byte_level). Chat prompts render the checkpoint's own Jinja chat template as
transformers does (jinja2 imported only then), else a built-in ChatML or Llama-3 format.
Byte-level BPE vocabularies list tokens as printable strings through GPT-2's byte<->unicode map,
and their ids follow merge order, so a token's id is its tiktoken rank.
"""
import base64
import datetime
import functools
import importlib.util
import json
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

        try:
            return template.render(**context)
        except (jinja2.TemplateError, TypeError, ArithmeticError) as e:
            reason = " ".join(str(e).split()).rstrip(".")
            raise ValueError(f"the chat template in {self.template_from} failed on the messages "
                             f"({type(e).__name__}: {reason})") from None

    def prompt(self, user):
        """Token ids of a one-turn chat prompt that ends where the assistant's answer starts."""
        if self.chat is None and self.template is None:
            return self.encode(user)
        return self.encode_chat(self.render([{"role": "user", "content": user}], add_generation_prompt=True))


def jinja_installed():
    return importlib.util.find_spec("jinja2") is not None


@functools.lru_cache(maxsize=8)
def compile_template(source):
    """A chat template compiled as transformers compiles it: a sandbox (templates come from the
    hub: untrusted), trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and
    strftime_now, and `{% generation %}` blocks rendered as their content."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("this model's chat template needs jinja2: pip install jinja2") from None

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
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
    ranks = {bytes(dec[c] for c in tok): i for tok, i in vocab.items() if tok not in specials}
    enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    tok = with_chat(enc, template, names)
    tok.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
    return tok


def with_chat(enc, template=None, names=None):
    """The Tokenizer of `enc`: the checkpoint's template and its token names (bos_token, eos_token),
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
    return Tokenizer(enc, chat, system, stop, template=template, names=names)


def from_gguf(fields):
    """fields: the GGUF key -> value metadata (already decoded to Python values)."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model {fields.get('tokenizer.ggml.model')!r} is not "
                         "byte-level BPE ('gpt2'); only that kind can be read into tiktoken")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PATTERNS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(PATTERNS)})")
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
    vocab = {t: i for i, t in enumerate(tokens)}
    names = {f"{k}_token": tokens[fields[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos")
             if f"tokenizer.ggml.{k}_token_id" in fields}
    return from_vocab(f"gguf-{pre}", vocab, specials, PATTERNS[pre], fields.get("tokenizer.chat_template"), names)


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
    """What a tokenizer.json is, in words, when it is not byte-level BPE as tiktoken reads it; None
    when it is. SentencePiece-style BPE (Llama 2, Mistral 7B, TinyLlama: '▁' for spaces, <0x..>
    byte fallback) merges characters, not bytes, which tiktoken cannot express."""
    model = tj.get("model") or {}
    parts = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")], ensure_ascii=False)
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return f"a {model.get('type')} tokenizer"
    if model.get("byte_fallback") or "Metaspace" in parts or "▁" in parts:
        return "SentencePiece-style BPE ('▁' for spaces, byte fallback)"
    if '"ByteLevel"' not in parts:
        return "BPE over characters, not bytes"
    if '"add_prefix_space": true' in json.dumps(tj.get("pre_tokenizer")):
        return "byte-level BPE that adds a space before the text (add_prefix_space)"
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") not in NORMALIZERS:
        return f"byte-level BPE with a {norm.get('type')} normalizer (only {', '.join(NORMALIZERS)} are applied)"
    return None


def hf_chat(path):
    """(chat template or None, the file it is in, {bos_token, eos_token}) of a checkpoint directory:
    the template from tokenizer_config.json (a string, or a list of named ones: "default") or
    chat_template.jinja, where transformers 5 saves it."""
    config = {}
    if (path / "tokenizer_config.json").exists():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
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
    template, source, names = hf_chat(path)
    tok = from_hf_files(path, template, names)
    if tok is not None:
        tok.template_from = str(source)
    return tok


def from_hf_files(path, template, names):
    """from_hf_dir's tokenizer, from whichever files the directory ships."""
    if (path / "tokenizer.json").exists():
        tj = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        unreadable = not_byte_level(tj)
        if unreadable:
            raise ValueError(f"{path / 'tokenizer.json'} is {unreadable}: only byte-level BPE tokenizers "
                             f"(GPT-2, Llama 3, SmolLM, Qwen2 and the like) can be read")
        vocab = dict(tj["model"]["vocab"])
        specials = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        vocab.update(specials)
        tok = from_vocab(path.name, vocab, specials, hf_pattern(tj.get("pre_tokenizer")), template, names)
        tok.normalize = (tj.get("normalizer") or {}).get("type")
        return tok
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        specials = {t: i for t, i in vocab.items() if t == "<|endoftext|>"}
        return from_vocab(path.name, vocab, specials, GPT2_PAT, template, names)
    if (path / "tokenizer.model").exists() or (path / "original" / "tokenizer.model").exists():
        model_file = path / "tokenizer.model"
        model_file = model_file if model_file.exists() else path / "original" / "tokenizer.model"
        return from_llama3_model(model_file, template, names)
    return None


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
        raise ValueError(f"{model_file} is not a tiktoken BPE file (a SentencePiece model, as Llama 2 "
                         "ships, cannot be read without the sentencepiece package)") from None
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    return with_chat(tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                                       special_tokens=specials), template, names)


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
