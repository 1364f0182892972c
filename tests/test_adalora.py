"""AdaLoRA: the budget schedule, exact masking, the scores, the orthogonality loss, and the contract."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

import adapters
from training import train_step
from methods import adalora
from conftest import tiny_gpt, tiny_llama
from models import Llama

SETTINGS = settings(max_examples=30, deadline=None)


def batch(seed=0, B=2, T=8, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def train(model, cfg, total_steps, lr=1e-2, seed=0):
    """training.train_step at a constant lr; return the model, after_step's figures and the mask of all
    triplets after each step."""
    adalora.apply(model, cfg)
    model.train()
    opt = torch.optim.AdamW(adalora.param_groups(model, lr, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batches = [batch(seed)]
    figures, masks = [], []
    for step in range(1, total_steps + 1):
        figures.append(train_step(model, adalora, opt, sched, batches, step, total_steps)[1])
        masks.append(torch.cat([m.lora_mask for m in adalora.layers(model).values()]).clone())
    return model.eval(), figures, masks


def masked_linear(seed, init_r, in_f=6, out_f=5):
    """One SVDLinear with random E and a random mask applied."""
    torch.manual_seed(seed)
    m = adalora.SVDLinear(nn.Linear(in_f, out_f), adalora.Config(init_r=init_r, target_r=1, dropout=0.0))
    with torch.no_grad():
        m.lora_E.normal_()
    m.set_mask(torch.rand(init_r) < 0.5)
    return m


# --- the schedule --------------------------------------------------------------------------------

@st.composite
def schedules(draw):
    init_r = draw(st.integers(1, 16))
    target_r = draw(st.integers(1, init_r))
    total = draw(st.integers(1, 300))
    tinit = draw(st.floats(0, 0.95))
    tfinal = draw(st.floats(0, 0.99 - tinit))
    cfg = adalora.Config(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal)
    return cfg, total, draw(st.integers(1, 8))


@SETTINGS
@given(schedules())
def test_budget_falls_from_init_to_target(case):
    cfg, total, n = case
    try:
        tinit, tfinal = adalora.phases(cfg, total)
    except ValueError:
        assume(False)
    b = [adalora.budget(t, total, cfg, n) for t in range(1, total + 1)]
    assert all(type(v) is int for v in b)
    assert all(x >= y for x, y in zip(b, b[1:]))  # non-increasing
    assert all(cfg.target_r * n <= v <= cfg.init_r * n for v in b)
    for t, v in enumerate(b, 1):
        if t <= tinit:
            assert v == cfg.init_r * n
        if t >= total - tfinal:
            assert v == cfg.target_r * n
    assert b[-1] == cfg.target_r * n


@SETTINGS
@given(st.integers(1, 100_000))
def test_default_phases_are_10_and_30_percent_and_always_valid(total):
    tinit, tfinal = adalora.phases(adalora.Config(), total)
    assert abs(tinit - total / 10) <= 0.5 and abs(tfinal - 3 * total / 10) <= 0.5
    assert tinit + tfinal < total


@SETTINGS
@given(st.floats(0, 0.5), st.floats(0, 0.45), st.integers(20, 5000), st.integers(1, 8))
def test_the_budget_curve_is_the_same_at_any_length(tinit, tfinal, total, n):
    """tinit and tfinal are shares of the run: at 4x the steps the budget at 4x the step is the
    budget at the step (to the rounding of the phase boundaries and of the budget itself)."""
    cfg = adalora.Config(init_r=12, target_r=8, tinit=tinit, tfinal=tfinal)
    short, long = adalora.phases(cfg, total), adalora.phases(cfg, 4 * total)
    assert all(abs(4 * a - b) <= 2 for a, b in zip(short, long))
    shift = 4 * (cfg.init_r - cfg.target_r) * n * 3 / max(1, total - sum(short))  # the cubic's steepest fall in 4 steps
    for t in range(1, total + 1, max(1, total // 50)):
        assert abs(adalora.budget(t, total, cfg, n) - adalora.budget(4 * t, 4 * total, cfg, n)) <= shift + 1


@pytest.mark.parametrize("tinit,tfinal,total", [(0.5, 0.45, 10), (0.95, 0.0, 10), (0.0, 0.96, 10), (0.66, 0.3, 10)])
def test_no_budgeting_phase_raises(tinit, tfinal, total):
    with pytest.raises(ValueError, match="tinit"):
        adalora.budget(1, total, adalora.Config(tinit=tinit, tfinal=tfinal), 4)


# --- masking -------------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.data())
def test_top_budget_keeps_exactly_b_despite_ties(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    b = data.draw(st.integers(0, len(values)))
    keep = adalora.top_budget(scores, b)
    assert int(keep.sum()) == b
    if 0 < b < len(values):
        assert scores[keep].min() >= scores[~keep].max()
        tied = torch.arange(len(values))[scores == scores[keep].min()]  # at the boundary the lower indices win
        assert keep[tied].tolist() == sorted(keep[tied].tolist(), reverse=True)


@SETTINGS
@given(st.integers(0, 1000), st.integers(1, 5), st.data())
def test_mask_to_budget_over_modules(seed, init_r, data):
    model = adalora.apply(tiny_llama(), adalora.Config(init_r=init_r, target_r=1, targets=("q", "v", "up")))
    mods = list(adalora.layers(model).values())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mods:
            m.lora_E.normal_(generator=g)
            for f in "AEB":  # coarse integer EMAs: many tied triplet scores
                getattr(m, "i_bar_" + f).copy_(torch.randint(0, 3, getattr(m, "lora_" + f).shape, generator=g))
                getattr(m, "u_bar_" + f).fill_(1.0)
    b = data.draw(st.integers(0, init_r * len(mods)))
    adalora.mask_to_budget(mods, b)
    assert sum(adalora.ranks(model).values()) == b
    scores = torch.cat([m.triplet_scores() for m in mods])
    keep = torch.cat([m.lora_mask for m in mods])
    if 0 < b < len(scores):
        assert scores[keep].min() >= scores[~keep].max()
    for m in mods:
        assert torch.equal(m.lora_E[~m.lora_mask], torch.zeros_like(m.lora_E[~m.lora_mask]))
        assert torch.all(m.lora_E[m.lora_mask] != 0)  # live ones untouched


@SETTINGS
@given(st.integers(0, 1000), st.integers(1, 6))
def test_masked_triplets_contribute_nothing(seed, init_r):
    m = masked_linear(seed, init_r)
    x = torch.randn(3, 4, m.in_features)
    before = m(x)
    with torch.no_grad():
        dead = ~m.lora_mask
        m.lora_A[dead] = torch.randn_like(m.lora_A[dead]) * 100
        m.lora_B[:, dead] = torch.randn_like(m.lora_B[:, dead]) * 100
    assert torch.equal(m(x), before)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 4), st.integers(0, 100))
def test_equal_init_and_target_masks_nothing(r, seed):
    model, figures, _ = train(tiny_gpt(seed), adalora.Config(init_r=r, target_r=r, tinit=0.2, tfinal=0.2), 5)
    assert set(adalora.ranks(model).values()) == {r}
    assert all(f["live_rank"] == f["budget"] == r * 4 for f in figures)


# --- scores and the regulariser ------------------------------------------------------------------

@SETTINGS
@given(st.floats(0.01, 0.99), st.floats(0.01, 0.99), st.integers(0, 1000))
def test_ema_first_update_from_zero(beta1, beta2, seed):
    torch.manual_seed(seed)
    m = adalora.SVDLinear(nn.Linear(6, 5), adalora.Config(init_r=3, target_r=1, beta1=beta1, beta2=beta2))
    for f in "AEB":
        p = getattr(m, "lora_" + f)
        p.data.normal_()
        p.grad = torch.randn_like(p)
    m.update_importance()
    for f in "AEB":
        p = getattr(m, "lora_" + f)
        ipt = (p * p.grad).abs()
        torch.testing.assert_close(getattr(m, "i_bar_" + f), (1 - beta1) * ipt)
        torch.testing.assert_close(getattr(m, "u_bar_" + f), (1 - beta2) * beta1 * ipt)


def test_scores_update_until_the_final_phase_only():
    model = adalora.apply(tiny_llama(), adalora.Config(init_r=3, target_r=1, tinit=0.1, tfinal=0.3)).train()
    m = next(iter(adalora.layers(model).values()))
    x, y = batch()
    for step, changes in ((1, True), (7, True), (8, False), (10, False)):  # T = 10: T - tfinal = 7
        with torch.no_grad():
            m.lora_E.normal_()  # so that A and B get gradients too
        before = [getattr(m, k + f).clone() for k in ("i_bar_", "u_bar_") for f in "AEB"]
        model.loss(x, y).backward()
        adalora.after_backward(model, step, 10)
        model.zero_grad(set_to_none=True)
        after = [getattr(m, k + f) for k in ("i_bar_", "u_bar_") for f in "AEB"]
        assert [not torch.equal(a, b) for a, b in zip(after, before)] == [changes] * 6


def test_triplet_score_is_e_plus_row_and_column_means():
    m = adalora.SVDLinear(nn.Linear(6, 5), adalora.Config(init_r=3, target_r=1))
    for f in "AEB":
        getattr(m, "i_bar_" + f).uniform_()
        getattr(m, "u_bar_" + f).uniform_()
    s = {f: getattr(m, "i_bar_" + f) * getattr(m, "u_bar_" + f) for f in "AEB"}
    want = [s["E"][k, 0] + s["A"][k].mean() + s["B"][:, k].mean() for k in range(3)]
    torch.testing.assert_close(m.triplet_scores(), torch.stack(want))


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 4), st.integers(0, 4), st.integers(0, 1000))
def test_orth_loss_zero_iff_orthonormal(r, extra_in, extra_out, seed):
    torch.manual_seed(seed)
    m = adalora.SVDLinear(nn.Linear(r + extra_in, r + extra_out), adalora.Config(init_r=r, target_r=1))
    with torch.no_grad():
        m.lora_A.copy_(torch.linalg.qr(torch.randn(r + extra_in, r))[0].T)  # orthonormal rows
        m.lora_B.copy_(torch.linalg.qr(torch.randn(r + extra_out, r))[0])  # orthonormal columns
    loss = adalora.orth_loss(m)
    assert loss.item() < 1e-5
    loss.backward()
    assert torch.isfinite(m.lora_A.grad).all() and torch.isfinite(m.lora_B.grad).all()
    with torch.no_grad():
        m.lora_A[0] *= 1.5
    assert adalora.orth_loss(m).item() > 0.1


def test_extra_loss_is_weighted_mean_over_a_and_b():
    model = adalora.apply(tiny_llama(), adalora.Config(init_r=3, target_r=1, orth_reg_weight=0.3))
    mods = list(adalora.layers(model).values())
    terms = [torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - torch.eye(3)) for m in mods]
    terms += [torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - torch.eye(3)) for m in mods]
    torch.testing.assert_close(adalora.extra_loss(model), 0.3 * torch.stack(terms).mean())
    off = adalora.apply(tiny_llama(), adalora.Config(orth_reg_weight=0.0))
    assert adalora.extra_loss(off).item() == 0


# --- the contract --------------------------------------------------------------------------------

def test_training_shrinks_ranks_to_the_budget():
    cfg = adalora.Config(init_r=4, target_r=2, tinit=2 / 14, tfinal=4 / 14, targets=("q", "k", "v", "o"))
    model, figures, _ = train(tiny_llama(), cfg, total_steps=14)
    n = len(adalora.layers(model))
    budgets = [f["budget"] for f in figures]
    assert budgets[:2] == [4 * n] * 2 and budgets[-5:] == [2 * n] * 5
    assert all(x >= y for x, y in zip(budgets, budgets[1:])) and len(set(budgets)) > 2
    assert all(f["live_rank"] == f["budget"] for f in figures)  # delta_t = 1: masked every step
    r = adalora.ranks(model)
    assert sum(r.values()) == figures[-1]["live_rank"] == 2 * n
    assert len(set(r.values())) > 1  # the budget went where the scores put it, not uniformly
    for m in adalora.layers(model).values():  # the final pattern holds exact zeros
        assert torch.equal(m.lora_E[~m.lora_mask], torch.zeros_like(m.lora_E[~m.lora_mask]))
        assert torch.all(m.lora_E[m.lora_mask] != 0)


def test_mask_only_every_delta_t_steps_and_pattern_fixed_at_the_end():
    cfg = adalora.Config(init_r=4, target_r=1, tinit=1 / 16, tfinal=3 / 16, delta_t=3, targets=("q", "v", "up"))
    _, figures, masks = train(tiny_llama(), cfg, total_steps=16)
    for step, f in enumerate(figures, 1):
        if step == 13 or (1 < step < 13 and step % 3 == 0):  # allocations, the last one forced
            assert f["live_rank"] == f["budget"]
        elif 1 < step < 13:
            assert f["live_rank"] == figures[step - 2]["live_rank"] >= f["budget"]
            assert torch.equal(masks[step - 1], masks[step - 2])
    assert all(torch.equal(masks[s - 1], masks[12]) for s in (14, 15, 16))


@SETTINGS
@given(st.integers(0, 1000), st.integers(1, 6))
def test_to_lora_reproduces_the_forward(seed, init_r):
    m = masked_linear(seed, init_r)
    model = nn.Sequential()
    model.add_module("layer", m)
    A, B = adalora.to_lora(model)["layer"]
    assert A.shape == (int(m.lora_mask.sum()), m.in_features) and B.shape == (m.out_features, A.shape[0])
    x = torch.randn(3, m.in_features)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias) + x @ A.T @ B.T, rtol=1e-5, atol=1e-6)


def test_save_load_gives_identical_logits(tiny_model, tmp_path):
    cfg = adalora.Config(init_r=4, target_r=2, tinit=1 / 8, tfinal=2 / 8)
    model, _, _ = train(tiny_model, cfg, total_steps=8)
    fresh = tiny_llama() if isinstance(model, Llama) else tiny_gpt()
    adapters.save_adapter(model, tmp_path, "adalora", cfg, model_config=dataclasses.asdict(model.cfg))
    loaded, _ = adapters.load_adapter(fresh, tmp_path)
    loaded.eval()
    x, _ = batch(2)
    assert torch.equal(loaded(x), model(x))
    assert adalora.ranks(loaded) == adalora.ranks(model)
    assert not any("bar" in k for k in adapters.adapter_state(model))  # EMAs are training-only


@pytest.mark.parametrize("kw", [dict(target_r=0), dict(init_r=4, target_r=5), dict(tinit=-0.1), dict(tfinal=-0.2),
                                dict(tinit=0.5, tfinal=0.5), dict(tinit=float("nan")),
                                dict(delta_t=0), dict(beta1=0.0), dict(beta2=1.0), dict(orth_reg_weight=-0.1),
                                dict(alpha=0.0), dict(dropout=1.0)])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError):
        adalora.Config(**kw)
