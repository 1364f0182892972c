"""ALoRA (Allocating LoRA): gates, AB-LoRA importance, prune/reallocate rounds, reduction to LoRA."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
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


def closure(model, x, y):
    def val_loss():
        was = model.training
        model.eval()
        with torch.no_grad():
            loss = model.loss(x, y).item()
        model.train(was)
        return loss
    return val_loss


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
       frac=st.sampled_from([1.0, 0.5, 0.2]))
def test_round_conserves_total_live_rank(r, extra, n_prune, seed, frac):
    model = adapted(tiny_llama, seed, r=r, rmax=r + extra, targets=("q", "v", "o"))
    randomise(model, seed)
    x, y = batch(model, seed)
    opt = torch.optim.AdamW(alora.param_groups(model, 1e-3, 0.0))
    before = alora.ranks(model)
    _, pruned, grown = alora.allocation_round(model, opt, closure(model, x, y), n_prune, frac,
                                              torch.Generator().manual_seed(seed))
    after = alora.ranks(model)
    lost = set(pruned)
    free = sum(model.get_submodule(n).cfg.rmax - before[n] for n in before if n not in lost)
    scored = sum(math.ceil(frac * k) for k in before.values())  # only scored ranks can be pruned
    assert len(pruned) == min(n_prune, scored)
    assert len(grown) == min(len(pruned), free) and not lost & set(grown)
    assert sum(after.values()) == sum(before.values()) - len(pruned) + len(grown)
    if free >= len(pruned):
        assert sum(after.values()) == sum(before.values())
    assert all(after[n] <= before[n] for n in lost)


def test_round_with_every_module_pruned_reallocates_nothing():
    model = adapted(tiny_llama, 0, r=1, rmax=3)  # 4 modules of rank 1: pruning 4 empties them all
    x, y = batch(model)
    _, pruned, grown = alora.allocation_round(model, torch.optim.AdamW(alora.param_groups(model, 1e-3, 0)),
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
    is_ = dict(scores["0"])
    assert base == val_loss()  # the gates are restored
    assert all(is_[0] > is_[j] for j in range(1, r))
    assert is_ == dict(alora.importance(model, val_loss)[1]["0"])  # deterministic


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
    a, b = dict(scores["a"]), dict(scores["b"])
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
    cfg = alora.Config(k1=k1, k2=k2)
    steps = [s for s in range(1, total + 1) if alora.round_at(cfg, s, total)]
    assert [alora.round_at(cfg, s, total) for s in steps] == list(range(1, len(steps) + 1))
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
                                dict(rounds=-1), dict(prune_per_round=0), dict(score_frac=0.0),
                                dict(score_frac=1.5)])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        alora.Config(**kw)


def test_config_defaults():
    cfg = alora.Config()
    assert (cfg.r, cfg.rmax, cfg.alpha, cfg.score_frac) == (8, 16, 16.0, 1.0)
    assert alora.Config(r=5).rmax == 10


@SETTINGS
@given(targets=st.lists(st.sampled_from(["q", "k", "v", "o"]), min_size=1, max_size=4, unique=True),
       modules=st.integers(1, 64))
def test_the_default_prune_count_leaves_a_module_to_receive(targets, modules):
    n = alora.default_prune(alora.Config(targets=tuple(targets)), modules)
    assert 1 <= n <= len(targets) and (n < modules or modules == 1)
    assert n == len(targets) or n == max(1, modules - 1)  # one per target name unless the modules are fewer
