"""SaLoRA: Hard-Concrete gates, expected L0, the density constraint's multiplier, and the contract."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import adapters
from training import train_step
from conftest import tiny_gpt, tiny_llama
from methods import salora

SETTINGS = settings(max_examples=25, deadline=None)


def batch(seed=0, B=2, T=8, vocab=97):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    return x, torch.roll(x, -1, 1)


def perturb(model, seed, closed=0.3):
    """Random B and log α (a share of gates closed), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in salora.layers(model).values():
            m.lora_B.normal_(0, 0.5, generator=g)
            shut = torch.rand(m.lora_logalpha.shape, generator=g) < closed
            m.lora_logalpha.copy_(torch.where(shut, -5.0, torch.randn(m.lora_logalpha.shape, generator=g)))
    return model


def train(model, steps, total_steps=None, lr=1e-2, on_step=lambda figures: None):
    """training.train_step at a constant lr, one micro-batch per step; after_step's figures per step."""
    total_steps = total_steps or steps
    model.train()
    opt = torch.optim.AdamW(salora.param_groups(model, lr, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [batch()]
    history = []
    for step in range(1, steps + 1):
        history.append(train_step(model, salora, opt, sched, batches, step, total_steps)[1])
        on_step(history[-1])
    return history


# --- the gate ---------------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=16), st.floats(0.05, 3.0), st.integers(0, 2**31))
def test_gates_lie_in_unit_interval(logalpha, tau, seed):
    torch.manual_seed(seed)
    la = torch.tensor(logalpha).expand(64, -1)
    for g in (salora.sample_gates(la, tau), salora.eval_gates(la)):
        assert g.min() >= 0 and g.max() <= 1


@settings(max_examples=10, deadline=None)
@given(st.lists(st.floats(-4, 4), min_size=1, max_size=4), st.floats(0.3, 1.5), st.integers(0, 2**31))
def test_expected_l0_matches_monte_carlo(logalpha, tau, seed):
    torch.manual_seed(seed)
    la = torch.tensor(logalpha)
    n = 200_000
    mc = (salora.sample_gates(la.expand(n, -1), tau) > 0).double().mean(0)
    p = salora.expected_l0(la, tau).double()
    assert torch.all((mc - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4)


@SETTINGS
@given(st.integers(1, 16), st.floats(-8, 8), st.floats(0.01, 4), st.floats(0.3, 1.5))
def test_expected_l0_in_open_interval_and_increasing(r, start, step, tau):
    la = torch.full((r,), start)
    e = salora.expected_l0(la, tau).sum()
    assert 0 < e < r
    assert torch.all(salora.expected_l0(la + step, tau) > salora.expected_l0(la, tau))


def test_init_opens_every_rank():
    model = salora.apply(tiny_llama(), salora.Config())
    for m in salora.layers(model).values():
        assert torch.all(salora.eval_gates(m.lora_logalpha) == 1)
        assert torch.all(salora.expected_l0(m.lora_logalpha, m.tau) > 0.98)


def test_eval_gates_deterministic_and_one_mask_per_batch():
    model = perturb(salora.apply(tiny_llama(), salora.Config(dropout=0.0, targets=("q", "v", "o"))), 0, 0.0)
    x, _ = batch(B=1)
    x = x.expand(3, -1)  # three identical examples
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert torch.equal(model(x), model(x))  # training, but before the window: the eval gates
        for m in salora.layers(model).values():
            m.sampling.fill_(True)
        torch.manual_seed(0)
        a, b = model(x), model(x)
    assert not torch.equal(a, b)  # a fresh mask each forward ...
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])  # ... shared by the batch's examples


def step_hooks(model, opt, step, total):
    """after_backward and after_step around an optimizer step that moves nothing (no gradients)."""
    salora.after_backward(model, step, total)
    opt.step()
    return salora.after_step(model, opt, step, total)


@SETTINGS
@given(total=st.integers(3, 60), data=st.data())
def test_gates_are_sampled_in_the_window_only(total, data):
    """after_step of step t sets the sampling of step t + 1: on exactly at t_start T < t + 1 <= t_end T, so
    the last part of a run trains with the gates it will be evaluated with."""
    t_start = data.draw(st.integers(0, total - 1))
    t_end = data.draw(st.integers(t_start + 1, total))
    model = salora.apply(tiny_llama(), salora.Config(t_start=t_start / total, t_end=t_end / total))
    assert salora.window(salora.config(model), total) == (t_start, t_end)
    opt = torch.optim.AdamW(salora.param_groups(model, 1e-3, 0.0))
    for step in range(1, total + 1):
        step_hooks(model, opt, step, total)
        flags = {bool(m.sampling) for m in salora.layers(model).values()}
        assert flags == {t_start < step + 1 <= t_end}


@SETTINGS
@given(t_start=st.floats(0, 0.9), width=st.floats(0.05, 1), total=st.integers(20, 2000))
def test_the_window_is_a_share_of_the_run(t_start, width, total):
    """t_start and t_end are fractions of total_steps: the window sits at the same place in a run of
    any length (to the nearest step)."""
    cfg = salora.Config(t_start=t_start, t_end=min(1.0, t_start + width))
    try:
        ws, we = salora.window(cfg, total)
    except ValueError:  # a run too short for the window to hold a step
        assert int(cfg.t_start * total + 0.5) >= int(cfg.t_end * total + 0.5)
        return
    assert abs(ws - cfg.t_start * total) <= 0.5 and abs(we - cfg.t_end * total) <= 0.5
    assert salora.window(cfg, 4 * total) == pytest.approx((4 * ws, 4 * we), abs=2)


def run_with_constant_gradient(cfg, total, schedule=lambda s: 1.0):
    """The hooks around AdamW over `total` steps where every log α has the gradient +1 (so Adam moves
    it by its lr a step); returns after_step's figures and the log α after each step."""
    model = salora.apply(tiny_llama(), cfg)
    opt = torch.optim.AdamW(salora.param_groups(model, 1e-3, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    figures, logalpha = [], []
    for step in range(1, total + 1):
        for m in salora.layers(model).values():
            m.lora_logalpha.grad = torch.ones_like(m.lora_logalpha)
        salora.after_backward(model, step, total)
        opt.step()
        figures.append(salora.after_step(model, opt, step, total))
        logalpha.append(torch.cat([m.lora_logalpha.detach().clone() for m in salora.layers(model).values()]))
        sched.step()
        opt.zero_grad()
    return figures, logalpha


@settings(max_examples=8, deadline=None)
@given(tenths=st.integers(2, 6), gate_lr_total=st.floats(0.5, 40))
def test_log_alpha_travels_the_same_over_the_window_at_any_length(tenths, gate_lr_total):
    """Each step in the window moves log α by gate_lr_total / total_steps (under a constant gradient and
    schedule), so its travel over the window, gate_lr_total * (t_end - t_start), does not depend on
    the run's length."""
    cfg = salora.Config(rmax=2, gate_lr_total=gate_lr_total)
    travel = []
    for total in (10 * tenths, 40 * tenths):
        figures, logalpha = run_with_constant_gradient(cfg, total)
        ws, we = salora.window(cfg, total)
        lrs = [f["gate_lr"] for f in figures]
        assert lrs == pytest.approx([gate_lr_total / total if ws < s <= we else 0.0 for s in range(1, total + 1)])
        for s in range(2, we):  # every step but the last of the window (which hardens the gates)
            moved = logalpha[s - 2] - logalpha[s - 1]
            # float32 holds the optimizer's step (lr 1e-3) on a log α of ~3 to ~1e-4 of itself: the rescale keeps that
            torch.testing.assert_close(moved, torch.full_like(moved, lrs[s - 1]), rtol=2e-3, atol=1e-6)
        travel.append(sum(lrs))
    assert travel[0] == pytest.approx(travel[1]) == pytest.approx(gate_lr_total * 0.6)


# --- the regularisers and the multiplier -------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 6), st.integers(0, 2**31))
def test_orthogonality_zero_only_at_orthonormal_factors(r, extra_in, extra_out, seed):
    torch.manual_seed(seed)
    m = salora.SaLoRALinear(nn.Linear(r + extra_in, r + extra_out), salora.Config(rmax=r, dropout=0.0)).double()
    with torch.no_grad():
        m.lora_A.copy_(torch.linalg.qr(torch.randn(r + extra_in, r).double())[0].T)  # orthonormal rows
        m.lora_B.copy_(torch.linalg.qr(torch.randn(r + extra_out, r).double())[0])  # orthonormal columns
    reg = salora.orthogonality(m)
    reg.backward()
    assert reg < 1e-20 and m.lora_A.grad.abs().max() < 1e-9 and m.lora_B.grad.abs().max() < 1e-9
    with torch.no_grad():
        m.lora_A.mul_(1.1)
    assert salora.orthogonality(m) > 1e-3


@SETTINGS
@given(st.floats(0.05, 1.0), st.floats(0, 10), st.lists(st.floats(-6, 6), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_lambda_never_negative_nor_decreasing(b, lr, moves, seed):
    total = len(moves)
    model = salora.apply(tiny_llama(), salora.Config(target_density=b, lagrangian_lr_total=lr * total, t_start=0,
                                                     t_end=1.0))
    opt = torch.optim.AdamW(salora.param_groups(model, 1e-3, 0.0))
    lams = [salora.multiplier(model).item()]
    g = torch.Generator().manual_seed(seed)
    for step, move in enumerate(moves, 1):
        with torch.no_grad():
            for m in salora.layers(model).values():
                m.lora_logalpha.add_(move * torch.rand(m.lora_logalpha.shape, generator=g))
        c = salora.density(model).item()
        figures = step_hooks(model, opt, step, total)
        assert figures["lam"] == salora.multiplier(model).item()
        assert figures["lam"] == pytest.approx(lams[-1] + lr * (c - b) ** 2, rel=1e-5, abs=1e-6)  # lr a step
        lams.append(figures["lam"])
    assert all(0 <= before <= after for before, after in zip(lams, lams[1:]))


def test_lambda_unchanged_when_density_on_target():
    model = salora.apply(tiny_llama(), salora.Config(lagrangian_lr_total=50.0, t_start=0))
    salora.multiplier(model).fill_(2.5)
    salora.config(model).target_density = salora.density(model).item()
    assert step_hooks(model, torch.optim.AdamW(salora.param_groups(model, 1e-3, 0.0)), 1, 10)["lam"] == 2.5


def test_extra_loss_is_orthogonality_and_density_terms():
    model = salora.apply(tiny_llama(), salora.Config(beta=0.3, target_density=0.4))
    salora.multiplier(model).fill_(2.0)
    layers = salora.layers(model).values()
    sizes = [m.in_features + m.out_features for m in layers]
    kept = sum(salora.expected_l0(m.lora_logalpha, m.tau).sum() * d for m, d in zip(layers, sizes))
    total = sum(m.lora_A.shape[0] * d for m, d in zip(layers, sizes))
    want = 0.3 * sum(salora.orthogonality(m) for m in layers) / len(layers) + 2.0 * (kept / total - 0.4) ** 2
    torch.testing.assert_close(salora.extra_loss(model), want)


# --- dynamics ------------------------------------------------------------------------------------------

def test_density_moves_toward_target_and_ranks_close():
    cfg = salora.Config(rmax=4, dropout=0.0, target_density=0.5, lagrangian_lr_total=40.0, gate_lr_total=8.0,
                        t_start=0, t_end=1.0, targets=("q", "v", "o"))
    model = tiny_llama(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16)
    history = train(salora.apply(model, cfg), 40)
    start, end = history[0]["density"], history[-2]["density"]  # the last step hardens the gates
    assert start > 0.95 and abs(end - 0.5) < 0.1 < abs(start - 0.5)
    assert history[-1]["lam"] > 0
    assert sum(salora.ranks(model).values()) < 4 * len(salora.layers(model))


def test_gates_and_lambda_frozen_outside_window():
    # droprate 0.5: log α ≈ 0, so few sampled gates sit clamped at 0 or 1 (where their gradient is 0)
    cfg = salora.Config(rmax=4, dropout=0.0, gate_lr_total=0.6, t_start=2 / 6, t_end=4 / 6, droprate_init=0.5)
    model = tiny_llama(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=16)
    salora.apply(model, cfg)
    gates = [m.lora_logalpha for m in salora.layers(model).values()]
    snapshots = [[g.detach().clone() for g in gates]]
    lams = [0.0]

    def snapshot(figures):
        snapshots.append([g.detach().clone() for g in gates])
        lams.append(figures["lam"])

    torch.manual_seed(0)
    train(model, 6, on_step=snapshot)
    moved = [not all(torch.equal(a, b) for a, b in zip(s0, s1)) for s0, s1 in zip(snapshots, snapshots[1:])]
    assert moved == [False, False, True, True, False, False]
    assert [b > a for a, b in zip(lams, lams[1:])] == moved


@SETTINGS
@given(shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=5),
       rmax=st.integers(1, 6), b=st.floats(0.05, 1.0), seed=st.integers(0, 2**31))
def test_harden_leaves_every_gate_0_or_1_and_the_most_open_ranks_within_the_budget(shapes, rmax, b, seed):
    model = nn.Sequential(*(nn.Linear(i, o) for i, o in shapes))
    salora.apply(model, salora.Config(rmax=rmax, target_density=b, targets=tuple(map(str, range(len(shapes))))))
    mods = list(salora.layers(model).values())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mods:
            m.lora_logalpha.copy_(3 * torch.randn(rmax, generator=g))
    before = torch.cat([m.lora_logalpha.detach().clone() for m in mods])
    sizes = torch.tensor([float(m.in_features + m.out_features) for m in mods for _ in range(rmax)])
    salora.harden(model)
    gates = torch.cat([salora.eval_gates(m.lora_logalpha) for m in mods])
    assert set(gates.tolist()) <= {0.0, 1.0}
    kept = gates == 1
    assert sizes[kept].sum() <= b * sizes.sum()  # the budget holds exactly, not in expectation
    likely = salora.expected_l0(before, salora.config(model).temperature) >= 0.5
    assert not (kept & ~likely).any()  # no rank more likely closed than open is opened
    if kept.any() and (~kept).any():
        assert before[kept].min() >= before[~kept].max() or not likely[~kept].any()
    left = likely & ~kept  # a likely-open rank is closed only where the budget has no room for it
    if left.any():
        top = before.masked_fill(~left, -math.inf).argmax()
        assert sizes[kept].sum() + sizes[top] > b * sizes.sum()
    assert sum(salora.ranks(model).values()) == int(kept.sum())


@settings(max_examples=6, deadline=None)
@given(total=st.integers(10, 30), b=st.floats(0.2, 1.0), seed=st.integers(0, 2**16))
def test_a_run_ends_with_every_gate_0_or_1_and_within_its_budget(total, b, seed):
    """train.train_step over a whole run at the defaults' fractions: from the window's end on the gates
    are 0 or 1, and the live parameters (to_lora's) are at most target_density of the adapter's."""
    torch.manual_seed(seed)
    model = salora.apply(tiny_llama(), salora.Config(rmax=4, target_density=b))
    history = train(model, total)
    _, t_end = salora.window(salora.config(model), total)
    gates = torch.cat([salora.eval_gates(m.lora_logalpha) for m in salora.layers(model).values()])
    assert set(gates.tolist()) <= {0.0, 1.0}
    live = sum(a.numel() + b_.numel() for a, b_ in salora.to_lora(model).values())
    full = sum(m.lora_A.numel() + m.lora_B.numel() for m in salora.layers(model).values())
    assert live <= b * full
    assert all(f["gate_lr"] == 0.0 for f in history[t_end:])  # the gates are frozen after the window


def test_default_window_from_total_steps():
    assert salora.window(salora.Config(), 1000) == (100, 700)
    assert salora.window(salora.Config(t_start=0.005, t_end=0.05), 1000) == (5, 50)


# --- the contract -----------------------------------------------------------------------------------

def test_zero_delta_at_init(tiny_model):
    x, _ = batch()
    with torch.no_grad():
        base = tiny_model(x)
        salora.apply(tiny_model, salora.Config(targets=("q", "k", "v", "o")))
        assert torch.equal(tiny_model(x), base)
        tiny_model.train()
        assert torch.equal(tiny_model(x), base)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8), st.floats(0, 1), st.integers(0, 2**31))
def test_to_lora_reproduces_eval_forward(d_in, d_out, rmax, closed, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out).double())
    salora.apply(model, salora.Config(rmax=rmax, targets=("0",)))
    perturb(model.double(), seed, closed).eval()
    x = torch.randn(5, d_in, dtype=torch.float64)
    (name, (a, b)), = salora.to_lora(model).items()
    assert a.shape == (salora.ranks(model)[name], d_in) and b.shape == (d_out, a.shape[0])
    lin = model[0]
    with torch.no_grad():
        torch.testing.assert_close(x @ (lin.weight + b @ a).T + lin.bias, model(x), rtol=1e-12, atol=1e-12)


def test_ranks_count_open_eval_gates():
    model = salora.apply(tiny_llama(), salora.Config(rmax=4))
    first, m = next(iter(salora.layers(model).items()))
    with torch.no_grad():
        m.lora_logalpha.copy_(torch.tensor([5.0, -5.0, 0.0, -2.3]))  # eval gates 1, 0, 0.5, > 0
    assert salora.ranks(model)[first] == 3
    assert all(r == 4 for n, r in salora.ranks(model).items() if n != first)


def test_param_groups_give_gates_own_group_without_decay():
    """log α's group starts at the model's lr: after_step rescales its step to gate_lr_t."""
    model = salora.apply(tiny_llama(), salora.Config(gate_lr_total=7.0))
    factors, gates = salora.param_groups(model, 1e-3, 0.1)
    assert factors["lr"] == 1e-3 and factors["weight_decay"] == 0.1
    assert gates["lr"] == 1e-3 and gates["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("lora_logalpha") for p in gates["params"])
    assert len(factors["params"]) + len(gates["params"]) == sum(p.requires_grad for p in model.parameters())


def test_save_load_gives_identical_logits(tiny_model, tmp_path):
    cfg = salora.Config(rmax=4, targets=("q", "v", "o"))
    model = perturb(salora.apply(tiny_model, cfg), 1).eval()
    adapters.save_adapter(model, tmp_path, "salora", cfg, model_config=dataclasses.asdict(model.cfg))
    fresh = tiny_llama() if type(model).__name__ == "Llama" else tiny_gpt()
    adapters.load_adapter(fresh, tmp_path)
    fresh.eval()
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert torch.equal(salora.multiplier(fresh), torch.zeros(()))  # training state, not in the adapter file
    first = next(iter(salora.layers(model)))
    assert f"{first}.lam" in dict(model.named_buffers()) and f"{first}.lam" not in model.state_dict()
    assert not dict(model.named_buffers(recurse=False)).keys() & {"lam", "lora_lam"}  # nothing on the root


@pytest.mark.parametrize("bad", [dict(rmax=0), dict(target_density=0.0), dict(target_density=1.5),
                                 dict(beta=-1.0), dict(temperature=0.0), dict(t_start=-0.1),
                                 dict(t_start=0.5, t_end=0.5), dict(t_end=0.0), dict(t_end=1.5),
                                 dict(lagrangian_lr_total=-0.1), dict(gate_lr_total=0.0),
                                 dict(droprate_init=0.0), dict(droprate_init=1.0),
                                 dict(dropout=1.0)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        salora.Config(**bad)


def test_droprate_init_sets_log_alpha():
    model = salora.apply(tiny_llama(), salora.Config(droprate_init=0.3))
    la = torch.cat([m.lora_logalpha for m in salora.layers(model).values()])
    assert abs(la.mean().item() - math.log(0.7 / 0.3)) < 0.01 and la.std().item() < 0.03
