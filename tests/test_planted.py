"""planted.py's machinery: the planted problem, Spearman's ρ, one row per method, the files it writes.
Its outcome (which method finds the ranks) is what it measures, so no test asserts it."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import methods
import planted

SETTINGS = settings(max_examples=20, deadline=None)


@SETTINGS
@given(dim=st.integers(8, 32), ranks=st.lists(st.integers(0, 8), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_planted_updates_have_the_planted_ranks(dim, ranks, seed):
    delta = planted.planted_updates(dim, ranks, torch.Generator().manual_seed(seed))
    assert delta.shape == (len(ranks), dim, dim)
    assert [int(torch.linalg.matrix_rank(d)) for d in delta] == ranks


def test_the_loss_is_one_at_delta_zero_and_the_noise_floor_at_the_planted_update():
    problem = planted.Problem(dim=32, seed=3)
    x, y = problem.batch(4096, "test")
    with torch.no_grad():
        assert problem.model.loss(x, y).item() == pytest.approx(1.0, abs=1e-5)
        for block, d in zip(problem.model.m, problem.delta):
            block.proj.weight += d
        floor = problem.model.loss(x, y).item()
    assert floor < 0.2  # what is left is the label noise


def test_batches_are_seeded_by_split_and_step():
    problem = planted.Problem(dim=16)
    assert torch.equal(problem.batch(8, "train", 3)[0], problem.batch(8, "train", 3)[0])
    assert not torch.equal(problem.batch(8, "train", 3)[0], problem.batch(8, "train", 4)[0])
    assert not torch.equal(problem.batch(8, "train", 0)[0], problem.batch(8, "val", 0)[0])


@SETTINGS
@given(a=st.lists(st.integers(0, 9), min_size=3, max_size=12))
def test_spearman_is_one_for_any_increasing_map_and_none_for_a_constant(a):
    if len(set(a)) == 1:
        assert planted.spearman(a, a) is None
        return
    assert planted.spearman(a, [3 * v + 1 for v in a]) == pytest.approx(1.0)
    assert planted.spearman(a, [-v for v in a]) == pytest.approx(-1.0)
    assert planted.spearman(a, [7] * len(a)) is None


def test_spearman_gives_ties_their_mean_rank():
    # ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3): Pearson of those is 4.5 / sqrt(4.5 * 5)
    assert planted.spearman([0, 0, 1, 2], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


@pytest.mark.parametrize("name", methods.NAMES)
def test_every_method_gives_a_row(name):
    row = planted.run_method(name, planted.Problem(dim=16), steps=4, batch_size=8)
    assert row["method"] == name and len(row["ranks"]) == len(planted.PLANTED)
    assert row["live"] == sum(row["ranks"]) and 0 <= row["closed"] <= 1 and row["loss"] > 0
    assert row["rho"] is None or -1 <= row["rho"] <= 1


def test_each_method_trains_at_the_lr_train_py_would_give_it():
    assert planted.run_method("mosara", planted.Problem(dim=16), steps=2, batch_size=8)["lr"] == 3e-2
    assert planted.run_method("lora", planted.Problem(dim=16), steps=2, batch_size=8)["lr"] == 1e-3
    assert planted.run_method("mosara", planted.Problem(dim=16), steps=2, batch_size=8, lr=0.005)["lr"] == 0.005


def test_the_command_writes_the_table_json_and_picture(tmp_path, capsys):
    out = tmp_path / "planted"
    rows = planted.main(["--methods", "lora,sora", "--dim", "16", "--steps", "4", "--out", str(out)])
    saved = json.loads((out / "planted.json").read_text())
    assert saved["rows"] == rows and saved["planted"] == list(planted.PLANTED)
    assert (out / "ranks.png").stat().st_size > 0
    assert "/LoRA" in capsys.readouterr().out


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method nope"):
        planted.main(["--methods", "lora,nope"])


def test_the_picture_gives_ranks_0_to_16_distinct_colours_beside_a_row_of_71(tmp_path, monkeypatch):
    import plots
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig))
    rows = [{"method": "mosara", "ranks": [71] * 8}, {"method": "sora", "ranks": [0, 1, 2, 4, 8, 16, 16, 16]}]
    planted.draw(rows, planted.PLANTED, tmp_path / "ranks.png")
    image = figures[0].axes[0].images[0]
    colours = torch.tensor(image.to_rgba(torch.tensor([0, 1, 2, 4, 8, 16, 71]).numpy())[:, :3])
    assert (colours[1:] - colours[:-1]).norm(dim=1).min() > 0.08  # each step up has a colour of its own
    plots.pyplot().close(figures[0])
