"""Tokenizers: byte-level BPE from a GGUF-style vocabulary and from HF files, the default model's
(SmolLM2) tokenizer, and SentencePiece-style BPE (tokenizer.json, tokenizer.model): ids equal to
transformers', round trips, digit splitting, special tokens, chat prompts."""
import json
import re
import struct

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoints as ck
import data
import models
from conftest import tiny_llama, write_checkpoint
from helpers import write_jsonl
from models import tokenizer as tok

BYTE_DEC = {c: b for b, c in ck.BYTE_ENC.items()}
DIGITS = "0123456789"

# text that stresses byte-level BPE: any unicode (no lone surrogates), with whitespace runs,
# newlines, digits, apostrophes and the strings of special tokens mixed in
SPECIAL_STRINGS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|", "<|"]
texts = st.lists(st.one_of(st.text(max_size=30),
                           st.sampled_from(SPECIAL_STRINGS + [" ", "  ", "\n", "\n\n", "\t", "'s", "'ll", "12345",
                                                              " 2024", "naïve", "日本語", "🙂👍🏽", "\r\n"])),
                 max_size=8).map("".join)


def gguf_fields(pre="gpt2", template=None):
    tokens, types, merges = ck.byte_vocab()
    f = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    if template:
        f["tokenizer.chat_template"] = template
    return f


@pytest.fixture(scope="module")
def gguf_file_tokenizer(tmp_path_factory):
    """The same vocabulary, written into a real GGUF file and read back through models.load."""
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    ck.write_gguf(path, tiny_llama(vocab_size=ck.VOCAB_SIZE, hidden_dim=64))
    return models.load(path)[1]


@pytest.fixture(scope="module", params=["gpt2", "smollm"])
def small_tokenizer(request):
    return tok.from_gguf(gguf_fields(request.param))


# ============================================================================ the small vocabulary

def test_small_vocab_ids_are_gguf_positions(gguf_file_tokenizer):
    tokens, types, _ = ck.byte_vocab()
    t = gguf_file_tokenizer
    assert t.enc.n_vocab == len(tokens)
    for i, (s, ty) in enumerate(zip(tokens, types)):
        if ty == 3:
            assert t.special(s) == i
        else:  # id == rank, and the printable form maps back through GPT-2's byte table
            assert t.enc.decode_single_token_bytes(i) == bytes(BYTE_DEC[c] for c in s), (i, s)
    assert t.stop == [tokens.index("<|endoftext|>")]


def test_small_vocab_applies_merges(small_tokenizer):
    tokens = ck.byte_vocab()[0]
    t = small_tokenizer
    assert t.encode(" the") == [tokens.index("Ġthe")]
    assert t.encode(" whe") == [tokens.index("Ġwhe")]
    assert t.encode("he") == [tokens.index("he")]
    assert t.encode("in on") == [tokens.index("in"), tokens.index("Ġ"), tokens.index("on")]  # no "Ġo" merge
    assert t.encode("\u00e9") == [tokens.index(ck.BYTE_ENC[0xC3]), tokens.index(ck.BYTE_ENC[0xA9])]


def test_small_vocab_pre_tokenizer(small_tokenizer):
    """gpt2 keeps digit runs together (the '12' merge applies); smollm splits every digit."""
    tokens = ck.byte_vocab()[0]
    ids = small_tokenizer.encode("123")
    if small_tokenizer.enc.name.endswith("smollm"):
        assert ids == [tokens.index(d) for d in "123"]
    else:
        assert ids == [tokens.index("12"), tokens.index("3")]


@settings(max_examples=60, deadline=None)
@given(s=texts)
def test_small_vocab_round_trip(small_tokenizer, s):
    ids = small_tokenizer.encode(s)
    assert small_tokenizer.decode(ids) == s
    assert not set(ids) & {small_tokenizer.special(x) for x in ck.SPECIALS}


@settings(max_examples=40, deadline=None)
@given(s=texts)
def test_gguf_file_tokenizer_round_trip(gguf_file_tokenizer, s):
    ids = gguf_file_tokenizer.encode(s)
    assert gguf_file_tokenizer.decode(ids) == s
    assert all(0 <= i < ck.VOCAB_SIZE - len(ck.SPECIALS) for i in ids)


def test_gguf_unknown_tokenizer_kinds_are_refused():
    with pytest.raises(ValueError, match="'t5' is neither byte-level BPE"):
        tok.from_gguf({**gguf_fields(), "tokenizer.ggml.model": "t5"})
    with pytest.raises(ValueError, match="no-such-pre"):
        tok.from_gguf(gguf_fields("no-such-pre"))


# SmolLM2's template, with another default system message
CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
                   "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("jinja", [True, False], ids=["template", "built-in"])
def test_chatml_vocab_builds_chat_prompt(jinja, monkeypatch):
    """The GGUF's template rendered, or without jinja2 the built-in ChatML: the same ids."""
    if not jinja:
        monkeypatch.setattr(tok, "jinja_installed", lambda: False)
        monkeypatch.setattr(tok, "compile_template", None)  # never called
    tokens, types, merges = ck.byte_vocab()
    f = gguf_fields(template=CHATML_TEMPLATE)
    f["tokenizer.ggml.tokens"] = tokens + ["<|im_start|>", "<|im_end|>"]
    f["tokenizer.ggml.token_type"] = types + [3, 3]
    t = tok.from_gguf(f)
    start, end = t.special("<|im_start|>"), t.special("<|im_end|>")
    assert (t.chat, t.system, t.stop) == ("chatml", "Be brief.", [end])
    ids = t.prompt("Hi <|im_end|> there")
    assert t.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|> there"
                             "<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(start) == 3 and ids.count(end) == 2  # the user's "<|im_end|>" stays plain text


# ============================================================================ Hugging Face files

def write_hf_tokenizer(path, kind):
    tokens = [t for t in ck.byte_vocab()[0] if t != "<|pad|>"]
    if kind == "vocab.json":
        (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(ck.MERGES) + "\n", encoding="utf-8")
    else:  # tokenizer.json as SmolLM ships it: Digits(individual) then ByteLevel
        eot = tokens.index("<|endoftext|>")
        tj = {"version": "1.0",
              "added_tokens": [{"id": eot, "content": "<|endoftext|>", "special": True}],
              "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                  {"type": "Digits", "individual_digits": True},
                  {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
              "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens) if i != eot},
                        "merges": ck.MERGES}}
        (path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return tokens


@pytest.mark.parametrize("kind", ["vocab.json", "tokenizer.json"])
def test_hf_dir_tokenizer_loads_with_the_model(tmp_path, kind):
    raw = ck.gpt2_hf_tensors(0, vocab_size=ck.VOCAB_SIZE - 1)
    ck.write_safetensors_dir(tmp_path, ck.gpt2_hf_config(ck.VOCAB_SIZE - 1, 32, 2, 4, 64), raw)
    tokens = write_hf_tokenizer(tmp_path, kind)
    _, t = models.load(tmp_path)  # no warning: tokenizer files are there
    assert t is not None and t.stop == [tokens.index("<|endoftext|>")]
    assert t.encode(" the") == [tokens.index("Ġthe")]
    digits = t.encode("123")
    assert digits == ([tokens.index(d) for d in "123"] if kind == "tokenizer.json"
                      else [tokens.index("12"), tokens.index("3")])
    s = "Où est le café? 12 + 345 = 357\n\n<|endoftext|> 🙂"
    assert t.decode(t.encode(s)) == s


@pytest.mark.parametrize("where", ["tokenizer.model", "original/tokenizer.model"])
def test_llama3_tokenizer_model_loads_with_the_model(tmp_path, where):
    """A Llama-3 checkpoint that ships only tokenizer.model (base64 token, rank per line) and a
    tokenizer_config.json: the ranks, then Llama 3's 256 special tokens, its chat format and stops."""
    import base64

    tokens = [t for t in ck.byte_vocab()[0] if t not in ck.SPECIALS]
    ranks = [bytes(BYTE_DEC[c] for c in t) for t in tokens]
    model = tiny_llama(vocab_size=len(ranks) + 256)
    ck.write_safetensors_dir(tmp_path, ck.llama_hf_config(model.cfg), ck.llama_hf_tensors(model))
    (tmp_path / where).parent.mkdir(exist_ok=True)
    (tmp_path / where).write_text("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(ranks)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))
    _, t = models.load(tmp_path)
    assert t.encode(" the") == [ranks.index(b" the")]
    s = "Où est le café? 12 + 345 = 357\n\n<|eot_id|> 🙂"
    assert t.decode(t.encode(s)) == s
    eot, end = t.special("<|eot_id|>"), t.special("<|end_of_text|>")
    assert (t.chat, t.stop, eot, t.names["eos_token"]) == ("llama3", [eot, end], len(ranks) + 9, "<|eot_id|>")
    assert t.decode(t.prompt("hi")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    for junk, what in ((b"\n\x05\x00\xff\x12 protobuf\n", "is not a SentencePiece model"),
                       (b"not base64\n", "is neither a tiktoken BPE file nor a SentencePiece model")):
        (tmp_path / where).write_bytes(junk)
        with pytest.raises(models.LoadError, match=what) as e:
            models.load(tmp_path)
        assert "\n" not in str(e.value)


# ============================================================================ the default model's

@pytest.fixture(scope="module")
def smol():
    return ck.default_model()[1]


@pytest.fixture(scope="module")
def smol_vocab():
    """The default GGUF's tokens, token types and merges, read with gguf itself."""
    reader = gguf.GGUFReader(str(models.resolve()))
    return tuple(reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "token_type", "merges"))


def missing_bytes(tokens):
    """Bytes with no single-byte token (SmolLM2 lacks 21, e.g. 0x04 and the 0xF1/0xF2 lead bytes)."""
    have = set(tokens)
    return {b for b, c in ck.BYTE_ENC.items() if c not in have}


def representable(s, missing):
    return "".join(c for c in s if not set(c.encode()) & missing)


def test_default_ids_match_the_gguf_vocabulary(smol, smol_vocab):
    """id == position in the GGUF token list, for every token; specials are the control tokens."""
    tokens, types, _ = smol_vocab
    assert smol.enc.n_vocab == len(tokens) == 49152
    specials = {s for s, ty in zip(tokens, types) if ty == 3}
    assert specials == set(smol.enc.special_tokens_set)
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= specials
    for i, (s, ty) in enumerate(zip(tokens, types)):
        if ty == 3:
            assert smol.special(s) == i
        else:
            assert smol.enc.decode_single_token_bytes(i) == bytes(BYTE_DEC[c] for c in s), (i, s)


def test_default_merge_order_is_id_order(smol_vocab):
    """tiktoken merges by rank = id; that equals HF's merge priority only if ids follow merges."""
    tokens, _, merges = smol_vocab
    index = {t: i for i, t in enumerate(tokens)}
    merged = [index[a + b] for a, b in (m.split(" ") for m in merges)]
    assert all(x < y for x, y in zip(merged, merged[1:]))


@settings(max_examples=80, deadline=None)
@given(s=texts)
def test_default_round_trip(smol, smol_vocab, s):
    s = representable(s, missing_bytes(smol_vocab[0]))  # text the vocabulary can spell
    ids = smol.encode(s)
    assert smol.decode(ids) == s
    assert not set(ids) & {smol.special(x) for x in smol.enc.special_tokens_set}


@pytest.mark.parametrize("s", ["a\x04b", "x\U00086e10y", "ok \x1d"])
def test_default_unspellable_bytes_do_not_panic(smol, smol_vocab, s):
    """Text with a byte the vocabulary has no token for (SmolLM2 has none for 0x04, 0x1D, 0xF2...)
    must not crash with tiktoken's Rust panic (a BaseException, which `except Exception` misses):
    either a clear Exception, or the unspellable characters are dropped (as HF tokenizers does)."""
    missing = missing_bytes(smol_vocab[0])
    assert set(s.encode()) & missing  # the case is real
    try:
        ids = smol.encode(s)
    except Exception:
        return
    assert smol.decode(ids) == representable(s, missing)


def test_default_known_tokenisation(smol):
    assert smol.special("<|endoftext|>") == 0
    assert (smol.special("<|im_start|>"), smol.special("<|im_end|>")) == (1, 2)
    assert [smol.decode([i]) for i in smol.encode("Hello world, it's 2024!")] == \
        ["Hello", " world", ",", " it", "'s", " ", "2", "0", "2", "4", "!"]


@settings(max_examples=60, deadline=None)
@given(s=st.text(alphabet=DIGITS + "ab .,-\n", max_size=40))
def test_default_splits_every_digit(smol, s):
    pieces = [smol.enc.decode_single_token_bytes(i) for i in smol.encode(s)]
    for p in pieces:
        if any(chr(c) in DIGITS for c in p):
            assert len(p) == 1, pieces
    assert b"".join(pieces).decode() == s
    assert sum(len(p) == 1 and chr(p[0]) in DIGITS for p in pieces) == sum(c in DIGITS for c in s)


def test_default_special_strings_stay_text(smol):
    s = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = smol.encode(s)
    assert not set(ids) & {0, 1, 2} and len(ids) > 3
    assert smol.decode(ids) == s


def test_default_chat_prompt(smol):
    ids = smol.prompt("What is the capital of France?")
    assert smol.chat == "chatml" and smol.stop == [2]
    assert smol.system and "SmolLM" in smol.system  # the template's default system message
    text = smol.decode(ids)
    assert text == (f"<|im_start|>system\n{smol.system}<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                    "France?<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[-1] != 2


# ============================================================================ tokenizer.json files built with `tokenizers`

CORPUS = ["the quick brown fox jumps over the lazy dog 12345 2024", "hello world, where is the café? naïve",
          "日本語のテキスト 🙂👍🏽 it's we'll they've\n\n\tTabs  and   spaces", "The answer is 42.\r\nYes!"] * 10
HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_pre(kind):
    from tokenizers import Regex, pre_tokenizers

    if kind == "bytelevel":  # GPT-2's
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "digits":  # SmolLM's
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return pre_tokenizers.Sequence([  # Llama 3's / Qwen2's: a Split regex, then bytes
        pre_tokenizers.Split(Regex(tok.LLAMA3_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def save_trained(path, kind, normalizer=None):
    """A byte-level BPE trained here with the `tokenizers` library, saved by transformers."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = HFTokenizer(tmodels.BPE())
    t.pre_tokenizer = byte_level_pre(kind)
    t.decoder = decoders.ByteLevel()
    t.normalizer = normalizer
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=HF_SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["bytelevel", "digits", "split-regex", "nfc"])
def trained(request, tmp_path_factory):
    """(our tokenizer, transformers' AutoTokenizer) of one trained tokenizer.json."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    kind = "split-regex" if request.param == "nfc" else request.param
    path = save_trained(tmp_path_factory.mktemp(request.param), kind,
                        normalizers.NFC() if request.param == "nfc" else None)
    # split_special_tokens: special-token strings in ordinary text are text, as our encode() has them
    return tok.from_hf_dir(path), AutoTokenizer.from_pretrained(path, split_special_tokens=True)


@settings(max_examples=80, deadline=None)
@given(s=texts | st.text(alphabet="e\u0301\u00e9 1a", max_size=12))  # and text that NFC changes
def test_trained_tokenizer_json_ids_equal_transformers(trained, s):
    ours, theirs = trained
    ids = ours.encode(s)
    assert ids == theirs.encode(s, add_special_tokens=False)
    assert ours.decode(ids) == (theirs.decode(ids) if ours.normalize else s)


def test_trained_tokenizer_json_specials_and_merges(trained):
    ours, theirs = trained
    assert [ours.special(t) for t in HF_SPECIALS] == theirs.convert_tokens_to_ids(HF_SPECIALS)
    assert ours.stop == theirs.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])  # end of turn, then eos
    assert ours.chat == "chatml"
    assert len(ours.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # the merges are applied


SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_STYLES = ("llama2", "llama-class", "metaspace")


def save_sentencepiece(path, style, vocab_size=260):
    """A SentencePiece-style tokenizer.json trained here with `tokenizers`, laid out as Llama 2's
    (<unk> <s> </s>, then the 256 byte tokens, then the pieces), saved by transformers:
    llama2: Prepend("▁") + Replace(" ", "▁") normalizer, byte fallback, a Replace + ByteFallback +
      Fuse + Strip decoder, <s> put first by the post-processor; its merges were learnt over whole
      lines, so some cross a '▁' (words are cut only where none can);
    llama-class: the same files with tokenizer_class LlamaTokenizerFast (legacy false), which
      transformers 5 loads with its own pipeline: a Metaspace pre-tokenizer ("first", no split);
    metaspace: a Metaspace pre-tokenizer that splits, <unk> (fused) for what the vocabulary lacks,
      ignore_merges, a Metaspace decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models as tmodels, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    prepend = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t = HFTokenizer(tmodels.BPE(unk_token="<unk>"))
    if style == "llama2":
        t.normalizer = prepend
    else:
        t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SP_SPECIALS))
    trained = json.loads(t.to_str())["model"]
    fallback = style != "metaspace"
    pieces = SP_SPECIALS + [f"<0x{b:02X}>" for b in range(256) if fallback] + [
        p for p in sorted(trained["vocab"], key=trained["vocab"].get) if p not in SP_SPECIALS]
    t = HFTokenizer(tmodels.BPE({p: i for i, p in enumerate(pieces)}, [tuple(m) for m in trained["merges"]],
                                unk_token="<unk>", fuse_unk=True, byte_fallback=fallback,
                                ignore_merges=not fallback))
    if fallback:
        t.normalizer = prepend
        t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
        t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                         special_tokens=[("<s>", 1)])
    else:
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        t.decoder = decoders.Metaspace()
    t.add_special_tokens(SP_SPECIALS)
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=t, **names).save_pretrained(path)
    if style == "llama-class":
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast",
                                                                "legacy": False}))
    return path


@pytest.fixture(scope="module", params=SP_STYLES)
def sentencepiece(request, tmp_path_factory):
    """(our tokenizer, transformers' AutoTokenizer) of one SentencePiece-style tokenizer."""
    from transformers import AutoTokenizer

    path = save_sentencepiece(tmp_path_factory.mktemp(request.param), request.param)
    return tok.from_hf_dir(path), AutoTokenizer.from_pretrained(path, split_special_tokens=True)


# what stresses SentencePiece-style BPE: leading spaces, whitespace runs, newlines, '▁' itself,
# accented Latin, CJK, emoji and other characters outside the vocabulary, the specials' strings
sp_texts = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(
    ["<s>", "</s>", "<unk>", "<0x41>", "▁", " ", "  ", "   ", "\n", "\n\n", "\t", " the", "the quick",
     "café naïve", "e\u0301", "日本語のテキスト", "🙂👍🏽", "ƒøø", "\r\n", "12345", "we'll"])), max_size=8).map("".join)


def assert_same_ids(ours, theirs, s):
    """Our ids for s equal transformers' without and with the BOS it adds, and decode alike."""
    ids = ours.encode(s)
    assert ids == theirs.encode(s, add_special_tokens=False)
    assert ours.bos + ids == theirs.encode(s)
    assert ours.decode(ids) == theirs.decode(ids)


@settings(max_examples=120, deadline=None)
@given(s=sp_texts)
def test_sentencepiece_ids_equal_transformers(sentencepiece, s):
    assert_same_ids(*sentencepiece, s)


@pytest.mark.parametrize("sentencepiece", ["llama2", "llama-class"], indirect=True)
@settings(max_examples=60, deadline=None)
@given(s=sp_texts.map(lambda s: s.replace("▁", "")))
def test_sentencepiece_with_byte_fallback_round_trips(sentencepiece, s):
    """Every character has tokens (its bytes at worst) and a space is a '▁', so the text comes
    back, less the leading space a Metaspace "first" folds into its own."""
    ours, theirs = sentencepiece
    expect = s[1:] if ours.enc.metaspace and s.startswith(" ") else s
    assert ours.decode(ours.encode(s)) == expect


def test_sentencepiece_specials_bos_and_merges(sentencepiece):
    ours, theirs = sentencepiece
    assert [ours.special(t) for t in SP_SPECIALS] == theirs.convert_tokens_to_ids(SP_SPECIALS) == [0, 1, 2]
    assert ours.bos == ([1] if ours.enc.byte_fallback else [])
    assert ours.stop == [2] and ours.chat is None
    assert ours.prompt("hi there") == ours.bos + ours.encode("hi there")
    assert len(ours.encode(CORPUS[0])) < len(CORPUS[0]) / 2  # the merges are applied
    if ours.enc.normalizer:  # merges learnt over whole lines cross a '▁': words are cut where none can
        assert ours.enc.cut is not None and any(len(w) > 1 and "▁" in w[1:] for w in ours.enc.tokens.values())


@settings(max_examples=40, deadline=None)
@given(s=sp_texts, question=st.text(max_size=20), context=st.text(max_size=10))
def test_every_prompt_kind_starts_with_the_bos_transformers_adds(sentencepiece, s, question, context):
    """Alpaca prompts, chat prompts of a tokenizer with no chat format and plain text cut into
    windows hold the BOS the tokenizer puts before a text (Llama 2's <s>), as transformers'
    tokenizer encodes them with add_special_tokens."""
    ours, theirs = sentencepiece
    ex = data.Example(question=question, response="", answer="", input=context)
    alpaca = (data.ALPACA_INPUT if context else data.ALPACA).format(question=question, input=context)
    assert data.prompt(ours, ex, "alpaca") == theirs.encode(alpaca)
    assert data.prompt(ours, ex) == theirs.encode(question + (f"\n\n{context}" if context else ""))
    ids = theirs.encode(s)
    if len(ids) > 1:
        windows = data.chunks(ours, [s], 4)
        assert [windows[0][0][0]] + [t for _, targets in windows for t in targets] == ids
        assert data.encode_all(ours, [s], 4) == windows


@settings(max_examples=60, deadline=None)
@given(s=sp_texts)
def test_sentencepiece_merges_short_and_long_words_alike(sentencepiece, s):
    """A word's merges as a list of ranks (short words) and as `tokenizers`' heap (long ones):
    the same tokens, and a run merged whole or cut into words and pieces: the same ids."""
    sp = sentencepiece[0].enc
    text = sp.normalize(s, True)[0]
    if not text:
        return
    ids = [sp.vocab.get(c, sp.unk if sp.unk is not None else 3) for c in text]  # <unk> or <0x00> stand in
    assert sp.merge_short(list(ids)) == sp.merge_heap(list(ids))
    merged_alone = sp.words(text) if sp.split else [text]  # the words `tokenizers` merges one by one
    assert [t for w in sp.words(text) for t in sp.word(w)] == [t for w in merged_alone for t in sp.bpe(w)]


@pytest.mark.parametrize("part,spec,what", [
    ("normalizer", {"type": "NFKC"}, "its NFKC normalizer is not one a SentencePiece-style tokenizer uses"),
    ("pre_tokenizer", {"type": "Whitespace"}, "its pre-tokenizer .* is not a Metaspace"),
    ("decoder", {"type": "WordPiece"}, "its decoder WordPiece is not one a SentencePiece-style tokenizer uses")])
def test_sentencepiece_parts_it_cannot_run_are_refused_in_one_sentence(tmp_path, part, spec, what):
    path = save_sentencepiece(tmp_path, "llama2")
    tj = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps({**tj, part: spec}))
    with pytest.raises(ValueError, match=f"tokenizer.json is SentencePiece-style BPE, but {what}") as e:
        tok.from_hf_dir(path)
    assert "\n" not in str(e.value)


def protobuf(*fields):
    """A protobuf message of (field number, value) fields: an int is a varint, a float a fixed32,
    bytes or str length-delimited."""
    def varint(n):
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    out = b""
    for number, value in fields:
        if isinstance(value, int):
            out += varint(number << 3) + varint(value)
        elif isinstance(value, float):
            out += varint(number << 3 | 5) + struct.pack("<f", value)
        else:
            value = value.encode() if isinstance(value, str) else value
            out += varint(number << 3 | 2) + varint(len(value)) + value
    return out


def write_sentencepiece_model(path, pieces, model_type=2):
    """tokenizer.model: a SentencePiece ModelProto of (piece, type) pieces, scored by position, with
    byte fallback, an identity normalizer and Llama 2's 'Ġ'-free settings (sentencepiece_model.proto)."""
    body = b"".join(protobuf((1, protobuf((1, p), (2, -float(i)), (3, t)))) for i, (p, t) in enumerate(pieces))
    trainer = protobuf((3, model_type), (35, 1), (40, 0), (41, 1), (42, 2))  # type, byte_fallback, unk/bos/eos ids
    (path / "tokenizer.model").write_bytes(body + protobuf((2, trainer), (3, protobuf((1, "identity"), (3, 1)))))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """(ours from a tokenizer.model and tokenizer_config.json, transformers' AutoTokenizer of the
    tokenizer.json transformers makes of that model: its vocabulary, generate_merges' merges)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models as tmodels, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    trained = save_sentencepiece(tmp_path_factory.mktemp("trained"), "llama-class")
    vocab = json.loads((trained / "tokenizer.json").read_text())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)  # <unk>, <s> </s>, the bytes, the pieces
    ours, theirs = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("json")
    write_sentencepiece_model(ours, list(zip(pieces, types)))
    t = HFTokenizer(tmodels.BPE(vocab, generate_merges(vocab), byte_fallback=True, fuse_unk=True))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # add_bos_token's
    t.add_special_tokens(SP_SPECIALS)
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    PreTrainedTokenizerFast(tokenizer_object=t, **names).save_pretrained(theirs)
    config = {**json.loads((theirs / "tokenizer_config.json").read_text()), "tokenizer_class": "LlamaTokenizerFast",
              "legacy": False, "add_bos_token": True}
    for path in (ours, theirs):
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.from_hf_dir(ours), AutoTokenizer.from_pretrained(theirs, split_special_tokens=True)


@settings(max_examples=80, deadline=None)
@given(s=sp_texts)
def test_sentencepiece_model_file_ids_equal_transformers(sentencepiece_model, s):
    assert_same_ids(*sentencepiece_model, s)


def test_sentencepiece_model_file_of_another_kind_is_refused(tmp_path):
    write_sentencepiece_model(tmp_path, [("<unk>", 2), ("▁a", 1)], model_type=1)
    with pytest.raises(ValueError, match="is a SentencePiece Unigram model: only SentencePiece BPE"):
        tok.from_hf_dir(tmp_path)


def sentencepiece_gguf_vocab(tj):
    """(tokens, token types, scores) of a SentencePiece-style tokenizer.json's vocabulary, as
    llama.cpp writes a Llama 2 vocabulary into a GGUF: tokens in id order, the earlier the better
    scored, 2 unknown, 3 control, 6 byte, 1 the rest."""
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if tok.BYTE_TOKEN.fullmatch(t) else 1
             for t in tokens]
    return tokens, types, [-float(i) for i in range(len(tokens))]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """(ours of a GGUF SentencePiece vocabulary, ours of its tokenizer.json, transformers' of the
    GGUF, transformers' of the tokenizer.json): a tokenizer trained here, its tokenizer.json given
    the merges the GGUF's scores imply (transformers' generate_merges), so both state one tokenizer."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_base import generate_merges

    path = save_sentencepiece(tmp_path_factory.mktemp("sp-gguf") / "json", "llama-class")
    tj = json.loads((path / "tokenizer.json").read_text())
    tokens, types, scores = sentencepiece_gguf_vocab(tj)
    tj["model"]["merges"] = [list(m) for m in generate_merges(tj["model"]["vocab"], dict(zip(tokens, scores)))]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    gguf_file = path.parent / "model.gguf"
    ck.write_gguf(gguf_file, tiny_llama(vocab_size=len(tokens)), vocab=(tokens, types, None), scores=scores)
    return (models.load(gguf_file)[1], tok.from_hf_dir(path),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=gguf_file.name, split_special_tokens=True),
            AutoTokenizer.from_pretrained(path, split_special_tokens=True))


@settings(max_examples=80, deadline=None)
@given(s=sp_texts)
def test_gguf_sentencepiece_ids_equal_its_tokenizer_json_and_transformers(sentencepiece_gguf, s):
    """A GGUF SentencePiece vocabulary (tokenizer model "llama": tokens, scores, token types, no
    merges) reads as the same tokenizer as its tokenizer.json: merges by score, byte fallback, BOS."""
    from_gguf, from_json, theirs_gguf, theirs_json = sentencepiece_gguf
    ids = from_gguf.encode(s)
    assert ids == from_json.encode(s) == theirs_json.encode(s, add_special_tokens=False)
    assert from_gguf.bos + ids == theirs_gguf.encode(s) == theirs_json.encode(s)
    assert from_gguf.decode(ids) == theirs_gguf.decode(ids)


def test_gguf_sentencepiece_specials_and_stops(sentencepiece_gguf):
    from_gguf, from_json, theirs_gguf, _ = sentencepiece_gguf
    assert from_gguf.bos == [1] and from_gguf.stop == [2] and from_gguf.chat is None
    assert [from_gguf.special(t) for t in SP_SPECIALS] == [0, 1, 2]
    assert from_gguf.encode("<s> hi") == from_json.encode("<s> hi")  # special strings in text stay text


def sentencepiece_refused(path, style):
    """tokenizer.json files of the kinds still refused, built with `tokenizers`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models as tmodels, pre_tokenizers, trainers

    if style == "wordpiece":
        t = HFTokenizer(tmodels.WordPiece(unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"])
    else:
        t = HFTokenizer(tmodels.Unigram())
        t.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=100, special_tokens=["<unk>"], unk_token="<unk>")
    t.train_from_iterator(CORPUS, trainer)
    t.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("style,what", [("wordpiece", "a WordPiece tokenizer"), ("unigram", "a Unigram tokenizer")])
def test_tokenizers_of_other_kinds_are_refused_when_the_model_loads(tmp_path, style, what):
    ck.write_safetensors_dir(tmp_path, ck.llama_hf_config(tiny_llama(vocab_size=97).cfg),
                             ck.llama_hf_tensors(tiny_llama(vocab_size=97)))
    sentencepiece_refused(tmp_path, style)
    refusal = (f"is {what}: only BPE tokenizers can be read.*Unigram's most likely segmentation .* and "
               "WordPiece's longest-match are not implemented")
    with pytest.raises(models.LoadError, match=refusal) as e:
        models.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)


# ============================================================================ chat templates

TEMPLATES = {  # shaped like SmolLM2's, Zephyr's and Mistral's; the last marks assistant text for training
    "chatml": CHATML_TEMPLATE,
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + "
               "eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                "(loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "generation": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
                   "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
                   "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """name -> (our tokenizer, transformers') of a trained tokenizer with that chat template,
    saved by transformers (which writes it to chat_template.jinja)."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        path = save_trained(tmp_path_factory.mktemp(name), "bytelevel")
        theirs = AutoTokenizer.from_pretrained(path)
        theirs.chat_template = template
        theirs.bos_token = "<|im_start|>"
        theirs.save_pretrained(path)
        out[name] = tok.from_hf_dir(path), AutoTokenizer.from_pretrained(path)
    return out


words = st.text(alphabet="ab 1\n", max_size=10)


def alternating(n_min=1):
    """user/assistant/... conversations (what every template above accepts), ending with a user turn."""
    return st.lists(st.tuples(words, words), min_size=n_min, max_size=3).flatmap(lambda pairs: words.map(
        lambda last: [m for u, a in pairs for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        + [{"role": "user", "content": last}]))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(TEMPLATES)), msgs=alternating(), gen=st.booleans())
def test_the_checkpoints_template_renders_as_transformers_does(templated, name, msgs, gen):
    ours, theirs = templated[name]
    if name == "mistral" and gen:
        gen = False  # its template has no generation prompt: the prompt ends with [/INST]
    text = theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    assert ours.render(msgs, add_generation_prompt=gen) == text
    assert ours.encode_chat(ours.render(msgs, gen)) == theirs(text, add_special_tokens=False)["input_ids"]
    if gen:
        assert ours.prompt(msgs[0]["content"]) == theirs.apply_chat_template(
            msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_template_names_and_stop_tokens(templated):
    ours, theirs = templated["mistral"]
    assert ours.names == {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}
    assert ours.stop[-1] == theirs.eos_token_id
    with pytest.raises(ValueError, match="refused the messages: roles must alternate"):
        ours.render([{"role": "assistant", "content": "hi"}])


FAILING_TEMPLATES = {  # each compiles, then fails as it renders: jinja2's UndefinedError and SecurityError, a TypeError
    "undefined": "{{ messages[0]['content'] + tools.name }}",
    "sandbox": "{{ messages.append(messages[0]) }}",
    "type": "{{ messages[0]['content'] + 1 }}",
}


@pytest.mark.parametrize("bad", sorted(FAILING_TEMPLATES))
def test_a_template_that_fails_as_it_renders_is_one_sentence_naming_its_file(tmp_path, bad):
    path = save_trained(tmp_path, "bytelevel")
    (path / "chat_template.jinja").write_text(FAILING_TEMPLATES[bad])
    ours = tok.from_hf_dir(path)
    for render in (lambda: ours.prompt("hi"), lambda: ours.render([{"role": "user", "content": "hi"}])):
        with pytest.raises(ValueError, match=f"chat template in {path / 'chat_template.jinja'} failed") as e:
            render()
        assert "\n" not in str(e.value)


def test_without_jinja2_a_template_falls_back_to_chatml_or_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 now fails
    monkeypatch.setattr(tok, "jinja_installed", lambda: False)
    tok.compile_template.cache_clear()
    tokens, types, merges = ck.byte_vocab()
    chatml = gguf_fields(template=TEMPLATES["zephyr"])
    chatml["tokenizer.ggml.tokens"] = tokens + ["<|im_start|>", "<|im_end|>"]
    chatml["tokenizer.ggml.token_type"] = types + [3, 3]
    assert tok.from_gguf(chatml).decode(tok.from_gguf(chatml).prompt("hi")) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # the built-in ChatML
    with pytest.raises(ValueError, match="needs jinja2: pip install jinja2"):
        tok.from_gguf(gguf_fields(template=TEMPLATES["zephyr"])).prompt("hi")  # no built-in format
    tok.compile_template.cache_clear()


# chat templates with {% generation %} blocks, for SentencePiece-style tokenizers: Mistral's format
# (<s> from bos_token; [INST] is text), and Phi-3's (its chat tokens are special and take the
# whitespace after them: rstrip)
SP_TEMPLATES = {
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                "' [/INST]' }}{% else %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}"
                "{% endfor %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
             "{{ m['content'] + '<|end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|end|>' }}{% endif %}"
             "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
}
PHI3_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def save_chat_tokenizer(path, kind):
    """A tokenizer trained by this file's helpers with a template marking assistant text,
    saved by transformers: byte-level with ChatML, or SentencePiece-style with SP_TEMPLATES'."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    if kind == "bytelevel":
        path, template = save_trained(path, "bytelevel"), TEMPLATES["generation"]
    else:
        style, name = kind.split("+")
        path, template = save_sentencepiece(path, style), SP_TEMPLATES[name]
    theirs = AutoTokenizer.from_pretrained(path)
    if kind.endswith("phi3"):
        theirs.add_tokens([AddedToken(t, rstrip=True, special=True, normalized=False) for t in PHI3_TOKENS],
                          special_tokens=True)
    theirs.chat_template = template
    theirs.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["bytelevel", "llama2+mistral", "llama-class+mistral", "llama2+phi3"])
def test_assistant_targets_equal_transformers_assistant_mask(tmp_path, kind):
    """On a template with {% generation %} blocks, the tokens this library learns are exactly those
    transformers' return_assistant_tokens_mask marks, and the ids its own."""
    from transformers import AutoTokenizer

    path = save_chat_tokenizer(tmp_path, kind)
    theirs, ours = AutoTokenizer.from_pretrained(path), tok.from_hf_dir(path)

    @settings(max_examples=40, deadline=None)
    @given(msgs=alternating().map(lambda m: m[:-1]))  # ends with an assistant turn
    def check(msgs):
        out = theirs.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, targets = data.encode_chat(ours, data.Chat(tuple(msgs)), 10_000)
        assert ids == out["input_ids"][:-1]
        assert [0] + [int(t != -100) for t in targets] == out["assistant_masks"]
        prompt = theirs.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert ours.prompt(msgs[0]["content"]) == prompt["input_ids"]

    check()


def test_train_py_takes_chat_on_a_sentencepiece_checkpoint(tmp_path):
    """{"messages": ...} training runs on a Llama-2-style checkpoint (SentencePiece-style
    tokenizer.json, Mistral's template), and trains on exactly the tokens encode_chat gives."""
    import benchmarks
    import train

    path = save_chat_tokenizer(tmp_path / "model", "llama2+mistral")
    model = tiny_llama(vocab_size=models.tokenizer.from_hf_dir(path).enc.n_vocab, max_seq_len=128)
    ck.write_safetensors_dir(path, ck.llama_hf_config(model.cfg), ck.llama_hf_tensors(model))
    records = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": f"{i} + {i} = {2 * i}. Où?"}]} for i in range(6)]
    chats = write_jsonl(tmp_path / "d.jsonl", records)
    summary = train.main(["--method", "lora", "--model", str(path), "--data", str(chats), "--out",
                          str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "64",
                          "--val-size", "2", "--log-every", "1"])
    assert summary["steps"] == 2
    tokenizer = models.load(path)[1]
    encoded = benchmarks.train_set(tokenizer, str(chats), None, "chat", 64)
    assert encoded == [data.encode_chat(tokenizer, c, 64) for c in data.load_items(chats)]
    ids, targets = encoded[0]
    assert ids[0] == tokenizer.special("<s>") and targets[-1] == tokenizer.special("</s>")
    assert tokenizer.decode([t for t in targets if t != -100]) == "0 + 0 = 0. Où?</s>"


# ============================================================================ broken tokenizer files


def broken_json(tmp_path):
    """A tokenizer.json whose added token takes the id of the byte token 'b' (id 65)."""
    path = write_checkpoint(tmp_path / "ckpt", tiny_llama(vocab_size=259, max_seq_len=512))
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 65, "content": "<|x|>", "special": True})
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def broken_gguf(tmp_path, tokens, types):
    path = tmp_path / "model.gguf"
    ck.write_gguf(path, tiny_llama(vocab_size=len(tokens)), vocab=(tokens, types, ck.byte_vocab()[2]))
    return path


BROKEN = {  # name -> (a checkpoint with that tokenizer, what the refusal says)
    "one id, two tokens": (broken_json, "tokenizer.json cannot be read: it gives id 65 to two tokens, 'b' and '<|x|>'"),
    "short token types": (lambda p: broken_gguf(p, ck.byte_vocab()[0], ck.byte_vocab()[1][:-2]),
                          f"its token_type list has {ck.VOCAB_SIZE - 2} entries for {ck.VOCAB_SIZE} tokens"),
    "control byte token": (lambda p: broken_gguf(p, ck.byte_vocab()[0], [3] + ck.byte_vocab()[1][1:]),
                           r"its special token '!' \(id 0\) is the token of a byte, which text needs"),
    "eos on a byte token": (lambda p: broken_gguf(p, *(v[:-len(ck.SPECIALS)] for v in ck.byte_vocab()[:2])),
                            r"its special token '!' \(id 0\) is the token of a byte"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_tokenizer_is_one_sentence_and_status_2_from_train_and_eval(tmp_path, name, capsys):
    """Refused where the tokenizer is read, before tiktoken would panic (a BaseException that a
    script's error handling does not catch) or a byte would be lost from every text."""
    import cli
    import eval as evaluate
    import train

    make, message = BROKEN[name]
    model = make(tmp_path)
    for main in (lambda: train.main(["--method", "lora", "--model", str(model), "--out", str(tmp_path / "run"),
                                      "--steps", "1"]),
                 lambda: evaluate.main(["--model", str(model), "--limit", "1"])):
        with pytest.raises(SystemExit) as e:
            cli.run(main)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    assert not (tmp_path / "run" / "log.jsonl").exists()


# ============================================================================ where generation stops


def phi3_checkpoint(path):
    """A tiny Llama with a byte-level tokenizer (<|endoftext|> 256), Phi-3's chat tokens (257 to 259)
    and template (a turn ends with <|end|>), and its generation_config.json's eos ids, whose greedy
    answer to anything is <|end|>: every embedding points one way, <|end|>'s is the longest, and the
    blocks add nothing."""
    model = tiny_llama(vocab_size=260, max_seq_len=512)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.embed_tokens.weight[259] = 2.0
    write_checkpoint(path, model)
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["added_tokens"] = [{"id": 256, "content": "<|endoftext|>", "special": True}] + [
        {"id": 257 + i, "content": t, "special": True} for i, t in enumerate(PHI3_TOKENS)]
    (path / "tokenizer.json").write_text(json.dumps(tj))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": SP_TEMPLATES["phi3"]}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [256, 258, 259]}))
    return path


def test_generation_stops_at_every_end_of_turn_and_eos_id_the_checkpoint_declares(tmp_path, capsys):
    """Phi-3's turns end with <|end|>: its template says so (first: what a response is trained to
    end with), and so does its generation_config.json, beside <|endoftext|> and <|assistant|>."""
    import generate

    path = phi3_checkpoint(tmp_path / "phi3")
    assert tok.from_hf_dir(path).stop == [259, 256, 258]
    capsys.readouterr()
    generate.main(["--model", str(path), "--max-new-tokens", "5", "hi"])
    assert capsys.readouterr().out == "\n"  # <|end|> at once: the answer is empty
    (path / "generation_config.json").unlink()
    assert tok.from_hf_dir(path).stop == [259, 256]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 300}))
    with pytest.raises(ValueError, match="eos_token_id 300 is not one of the tokenizer's 260 ids"):
        tok.from_hf_dir(path)
