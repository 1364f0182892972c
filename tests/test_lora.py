"""LoRA: the contract's invariants, over shapes, ranks and seeds."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
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


def test_load_adapter_refuses_another_model(tmp_path):
    model = tiny_llama()
    cfg = lora.Config()
    lora.apply(model, cfg)
    adapters.save_adapter(model, tmp_path, "lora", cfg, model_config=dataclasses.asdict(model.cfg))
    with pytest.raises(adapters.AdapterError, match="another model"):
        adapters.load_adapter(tiny_llama(dim=48), tmp_path)


def test_bad_config_and_targets():
    with pytest.raises(ValueError):
        lora.Config(r=0)
    with pytest.raises(ValueError):
        lora.Config(dropout=1.0)
    with pytest.raises(ValueError, match="no layer matches targets"):
        lora.apply(tiny_llama(), lora.Config(targets=("nope",)))


def test_targets_accept_module_suffixes():
    """A model without a TARGETS table (any other codebase) is targeted by module-name suffixes."""
    model = tiny_llama()
    model.TARGETS = {}
    lora.apply(model, lora.Config(targets=("self_attn.q_proj",)))
    assert set(lora.layers(model)) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
