"""The method contract, tested once for every method on four tiny random models: this library's
Llama and GPT-2, and transformers' LlamaForCausalLM and GPT2LMHeadModel (GPT-2's Conv1D layers
adapted as they are); transformers' Mistral and Qwen2 layouts take the default targets too.
Training is train.train_step itself. What is specific to one method lives in its own test file."""
import ast
import copy
import functools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
import train
from bench import HFLoss as HFCausalLM  # a transformers LM with our loss(x, y)
from conftest import tiny_gpt, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "gpt", "hf_llama", "hf_gpt")
STEPS = 4
# small adapters on 32-wide models; Mo-SARA with one head, the only one that merges
CONFIGS = {"lora": {"r": 4}, "sara": {"threshold": 0.2}, "mosara": {"heads": 1}, "sora": {"rmax": 6, "lam": 0.5},
           "adalora": {"init_r": 6, "target_r": 4}, "alora": {"r": 4}, "salora": {"rmax": 6}}


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


def batch(seed, n=4, t=12):
    x = torch.randint(2, 97, (n, t), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def adapted(name, family, seed=0):
    model = MAKE[family](seed)
    method = methods.get(name)
    cfg = method.Config(**CONFIGS[name])
    torch.manual_seed(seed)
    method.apply(model, cfg)
    return model, method, cfg


def run_steps(model, method, steps=STEPS, seed=0):
    """train.train_step `steps` times, with a cosine schedule and the validation closure ALoRA needs."""
    opt = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    val_loss = train.val_closure(model, batch(seed + 100))
    model.train()
    for step in range(1, steps + 1):
        train.train_step(model, method, opt, sched, [batch(seed + step)], step, steps, val_loss=val_loss)
    model.eval()
    return opt


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
    methods.save_adapter(model, tmp_path, name, method.config(model))
    fresh, meta = methods.load_adapter(copy.deepcopy(base), tmp_path)
    assert meta["method"] == name and methods.config_from_dict(method, meta["config"]) == method.config(model)
    assert torch.equal(logits(fresh.eval()), logits(model))
    assert method.ranks(fresh) == method.ranks(model)


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
    (got_task, got_penalty), _ = train.train_step(model, method, opt, sched, [(x, y)], 1, STEPS,
                                                  val_loss=train.val_closure(model, (x, y)))
    assert got_task == pytest.approx(task, rel=1e-6) and got_penalty == pytest.approx(penalty, rel=1e-6, abs=1e-9)
    assert (penalty > 0) == (name in ("adalora", "salora"))  # the two with a regulariser at init


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
    assert imports <= {"math", "dataclasses", "torch"}, imports
    (tmp_path / src.name).write_text(src.read_text())
    code = usage_block(src).splitlines()
    body, last = textwrap.indent("\n".join(code[:-1]), "    "), textwrap.indent(code[-1], "    ")
    (tmp_path / "run.py").write_text(PREAMBLE + body + "\n" + CHECK.format(last=last))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.findall(r"^ok (\w+ torch\.\w+)", r.stdout, re.M) == [
        f"{kind} torch.{dtype}" for dtype in ("float32", "bfloat16") for kind in ("LlamaForCausalLM", "GPT2LMHeadModel")]


# ----------------------------------------------------------------------------- the README's snippet

def test_the_readme_snippet_runs_on_a_tiny_transformers_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use a method in your own loop"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    assert len(snippet.strip().splitlines()) <= 15
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                 eos_token_id=1)).save_pretrained(tmp_path / "tiny")
    hub_name = re.search(r'from_pretrained\("([^"]+)"\)', snippet)[1]
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(2, 97, (2, 10), generator=g) for _ in range(5)]
    scope = {"batches": [{"input_ids": x, "labels": x} for x in ids]}
    exec(snippet.replace(hub_name, str(tmp_path / "tiny")), scope)  # noqa: S102 - our own README
    model, method = scope["model"], scope["method"]
    assert not method.layers(model)  # merged at the end: plain layers
    before = LlamaForCausalLM.from_pretrained(tmp_path / "tiny")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before.model.layers[0].self_attn.q_proj.weight)


def test_the_readme_trainer_glue_runs_every_hook_in_order(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use a method in your own loop"):]
    glue = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    scope = {"torch": torch, "method": methods.get("adalora")}
    exec(glue, scope)  # noqa: S102 - our own README
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1))
    method = scope["method"]
    method.apply(model, method.Config(init_r=6, target_r=4))
    calls = []
    spy = type("Spy", (), {})()
    spy.extra_loss = method.extra_loss
    spy.after_backward = lambda m, step, total: (calls.append(("after_backward", step, total)),
                                                 method.after_backward(m, step, total))
    spy.after_step = lambda m, opt, step, total: (calls.append(("after_step", step, total)),
                                                  method.after_step(m, opt, step, total))
    scope["method"] = spy
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": x, "labels": x} for x in torch.randint(2, 97, (8, 10), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, max_grad_norm=0,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = scope["MethodTrainer"](model, args, train_dataset=data, callbacks=[scope["Hooks"]()],
                                     optimizers=(torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0)), None))
    trainer.train()
    assert calls == [(hook, s, 4) for s in range(1, 5) for hook in ("after_backward", "after_step")]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert method.ranks(model) and sum(method.ranks(model).values()) == 4 * len(method.layers(model))


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
