"""SARA: Algorithm 1's k, the U diag(lam) V adapter, its inits, merge and to_lora."""
import math

import pytest
import torch
import torch.nn as nn
from conftest import drive, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import sara

FAST = settings(max_examples=40, deadline=None)
dims = st.integers(1, 24)
thresholds = st.floats(1e-4, 1.0)


def matrix(out, inp, seed, rank=None):
    """A Gaussian (out, in) matrix, or one of exactly the given rank (a Gaussian block among zeros)."""
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(out, inp, generator=g)
    w = torch.zeros(out, inp)
    w[:rank, :rank] = torch.randn(rank, rank, generator=g)
    return w[torch.randperm(out, generator=g)][:, torch.randperm(inp, generator=g)]


def k_literal(w, t):
    """Algorithm 1 written as the paper's loop, with the target fixed to threshold * total."""
    s = torch.linalg.svdvals(w.double()).tolist()
    target, cumulative, k = t * sum(s), 0.0, 0
    while cumulative < target:
        cumulative += s[k]
        k += 1
    return max(k, 1)


class One(nn.Module):
    """A single linear layer named `proj`: hypothesis varies its shape freely."""

    def __init__(self, w, bias=True):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        with torch.no_grad():
            self.proj.weight.copy_(w)
        self.requires_grad_(False).eval()

    def forward(self, x):
        return self.proj(x)


def randomise(model, seed=0):
    """Give every adapter tensor random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def train_steps(model, cfg, steps=3, lr=1e-2, seed=0):
    """A few steps of training.train_step; the method logs nothing."""
    assert all(f == {} for f in drive(sara, model, steps, lr, seed))
    return model


# --- Algorithm 1 -----------------------------------------------------------------------------------

@FAST
@given(out=dims, inp=dims, seed=st.integers(0, 10**6), t=thresholds)
def test_k_reaches_the_target_and_k_minus_1_does_not(out, inp, seed, t):
    w = matrix(out, inp, seed)
    k = sara.rank_for(w, t)
    s = torch.linalg.svdvals(w.double())
    assert 1 <= k <= min(out, inp)
    assert s[:k].sum() >= t * s.sum() * (1 - 1e-12)
    assert k == 1 or s[:k - 1].sum() < t * s.sum()
    assert k == k_literal(w, t)


@FAST
@given(out=dims, inp=dims, seed=st.integers(0, 10**6), t1=thresholds, t2=thresholds)
def test_k_is_non_decreasing_in_threshold(out, inp, seed, t1, t2):
    w = matrix(out, inp, seed)
    lo, hi = sorted((t1, t2))
    assert sara.rank_for(w, lo) <= sara.rank_for(w, hi)


@FAST
@given(out=dims, inp=dims, seed=st.integers(0, 10**6), t=thresholds, c=st.floats(1e-3, 1e3))
def test_k_is_invariant_to_scale_and_transpose(out, inp, seed, t, c):
    w = matrix(out, inp, seed)
    k = sara.rank_for(w, t)
    assert sara.rank_for(c * w, t) == k
    assert sara.rank_for(w.T, t) == k


@FAST
@given(out=st.integers(2, 24), inp=st.integers(2, 24), seed=st.integers(0, 10**6), t=thresholds, data=st.data())
def test_k_never_exceeds_the_numerical_rank(out, inp, seed, t, data):
    rank = data.draw(st.integers(1, min(out, inp)))
    w = matrix(out, inp, seed, rank)
    assert 1 <= sara.rank_for(w, t) <= rank
    assert sara.rank_for(w, 1.0) == torch.linalg.matrix_rank(w.double())


@FAST
@given(seed=st.integers(0, 10**6), t=thresholds)
def test_k_of_a_bfloat16_weight_is_k_of_its_values(seed, t):
    w = matrix(32, 32, seed).bfloat16()
    assert sara.rank_for(w, t) == sara.rank_for(w.float(), t)


def test_tiny_threshold_gives_k_1_never_0():
    assert sara.rank_for(matrix(16, 16, 0), 1e-9) == 1
    assert sara.rank_for(torch.eye(8), 1 / 8) == 1  # the first singular value reaches the target exactly


@pytest.mark.parametrize("w", [torch.zeros(4, 6), torch.full((3, 3), float("nan"))])
def test_matrices_without_a_spectrum_raise(w):
    with pytest.raises(ValueError):
        sara.rank_for(w, 0.5)


# --- the adapter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["lambda0", "v0"])
def test_delta_w_is_zero_at_init(tiny_model, init):
    x = torch.randint(0, 97, (2, 12))
    base = tiny_model(x)
    sara.apply(tiny_model, sara.Config(threshold=0.3, init=init))
    assert torch.equal(tiny_model(x), base)


@FAST
@given(out=dims, inp=dims, seed=st.integers(0, 10**6), t=thresholds)
def test_paper_init_starts_with_delta_w_nonzero_at_the_spectrum_rules_rank(out, inp, seed, t):
    """init="paper": U, V Kaiming-uniform and lam U(-1, 1), all random, so ΔW != 0 at step 0 (the
    contract's ΔW = 0 holds only for the inits that zero a factor); k is Algorithm 1's, as for v0."""
    w = matrix(out, inp, seed)
    torch.manual_seed(seed)
    model = sara.apply(One(w), sara.Config(threshold=t, init="paper", targets=("proj",)))
    layer, k = model.proj, sara.rank_for(w, t)
    assert sara.ranks(model) == {"proj": k} == sara.ranks(sara.apply(One(w), sara.Config(threshold=t,
                                                                                          targets=("proj",))))
    assert layer.lora_U.abs().max() <= 1 / math.sqrt(k) and layer.lora_V.abs().max() <= 1 / math.sqrt(inp)
    assert layer.lora_lam.abs().max() <= 1
    assert layer.delta_weight().abs().max() > 0
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w + layer.delta_weight()).T + layer.bias)


def test_ranks_and_trainable_count_follow_algorithm_1(tiny_model):
    wanted = {n: sara.rank_for(m.weight, 0.3) for n, m in sara.find_targets(tiny_model, ("q", "v")).items()}
    sara.apply(tiny_model, sara.Config(threshold=0.3))
    assert sara.ranks(tiny_model) == wanted
    shapes = {n: m.weight.shape for n, m in sara.layers(tiny_model).items()}
    expected = sum(k * (shapes[n][0] + shapes[n][1]) + k for n, k in wanted.items())
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) == expected


@FAST
@given(out=dims, inp=dims, seed=st.integers(0, 10**6), t=thresholds)
def test_to_lora_reproduces_the_forward(out, inp, seed, t):
    model = randomise(sara.apply(One(matrix(out, inp, seed)), sara.Config(threshold=t, targets=("proj",))), seed)
    x = torch.randn(5, inp, generator=torch.Generator().manual_seed(seed))
    A, B = sara.to_lora(model)["proj"]
    layer = model.proj
    assert A.shape == (sara.ranks(model)["proj"], inp) and B.shape == (out, A.shape[0])
    expected = x @ layer.weight.T + layer.bias + (x @ A.T) @ B.T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_base_weights_stay_bit_identical(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = sara.Config(threshold=0.3)
    sara.apply(tiny_model, cfg)
    assert {n for n, p in tiny_model.named_parameters() if p.requires_grad} == {
        n for n in dict(tiny_model.named_parameters()) if "lora_" in n}
    before = {n: p.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
    train_steps(tiny_model, cfg)
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters() if p.requires_grad)


def test_lambda0_first_gradient_reaches_lambda_only():
    """With lam = 0 only lam gets a gradient at first; after one step U and V train too."""
    model = tiny_llama()
    cfg = sara.Config(threshold=0.3, init="lambda0")
    sara.apply(model, cfg)
    x = torch.randint(0, 97, (2, 12))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for m in sara.layers(model).values():
        assert m.lora_lam.grad.abs().sum() > 0
        assert torch.equal(m.lora_U.grad, torch.zeros_like(m.lora_U))
        assert torch.equal(m.lora_V.grad, torch.zeros_like(m.lora_V))
    model.zero_grad(set_to_none=True)
    train_steps(model, cfg, steps=1)
    model.train()
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for m in sara.layers(model).values():
        assert m.lora_lam.abs().min() > 0
        assert m.lora_U.grad.abs().sum() > 0 and m.lora_V.grad.abs().sum() > 0


def test_v0_trains_the_up_projection_first():
    model = sara.apply(tiny_llama(), sara.Config(threshold=0.3, init="v0"))
    x = torch.randint(0, 97, (2, 12))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for m in sara.layers(model).values():
        assert m.lora_U.grad.abs().sum() > 0
        assert torch.equal(m.lora_lam.grad, torch.zeros_like(m.lora_lam))
        assert torch.equal(m.lora_V.grad, torch.zeros_like(m.lora_V))


def test_training_lowers_the_loss():
    model = sara.apply(tiny_llama(), sara.Config(threshold=0.5, dropout=0.0))
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    first = model.loss(x[:, :-1], x[:, 1:]).item()
    opt = torch.optim.AdamW(sara.param_groups(model, 3e-2, 0.0))
    for _ in range(20):
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert model.loss(x[:, :-1], x[:, 1:]).item() < first - 0.1


@pytest.mark.parametrize("kw", [dict(threshold=0.0), dict(threshold=1.5), dict(threshold=float("nan")),
                                dict(threshold=-0.1), dict(init="v0+lambda0"), dict(init="zeros"),
                                dict(dropout=1.0), dict(dropout=-0.1)])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        sara.Config(**kw)
