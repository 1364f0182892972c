"""ALoRA (Allocating LoRA): gates, AB-LoRA importance, prune/reallocate rounds, reduction to LoRA."""
import copy
import dataclasses
import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import adapters
import training
from methods import alora
from conftest import tiny_gpt, tiny_llama

SETTINGS = settings(max_examples=25, deadline=None)


def batch(model, seed=0, B=2, T=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    return x, torch.roll(x, -1, dims=1)


def closure(model, x, y, calls=None):
    """train.py's validation closure; `calls` (a list), if given, records each call's grad flag."""
    val_loss = training.val_closure(model, (x, y))

    def counted(grad=False):
        calls.append(grad)
        return val_loss(grad)
    return val_loss if calls is None else counted


def randomise(model, seed, dead=0.0):
    """Trained-looking adapters: random B, and a share `dead` of the live slots gated off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in alora.layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
            off = torch.rand(m.lora_gate.shape, generator=g) < dead
            m.lora_gate[off] = 0


def adapted(make, seed=0, **kw):
    model = make(seed)
    return alora.apply(model, alora.Config(**{"dropout": 0.0, **kw}))


@SETTINGS
@given(r=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 1000), gpt=st.booleans())
def test_zero_delta_at_init(r, extra, seed, gpt):
    make = tiny_gpt if gpt else tiny_llama
    x, _ = batch(make(seed), seed)
    base = make(seed)(x)
    model = adapted(make, seed, r=r, rmax=r + extra, targets=("q", "k", "v", "o"))
    assert torch.equal(model(x), base)
    assert alora.ranks(model) == {n: r for n in alora.layers(model)}


@SETTINGS
@given(r=st.integers(1, 6), extra=st.integers(0, 6), seed=st.integers(0, 1000), dead=st.floats(0, 1))
def test_to_lora_drops_gated_off_ranks_exactly(r, extra, seed, dead):
    model = adapted(tiny_llama, seed, r=r, rmax=r + extra)
    randomise(model, seed, dead)
    factors = alora.to_lora(model)
    live = alora.ranks(model)
    g = torch.Generator().manual_seed(seed)
    for n, m in alora.layers(model).items():
        A, B = factors[n]
        assert A.shape == (live[n], m.in_features) and B.shape == (m.out_features, live[n])
        x = torch.randn(3, m.in_features, generator=g)
        mine = m(x) - F.linear(x, m.weight, m.bias)
        torch.testing.assert_close(F.linear(F.linear(x, A), B), mine)
        torch.testing.assert_close(B @ A, m.delta_weight(), rtol=1e-5, atol=1e-7)


@SETTINGS
@given(r=st.integers(1, 5), extra=st.integers(1, 5), n=st.integers(1, 5), seed=st.integers(0, 1000))
def test_new_rank_changes_no_output_and_resets_optimizer_state(r, extra, n, seed):
    model = adapted(tiny_llama, seed, r=r, rmax=r + extra)
    randomise(model, seed)
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-2, 0.01))
    x, y = batch(model, seed)
    model.loss(x, y).backward()
    opt.step()
    out = model(x)
    m = next(iter(alora.layers(model).values()))
    dead = (m.lora_gate == 0).nonzero().flatten()[:n]
    alora.grow(m, n, opt, torch.Generator().manual_seed(seed))
    assert torch.equal(model(x), out)
    assert int(m.lora_gate.sum()) == r + len(dead)
    for key in ("exp_avg", "exp_avg_sq"):
        assert not opt.state[m.lora_A][key][dead].any()
        assert not opt.state[m.lora_B][key][:, dead].any()
    assert not m.lora_B[:, dead].any() and m.lora_A[dead].abs().max() <= m.in_features ** -0.5


@SETTINGS
@given(r=st.integers(1, 4), extra=st.integers(0, 4), n_prune=st.integers(1, 8), seed=st.integers(0, 1000),
       scoring=st.sampled_from(["exact", "candidates"]))
def test_round_conserves_total_live_rank(r, extra, n_prune, seed, scoring):
    model = adapted(tiny_llama, seed, r=r, rmax=r + extra, targets=("q", "v", "o"))
    randomise(model, seed)
    x, y = batch(model, seed)
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0))
    before = alora.ranks(model)
    _, pruned, grown, _ = alora.allocation_round(model, opt, closure(model, x, y), n_prune, scoring,
                                                 torch.Generator().manual_seed(seed))
    after = alora.ranks(model)
    lost = set(pruned)
    free = sum(model.get_submodule(n).cfg.rmax - before[n] for n in before if n not in lost)
    assert len(pruned) == min(n_prune, sum(before.values()))
    assert len(grown) == min(len(pruned), free) and not lost & set(grown)
    assert sum(after.values()) == sum(before.values()) - len(pruned) + len(grown)
    if free >= len(pruned):
        assert sum(after.values()) == sum(before.values())
    assert all(after[n] <= before[n] for n in lost)


def test_round_with_every_module_pruned_reallocates_nothing():
    model = adapted(tiny_llama, 0, r=1, rmax=3)  # 4 modules of rank 1: pruning 4 empties them all
    x, y = batch(model)
    _, pruned, grown, _ = alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0)),
                                                 closure(model, x, y), 4)
    assert len(set(pruned)) == 4 and grown == [] and sum(alora.ranks(model).values()) == 0


@SETTINGS
@given(seed=st.integers(0, 1000), d=st.integers(4, 12), c=st.integers(3, 8), r=st.integers(2, 4))
def test_importance_ranks_signal_above_dead_rank(seed, d, c, r):
    """One module; slot 0 carries a planted rank-1 update that fits the labels, the others add nothing."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, c, bias=False)).requires_grad_(False)
    alora.apply(model, alora.Config(r=r, targets=("0",), dropout=0.0))
    m = model[0]
    x = torch.randn(64, d, generator=g)
    u, v = torch.randn(c, generator=g), torch.randn(d, generator=g)
    y = (x @ (10 * torch.outer(u, v)).T).argmax(-1)
    with torch.no_grad():
        m.lora_A[0] = v
        m.lora_B[:, 0] = 10 * u / m.scale
    val_loss = lambda: F.cross_entropy(model(x), y).item()  # noqa: E731
    base, scores = alora.importance(model, val_loss)
    is_ = {j: s for (_, j), s in scores.items()}
    assert base == val_loss()  # the gates are restored
    assert all(is_[0] > is_[j] for j in range(1, r))
    assert scores == alora.importance(model, val_loss)[1]  # deterministic


def trained(make, seed, steps=20, **kw):
    """An adapter after a few AdamW steps on random tokens, so its ranks' scores differ."""
    model = adapted(make, seed, **kw)
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-2, 0.0))
    x, y = batch(model, seed, B=4)
    for _ in range(steps):
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad()
    return model


def loss_at(model, val_loss, gates):
    """val_loss with every module's gate set to gates[name]; the gates are put back."""
    mods = alora.layers(model)
    saved = {n: m.lora_gate.clone() for n, m in mods.items()}
    with torch.no_grad():
        for n, m in mods.items():
            m.lora_gate.copy_(gates[n])
        loss = val_loss()
        for n, m in mods.items():
            m.lora_gate.copy_(saved[n])
    return loss


def with_gate(gates, name, j, value):
    out = {n: g.clone() for n, g in gates.items()}
    out[name][j] = value
    return out


@SETTINGS
@given(seed=st.integers(0, 1000), d=st.integers(3, 8), r=st.integers(1, 3), dead=st.floats(0, 0.5))
def test_estimate_is_eq6_to_first_order_in_the_gates(seed, d, r, dead):
    """IS ≈ −∂L/∂gate (live gates) − L(all gates 0) − ∂L/∂gate (all gates 0): both derivatives equal
    central finite differences of val_loss (a two-layer float64 network, so they resolve to ~1e-9)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
    alora.apply(model, alora.Config(r=r, rmax=r + 1, targets=("0", "2"), dropout=0.0)).double()
    with torch.no_grad():
        for m in alora.layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64))
            m.lora_gate[torch.rand(m.lora_gate.shape, generator=g) < dead] = 0
    x, y = torch.randn(16, d, generator=g, dtype=torch.float64), torch.randint(0, d, (16,), generator=g)

    def val_loss(grad=False):
        with torch.set_grad_enabled(grad):
            loss = F.cross_entropy(model(x), y)
        return loss if grad else loss.item()
    mods = alora.layers(model)
    live = {n: m.lora_gate.clone() for n, m in mods.items()}
    base, est = alora.estimates(mods, val_loss)
    assert base == val_loss() and all(torch.equal(m.lora_gate, live[n]) for n, m in mods.items())
    assert set(est) == {(n, j) for n, gate in live.items() for j in gate.nonzero().flatten().tolist()}
    zero = {n: torch.zeros_like(gate) for n, gate in live.items()}
    empty, eps = loss_at(model, val_loss, zero), 1e-6
    for (n, j), e in est.items():
        d_live = (loss_at(model, val_loss, with_gate(live, n, j, 1 + eps))
                  - loss_at(model, val_loss, with_gate(live, n, j, 1 - eps))) / (2 * eps)
        d_zero = (loss_at(model, val_loss, with_gate(zero, n, j, eps))
                  - loss_at(model, val_loss, with_gate(zero, n, j, -eps))) / (2 * eps)
        assert math.isclose(e, -d_live - empty - d_zero, rel_tol=1e-7, abs_tol=1e-8)


def switched_off(before, model):
    return {(n, j) for n, m in alora.layers(model).items() for j in range(len(m.lora_gate))
            if before[n][j] == 1 and m.lora_gate[j] == 0}


@SETTINGS
@given(seed=st.integers(0, 1000), n_prune=st.integers(1, 4), gpt=st.booleans())
def test_candidate_round_prunes_what_exact_scoring_prunes_when_its_premise_holds(seed, n_prune, gpt):
    """The candidate round's rule: a rank it leaves unscored can be among the n_prune lowest only if
    its estimate errs by more than every scored rank's did. Where no unscored rank's does (checked
    against every rank scored exactly), it switches off exactly the ranks full exact scoring does;
    the ranks it scores exactly get Eq. 6's scores."""
    model = trained(tiny_gpt if gpt else tiny_llama, seed, r=3, rmax=5, targets=("q", "v", "o"))
    x, y = batch(model, seed + 1, B=4)
    twin = copy.deepcopy(model)
    mods, val_loss = alora.layers(model), closure(model, x, y)
    _, full = alora.importance(model, val_loss)
    _, est, exact = alora.certified_lowest(mods, val_loss, n_prune)
    err = max(abs(exact[k] - est[k]) for k in exact)
    assume(all(abs(full[k] - est[k]) <= err for k in full if k not in exact))
    for k, v in exact.items():
        assert math.isclose(v, full[k], rel_tol=1e-6, abs_tol=1e-6)
    before = {n: m.lora_gate.clone() for n, m in mods.items()}
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0))
    alora.allocation_round(model, opt, val_loss, n_prune, "candidates")
    alora.allocation_round(twin, torch.optim.AdamW(alora.param_groups(twin, 1e-3, 0.0)), closure(twin, x, y),
                           n_prune, "exact")
    assert switched_off(before, model) == switched_off(before, twin)


@SETTINGS
@given(seed=st.integers(0, 1000), n_prune=st.integers(1, 6), r=st.integers(1, 3),
       scoring=st.sampled_from(["exact", "candidates"]))
def test_round_calls_val_loss_as_the_cost_model_says(seed, n_prune, r, scoring):
    """exact: 1 + 2 · (live ranks) forwards; candidates: two with gradients, then 2 per rank scored
    exactly, at least the 2 · n_prune lowest estimates."""
    model = trained(tiny_llama, seed, r=r, rmax=r + 2, targets=("q", "v"))
    live = sum(alora.ranks(model).values())
    calls = []
    _, _, _, scored = alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0)),
                                             closure(model, *batch(model, seed + 1), calls), n_prune, scoring)
    if scoring == "exact":
        assert calls == [False] * (1 + 2 * live) and scored == live
    else:
        assert calls == [True, True] + [False] * (2 * scored)
        assert min(2 * n_prune, live) <= scored <= live


@SETTINGS
@given(seed=st.integers(0, 1000), n_prune=st.integers(1, 4), r=st.integers(1, 4), extra=st.integers(0, 2),
       targets=st.sampled_from([("q", "v"), ("q", "v", "o"), ("k", "up")]), max_exact=st.integers(1, 10))
def test_a_round_scores_at_most_max_exact_ranks_exactly_and_prunes_only_those(seed, n_prune, r, extra, targets,
                                                                              max_exact):
    """Never more than max(max_exact, n_prune) ranks scored by Eq. 6 (2 forwards each, after the two
    gradient passes); the ranks switched off are the n_prune lowest exact scores among them."""
    model = trained(tiny_llama, seed, r=r, rmax=r + extra, targets=targets)
    live = sum(alora.ranks(model).values())
    before = {n: m.lora_gate.clone() for n, m in alora.layers(model).items()}
    calls, scored = [], {}
    exact_scores = alora.exact_scores

    def recorded(mods, val_loss, base, slots):
        out = exact_scores(mods, val_loss, base, slots)
        scored.update(out)
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(alora, "exact_scores", recorded)
        _, _, _, count = alora.allocation_round(
            model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0)),
            closure(model, *batch(model, seed + 1), calls), n_prune, "candidates", max_exact=max_exact)
    cap = max(max_exact, n_prune)
    assert count == len(scored) and min(2 * n_prune, live, cap) <= count <= min(cap, live)
    assert calls == [True, True] + [False] * (2 * count)
    lowest = sorted(scored, key=lambda k: (scored[k], *k))[:n_prune]
    assert switched_off(before, model) == set(lowest)


@SETTINGS
@given(seed=st.integers(0, 1000), n_prune=st.integers(1, 4), over=st.integers(0, 4), gpt=st.booleans())
def test_a_cap_at_or_above_the_live_ranks_changes_no_round(seed, n_prune, over, gpt):
    model = trained(tiny_gpt if gpt else tiny_llama, seed, r=3, rmax=5, targets=("q", "v", "o"))
    twin, x_y = copy.deepcopy(model), batch(model, seed + 1, B=4)
    live = sum(alora.ranks(model).values())
    rounds = [alora.allocation_round(m, torch.optim.AdamW(alora.param_groups(m, 1e-3, 0.0)), closure(m, *x_y),
                                     n_prune, "candidates", max_exact=cap)
              for m, cap in ((model, None), (twin, live + over))]
    assert rounds[0] == rounds[1]
    assert alora.ranks(model) == alora.ranks(twin)
    assert all(torch.equal(a.lora_gate, b.lora_gate) for a, b in zip(alora.layers(model).values(),
                                                                     alora.layers(twin).values()))


class Overflow(torch.autograd.Function):
    """The identity whose backward overflows, as an fp16 backward can."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def test_a_round_whose_gradients_overflow_scores_every_rank_exactly():
    model = trained(tiny_llama, 0, r=2, rmax=3, targets=("q", "v"))
    twin, live = copy.deepcopy(model), sum(alora.ranks(model).values())
    x, y = batch(model, 1)
    val_loss = closure(model, x, y)
    before = {n: m.lora_gate.clone() for n, m in alora.layers(model).items()}
    _, _, _, scored = alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0)),
                                             lambda grad=False: Overflow.apply(val_loss(grad)) if grad else val_loss(),
                                             2, "candidates")
    alora.allocation_round(twin, torch.optim.AdamW(alora.param_groups(twin, 1e-3, 0.0)), closure(twin, x, y), 2,
                           "exact")
    assert scored == live and switched_off(before, model) == switched_off(before, twin)


@SETTINGS
@given(seed=st.integers(0, 1000), n_prune=st.integers(1, 5), r=st.integers(1, 3), extra=st.integers(0, 2))
def test_exact_round_prunes_the_lowest_eq6_scores_and_grows_by_module_mean(seed, n_prune, r, extra):
    """Scoring "exact" is Algorithm 1 as the paper states it: Eq. 6 for every live rank (worked out
    here gate by gate), the n_prune lowest switched off, as many first dead slots switched on in the
    modules that lost none, spread evenly, the remainder to the highest mean score (footnote 3)."""
    model = trained(tiny_llama, seed, r=r, rmax=r + extra, targets=("q", "v", "o"))
    val_loss = closure(model, *batch(model, seed + 1))
    mods = alora.layers(model)
    live = {n: m.lora_gate.clone() for n, m in mods.items()}
    zero = {n: torch.zeros_like(g) for n, g in live.items()}
    base = loss_at(model, val_loss, live)
    score = {(n, j): -base + loss_at(model, val_loss, with_gate(live, n, j, 0))
             - loss_at(model, val_loss, with_gate(zero, n, j, 1))
             for n, g in live.items() for j in g.nonzero().flatten().tolist()}
    pruned = sorted(score, key=lambda k: (score[k], *k))[:n_prune]
    expect = {n: g.clone() for n, g in live.items()}
    for n, j in pruned:
        expect[n][j] = 0
    lost = {n for n, _ in pruned}
    mean = {n: statistics.fmean(s for (m, _), s in score.items() if m == n) for n in mods}
    receivers = sorted((n for n in mods if n not in lost), key=lambda n: -mean[n])
    for n, count in zip(receivers, alora.spread(len(pruned), [int((live[n] == 0).sum()) for n in receivers])):
        expect[n][(live[n] == 0).nonzero().flatten()[:count]] = 1
    alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0)), val_loss, n_prune,
                           "exact")
    assert {n: m.lora_gate.tolist() for n, m in mods.items()} == {n: g.tolist() for n, g in expect.items()}


class TwoHeads(nn.Module):
    """y = a(x) + b(x): two modules whose updates add up, so each can be ablated on its own."""

    def __init__(self, d, c):
        super().__init__()
        self.a, self.b = nn.Linear(d, c, bias=False), nn.Linear(d, c, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x)


@SETTINGS
@given(seed=st.integers(0, 1000), d=st.integers(6, 12), strong=st.floats(2.0, 5.0))
def test_importance_ranks_every_useful_rank_above_a_dead_one_across_modules(seed, d, strong):
    """Module a needs three ranks (each `strong`), module b one weak rank and has a dead slot. M_r
    keeps rank r alone in the whole adapter (paper Eq. 6): kept alone within its module, a's ranks
    would each be charged for a's other two and score below b's dead slot."""
    g = torch.Generator().manual_seed(seed)
    model = TwoHeads(d, d).requires_grad_(False)
    alora.apply(model, alora.Config(r=3, rmax=3, targets=("a", "b"), dropout=0.0))
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()  # orthonormal
    with torch.no_grad():
        for j in range(3):  # a: three useful ranks along orthogonal input directions
            model.a.lora_A[j] = basis[j]
            model.a.lora_B[:, j] = strong * basis[j] / model.a.scale
        model.b.lora_A.copy_(basis[3:6])
        model.b.lora_B.zero_()
        model.b.lora_B[:, 0] = basis[3] / model.b.scale  # b: one weak useful rank, slots 1 and 2 dead
    x = torch.randn(256, d, generator=g)
    y = model(x).detach()
    val_loss = lambda: F.mse_loss(model(x), y).item()  # noqa: E731
    _, scores = alora.importance(model, val_loss)
    a = {j: s for (n, j), s in scores.items() if n == "a"}
    b = {j: s for (n, j), s in scores.items() if n == "b"}
    assert min(a.values()) > max(b[1], b[2]) and b[0] > max(b[1], b[2])


def test_spread_footnote_example():
    assert alora.spread(8, [9, 9, 9]) == [3, 3, 2]
    assert alora.spread(5, [1, 9, 0]) == [1, 4, 0]
    assert alora.spread(5, [1, 1]) == [1, 1]


@SETTINGS
@given(n=st.integers(0, 30), cap=st.lists(st.integers(0, 10), min_size=1, max_size=8))
def test_spread_even_capped_and_ordered(n, cap):
    counts = alora.spread(n, cap)
    assert sum(counts) == min(n, sum(cap)) and all(0 <= k <= c for k, c in zip(counts, cap))
    uncapped = [k for k, c in zip(counts, cap) if k < c]
    assert max(counts) - min(uncapped, default=max(counts)) <= 1
    assert uncapped == sorted(uncapped, reverse=True)


@SETTINGS
@given(total=st.integers(1, 5000), k1=st.sampled_from([None, 1, 7]), k2=st.sampled_from([None, 1, 3]))
def test_schedule(total, k1, k2):
    cfg = alora.Config(k1=k1, k2=k2, targets=("0",))
    steps = [s for s in range(1, total + 1) if alora.round_at(cfg, s, total)]
    assert [alora.round_at(cfg, s, total) for s in steps] == list(range(1, len(steps) + 1))
    assert alora.val_loss_steps(alora.apply(nn.Sequential(nn.Linear(4, 4)), cfg), total) == steps  # what an ETA counts
    assert len(steps) <= 8
    if k1 is None and k2 is None and total >= 20:
        assert steps and steps[-1] < total
    if k1 is None and k2 is None:
        assert all(b - a == max(1, total // 40) for a, b in zip(steps, steps[1:]))


def test_only_adapter_trains_and_ranks_move(tiny_model):
    """training.train_step with a validation closure: base bit-identical, budget kept, ranks change."""
    torch.manual_seed(0)
    cfg = alora.Config(r=3, rmax=12, dropout=0.05)
    model = alora.apply(tiny_model, cfg)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, y = batch(model, 1, B=4)
    val_loss = closure(model, *batch(model, 2, B=4))
    model.train()
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-2, 0.01))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    total, rounds = 20, []
    for step in range(1, total + 1):
        _, figures = training.train_step(model, alora, opt, sched, [(x, y)], step, total, val_loss=val_loss)
        if figures:
            rounds.append(figures)
            assert figures["live_rank"] == 3 * len(alora.layers(model))
    assert [f["round"] for f in rounds] == list(range(1, 9))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    final = alora.ranks(model)
    assert final == rounds[-1]["ranks"] and len(set(final.values())) > 1


def test_round_needs_val_loss():
    model = adapted(tiny_llama, 0, k1=1)
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-3, 0))
    with pytest.raises(ValueError, match="val_loss"):
        alora.after_step(model, opt, 1, 100)
    assert alora.after_step(model, opt, 2, 100) == {}


def test_save_load_identical_logits(tmp_path):
    cfg = alora.Config(r=2, rmax=5, targets=("q", "v", "up"))
    model = alora.apply(tiny_llama(), cfg)
    randomise(model, 3, dead=0.3)
    x, y = batch(model)
    alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0)), closure(model, x, y), 3)
    model.eval()
    adapters.save_adapter(model, tmp_path, "alora", cfg, model_config=dataclasses.asdict(model.cfg))
    fresh, _ = adapters.load_adapter(tiny_llama(seed=0), tmp_path)
    fresh.eval()
    assert torch.equal(fresh(x), model(x))
    assert alora.ranks(fresh) == alora.ranks(model)


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=4, rmax=3), dict(dropout=1.0), dict(k1=0), dict(k2=-1),
                                dict(rounds=-1), dict(prune_per_round=0), dict(scoring="some"), dict(max_exact=0)])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        alora.Config(**kw)


def test_config_defaults():
    cfg = alora.Config()
    assert (cfg.r, cfg.rmax, cfg.alpha, cfg.scoring, cfg.max_exact) == (8, 16, 16.0, "candidates", 12)
    assert alora.Config(r=5).rmax == 10


@SETTINGS
@given(targets=st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, max_size=4, unique=True),
       modules=st.integers(1, 64))
def test_the_default_prune_count_leaves_a_module_to_receive(targets, modules):
    n = alora.default_prune(alora.Config(targets=tuple(targets)), modules)
    assert 1 <= n <= len(targets) and (n < modules or modules == 1)
    assert n == len(targets) or n == max(1, modules - 1)  # one per target name unless the modules are fewer
