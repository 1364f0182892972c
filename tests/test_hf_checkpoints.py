"""Checkpoints that transformers itself saves (save_pretrained, the version requirements-test.txt
pins): both config layouts read to the same logits, every RoPE variant llama.py implements,
the others refused, and export.py writing what transformers writes."""
import dataclasses
import json

import pytest
import torch
import transformers

import adapters
import export
import methods
import models

pytestmark = pytest.mark.filterwarnings("ignore:.*ships no tokenizer files")

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # short, so that every frequency is rescaled
KINDS = {  # name -> (transformers config class, its arguments); θ is never the default 10,000
    "llama-gqa": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    "llama3.1-scaling": ("LlamaConfig", dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0},
                                             tie_word_embeddings=True)),
    "linear-scaling": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 20000.0})),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                                  tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                             sliding_window=16)),
}


def spread(model, seed=0):
    """Random weights well away from the init (norms away from 1, biases non-zero): a wrong
    layout, θ or bias shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


def saved_by_transformers(path, kind, seed=0):
    cls, kw = KINDS[kind]
    cfg = getattr(transformers, cls)(**SHAPE, **kw)
    hf = spread(transformers.AutoModelForCausalLM.from_config(cfg), seed)
    hf.save_pretrained(path)
    return hf


def hf_gpt2(path, seed=0):
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    hf = spread(transformers.GPT2LMHeadModel(cfg), seed)
    hf.save_pretrained(path)
    return hf


def to_transformers4_keys(path):
    """The same config in transformers 4's layout: θ at the top level, scaling in rope_scaling."""
    c = json.loads((path / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] != "default":
        c["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(c))


def ids(seed=0, shape=(2, 13)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    out = model(x)
    return out if torch.is_tensor(out) else out.logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("layout", ["rope_parameters", "transformers4"])
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_saved_by_transformers_give_its_logits(tmp_path, kind, layout):
    hf = saved_by_transformers(tmp_path, kind)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # what transformers 5 writes
    if layout == "transformers4":
        to_transformers4_keys(tmp_path)
    ours, _ = models.load(tmp_path)
    assert ours.cfg.rope_theta == KINDS[kind][1]["rope_parameters"]["rope_theta"]
    assert ours.cfg.qkv_bias == (kind == "qwen2")
    x = ids()
    want = logits(hf, x)
    close(logits(ours, x), want)
    if kind == "mistral-window":  # within its window attention is full: the context ends there
        assert ours.cfg.max_seq_len == 16


def test_gpt2_saved_by_transformers_gives_its_logits(tmp_path):
    hf = hf_gpt2(tmp_path)
    ours, _ = models.load(tmp_path)
    close(logits(ours, ids()), logits(hf, ids()))


# what export adds to what transformers 5 writes: transformers 4's keys (θ, RoPE scaling, the dtype's
# old name) and GPT-2's n_ctx, which older readers take the context length from
TRANSFORMERS4 = {"llama-gqa": {"rope_theta", "torch_dtype"}, "qwen2": {"rope_theta", "torch_dtype"},
                 "llama3.1-scaling": {"rope_theta", "rope_scaling", "torch_dtype"}, "gpt2": {"n_ctx", "torch_dtype"}}


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS4))
def test_export_writes_what_transformers_writes_and_reads_back(tmp_path, kind):
    hf = hf_gpt2(tmp_path / "src") if kind == "gpt2" else saved_by_transformers(tmp_path / "src", kind)
    export.main(["--format", "hf", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    close(logits(back, ids(1)), logits(hf, ids(1)))
    back.save_pretrained(tmp_path / "again")
    theirs, ours, again = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("src", "out", "again"))
    assert ours.keys() - theirs.keys() == TRANSFORMERS4[kind]
    assert {k: ours[k] for k in ours.keys() & theirs.keys()} == {k: theirs[k] for k in ours.keys() & theirs.keys()}
    assert {k: again.get(k) for k in theirs} == theirs  # what export leaves out, transformers fills in as its own
    again, _ = models.load(tmp_path / "out")
    assert torch.equal(logits(again, ids(1)), logits(models.load(tmp_path / "src")[0], ids(1)))


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not implemented"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not implemented"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "per layer type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs factor"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_what_the_model_does_not_compute_is_refused(tmp_path, change, message):
    saved_by_transformers(tmp_path, "llama-gqa")
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
    with pytest.raises(models.LoadError, match=message) as e:
        models.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_adapters_recorded_before_a_config_field_existed_still_load(tmp_path):
    """An adapter's model_config written before LlamaConfig had qkv_bias still matches its model;
    a model of another shape is refused with the fields that differ."""
    saved_by_transformers(tmp_path / "m", "llama-gqa")
    model, _ = models.load(tmp_path / "m")
    lora = methods.get("lora")
    lora.apply(model, lora.Config(r=2))
    cfg = json.loads(json.dumps(dataclasses.asdict(model.cfg)))
    del cfg["qkv_bias"]
    adapters.save_adapter(model, tmp_path / "ad", "lora", lora.Config(r=2), model_config=cfg)
    adapters.load_adapter(models.load(tmp_path / "m")[0], tmp_path / "ad")
    saved_by_transformers(tmp_path / "other", "qwen2")
    with pytest.raises(adapters.AdapterError, match="qkv_bias False, here True.*--model"):
        adapters.check_adapter(models.load(tmp_path / "other")[0], tmp_path / "ad")
