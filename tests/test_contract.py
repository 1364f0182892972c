"""The method contract, tested once for every method on four tiny random models: this library's
Llama and GPT-2, and transformers' LlamaForCausalLM and GPT2LMHeadModel (GPT-2's Conv1D layers
adapted as they are); transformers' Mistral and Qwen2 layouts take the default targets too.
Training is training.train_step itself. What is specific to one method lives in its own test file."""
import ast
import copy
import dataclasses
import functools
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
import methods
import training
from conftest import tiny_gpt, tiny_llama
from helpers import CONFIGS, ROOT, STEPS, batch, run_steps
from training import HFLoss as HFCausalLM  # a transformers LM with our loss(x, y)

FAMILIES = ("llama", "gpt", "hf_llama", "hf_gpt")


def hf_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1)
    return HFCausalLM(LlamaForCausalLM(cfg)).eval().requires_grad_(False)


def hf_gpt(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    return HFCausalLM(GPT2LMHeadModel(cfg)).eval().requires_grad_(False)


MAKE = {"llama": tiny_llama, "gpt": tiny_gpt, "hf_llama": hf_llama, "hf_gpt": hf_gpt}
CASES = [(name, family) for name in methods.NAMES for family in FAMILIES]


def adapted(name, family, seed=0):
    model = MAKE[family](seed)
    method = methods.get(name)
    cfg = method.Config(**CONFIGS[name])
    torch.manual_seed(seed)
    method.apply(model, cfg)
    return model, method, cfg


@functools.cache
def trained(name, family):
    """(the base model, the adapted model after STEPS steps): built once, copied by each test."""
    model, method, _ = adapted(name, family)
    run_steps(model, method)
    return MAKE[family](0), model


def logits(model, seed=7):
    with torch.no_grad():
        return model(batch(seed)[0])


def dense(layer):
    """A wrapped layer's weight as (out, in), whatever its storage (Conv1D keeps (in, out))."""
    return layer.weight.T if layer.transposed else layer.weight


@pytest.mark.parametrize("name,family", CASES)
def test_delta_w_is_zero_at_init_and_apply_keeps_the_mode(name, family):
    base = MAKE[family](0)
    model, method, _ = adapted(name, family)
    assert not model.training and not any(m.training for m in method.layers(model).values())
    assert torch.equal(logits(model), logits(base))
    for m in method.layers(model).values():
        assert torch.equal(m.delta_weight(), torch.zeros_like(m.delta_weight()))
    train_mode = MAKE[family](0).train()
    method.apply(train_mode, method.Config(**CONFIGS[name]))
    assert all(m.training for m in method.layers(train_mode).values())


# ΔW = 0 at init is the rule at every method's defaults (above) and at every choice of init but those
# listed in STARTS_MOVED: SARA's init="paper" is the paper's own, random U, lam and V, so ΔW != 0 by design
# (its file tests what it does instead).
INIT_CHOICES = {"sara": ("init", ("lambda0", "v0", "paper")), "sora": ("gate_init", ("randn", "ones"))}
STARTS_MOVED = {("sara", "paper")}


@pytest.mark.parametrize("name,value", [(n, v) for n, (_, values) in INIT_CHOICES.items() for v in values])
def test_every_init_but_the_listed_ones_starts_from_the_base_model(name, value):
    method = methods.get(name)
    field, values = INIT_CHOICES[name]
    assert set(values) == set(getattr(method, "INITS", values))  # every choice the file offers is listed
    model = MAKE["llama"](0)
    torch.manual_seed(0)
    method.apply(model, method.Config(**{**CONFIGS[name], field: value}))
    zero = all(torch.equal(m.delta_weight(), torch.zeros_like(m.delta_weight())) for m in method.layers(model).values())
    assert zero == ((name, value) not in STARTS_MOVED)
    assert torch.equal(logits(model), logits(MAKE["llama"](0))) == zero


@pytest.mark.parametrize("name,family", CASES)
def test_only_adapter_tensors_train_and_the_base_stays_bit_identical(name, family):
    base, model = trained(name, family)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = base.state_dict()
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()  # wrapping renames nothing
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not torch.equal(logits(model), logits(base))  # it did train


@pytest.mark.parametrize("name,family", CASES)
def test_merge_equals_unmerged_and_unmerge_restores_w0_bit_for_bit(name, family):
    _, model = trained(name, family)
    model = copy.deepcopy(model)
    method = methods.get(name)
    y = logits(model)
    w0 = {n: m.weight.detach().clone() for n, m in method.layers(model).items()}
    for m in method.layers(model).values():
        m.merge()
        merged = m.weight.detach().clone()
        m.merge()  # twice == once
        assert torch.equal(m.weight, merged)
    torch.testing.assert_close(logits(model), y, rtol=1e-5, atol=1e-5)
    for n, m in method.layers(model).items():
        m.unmerge()
        m.unmerge()
        assert torch.equal(m.weight, w0[n])
    assert torch.equal(logits(model), y)
    kinds = {n: type(m.base) for n, m in method.layers(model).items()}
    method.merge(model)
    assert not method.layers(model) and not any("lora_" in k for k in model.state_dict())
    assert all(type(model.get_submodule(n)) is kind for n, kind in kinds.items())  # the original layers back
    torch.testing.assert_close(logits(model), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", methods.NAMES)
def test_merging_an_adapter_on_a_tied_lm_head_leaves_the_embeddings_as_they_were(name):
    model = tiny_llama(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2's are
    method = methods.get(name)
    torch.manual_seed(0)
    method.apply(model, method.Config(**{**CONFIGS[name], "targets": ("lm_head",)}))
    run_steps(model, method)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    y = logits(model)
    layer = method.layers(model)["lm_head"]
    assert method.can_merge(model) is None  # CONFIGS' Mo-SARA has one head
    layer.merge()
    torch.testing.assert_close(logits(model), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    layer.unmerge()
    assert layer.weight is model.model.embed_tokens.weight  # the tie holds again
    method.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    torch.testing.assert_close(logits(model), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,family", CASES)
def test_to_lora_reproduces_delta_w(name, family):
    _, model = trained(name, family)
    method = methods.get(name)
    factors = method.to_lora(model)
    mods = method.layers(model)
    assert factors.keys() == mods.keys()
    for n, (A, B) in factors.items():
        m = mods[n]
        assert A.shape == (method.ranks(model)[n], m.in_features) and B.shape == (m.out_features, A.shape[0])
        w0 = dense(m).detach().clone()
        m.merge()
        torch.testing.assert_close(B @ A, dense(m) - w0, rtol=1e-4, atol=1e-6)
        m.unmerge()


@pytest.mark.parametrize("name,family", CASES)
def test_save_then_load_adapter_gives_identical_logits(name, family, tmp_path):
    base, model = trained(name, family)
    method = methods.get(name)
    adapters.save_adapter(model, tmp_path, name, method.config(model))
    fresh, meta = adapters.load_adapter(copy.deepcopy(base), tmp_path)
    assert meta["method"] == name and adapters.config_from_dict(method, meta["config"]) == method.config(model)
    assert torch.equal(logits(fresh.eval()), logits(model))
    assert method.ranks(fresh) == method.ranks(model)


@pytest.mark.parametrize("name,family", [(n, f) for n in methods.NAMES for f in ("llama", "hf_gpt")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_method_files_own_save_and_load_round_trip_and_refuse_what_does_not_fit(name, family, suffix, tmp_path):
    base, model = trained(name, family)
    method = methods.get(name)
    method.save(model, tmp_path / f"adapter{suffix}")
    fresh = method.load(copy.deepcopy(base), tmp_path / f"adapter{suffix}").eval()
    assert method.config(fresh) == method.config(model)
    assert torch.equal(logits(fresh), logits(model))
    other = MAKE["gpt" if family == "llama" else "llama"](0)
    with pytest.raises((ValueError, RuntimeError)):
        method.load(other, tmp_path / f"adapter{suffix}")
    torch.save({"tensors": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="holds no adapter Config"):
        method.load(copy.deepcopy(base), tmp_path / "foreign.pt")


@pytest.mark.parametrize("name", methods.NAMES)
def test_misuse_fails_with_a_sentence_that_says_what_to_do(name):
    method = methods.get(name)
    bare = tiny_llama()
    with pytest.raises(ValueError, match="call apply"):
        method.param_groups(bare, 1e-3, 0.0)
    model, method, cfg = adapted(name, "llama")
    with pytest.raises(ValueError, match="already has an adapter"):
        method.apply(model, cfg)
    with pytest.raises(ValueError, match="steps count optimizer steps from 1"):
        method.after_step(model, None, STEPS + 1, STEPS)
    with pytest.raises(ValueError, match="steps count optimizer steps from 1"):
        method.after_backward(model, 0, STEPS)
    other = next(n for n in methods.NAMES if n != name)  # any method refuses a model adapted by another
    with pytest.raises(ValueError, match="already has an adapter"):
        methods.get(other).apply(model, methods.get(other).Config())
    with pytest.raises(ValueError, match="no layer matches targets"):
        method.apply(tiny_llama(), method.Config(**{**CONFIGS[name], "targets": ("nope",)}))


@pytest.mark.parametrize("name", methods.NAMES)
def test_only_linear_layers_can_be_targets(name):
    method = methods.get(name)
    with pytest.raises(ValueError, match="is a RMSNorm: only nn.Linear"):
        method.apply(tiny_llama(), method.Config(**{**CONFIGS[name], "targets": ("input_layernorm",)}))


@pytest.mark.parametrize("name", methods.NAMES)
def test_a_method_names_itself_and_the_config_fields_that_size_its_tensors(name):
    method = methods.get(name)
    assert method.NAME == name and isinstance(method.TITLE, str) and method.TITLE in method.__doc__.split(":")[0]
    fields = {f.name: f.type for f in dataclasses.fields(method.Config)}
    assert all(fields[f] in (int, int | None) for f in method.SIZE_FIELDS)
    model, _, cfg = adapted(name, "llama")
    tensor_dims = {d for t in adapters.adapter_state(model).values() for d in t.shape}
    assert all(getattr(cfg, f) in tensor_dims for f in method.SIZE_FIELDS)  # each sizes a tensor apply() made


@pytest.mark.parametrize("name", methods.NAMES)
def test_can_merge_answers_what_merge_does(name):
    """None where merge folds the adapter into the weights; a reason, and merge refuses, where it cannot
    (Mo-SARA with several heads; a weight that is not floating point)."""
    method = methods.get(name)
    model, _, _ = adapted(name, "llama")
    assert method.can_merge(model) is None
    if name == "mosara":
        several = tiny_llama()
        method.apply(several, method.Config(heads=3))
        assert "3 heads" in method.can_merge(several)
        with pytest.raises(ValueError):
            method.merge(several)
    layer = next(iter(method.layers(model).values()))
    layer.weight = nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    assert "int8" in method.can_merge(model)
    with pytest.raises(ValueError, match="int8"):
        method.merge(model)


class QuantLinear(nn.Linear):
    """An nn.Linear subclass with its own forward, as quantised layers are."""

    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("name", methods.NAMES)
def test_nn_linear_subclasses_are_adapted_through_their_own_forward(name):
    model = tiny_llama()
    for layer in model.model.layers:
        old = layer.self_attn.q_proj
        new = QuantLinear(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        layer.self_attn.q_proj = new
    y = logits(model)
    method = methods.get(name)
    method.apply(model, method.Config(**CONFIGS[name]))
    assert "model.layers.0.self_attn.q_proj" in method.layers(model)
    assert torch.equal(logits(model), y)  # the subclass's forward still runs, ΔW = 0
    method.merge(model)
    assert type(model.model.layers[0].self_attn.q_proj) is QuantLinear


@pytest.mark.parametrize("name", methods.NAMES)
@pytest.mark.parametrize("family", ["hf_llama", "hf_gpt"])
def test_default_targets_find_the_hf_layers(name, family):
    model = MAKE[family](0)
    method = methods.get(name)
    method.apply(model, method.Config(**{k: v for k, v in CONFIGS[name].items() if k != "targets"}))
    suffixes = {n.rsplit(".", 2)[-1] if family == "hf_gpt" else n.rsplit(".", 1)[-1] for n in method.layers(model)}
    assert suffixes == ({"c_attn"} if family == "hf_gpt" else {"q_proj", "v_proj"})
    assert len(method.layers(model)) == (2 if family == "hf_gpt" else 4)


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(methods.NAMES), seed=st.integers(0, 2**16), steps=st.integers(2, 6))
def test_train_step_changes_only_the_adapter_over_seeds_and_lengths(name, seed, steps):
    model, method, _ = adapted(name, "llama", seed)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    run_steps(model, method, steps, seed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", methods.NAMES)
def test_train_step_reports_the_task_loss_and_the_penalty_apart(name):
    """A regulariser must not pass for a worse fit: train_step returns the task loss (what the
    progress line, log.jsonl and summary.json's final_loss show) and extra_loss's sum on their own."""
    model = tiny_llama(0)
    method = methods.get(name)
    torch.manual_seed(0)
    method.apply(model, method.Config(**{**CONFIGS[name], "dropout": 0.0}))  # deterministic forwards
    model.train()
    x, y = batch(3)
    with torch.no_grad():
        task, penalty = model.loss(x, y).item(), method.extra_loss(model).item()
    opt = torch.optim.AdamW(method.param_groups(model, 1e-3, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (got_task, got_penalty), _ = training.train_step(model, method, opt, sched, [(x, y)], 1, STEPS,
                                                  val_loss=training.val_closure(model, (x, y)))
    assert got_task == pytest.approx(task, rel=1e-6) and got_penalty == pytest.approx(penalty, rel=1e-6, abs=1e-9)
    assert (penalty > 0) == (name in ("adalora", "salora"))  # the two with a regulariser at init


@pytest.mark.parametrize("name", methods.NAMES)
def test_after_step_calls_val_loss_at_the_steps_val_loss_steps_names_and_no_others(name):
    """A trainer's ETA and progress lines rest on val_loss_steps: the steps of a scoring round (ALoRA's,
    at 12 steps rounds 1 to 8), the only ones whose after_step calls val_loss."""
    model, method, _ = adapted(name, "llama")
    total, calls = 12, []
    inner = training.val_closure(model, batch(100))

    def val_loss(grad=False):
        calls.append(step)
        return inner(grad)
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.train()
    for step in range(1, total + 1):
        training.train_step(model, method, opt, sched, [batch(step)], step, total, val_loss=val_loss)
    assert sorted(set(calls)) == method.val_loss_steps(model, total) == ([*range(1, 9)] if name == "alora" else [])


# ----------------------------------------------------------------------------- a file copied alone

def usage_block(path):
    """The indented code of the docstring's Usage block, dedented."""
    doc = ast.get_docstring(ast.parse(Path(path).read_text()))
    lines = doc[doc.index("\nUsage:"):].splitlines()
    code = [line for line in lines if line.startswith("    ") or not line.strip()]
    return textwrap.dedent("\n".join(code)).strip()


PREAMBLE = '''
import copy, importlib.util, sys
import torch
import torch.nn.functional as F
assert importlib.util.find_spec("methods") is None and importlib.util.find_spec("models") is None
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

def task_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())

def data(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(2, 97, (4, 12), generator=g)
        yield x[:, :-1], x[:, 1:]

makers = (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1)),
          lambda: GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
              eos_token_id=1)))
for dtype, make in [(dtype, make) for dtype in (torch.float32, torch.bfloat16) for make in makers]:
    torch.manual_seed(0)
    model = make().to(dtype)
    base = copy.deepcopy(model)
    model.requires_grad_(False)
    total_steps, batches, val_batch = 6, data(0), next(data(1))
    probe = next(data(2))[0]
'''
CHECK = '''
    model.eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(p.dtype == dtype for n, p in model.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        unmerged, original = model(input_ids=probe).logits, base(input_ids=probe).logits
    assert not torch.equal(unmerged, original), "training changed nothing"
{last}
    with torch.no_grad():
        after = model(input_ids=probe).logits
    gap = (after.float() - unmerged.float()).abs().max().item()
    assert gap < (1e-5 if dtype == torch.float32 else 0.05 * unmerged.float().abs().max().item()), gap
    assert not any("lora_" in k for k in model.state_dict()) or method.__name__ == "mosara"
    print("ok", type(model).__name__, dtype, sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))
'''


@pytest.mark.parametrize("name", methods.NAMES)
def test_a_method_file_copied_alone_runs_its_usage_block_on_transformers_llama_and_gpt2(name, tmp_path):
    """In float32 and on bf16 models: the adapter stays float32 whatever the model's dtype."""
    src = ROOT / "methods" / f"{name}.py"
    imports = {n.split(".")[0] for node in ast.walk(ast.parse(src.read_text()))
               if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])}
    assert imports <= {"json", "math", "dataclasses", "torch", "safetensors"}, imports
    (tmp_path / src.name).write_text(src.read_text())
    code = usage_block(src).splitlines()
    body, last = textwrap.indent("\n".join(code[:-1]), "    "), textwrap.indent(code[-1], "    ")
    (tmp_path / "run.py").write_text(PREAMBLE + body + "\n" + CHECK.format(last=last))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.findall(r"^ok (\w+ torch\.\w+)", r.stdout, re.M) == [
        f"{kind} torch.{dtype}" for dtype in ("float32", "bfloat16") for kind in ("LlamaForCausalLM", "GPT2LMHeadModel")]


# ----------------------------------------------------------------------------- the README's snippets

def readme_blocks():
    """The README's own-loop snippet, then docs/trainer.md's callback."""
    readme = (ROOT / "README.md").read_text()
    loop = re.search(r"```python\n(.*?)```", readme[readme.index("## Use a method in your own loop"):], re.S)[1]
    return [loop, re.search(r"```python\n(.*?)```", (ROOT / "docs" / "trainer.md").read_text(), re.S)[1]]


def tiny_hf(kind, path=None, seed=0):
    """A tiny transformers Llama or GPT-2 (saved to `path` when given)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = (LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                          eos_token_id=1)) if kind == "llama" else
             GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=0, eos_token_id=1)))
    if path:
        model.save_pretrained(path)
    return model


def token_batches(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": x, "labels": x} for x in (torch.randint(2, 97, (size, 10), generator=g) for _ in range(n))]


@pytest.mark.parametrize("name", methods.NAMES)
def test_the_readme_loop_runs_unchanged_for_every_method_and_its_saved_adapter_loads_back(name, tmp_path):
    from transformers import LlamaForCausalLM
    snippet = readme_blocks()[0]
    tiny_hf("llama", tmp_path / "tiny")
    hub_name = re.search(r'from_pretrained\("([^"]+)"\)', snippet)[1]
    code = (snippet.replace(hub_name, str(tmp_path / "tiny")).replace("import sora as", f"import {name} as")
            .replace('"sora.safetensors"', repr(str(tmp_path / "adapter.safetensors"))))
    scope = {"batches": token_batches(12, 2), "val_batch": token_batches(1, 2, seed=1)[0]}
    os.chdir(tmp_path)
    exec(code, scope)  # noqa: S102 - our own README
    model, method = scope["model"], scope["method"]
    assert method.__name__ == f"methods.{name}"
    probe = token_batches(1, 2, seed=2)[0]["input_ids"]
    base = LlamaForCausalLM.from_pretrained(tmp_path / "tiny")
    with torch.no_grad():
        trained, original = model.eval()(input_ids=probe).logits, base(input_ids=probe).logits
        assert not torch.equal(trained, original)  # it trained
        loaded = method.load(base, tmp_path / "adapter.safetensors").eval()(input_ids=probe).logits
    assert torch.equal(loaded, trained)


def trainer_run(tmp_path, name, kind, accumulate, batch_size, steps, cfg=None, save_steps=None, bf16=False,
                dtype=torch.float32):
    """docs/trainer.md's MethodHooks under transformers' Trainer (`bf16`: TrainingArguments' bf16=True;
    `dtype`: the model's). Returns (model, trainer, seen): seen.grads, the adapter's gradients at each
    after_backward (penalty included, before the clipping); seen.penalty, each extra_loss call's
    (value, gradients); seen.rank, the total live rank after each after_step; seen.losses, the loss of
    each training forward (validation forwards run in eval mode and are left out)."""
    from transformers import Trainer, TrainingArguments
    method = methods.get(name)
    scope = {"torch": torch, "method": method}
    exec(readme_blocks()[1], scope)  # noqa: S102 - our own docs
    model = tiny_hf(kind).to(dtype)
    method.apply(model, method.Config(**{**CONFIGS[name], "dropout": 0.0, **(cfg or {})}))
    seen = types.SimpleNamespace(grads=[], penalty=[], rank=[], losses=[])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def extra_loss(m):
        penalty = method.extra_loss(m)
        grads = (torch.autograd.grad(penalty, list(trainable.values()), retain_graph=True, allow_unused=True)
                 if penalty.requires_grad else [None] * len(trainable))
        seen.penalty.append((penalty.item(), {n: g for n, g in zip(trainable, grads) if g is not None}))
        return penalty

    def after_backward(m, step, total):
        seen.grads.append({n: p.grad.clone() for n, p in trainable.items() if p.grad is not None})
        method.after_backward(m, step, total)

    def after_step(m, *args, **kw):
        figures = method.after_step(m, *args, **kw)
        seen.rank.append(sum(method.ranks(m).values()))
        return figures
    spy = types.SimpleNamespace(**{k: getattr(method, k) for k in dir(method) if not k.startswith("_")})
    spy.extra_loss, spy.after_backward, spy.after_step = extra_loss, after_backward, after_step
    scope["method"] = spy
    model.register_forward_hook(lambda m, args, out: seen.losses.append(out.loss.item()) if m.training else None)
    val = token_batches(1, 2, seed=1)[0]

    def val_loss(grad=False):
        model.eval()
        with torch.set_grad_enabled(grad):
            loss = model(**val).loss
        model.train()
        return loss if grad else loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulate, max_grad_norm=0, report_to=[],
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True, bf16=bf16)
    trainer = Trainer(model, args, train_dataset=[b for x in token_batches(steps * 4, 1) for b in [
                          {"input_ids": x["input_ids"][0], "labels": x["labels"][0]}]],
                      callbacks=[scope["MethodHooks"](val_loss)],
                      optimizers=(torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0)), None))
    trainer.train()
    return model, trainer, seen


def step_logs(trainer):
    """The Trainer's log of each optimizer step (logging_steps=1), in order."""
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["adalora", "salora"])
def test_the_readme_trainer_callback_counts_the_penalty_once_per_step_under_accumulation(name, tmp_path):
    grads = {}
    for accumulate, size in ((1, 4), (2, 2)):
        _, trainer, seen = trainer_run(tmp_path / str(accumulate), name, "llama", accumulate, size, 2)
        logged = step_logs(trainer)
        assert len(logged) == 2 and all(h["penalty"] > 0 and h["rank"] > 0 for h in logged)
        grads[accumulate] = seen.grads
    for one, two in zip(*grads.values(), strict=True):
        assert one.keys() == two.keys() and one
        for n in one:
            torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", methods.NAMES)
def test_the_readme_trainer_callback_under_bf16_and_accumulation_logs_task_loss_penalty_and_rank(name, dtype,
                                                                                                 tmp_path):
    """Trainer(bf16=True) on a float32 or a bfloat16 model, 2 micro-batches a step: each step's "loss" is
    the task loss (its forwards' losses, which the Trainer sums under accumulation), "penalty" the
    extra_loss of its one call that step, "rank" the live rank after_step left; a round's figures
    (ALoRA's, at steps 1 and 2 of 3) stand in their own step's log alone."""
    accumulate, steps = 2, 3
    model, trainer, seen = trainer_run(tmp_path, name, "llama", accumulate, 2, steps, bf16=True, dtype=dtype)
    logged = step_logs(trainer)
    assert len(logged) == len(seen.penalty) == len(seen.rank) == len(seen.grads) == steps  # extra_loss once a step
    assert len(seen.losses) == accumulate * steps
    for h, pair, (penalty, _), rank in zip(logged, zip(seen.losses[::2], seen.losses[1::2]), seen.penalty, seen.rank):
        assert h["loss"] == pytest.approx(sum(pair), rel=1e-6)
        assert h["penalty"] == penalty and (penalty > 0) == (name in ("adalora", "salora"))
        assert h["rank"] == rank  # SaLoRA may close every gate in 3 steps
    scoring = methods.get(name).val_loss_steps(model, steps)
    assert [h.get("round") for h in logged] == [scoring.index(s) + 1 if s in scoring else None
                                                for s in range(1, steps + 1)]


@pytest.mark.parametrize("name", ["adalora", "salora"])
def test_the_readme_trainer_callback_adds_the_penalty_once_per_step_under_bf16_accumulation(name, tmp_path):
    """Under bf16 the two splits' task gradients differ by rounding, so each step's gradients are
    compared with the penalty's own: they differ by less than half of it (a penalty counted twice
    would add all of it)."""
    runs = {a: trainer_run(tmp_path / str(a), name, "llama", a, 4 // a, 2, bf16=True)[2] for a in (1, 2)}
    for step, (one, two) in enumerate(zip(runs[1].grads, runs[2].grads, strict=True)):
        penalty = runs[1].penalty[step][1]
        gap = torch.cat([(two[n] - one[n]).flatten() for n in penalty]).norm()
        own = torch.cat([g.flatten() for g in penalty.values()]).norm()
        assert own > 0 and gap < 0.5 * own, (step, gap.item(), own.item())


def test_the_readme_trainer_callback_saves_an_adapter_that_loads_and_save_pretrained_drops_it(tmp_path):
    from transformers import LlamaForCausalLM
    model, _, _ = trainer_run(tmp_path / "run", "sora", "llama", 1, 2, 4, save_steps=2)
    probe = token_batches(1, 2, seed=2)[0]["input_ids"]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
        base = tiny_hf("llama")(input_ids=probe).logits
        saved = methods.get("sora").load(tiny_hf("llama"), tmp_path / "run/checkpoint-4/adapter.safetensors")
        torch.testing.assert_close(saved.eval()(input_ids=probe).logits, trained)
        model.save_pretrained(tmp_path / "pretrained")
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pretrained")(input_ids=probe).logits
    assert (tmp_path / "run/checkpoint-2/adapter.safetensors").exists()
    torch.testing.assert_close(reloaded, base)  # what docs/trainer.md warns of: the adapter is gone
    assert not torch.equal(trained, base)


def test_alora_keeps_its_total_rank_under_the_trainer_on_gpt2s_fused_c_attn(tmp_path):
    model, trainer, _ = trainer_run(tmp_path, "alora", "gpt", 1, 2, 12)
    method = methods.get("alora")
    assert sum(method.ranks(model).values()) == 4 * len(method.layers(model))
    assert any("round" in h for h in trainer.state.log_history)  # its rounds ran


@pytest.mark.parametrize("name", methods.NAMES)
@pytest.mark.parametrize("kind", ["Mistral", "Qwen2"])
def test_mistral_and_qwen2_layouts_take_the_default_targets(name, kind):
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(vocab_size=97, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 bos_token_id=0, eos_token_id=1)
    model = HFCausalLM(getattr(transformers, f"{kind}ForCausalLM")(cfg)).eval().requires_grad_(False)
    y = logits(model)
    method = methods.get(name)
    method.apply(model, method.Config(**{k: v for k, v in CONFIGS[name].items()}))
    assert {n.rsplit(".", 1)[-1] for n in method.layers(model)} == {"q_proj", "v_proj"}
    assert torch.equal(logits(model), y)
    run_steps(model, method)
    trained_logits = logits(model)
    assert not torch.equal(trained_logits, y)
    method.merge(model)
    torch.testing.assert_close(logits(model), trained_logits, rtol=1e-5, atol=1e-5)
