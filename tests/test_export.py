"""export.py against the real transformers and peft: PEFT adapters, HF and merged checkpoints,
loading PEFT adapters back, and the CLI's errors.

Every checkpoint is written here from a tiny random model (tests/checkpoints.py); the default
model's export is checked once, on a short prompt.
"""
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import adapters
import checkpoints as ck
import eval as evaluate
import export
import files
import methods
import models
import train
from adapters import hf_lora, our_lora
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*ships no tokenizer files", "ignore::FutureWarning")
FAMILIES = ("llama", "llama-untied", "gpt2")
METHODS = {  # Config per method: every q/k/v third of GPT-2's c_attn, and pruned ranks, get exercised
    "lora": dict(r=3, targets=("q", "k", "v")),
    "sora": dict(rmax=5, targets=("q", "v")),
    "adalora": dict(init_r=4, target_r=2, targets=("q", "v", "o")),
    "sara": dict(threshold=0.3, targets=("q", "v")),
}


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def close(a, b):
    """Equal up to fp32 rounding: 1e-5 relative to the size of the logits."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@torch.no_grad()
def logits(model, x):
    out = model(x)
    return out if torch.is_tensor(out) else out.logits


def spread(model, seed):
    """Weights larger than the init, norms away from 1: a wrong layout or eps shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """family -> a HF checkpoint directory of a tiny random model, and its own HF export."""
    root = tmp_path_factory.mktemp("sources")
    kw = dict(norm_eps=1e-6, rope_theta=5000.0)
    tied, untied = spread(tiny_llama(1, **kw), 1), spread(tiny_llama(2, tie_embeddings=False, **kw), 2)
    src = {"llama": ck.write_safetensors_dir(root / "llama", ck.llama_hf_config(tied.cfg), ck.llama_hf_tensors(tied)),
           "llama-untied": ck.write_safetensors_dir(root / "untied", ck.llama_hf_config(untied.cfg),
                                                    ck.llama_hf_tensors(untied)),
           "gpt2": ck.write_safetensors_dir(root / "gpt2", ck.gpt2_hf_config(97, 32, 2, 4, 64), ck.gpt2_hf_tensors(3))}
    for family, path in src.items():
        export.main(["--format", "hf", "--model", str(path), "--out", str(root / f"{family}-hf")])
    return {family: (path, root / f"{family}-hf") for family, path in src.items()}


def with_random_adapter(source, name, seed=0, prune=0.4, **cfg):
    """Our model with method `name` applied and random adapter tensors. A share `prune` of the
    SoRA gates / AdaLoRA triplets is switched off, and all of them in the first module (rank 0)."""
    model, _ = models.load(source)
    method = methods.get(name)
    cfg = method.Config(**{"dropout": 0.0, **cfg})
    torch.manual_seed(seed)
    method.apply(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(m for m in model.modules() if hasattr(m, "lora_A") or hasattr(m, "lora_U")):
            for pname, t in layer.named_parameters():
                if pname.startswith("lora_"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            for off in ("lora_gate", "lora_mask"):
                if hasattr(layer, off):
                    t = getattr(layer, off)
                    t.masked_fill_((torch.rand(t.shape, generator=g) < prune) | (i == 0), 0)
            if hasattr(layer, "apply_mask"):
                layer.apply_mask()  # AdaLoRA zeroes the masked E, as its training does
    return model.eval(), cfg


def save(model, name, cfg, out):
    adapters.save_adapter(model, out, name, cfg, model_config=dataclasses.asdict(model.cfg))


def peft_model(hf_dir, adapter_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir).eval()


# ============================================================================ Hugging Face checkpoints

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_loads_in_transformers_and_back(sources, family):
    src, hf_dir = sources[family]
    ours, _ = models.load(src)
    x = ids()
    close(logits(AutoModelForCausalLM.from_pretrained(hf_dir), x), logits(ours, x))
    again, _ = models.load(hf_dir)
    assert torch.equal(logits(again, x), logits(ours, x))
    keys = load_file(hf_dir / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) == (family == "llama-untied")  # a tied head is not stored twice
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] == (family != "llama-untied")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_equals_the_adapter(sources, family, tmp_path):
    src, _ = sources[family]
    ours, cfg = with_random_adapter(src, "sora", rmax=4, targets=("q", "v", "o"))
    save(ours, "sora", cfg, tmp_path / "ad")
    export.main(["--format", "merged", "--adapter", str(tmp_path / "ad"), "--model", str(src), "--out", str(tmp_path / "m")])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    close(logits(hf, ids()), logits(ours, ids()))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_of_an_adapted_tied_head_unties_it(sources, family, tmp_path):
    """An adapter on a head tied to the embeddings: the merged export writes the head as a weight of
    its own (tie_word_embeddings false), so transformers and our loader give the adapter's logits."""
    src, _ = sources[family]
    ours, cfg = with_random_adapter(src, "lora", r=2, targets=("q", "lm_head"))
    save(ours, "lora", cfg, tmp_path / "ad")
    export.main(["--format", "merged", "--adapter", str(tmp_path / "ad"), "--model", str(src),
                 "--out", str(tmp_path / "m")])
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "m" / "model.safetensors")
    want = logits(ours, ids())
    assert not torch.allclose(want, logits(models.load(src)[0], ids()), atol=1e-3)  # the adapter matters
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), ids()), want)
    close(logits(models.load(tmp_path / "m")[0], ids()), want)


def test_gguf_export_ships_a_tokenizer_that_train_reads(tmp_path):
    """A GGUF's vocabulary becomes tokenizer.json: transformers and our loader split text alike,
    and train.py runs on the exported directory."""
    ref = spread(tiny_llama(4, vocab_size=ck.VOCAB_SIZE, max_seq_len=512), 4)
    ck.write_gguf(tmp_path / "m.gguf", ref)
    export.main(["--format", "hf", "--model", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "hf")])
    ours, tok = models.load(tmp_path / "m.gguf")
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids()), logits(ours, ids()))
    text = "the 12 wheels, where? 3.5 the end\n"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text, add_special_tokens=False) == tok.encode(text)
    summary = train.main(["--method", "lora", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "run"),
                          "--steps", "2", "--batch-size", "2", "--seq-len", "512", "--log-every", "1",
                          "--val-size", "2"])
    assert summary["steps"] == 2 and (tmp_path / "run" / "adapter.safetensors").exists()


def test_default_model_exports_to_transformers(tmp_path):
    """The GGUF default model (q/k unpermuted at load, config from GGUF metadata) as a HF checkpoint."""
    model, tok = ck.default_model()
    files.write_dir(tmp_path / "hf", lambda out: export.write_hf(out, model, None))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.tensor([tok.prompt("What is the capital of France?")])
    close(logits(hf, x), logits(model, x))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    hf_ids = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(chat, add_generation_prompt=True)
    assert hf_ids["input_ids"] == x[0].tolist()


# ============================================================================ PEFT adapters

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_matches_peft_and_loads_back(sources, family, name, tmp_path):
    src, hf_dir = sources[family]
    ours, cfg = with_random_adapter(src, name, **METHODS[name])
    save(ours, name, cfg, tmp_path / "ad")
    export.main(["--format", "peft", "--adapter", str(tmp_path / "ad"), "--model", str(src), "--out", str(tmp_path / "p")])
    x = ids()
    want = logits(ours, x)
    assert not torch.allclose(want, logits(models.load(src)[0], x), atol=1e-3)  # the adapter matters
    close(logits(peft_model(hf_dir, tmp_path / "p"), x), want)

    back, _ = models.load(src)
    adapters.load_adapter(back, tmp_path / "p")
    close(logits(back, x), want)
    live = {n: A.shape[0] for n, (A, _) in methods.get(name).to_lora(ours).items() if A.shape[0]}
    if family != "gpt2":  # the same modules at the same ranks (GPT-2's are re-split from c_attn)
        assert methods.get("lora").ranks(back) == live


def test_peft_config_carries_per_module_ranks_and_skips_rank_0(sources, tmp_path):
    src, hf_dir = sources["llama"]
    ours, cfg = with_random_adapter(src, "sora", seed=3, prune=0.5, rmax=6, targets=("q", "k", "v", "o"))
    save(ours, "sora", cfg, tmp_path / "ad")
    export.main(["--format", "peft", "--adapter", str(tmp_path / "ad"), "--model", str(src), "--out", str(tmp_path / "p")])
    c = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    ranks = {n: A.shape[0] for n, (A, _) in methods.get("sora").to_lora(ours).items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 0 and len(set(ranks.values())) > 2
    assert sorted(c["target_modules"]) == sorted(n for n, r in ranks.items() if r)
    assert all(c["rank_pattern"].get(n, c["r"]) == r for n, r in ranks.items() if r)
    assert c["rank_pattern"] == c["alpha_pattern"] and c["r"] == c["lora_alpha"]
    assert (c["peft_type"], c["task_type"], c["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", str(src.resolve()))
    pm = peft_model(hf_dir, tmp_path / "p")
    q0 = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q0) is torch.nn.Linear  # pruned entirely: PEFT leaves the layer alone
    for n, r in ranks.items():
        if r:
            assert pm.base_model.model.get_submodule(n).r["default"] == r


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["sora", "adalora", "sara"]), seed=st.integers(0, 10_000), r=st.integers(1, 4),
       prune=st.floats(0, 0.9), threshold=st.floats(0.05, 0.9))
def test_gpt2_qkv_joins_into_c_attn_exactly(sources, name, seed, r, prune, threshold):
    """Any q/k/v ranks (0 included) on GPT-2: one block-diagonal c_attn LoRA that PEFT reproduces."""
    src, hf_dir = sources["gpt2"]
    cfg = {"sora": dict(rmax=r), "adalora": dict(init_r=r, target_r=1), "sara": dict(threshold=threshold)}[name]
    ours, _ = with_random_adapter(src, name, seed=seed, prune=prune, targets=("q", "k", "v", "fc"), **cfg)
    factors = methods.get(name).to_lora(ours)
    write = lambda tmp: adapters.write_peft(tmp, ours, factors, "gpt2")  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        if not any(A.shape[0] for A, _ in factors.values()):
            with pytest.raises(ValueError, match="pruned to rank 0"):
                files.write_dir(Path(d) / "p", write)
            return
        files.write_dir(Path(d) / "p", write)
        close(logits(peft_model(hf_dir, Path(d) / "p"), ids(seed)), logits(ours, ids(seed)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=3, max_size=3), st.integers(0, 1000))
def test_hf_lora_and_our_lora_are_inverse(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    factors = {f"transformer.h.0.attn.{p}_proj": (torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g))
               for p, r in zip("qkv", ranks)}
    joined = hf_lora(factors)
    assert list(joined) == (["transformer.h.0.attn.c_attn"] if sum(ranks) else [])
    if sum(ranks):
        A, B = joined["transformer.h.0.attn.c_attn"]
        assert A.shape == (sum(ranks), 8) and B.shape == (24, sum(ranks))
        torch.testing.assert_close(B @ A, torch.cat([B_ @ A_ for A_, B_ in factors.values()]), rtol=1e-6, atol=1e-6)
    back = our_lora(joined)
    assert back.keys() == {n for n, (A, _) in factors.items() if A.shape[0]}
    for n, (A, B) in back.items():
        assert torch.equal(A, factors[n][0]) and torch.equal(B, factors[n][1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapters_saved_by_peft_load_as_lora(sources, family, tmp_path):
    """PEFT's own save_pretrained output, with rank_pattern, alpha_pattern and rsLoRA."""
    src, hf_dir = sources[family]
    targets = ["q_proj", "v_proj", "o_proj"] if family == "llama" else ["c_attn", "c_fc"]
    first = "model.layers.0.self_attn.v_proj" if family == "llama" else "transformer.h.0.attn.c_attn"
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=targets, rank_pattern={first: 2}, alpha_pattern={first: 7},
                     use_rslora=True, init_lora_weights=False, fan_in_fan_out=family == "gpt2",
                     task_type="CAUSAL_LM")
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), cfg).eval()
    pm.save_pretrained(tmp_path / "p")
    ours, _ = models.load(src)
    adapters.load_adapter(ours, tmp_path / "p")
    close(logits(ours, ids()), logits(pm, ids()))


def test_eval_reads_a_peft_adapter(tiny_checkpoint, tmp_path):
    ours, cfg = with_random_adapter(tiny_checkpoint, "lora", r=2)
    save(ours, "lora", cfg, tmp_path / "ad")
    export.main(["--format", "peft", "--adapter", str(tmp_path / "ad"), "--model", str(tiny_checkpoint),
                 "--out", str(tmp_path / "p")])
    rows = evaluate.main(["--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "p"), "--limit", "2",
                          "--max-new-tokens", "2"])
    assert [r["method"] for r in rows] == ["base", "lora"]
    assert rows[1]["trainable_params"] == sum(t.numel() for k, t in ours.named_parameters() if "lora_" in k)


# ============================================================================ errors and the output directory

@pytest.mark.parametrize("args,message", [
    (["--out", "x"], "--format must be one of"),
    (["--format", "onnx", "--out", "x"], "--format must be one of"),
    (["--format", "peft", "--out", "x"], "needs --adapter"),
    (["--format", "hf"], "--out is required"),
    (["--format", "hf", "--adapter", "a", "--out", "x"], "use --format merged"),
    (["--format", "peft", "--adapter", "/no/such/adapter", "--out", "x"], "does not exist"),
])
def test_bad_arguments_are_refused(args, message):
    with pytest.raises((ValueError, adapters.AdapterError), match=message):
        export.main(args)


def test_a_non_empty_out_is_replaced_only_with_force(sources, tmp_path):
    src, _ = sources["gpt2"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export.main(["--format", "hf", "--model", str(src), "--out", str(out)])
    assert (out / "keep.txt").exists()
    export.main(["--format", "hf", "--model", str(src), "--out", str(out), "--force"])
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [f.name for f in tmp_path.iterdir()] == ["out"]  # no temporary directory left over


def test_a_failed_export_leaves_nothing(tmp_path):
    def half(tmp):
        (tmp / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.write_dir(tmp_path / "out", half)
    assert list(tmp_path.iterdir()) == []


def test_mosara_with_heads_is_refused_with_exit_2(tiny_checkpoint, tmp_path):
    ours, cfg = with_random_adapter(tiny_checkpoint, "mosara", heads=3)
    save(ours, "mosara", cfg, tmp_path / "ad")
    args = ["--adapter", str(tmp_path / "ad"), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="3 heads"):
        export.main(["--format", "merged", *args])
    r = subprocess.run([sys.executable, "export.py", "--format", "peft", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "3 heads" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
