"""SoRA: the prox, post-pruning, the zero-gate dynamics and the method contract."""
import copy
import dataclasses
import functools
import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
from training import train_step
from conftest import tiny_gpt, tiny_llama
from methods import sora

floats = st.floats(-10, 10, allow_nan=False, width=32)
thresholds = st.floats(0, 5, allow_nan=False, width=32)


def close(a, b):
    """Equal up to fp32 rounding, relative to the size of the values."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + b.abs().max().item()))


def random_layer(seed, in_f, out_f, rmax, zeros):
    """A SoRALinear with random A, B, gates, and the gates in `zeros` set to exactly 0."""
    torch.manual_seed(seed)
    m = sora.SoRALinear(nn.Linear(in_f, out_f), sora.Config(rmax=rmax, dropout=0.0)).eval()
    with torch.no_grad():
        m.lora_B.normal_()
        m.lora_gate[list(zeros)] = 0.0
    return m


def train(model, cfg, steps, lr=1e-2, weight_decay=0.1, seed=0):
    """A few steps of training.train_step (warmup + cosine per group, clipping, the hooks in order)."""
    opt = torch.optim.AdamW(sora.param_groups(model, lr, weight_decay))
    warm = 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    g = torch.Generator().manual_seed(seed)
    model.train()
    figures = []
    for step in range(1, steps + 1):
        x = torch.randint(0, model.cfg.vocab_size, (4, 16), generator=g)
        figures.append(train_step(model, sora, opt, sched, [(x, x.roll(-1, 1))], step, steps)[1])
    return model.eval(), figures


# --- the soft threshold ----------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(floats, min_size=1, max_size=20), thresholds)
def test_soft_threshold_shrinks_by_exactly_xi_or_to_zero(values, xi):
    g = torch.tensor(values)
    t = sora.soft_threshold(g, xi)
    assert torch.equal(t.abs(), (g.abs() - xi).clamp(min=0))  # |T(g)| = max(|g| - xi, 0)
    assert torch.all((t == 0) | (torch.sign(t) == torch.sign(g)))  # never flips a sign
    assert torch.equal(t == 0, g.abs() <= xi)


@settings(max_examples=50, deadline=None)
@given(st.floats(-5, 5, allow_nan=False), st.floats(0, 3, allow_nan=False))
def test_soft_threshold_is_the_prox_of_xi_abs(g, xi):
    """T(g) = argmin_u ½(u - g)² + xi |u|: no point of a fine grid does better, nor do its neighbours."""
    obj = lambda u: 0.5 * (u - g) ** 2 + xi * u.abs()  # noqa: E731
    t = sora.soft_threshold(torch.tensor(g, dtype=torch.float64), xi)
    grid = torch.linspace(-6, 6, 24_001, dtype=torch.float64)
    assert obj(t) <= obj(grid).min() + 1e-12
    assert obj(t) <= obj(t + 1e-6) and obj(t) <= obj(t - 1e-6)


@settings(max_examples=50, deadline=None)
@given(st.lists(floats, min_size=1, max_size=20), thresholds, thresholds)
def test_soft_threshold_composes_and_is_non_expansive(values, a, b):
    g = torch.tensor(values, dtype=torch.float64)
    assert torch.allclose(sora.soft_threshold(sora.soft_threshold(g, a), b), sora.soft_threshold(g, a + b))
    h = g.flip(0)
    assert torch.all((sora.soft_threshold(g, a) - sora.soft_threshold(h, a)).abs() <= (g - h).abs() + 1e-12)


# --- post-pruning ----------------------------------------------------------------------------------

shapes = dict(seed=st.integers(0, 2**16), in_f=st.integers(1, 12), out_f=st.integers(1, 12),
              rmax=st.integers(1, 8), data=st.data())


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_pruning_zero_gates_leaves_outputs_unchanged(seed, in_f, out_f, rmax, data):
    zeros = data.draw(st.sets(st.integers(0, rmax - 1)))
    m = random_layer(seed, in_f, out_f, rmax, zeros)
    A, B = m.pruned()
    assert A.shape == (rmax - len(zeros), in_f) and B.shape == (out_f, rmax - len(zeros))
    x = torch.randn(3, 5, in_f)
    base = x @ m.weight.T + m.bias
    with torch.no_grad():
        assert close(m(x), base + x @ A.T @ B.T)
        full = m.scale * m.lora_B @ torch.diag(m.lora_gate) @ m.lora_A  # the unpruned ΔW
        assert close(m.delta_weight(), full)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_all_zero_gates_prune_to_rank_0_and_add_nothing(seed, in_f, out_f, rmax, data):
    m = random_layer(seed, in_f, out_f, rmax, range(rmax))
    A, B = m.pruned()
    assert A.shape == (0, in_f) and B.shape == (out_f, 0)
    x = torch.randn(2, in_f)
    w = m.weight.detach().clone()
    with torch.no_grad():
        assert torch.equal(m(x), nn.functional.linear(x, w, m.bias))
        m.merge()
    assert torch.equal(m.weight, w)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_a_zero_gate_gives_its_rank_zero_gradient(seed, in_f, out_f, rmax, data):
    zeros = data.draw(st.sets(st.integers(0, rmax - 1), min_size=1))
    m = random_layer(seed, in_f, out_f, rmax, zeros).train()
    m(torch.randn(4, in_f)).square().sum().backward()
    z = list(zeros)
    assert torch.all(m.lora_A.grad[z] == 0) and torch.all(m.lora_B.grad[:, z] == 0)


# --- the training hooks ----------------------------------------------------------------------------

@pytest.mark.parametrize("gate_init", ["randn", "ones"])
def test_delta_w_is_zero_at_init(tiny_model, gate_init):
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = tiny_model(x)
        sora.apply(tiny_model, sora.Config(gate_init=gate_init, targets=("q", "k", "v", "o")))
        assert torch.equal(tiny_model(x), before)


def test_param_groups_put_the_gates_alone_without_weight_decay():
    """The gates' group starts at the model's lr: the library regime rescales their step in after_step."""
    model = sora.apply(tiny_llama(), sora.Config())
    groups = sora.param_groups(model, 1e-3, 0.1)
    gates = {id(m.lora_gate) for m in sora.layers(model).values()}
    assert [{id(p) for p in g["params"]} == gates for g in groups] == [False, True]
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.1
    assert groups[0]["lr"] == groups[1]["lr"] == 1e-3
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def step_once(model, opt, step, total):
    """The hooks around one optimizer step, gradients as they stand."""
    sora.after_backward(model, step, total)
    opt.step()
    return sora.after_step(model, opt, step, total)


@settings(max_examples=10, deadline=None)
@given(st.floats(1e-4, 1e-1), st.floats(0.01, 20), st.floats(0.1, 50), st.integers(2, 50), st.integers(0, 2**16))
def test_first_step_shrinks_gates_by_exactly_gate_lr_lam_and_zero_gates_stay_zero(lr, gate_lr_total, lam, total,
                                                                                    seed):
    """At init B = 0, so every gate's gradient is exactly zero: Adam moves nothing, only the prox acts,
    with xi = gate_lr_total / total_steps * lam whatever the model's lr (no scheduler: a constant lr)."""
    torch.manual_seed(seed)
    model = sora.apply(tiny_llama(), sora.Config(lam=lam, gate_lr_total=gate_lr_total))
    ls = list(sora.layers(model).values())
    with torch.no_grad():
        ls[0].lora_gate[:3] = 0.0
    before = torch.cat([m.lora_gate.detach().clone() for m in ls])
    opt = torch.optim.AdamW(sora.param_groups(model, lr, 0.1))
    x = torch.randint(0, 97, (2, 8))
    model.train().loss(x, x).backward()
    assert all(torch.equal(m.lora_gate.grad, torch.zeros(16)) for m in ls)
    figures = step_once(model, opt, 1, total)
    after = torch.cat([m.lora_gate.detach() for m in ls])
    assert figures["gate_lr"] == pytest.approx(gate_lr_total / total, rel=1e-12)
    assert torch.equal(after, sora.soft_threshold(before, figures["gate_lr"] * lam))
    assert torch.all(after[:3] == 0)
    assert figures["live_rank"] == int(after.count_nonzero()) and figures["lam"] == lam


def test_threshold_uses_the_lr_of_the_step_just_taken():
    """The scheduler steps after after_step, so xi = gate_lr_t * lam with the schedule's factor of the
    step just taken, read from the group as it stands."""
    model = nn.Module()
    model.layer = sora.SoRALinear(nn.Linear(3, 3), sora.Config(rmax=4, lam=2.0, gate_lr_total=0.4))
    gate = model.layer.lora_gate
    with torch.no_grad():
        gate.fill_(1.0)
    opt = torch.optim.AdamW([{"params": [gate], "lr": 0.1, "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: [1.0, 0.5, 0.0][s])  # factor 1, then 0.5, then 0
    for step, want in ((1, 1 - 0.2 * 2), (2, 1 - 0.2 * 2 - 0.1 * 2)):  # gate_lr_t = 0.4 / 2 * factor
        gate.grad = torch.zeros(4)  # Adam moves nothing: only the prox does
        step_once(model, opt, step, 2)
        sched.step()
        torch.testing.assert_close(gate.detach(), torch.full((4,), want))
    assert "prox_lr" not in opt.param_groups[0]  # nothing stashed in the optimizer


def gate_travel(cfg, total, schedule):
    """How far the hooks around AdamW carry a gate over `total` steps under the constant gradient +1
    (Adam moves a parameter by its lr a step then), lam = 0: the sum of the gate lrs."""
    model = nn.Module()
    model.layer = sora.SoRALinear(nn.Linear(3, 3), cfg)
    gate = model.layer.lora_gate
    start = gate.detach().clone()
    opt = torch.optim.AdamW(sora.param_groups(model, 1e-3, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    lrs = []
    for step in range(1, total + 1):
        gate.grad = torch.ones(cfg.rmax)
        model.layer.lora_A.grad = model.layer.lora_B.grad = None
        lrs.append(step_once(model, opt, step, total)["gate_lr"])
        sched.step()
    return (start - gate.detach()).mean().item(), lrs


@settings(max_examples=10, deadline=None)
@given(total=st.integers(2, 40), gate_lr_total=st.floats(0.1, 5), warmup=st.floats(0, 0.3))
def test_a_gates_travel_over_the_run_does_not_depend_on_its_length(total, gate_lr_total, warmup):
    """Under a constant gradient a gate travels Σ gate_lr_t = gate_lr_total * mean(schedule): at a
    constant schedule gate_lr_total itself, at T steps as at 4T; on a warmup + cosine schedule the
    sum of the step lrs, each gate_lr_total / T times the schedule's factor."""
    cfg = sora.Config(rmax=3, lam=0.0, gate_lr_total=gate_lr_total)
    short, _ = gate_travel(cfg, total, lambda s: 1.0)
    long, _ = gate_travel(cfg, 4 * total, lambda s: 1.0)
    assert short == pytest.approx(gate_lr_total, rel=2e-3) and long == pytest.approx(gate_lr_total, rel=2e-3)

    def cosine(T):
        w = max(1, int(warmup * T))
        return lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, T - w)))
    travel, lrs = gate_travel(cfg, total, cosine(total))
    assert lrs == pytest.approx([gate_lr_total / total * cosine(total)(s) for s in range(total)])
    assert travel == pytest.approx(sum(lrs), rel=2e-3)


def test_the_library_regime_needs_after_backward_before_the_step():
    model = sora.apply(tiny_llama(), sora.Config())
    opt = torch.optim.AdamW(sora.param_groups(model, 1e-3, 0.0))
    with pytest.raises(ValueError, match="call after_backward"):
        sora.after_step(model, opt, 1, 10)


# --- the reference regime ----------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(st.floats(0, 50), st.integers(0, 2**16))
def test_the_reference_regimes_l1_term_is_l1_times_the_mean_abs_gate(l1, seed):
    """extra_loss = l1 * mean|g| over every gate of the model; its gradient l1 * sign(g) / (number of
    gates); zero in the library regime."""
    torch.manual_seed(seed)
    model = sora.apply(tiny_llama(), sora.Config(regime="reference", l1=l1))
    gates = [m.lora_gate for m in sora.layers(model).values()]
    with torch.no_grad():
        gates[0][:2] = 0.0
    flat = torch.cat([g.detach() for g in gates])
    loss = sora.extra_loss(model)
    torch.testing.assert_close(loss, l1 * flat.abs().mean())
    loss.backward()
    for g in gates:
        torch.testing.assert_close(g.grad, l1 * torch.sign(g.detach()) / flat.numel())
    assert sora.extra_loss(sora.apply(tiny_llama(), sora.Config())).item() == 0


@settings(max_examples=10, deadline=None)
@given(st.floats(1e-5, 1e-1), st.floats(0, 0.5), st.integers(0, 2**16))
def test_the_reference_regime_shrinks_by_a_constant_xi_at_any_lr(lr, xi, seed):
    """No gradient: Adam moves nothing, and the prox subtracts xi itself, not scaled by any lr."""
    torch.manual_seed(seed)
    model = sora.apply(tiny_llama(), sora.Config(regime="reference", xi=xi))
    ls = list(sora.layers(model).values())
    before = torch.cat([m.lora_gate.detach().clone() for m in ls])
    opt = torch.optim.AdamW(sora.param_groups(model, lr, 0.0))
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]  # the gates at the model's lr
    for m in ls:
        m.lora_gate.grad = torch.zeros_like(m.lora_gate)
    figures = step_once(model, opt, 1, 10)
    after = torch.cat([m.lora_gate.detach() for m in ls])
    assert torch.equal(after, sora.soft_threshold(before, xi))
    assert figures == {"live_rank": int(after.count_nonzero()), "xi": xi}


def test_lam_schedule_rises_in_stages_from_lam_to_lam_max():
    cfg = sora.Config(lam=0.5, lam_max=2.0, lam_stages=4)
    lams = [sora.lam_at(cfg, s, 100) for s in range(1, 101)]
    assert lams[0] == 0.5 and lams[-1] == 2.0 and lams == sorted(lams)
    assert sorted(set(lams)) == [0.5, 1.0, 1.5, 2.0] and lams.count(0.5) == 25
    assert {sora.lam_at(sora.Config(lam=0.3), s, 100) for s in range(1, 101)} == {0.3}


def test_large_lam_drives_gates_to_exactly_zero(tiny_model):
    """With xi far above Adam's step, gates die within a few dozen steps; the ranks follow them."""
    cfg = sora.Config(rmax=8, lam=50.0, targets=("q", "v"))
    model, figures = train(sora.apply(tiny_model, cfg), cfg, steps=30)
    live = [f["live_rank"] for f in figures]
    full = 8 * len(sora.layers(model))
    assert live == sorted(live, reverse=True) and live[-1] < full / 2  # lam > 1: no gate ever revives
    r = sora.ranks(model)
    assert sum(r.values()) == live[-1] and min(r.values()) < 8
    factors = sora.to_lora(model)
    assert {n: A.shape[0] for n, (A, B) in factors.items()} == r
    json.dumps(figures)


def test_zero_lam_prunes_nothing(tiny_model):
    cfg = sora.Config(rmax=4, lam=0.0, gate_init="ones")
    model, figures = train(sora.apply(tiny_model, cfg), cfg, steps=5)
    assert all(f["live_rank"] == 4 * len(sora.layers(model)) for f in figures)


# --- after training ----------------------------------------------------------------------------------

@functools.cache
def trained_once(family):
    """A model with trained A, B and some gates at zero (so pruning has work to do)."""
    cfg = sora.Config(rmax=6, lam=5.0, targets=("q", "v", "o"))
    torch.manual_seed(0)
    model, _ = train(sora.apply(tiny_llama() if family == "llama" else tiny_gpt(), cfg), cfg, steps=12)
    with torch.no_grad():
        for i, m in enumerate(sora.layers(model).values()):
            m.lora_gate[: i % 3 + 1] = 0.0
            if i == 0:
                m.lora_gate.zero_()  # one module of rank 0
    return model, cfg


@pytest.fixture(params=["llama", "gpt"])
def trained(request):
    """(a copy of the trained model, its Config, the function that builds its base model)."""
    model, cfg = trained_once(request.param)
    return copy.deepcopy(model), cfg, tiny_llama if request.param == "llama" else tiny_gpt


def test_to_lora_reproduces_the_forward(trained):
    model, _, _ = trained
    factors = sora.to_lora(model)
    assert factors.keys() == sora.layers(model).keys()
    assert min(A.shape[0] for A, B in factors.values()) == 0
    x = torch.randn(2, 5, model.cfg.dim)
    for name, m in sora.layers(model).items():
        A, B = factors[name]
        assert A.shape[0] == sora.ranks(model)[name]
        with torch.no_grad():
            assert close(m(x), nn.functional.linear(x, m.weight + B @ A, m.bias))


def test_merge_equals_unmerged_forward(trained):
    model, _, _ = trained
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        y = model(x)
        sora.merge(model)
        assert close(model(x), y)
    assert not sora.layers(model) and not any("lora_" in k for k in model.state_dict())


def test_save_load_adapter_gives_identical_logits(trained, tmp_path):
    model, cfg, base_model = trained
    adapters.save_adapter(model, tmp_path, "sora", cfg, model_config=dataclasses.asdict(model.cfg))
    fresh, _ = adapters.load_adapter(base_model(), tmp_path)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert sora.ranks(fresh) == sora.ranks(model)


@pytest.mark.parametrize("bad", [dict(rmax=0), dict(rmax=-3), dict(dropout=1.0), dict(dropout=-0.1),
                                 dict(lam=-1.0), dict(lam=1.0, lam_max=0.5), dict(lam_stages=1),
                                 dict(gate_init="zeros"), dict(alpha=0.0), dict(lam=math.nan),
                                 dict(lam_max=math.inf), dict(regime="paper"), dict(gate_lr_total=0.0),
                                 dict(regime="reference", lam_max=1.0), dict(xi=-1e-3), dict(l1=math.inf)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        sora.Config(**bad)


def test_unknown_target_raises():
    with pytest.raises(ValueError):
        sora.apply(tiny_llama(), sora.Config(targets=("nope",)))
