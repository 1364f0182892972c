"""LoRA: the contract's invariants, over shapes, ranks and seeds."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
from conftest import tiny_gpt, tiny_llama
from methods import lora

X = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
families = st.sampled_from([tiny_llama, tiny_gpt])
targets = st.sampled_from([("q", "v"), ("q", "k", "v", "o"), ("o",)])


def randomize(model, seed):
    """Give B a non-zero value so ΔW != 0 (at init it is zero by design)."""
    g = torch.Generator().manual_seed(seed)
    for m in lora.layers(model).values():
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


@settings(max_examples=20, deadline=None)
@given(families, st.integers(1, 16), targets, st.integers(0, 1000))
def test_zero_delta_at_init(family, r, tg, seed):
    model = family()
    y0 = model(X)
    torch.manual_seed(seed)
    lora.apply(model, lora.Config(r=r, targets=tg))
    assert torch.equal(model(X), y0)


@settings(max_examples=20, deadline=None)
@given(families, st.integers(1, 16), st.floats(0.5, 64), targets, st.integers(0, 1000))
def test_merge_equals_unmerged_and_unmerge_restores(family, r, alpha, tg, seed):
    model = family()
    lora.apply(model, lora.Config(r=r, alpha=alpha, targets=tg))
    randomize(model, seed)
    y = model(X)
    layers = lora.layers(model)
    w0 = {n: m.weight.detach().clone() for n, m in layers.items()}
    for m in layers.values():
        m.merge()
        m.merge()  # idempotent
    assert torch.allclose(model(X), y, atol=1e-4 * y.abs().max().item())  # fp32 rounding of W0 + ΔW
    for n, m in layers.items():
        assert torch.allclose(m.weight, w0[n] + m.delta_weight(), atol=1e-6)
        m.unmerge()
        m.unmerge()
        assert torch.equal(m.weight, w0[n])
    assert torch.equal(model(X), y)
    lora.merge(model)
    assert not lora.layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in layers)
    assert torch.allclose(model(X), y, atol=1e-4 * y.abs().max().item())  # fp32 rounding of W0 + ΔW


@settings(max_examples=15, deadline=None)
@given(families, st.integers(1, 12), st.integers(0, 1000))
def test_to_lora_reproduces_delta(family, r, seed):
    model = family()
    lora.apply(model, lora.Config(r=r))
    randomize(model, seed)
    factors = lora.to_lora(model)
    for name, m in lora.layers(model).items():
        A, B = factors[name]
        assert A.shape == (r, m.in_features) and B.shape == (m.out_features, r)
        assert torch.allclose(B @ A, m.delta_weight(), atol=1e-6)
    assert lora.ranks(model) == {n: r for n in factors}


def test_only_adapter_trains_and_base_stays_bit_identical(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    lora.apply(tiny_model, lora.Config(r=4, dropout=0.1))
    tiny_model.train()
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW(lora.param_groups(tiny_model, 1e-2, 0.1))
    y = torch.randint(0, 97, X.shape)
    before = tiny_model.loss(X, y).item()
    for step in range(1, 11):
        loss = tiny_model.loss(X, y) + lora.extra_loss(tiny_model)
        loss.backward()
        lora.after_backward(tiny_model, step, 10)
        opt.step()
        lora.after_step(tiny_model, opt, step, 10)
        opt.zero_grad()
    assert tiny_model.loss(X, y).item() < before
    for k, v in tiny_model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base[k]), k


@pytest.mark.parametrize("family", [tiny_llama, tiny_gpt])
def test_save_load_adapter_identical_logits(tmp_path, family):
    model = family()
    cfg = lora.Config(r=3, alpha=7.0, targets=("q", "k", "v", "o"))
    lora.apply(model, cfg)
    randomize(model, 1)
    model.eval()
    methods.save_adapter(model, tmp_path, "lora", cfg, model_config=dataclasses.asdict(model.cfg))
    assert (tmp_path / "adapter.safetensors").stat().st_size > 1000  # not an empty file
    fresh = methods.load_adapter(family(), tmp_path)
    assert torch.equal(fresh(X), model(X))


def test_load_adapter_refuses_another_model(tmp_path):
    model = tiny_llama()
    cfg = lora.Config()
    lora.apply(model, cfg)
    methods.save_adapter(model, tmp_path, "lora", cfg, model_config=dataclasses.asdict(model.cfg))
    with pytest.raises(methods.AdapterError, match="another model"):
        methods.load_adapter(tiny_llama(dim=48), tmp_path)


def test_bad_config_and_targets():
    with pytest.raises(ValueError):
        lora.Config(r=0)
    with pytest.raises(ValueError):
        lora.Config(dropout=1.0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply(tiny_llama(), lora.Config(targets=("nope",)))


def test_targets_accept_module_suffixes():
    """A model without a TARGETS table (any other codebase) is targeted by module-name suffixes."""
    model = tiny_llama()
    model.TARGETS = {}
    lora.apply(model, lora.Config(targets=("self_attn.q_proj",)))
    assert set(lora.layers(model)) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
