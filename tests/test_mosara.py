"""Mo-SARA: frozen singular vectors, routed singular-value heads, v = 0 at init, m = 1 is a LoRA."""
import pytest
import torch
import torch.nn as nn
from conftest import drive, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from methods import mosara

FAST = settings(max_examples=30, deadline=None)
dims = st.integers(1, 24)
thresholds = st.floats(1e-3, 1.0)
heads = st.integers(1, 7)
seeds = st.integers(0, 10**6)


def matrix(out, inp, seed):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


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

    def __init__(self, w):
        super().__init__()
        self.proj = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(w)
        self.requires_grad_(False).eval()

    def forward(self, x):
        return self.proj(x)


def one(out, inp, seed, t, m):
    return mosara.apply(One(matrix(out, inp, seed)), mosara.Config(threshold=t, heads=m, targets=("proj",)))


def randomise(model, seed=0, keep_v=False):
    """Give the trainable tensors random values, as training would (v stays 0 with keep_v)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not (keep_v and n.endswith("lora_v")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def train_steps(model, steps=3, lr=3e-2, seed=0):
    """A few steps of training.train_step; the method logs nothing."""
    assert all(f == {} for f in drive(mosara, model, steps, lr, seed))
    return model


# --- the frozen basis ------------------------------------------------------------------------------

@FAST
@given(out=dims, inp=dims, seed=seeds, t=thresholds)
def test_basis_is_the_top_k_singular_vectors_of_w0(out, inp, seed, t):
    w = matrix(out, inp, seed)
    U, V = mosara.top_singular(w, t)
    k = U.shape[1]
    assert k == k_literal(w, t) and V.shape == (k, inp) and U.shape == (out, k)
    eye = torch.eye(k)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(V @ V.T, eye, atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(w.double()).float()
    # U diag(σ_k) V is the best rank-k approximation: its error is the tail of the spectrum
    torch.testing.assert_close((w - U @ torch.diag(s[:k]) @ V).norm(), s[k:].norm(), atol=1e-4, rtol=1e-4)


def test_a_bfloat16_weight_gets_the_basis_of_its_values():
    w = matrix(32, 32, 0).bfloat16()
    for t in (0.1, 0.5, 0.9, 1.0):
        for got, want in zip(mosara.top_singular(w, t), mosara.top_singular(w.float(), t)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("w", [torch.zeros(4, 6), torch.full((3, 3), float("inf"))])
def test_matrices_without_a_spectrum_raise(w):
    with pytest.raises(ValueError):
        mosara.top_singular(w, 0.5)


# --- the router ------------------------------------------------------------------------------------

@FAST
@given(out=dims, inp=dims, seed=seeds, t=thresholds, m=heads)
def test_router_rows_are_a_distribution_led_by_an_extreme_of_w2(out, inp, seed, t, m):
    layer = randomise(one(out, inp, seed, t, m), seed).proj
    z = torch.randn(6, 3, layer.lora_U.shape[1]) * 3
    g = layer.gates(z)
    assert g.shape == (6, 3, m) and (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(6, 3))
    # one logit unit per token: only the largest or the smallest w2 can win
    w2 = layer.lora_w2[0]
    assert set(g.argmax(-1).flatten().tolist()) <= {int(w2.argmax()), int(w2.argmin())}


@FAST
@given(out=dims, inp=dims, seed=seeds, t=thresholds, m=heads)
def test_output_is_the_base_for_any_lambda_and_router_while_v_is_zero(out, inp, seed, t, m):
    model = randomise(one(out, inp, seed, t, m), seed, keep_v=True)
    x = torch.randn(5, inp)
    assert torch.equal(model(x), model.proj.base(x))  # the wrapped layer's own output, to the bit


def test_router_weights_are_mean_gates_of_the_last_forward(tiny_model):
    mosara.apply(tiny_model, mosara.Config(threshold=0.5, heads=4))
    assert mosara.router_weights(tiny_model) == {}
    randomise(tiny_model)
    x = torch.randint(0, 97, (2, 12))
    tiny_model(x)
    weights = mosara.router_weights(tiny_model)
    assert weights.keys() == mosara.layers(tiny_model).keys()
    for name, w in weights.items():
        assert len(w) == 4 and abs(sum(w) - 1) < 1e-5
    layer = next(iter(mosara.layers(tiny_model).values()))
    name = next(iter(mosara.layers(tiny_model)))
    z = torch.randn(7, layer.lora_U.shape[1])
    layer(z @ layer.lora_V)  # a forward of its own: the layer now reports these tokens
    torch.testing.assert_close(torch.tensor(mosara.router_weights(tiny_model)[name]),
                               layer.gates(z).mean(0))


# --- the adapter -----------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 5])
def test_trainable_count_is_m_k_plus_out_plus_k_plus_m(tiny_model, m):
    mosara.apply(tiny_model, mosara.Config(threshold=0.5, heads=m))
    expected = sum(m * k + mosara.layers(tiny_model)[n].out_features + k + m
                   for n, k in mosara.ranks(tiny_model).items())
    assert sum(p.numel() for p in tiny_model.parameters() if p.requires_grad) == expected


def test_ranks_follow_algorithm_1(tiny_model):
    wanted = {n: k_literal(m.weight, 0.5) for n, m in mosara.find_targets(tiny_model, ("q", "v")).items()}
    mosara.apply(tiny_model, mosara.Config(threshold=0.5))
    assert mosara.ranks(tiny_model) == wanted


@FAST
@given(out=dims, inp=dims, seed=seeds, t=thresholds)
def test_one_head_to_lora_reproduces_the_forward(out, inp, seed, t):
    model = randomise(one(out, inp, seed, t, 1), seed)
    x = torch.randn(5, inp)
    A, B = mosara.to_lora(model)["proj"]
    assert A.shape == (model.proj.lora_U.shape[1], inp) and B.shape == (out, A.shape[0])
    expected = x @ model.proj.weight.T + model.proj.bias + (x @ A.T) @ B.T
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_several_heads_refuse_to_merge_and_leave_the_model_untouched(tiny_model):
    randomise(mosara.apply(tiny_model, mosara.Config(heads=3)))
    x = torch.randint(0, 97, (2, 12))
    y = tiny_model(x)
    with pytest.raises(ValueError, match="per token"):
        mosara.to_lora(tiny_model)
    with pytest.raises(ValueError, match="per token"):
        mosara.merge(tiny_model)
    with pytest.raises(ValueError, match="per token"):
        next(iter(mosara.layers(tiny_model).values())).merge()
    assert len(mosara.layers(tiny_model)) == 4
    assert torch.equal(tiny_model(x), y)


def test_at_init_only_v_gets_a_gradient():
    model = mosara.apply(tiny_llama(), mosara.Config())
    x = torch.randint(0, 97, (2, 12))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    for m in mosara.layers(model).values():
        assert m.lora_v.grad.abs().sum() > 0
        for p in (m.lora_lam, m.lora_w1, m.lora_w2):
            assert torch.equal(p.grad, torch.zeros_like(p))


def test_only_adapters_train_and_base_weights_stay_bit_identical(tiny_model):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mosara.apply(tiny_model, mosara.Config())
    frozen = {n: b.clone() for n, b in tiny_model.named_buffers() if "lora_" in n}
    assert {n for n, p in tiny_model.named_parameters() if p.requires_grad} == {
        n for n in dict(tiny_model.named_parameters()) if "lora_" in n}
    before = {n: p.clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
    train_steps(tiny_model)
    after = tiny_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    # v moves at step 1; then lambda and the router get gradients too
    assert all(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("kw", [dict(threshold=0.0), dict(threshold=1.01), dict(threshold=float("nan")),
                                dict(heads=0), dict(heads=-2), dict(dropout=1.0), dict(dropout=-0.5)])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        mosara.Config(**kw)
