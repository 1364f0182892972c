"""Models: checkpoints in real formats load back exactly, KV-cache generation, the default model.

Every checkpoint here is written by the test (tests/checkpoints.py) from a tiny random model;
the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is loaded once per process.
"""
import functools
import json
import os

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoints as ck
import models
from conftest import tiny_gpt, tiny_llama
from helpers import Exploit

# unusual eps and theta, so a loader that ignores the config's values gives different logits
LLAMA_KW = dict(vocab_size=ck.VOCAB_SIZE, hidden_dim=64, norm_eps=1e-6, rope_theta=5000.0)
NO_TOKENIZER = "ships no tokenizer files"


def ids(vocab, seed=0, shape=(2, 11)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def spread(model, seed, std=0.3):
    """Larger random weights than the init, so greedy outputs vary from step to step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_norm else 0.0))
    return model


def load_quiet(path):
    """models.load of a checkpoint dir without tokenizer files: the warning is expected."""
    with pytest.warns(UserWarning, match=NO_TOKENIZER):
        return models.load(path)


# ============================================================================ HF safetensors: LLaMA

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shards", [1, 2], ids=["single", "sharded"])
def test_hf_llama_safetensors_loads_to_identical_logits(tmp_path, tie, shards):
    ref = spread(tiny_llama(seed=1, tie_embeddings=tie, **LLAMA_KW), seed=1)
    tensors = ck.llama_hf_tensors(ref, inv_freq=shards == 2)
    assert ("lm_head.weight" in tensors) == (not tie)
    ck.write_safetensors_dir(tmp_path, ck.llama_hf_config(ref.cfg), tensors, shards=shards)
    if shards == 2:
        assert not (tmp_path / "model.safetensors").exists()
        assert len(list(tmp_path.glob("model-0000?-of-00002.safetensors"))) == 2

    model, tokenizer = load_quiet(tmp_path)
    assert tokenizer is None
    assert isinstance(model, models.Llama)
    cfg = model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == \
           (ref.cfg.dim, ref.cfg.n_layers, ref.cfg.n_heads, ref.cfg.n_kv_heads, ref.cfg.hidden_dim, ref.cfg.vocab_size)
    assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 5000.0 and cfg.tie_embeddings is tie
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    x = ids(ref.cfg.vocab_size)
    assert torch.equal(model(x), ref(x))


# ============================================================================ HF: GPT-2

GPT2_SHAPE = dict(vocab_size=97, dim=32, n_layers=2, n_positions=64)
GPT2_HEADS = 4


def gpt2_dir(tmp_path, fmt, seed=3):
    raw = ck.gpt2_hf_tensors(seed, **GPT2_SHAPE)
    cfg = ck.gpt2_hf_config(GPT2_SHAPE["vocab_size"], GPT2_SHAPE["dim"], GPT2_SHAPE["n_layers"],
                            GPT2_HEADS, GPT2_SHAPE["n_positions"])
    if fmt == "safetensors":
        ck.write_safetensors_dir(tmp_path, cfg, raw)
    else:
        ck.write_bin_dir(tmp_path, cfg, raw)
    return raw


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_gpt2_matches_reference_forward(tmp_path, fmt):
    raw = gpt2_dir(tmp_path, fmt)
    assert "h.0.attn.bias" in raw and not any(k.startswith("transformer.") for k in raw)
    model, tokenizer = load_quiet(tmp_path)
    assert tokenizer is None and isinstance(model, models.GPT)

    # the Conv1D transpose and the c_attn split, weight by weight
    C = GPT2_SHAPE["dim"]
    for i, block in enumerate(model.transformer.h):
        w, b = raw[f"h.{i}.attn.c_attn.weight"], raw[f"h.{i}.attn.c_attn.bias"]
        for j, proj in enumerate((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)):
            assert torch.equal(proj.weight, w[:, j * C:(j + 1) * C].T)
            assert torch.equal(proj.bias, b[j * C:(j + 1) * C])
        assert torch.equal(block.attn.c_proj.weight, raw[f"h.{i}.attn.c_proj.weight"].T)
        assert torch.equal(block.mlp.c_fc.weight, raw[f"h.{i}.mlp.c_fc.weight"].T)
        assert torch.equal(block.mlp.c_proj.weight, raw[f"h.{i}.mlp.c_proj.weight"].T)
    assert model.lm_head.weight is model.transformer.wte.weight

    x = ids(GPT2_SHAPE["vocab_size"], shape=(2, 13))
    ref = ck.gpt2_reference_logits(raw, x, GPT2_HEADS)
    got = model(x).double()
    assert ref.abs().max() > 5.0  # the logits are not all near zero: the comparison means something
    # float32 model vs float64 reference: measured ~1e-6 relative; a wrong layout is off by O(1)
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    if fmt == "bin":  # the same tensors as safetensors give bit-identical logits
        ck.write_safetensors_dir(tmp_path / "st", json.loads((tmp_path / "config.json").read_text()), raw)
        assert torch.equal(load_quiet(tmp_path / "st")[0](x), model(x))


def test_hf_gpt2_transformer_prefix_and_lm_head_accepted(tmp_path):
    """Checkpoints saved from GPT2LMHeadModel carry `transformer.` and a tied `lm_head.weight`."""
    raw = ck.gpt2_hf_tensors(5, **GPT2_SHAPE)
    prefixed = {"transformer." + k: v for k, v in raw.items()}
    prefixed["lm_head.weight"] = raw["wte.weight"].clone()
    cfg = ck.gpt2_hf_config(GPT2_SHAPE["vocab_size"], GPT2_SHAPE["dim"], GPT2_SHAPE["n_layers"],
                            GPT2_HEADS, GPT2_SHAPE["n_positions"])
    ck.write_safetensors_dir(tmp_path, cfg, prefixed)
    model, _ = load_quiet(tmp_path)
    x = ids(GPT2_SHAPE["vocab_size"], seed=2, shape=(1, 9))
    ref = ck.gpt2_reference_logits(raw, x, GPT2_HEADS)
    assert (model(x).double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_hf_llama_pytorch_bin_loads(tmp_path):
    ref = spread(tiny_llama(seed=2, tie_embeddings=False, **LLAMA_KW), seed=2)
    ck.write_bin_dir(tmp_path, ck.llama_hf_config(ref.cfg), ck.llama_hf_tensors(ref))
    model, _ = load_quiet(tmp_path)
    x = ids(ref.cfg.vocab_size, seed=1)
    assert torch.equal(model(x), ref(x))


def test_pytorch_bin_is_never_unpickled(tmp_path):
    """A .bin holding an arbitrary object is refused (weights_only), and its code never runs."""
    ref = tiny_llama(seed=0, **LLAMA_KW)
    marker = tmp_path / "pwned"
    sd = ck.llama_hf_tensors(ref)
    sd["evil"] = Exploit(str(marker))
    ck.write_bin_dir(tmp_path, ck.llama_hf_config(ref.cfg), sd)
    with pytest.raises(models.LoadError) as e:
        models.load(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert not marker.exists()
    # control: a full unpickle of the same file does run the payload (so the file is a real exploit)
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_checkpoint_without_tokenizer_warns_and_returns_none(tmp_path):
    ref = tiny_llama(seed=0, **LLAMA_KW)
    ck.write_safetensors_dir(tmp_path, ck.llama_hf_config(ref.cfg), ck.llama_hf_tensors(ref))
    with pytest.warns(UserWarning, match=NO_TOKENIZER) as rec:
        model, tokenizer = models.load(tmp_path)
    assert tokenizer is None and model is not None
    assert any(str(tmp_path) in str(w.message) for w in rec)


# ============================================================================ GGUF

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_f32_loads_to_identical_logits(tmp_path, tie):
    ref = spread(tiny_llama(seed=4, tie_embeddings=tie, **LLAMA_KW), seed=4)
    path = tmp_path / "tiny.gguf"
    written = ck.write_gguf(path, ref)
    # the file really holds the permuted q/k (else the un-permute would go unchecked)
    assert not np.array_equal(written["blk.0.attn_q.weight"][0], ref.model.layers[0].self_attn.q_proj.weight.numpy())
    assert not np.array_equal(written["blk.0.attn_k.weight"][0], ref.model.layers[0].self_attn.k_proj.weight.numpy())
    assert ("output.weight" in written) == (not tie)

    model, tokenizer = models.load(path)
    assert isinstance(model, models.Llama)
    cfg = model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size, cfg.max_seq_len) == \
           (ref.cfg.dim, ref.cfg.n_layers, ref.cfg.n_heads, ref.cfg.n_kv_heads, ref.cfg.hidden_dim,
            ref.cfg.vocab_size, ref.cfg.max_seq_len)
    assert cfg.tie_embeddings is tie and cfg.rope_theta == 5000.0
    assert cfg.norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    ours = dict(model.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v), k
    x = ids(ref.cfg.vocab_size, seed=5)
    assert torch.equal(model(x), ref(x))
    # the vocabulary came along: byte-level BPE with the control tokens as specials
    assert tokenizer is not None and tokenizer.enc.n_vocab == ck.VOCAB_SIZE
    eot = tokenizer.special("<|endoftext|>")
    assert eot == ck.byte_vocab()[0].index("<|endoftext|>") and eot in tokenizer.stop
    assert tokenizer.decode(tokenizer.encode("the whale 12")) == "the whale 12"


def test_gguf_q8_0_loads_dequantised_weights(tmp_path):
    qtype = gguf.GGMLQuantizationType.Q8_0
    ref = spread(tiny_llama(seed=6, tie_embeddings=False, **LLAMA_KW), seed=6)
    path = tmp_path / "tiny-q8_0.gguf"
    written = ck.write_gguf(path, ref, qtype=qtype)
    assert written["blk.0.attn_q.weight"][1] == qtype and written["blk.0.attn_norm.weight"][1] != qtype
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert stored["blk.1.ffn_down.weight"] == stored["output.weight"] == qtype

    # the reference: what was written, dequantised by gguf itself, un-permuted here
    cfg = ref.cfg
    deq = {}
    for name, (data, t) in written.items():
        a = gguf.quants.dequantize(data, t).astype(np.float32)
        if ".attn_q." in name:
            a = ck.inverse_permute(a, cfg.n_heads)
        elif ".attn_k." in name:
            a = ck.inverse_permute(a, cfg.n_kv_heads)
        deq[name] = torch.from_numpy(np.ascontiguousarray(a))
    expect = {"model.embed_tokens.weight": deq["token_embd.weight"], "model.norm.weight": deq["output_norm.weight"],
              "lm_head.weight": deq["output.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in ck.GGUF_BLOCK.items():
            expect[f"model.layers.{i}.{ours}.weight"] = deq[f"blk.{i}.{theirs}.weight"]
    # quantisation changed the weights, but only a little (the reference is the right tensor)
    assert not torch.equal(expect["model.layers.0.self_attn.q_proj.weight"], ref.model.layers[0].self_attn.q_proj.weight)
    assert torch.allclose(expect["model.layers.0.self_attn.q_proj.weight"], ref.model.layers[0].self_attn.q_proj.weight,
                          atol=0.02)

    model, _ = models.load(path)
    ours = model.state_dict()
    for k, v in expect.items():
        assert torch.equal(ours[k], v), k
    built = models.Llama(models.LlamaConfig(**{**cfg.__dict__, "norm_eps": model.cfg.norm_eps})).eval()
    built.load_state_dict(expect, strict=True)
    x = ids(cfg.vocab_size, seed=7)
    assert (model(x) - built(x)).abs().max() <= 1e-6


# ============================================================================ load errors

def test_load_error_missing_path(tmp_path):
    p = tmp_path / "nowhere"
    with pytest.raises(models.LoadError, match=str(p)):
        models.load(p)


def test_load_error_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(models.LoadError, match="config.json") as e:
        models.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_error_random_bytes_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(models.LoadError) as e:
        models.load(p)
    assert str(p) in str(e.value)


def test_load_error_truncated_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    ck.write_gguf(good, tiny_llama(**LLAMA_KW))
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(models.LoadError) as e:
        models.load(bad)
    assert str(bad) in str(e.value)


def test_load_error_unsupported_model_type(tmp_path):
    ref = tiny_llama(**LLAMA_KW)
    config = {**ck.llama_hf_config(ref.cfg), "model_type": "mamba"}
    ck.write_safetensors_dir(tmp_path, config, ck.llama_hf_tensors(ref))
    with pytest.raises(models.LoadError, match="mamba") as e:
        models.load(tmp_path)
    assert str(tmp_path) in str(e.value)


# ============================================================================ generation

@functools.lru_cache(maxsize=None)
def gen_model(family):
    """Float64 so that near-ties in argmax cannot make the two paths differ by rounding."""
    m = tiny_llama(seed=8) if family == "llama" else tiny_gpt(seed=8)
    return spread(m, seed=8).double()


def naive_greedy(model, prompt, n, stop=()):
    """Recompute the whole forward every step; argmax of the last position."""
    seq, out = list(prompt), []
    for _ in range(n):
        tok = model(torch.tensor([seq]))[0, -1].argmax().item()
        if tok in stop:
            break
        out.append(tok)
        seq.append(tok)
    return out


prompt_st = st.lists(st.integers(0, 96), min_size=1, max_size=9)


@pytest.mark.parametrize("family", ["llama", "gpt"])
@settings(max_examples=6, deadline=None)
@given(prompt=prompt_st, n=st.integers(1, 8))
def test_generate_single_prompt_matches_naive(family, prompt, n):
    model = gen_model(family)
    assert model.generate([prompt], n) == [naive_greedy(model, prompt, n)]


@pytest.mark.parametrize("family", ["llama", "gpt"])
@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4, unique=True),
       seed=st.integers(0, 2 ** 16), n=st.integers(1, 8))
def test_generate_left_padded_batch_matches_naive(family, lengths, seed, n):
    """Prompts of different lengths share a batch: every row pads on the left to the longest."""
    model = gen_model(family)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 97, (k,), generator=g).tolist() for k in lengths]
    assert model.generate(prompts, n) == [naive_greedy(model, p, n) for p in prompts]


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_generate_fixed_batch_varies_and_matches(family):
    """A deterministic case (always run): outputs are not constant, so positions/masks matter."""
    model = gen_model(family)
    prompts = [[5, 17, 3, 44, 2, 9, 61, 8], [70], [12, 13, 14]]
    want = [naive_greedy(model, p, 10) for p in prompts]
    assert any(len(set(w)) > 2 for w in want)
    assert model.generate(prompts, 10) == want


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_generate_stops_rows_independently(family):
    model = gen_model(family)
    prompts = [[5, 17, 3, 44, 2, 9, 61, 8], [70], [12, 13, 14]]
    free = [naive_greedy(model, p, 10) for p in prompts]
    stop = (free[0][3],)  # row 0 stops after at most 3 tokens; other rows wherever it occurs
    got = model.generate(prompts, 10, stop_tokens=stop)
    assert got == [naive_greedy(model, p, 10, stop) for p in prompts]
    assert len(got[0]) <= 3 and stop[0] not in sum(got, [])


# ============================================================================ the default model

PARAGRAPH = ("The sun is the star at the center of our solar system. It is a huge ball of hot gas that "
             "gives the Earth light and heat. Without the sun, there would be no life on our planet. Plants "
             "use sunlight to make their own food, and animals eat the plants to stay alive.")  # ppl ~6


@pytest.fixture(scope="module")
def default():
    return ck.default_model()


def test_default_model_loads_offline(default):
    """The fixture loads it with sockets disabled (checkpoints.default_model)."""
    model, tokenizer = default
    assert isinstance(model, models.Llama)
    c = model.cfg
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.vocab_size, c.tie_embeddings, c.rope_theta) == \
           (30, 576, 9, 3, 49152, True, 100000.0)
    assert tokenizer.chat == "chatml" and tokenizer.special("<|im_end|>") in tokenizer.stop
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert os.path.basename(models.resolve()) == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_default_model_perplexity_is_sane(default):
    model, tokenizer = default
    x = torch.tensor([tokenizer.encode(PARAGRAPH)])
    assert x.size(1) > 50
    with torch.no_grad():
        ppl = model.loss(x[:, :-1], x[:, 1:]).exp().item()
    assert 1.5 < ppl < 30, ppl


def test_default_model_knows_paris(default):
    model, tokenizer = default
    prompt = tokenizer.prompt("What is the capital of France?")
    (out,) = model.generate([prompt], 24, stop_tokens=tokenizer.stop)
    assert "Paris" in tokenizer.decode(out), tokenizer.decode(out)
