"""Figures of a basis (trajstore/plots.py): what a reader of each panel is told, read back from the
matplotlib objects rather than from pixels."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection

from trajstore import TrajectoryStore, dldr
from trajstore.plots import (basis_figure, draw_explained_variance, draw_residuals, plot_basis, plural,
                             rank_statement, rounding_level)
from trajstore.plots import _percent

T, N = 12, 300


def trajectory(t: int = T, n: int = N, seed: int = 0, rank: int | None = None) -> np.ndarray:
    """(t, n) float32 snapshots: an offset start and a drift with a decaying spectrum; ``rank``
    confines the drift to that many directions (a centred rank below t - 1)."""
    rng = np.random.default_rng(seed)
    k = rank or t
    coeffs = np.cumsum(rng.standard_normal((t, k)), axis=0) / np.arange(1, k + 1) ** 1.5
    directions = np.linalg.qr(rng.standard_normal((n, k)))[0].T
    w = rng.standard_normal(n) + 3.0 * coeffs @ directions
    if rank is None:
        w += 1e-3 * rng.standard_normal((t, n))
    return w.astype(np.float32)


@pytest.fixture(autouse=True)
def _close_figures() -> None:
    yield
    plt.close("all")


def _bars(ax: object) -> np.ndarray:
    return np.asarray([p.get_height() for p in ax.patches])


def test_explained_variance_is_log_scale_with_every_bar_visible() -> None:
    basis = dldr(trajectory(), T - 1)
    fig = basis_figure(basis, experiment="toy")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # a linear axis hid every bar after the first few
    heights = _bars(ax)
    assert len(heights) == T - 1 and np.allclose(heights, basis.explained_variance_ratio)
    # the smallest ratio is orders of magnitude below the largest, and still above the axis' floor
    assert heights.min() < 1e-2 * heights.max() and ax.get_ylim()[0] < heights.min()


def test_d_equal_t_minus_1_says_the_directions_span_the_snapshots() -> None:
    basis = dldr(trajectory(), T - 1)
    title = basis_figure(basis, experiment="toy").axes[0].get_title().replace("\n", " ")
    assert f"d = {T - 1} = t − 1" in title  # the rank is stated
    assert f"span all {T} centred snapshots" in title and "by construction" in title  # 100% is no finding


def test_d_below_t_minus_1_is_not_called_a_construction() -> None:
    basis = dldr(trajectory(), 4)
    title = basis_figure(basis, experiment="toy").axes[0].get_title().replace("\n", " ")
    assert f"at most t − 1 = {T - 1} directions" in title and "by construction" not in title
    assert _percent(float(basis.explained_variance_ratio.sum())) in title


def test_a_smaller_rank_spanned_exactly_is_said_so() -> None:
    # 12 snapshots in a 3-D affine subspace: d = 3 < t - 1 directions already explain all of them
    evr = dldr(trajectory(rank=3), 3).explained_variance_ratio
    statement = rank_statement(evr, T)
    assert "span all 12 centred snapshots" in statement and "rank is 3 < t − 1 = 11" in statement


def test_percent_does_not_round_a_remainder_away() -> None:
    assert _percent(0.999964) == "99.996%"  # "100.0%" would claim what d = t - 2 does not give
    assert _percent(1.0) == "100.0%" and _percent(0.5) == "50.0%"


def test_rounding_level_is_the_stored_basis_precision_or_the_gram_resolution() -> None:
    floor = 10 * np.finfo(np.float32).eps
    assert rounding_level() == pytest.approx(floor)  # 1.19e-6: the float32 basis
    norms2 = np.array([1.0, 1e-3, 1e-12, 0.0])
    level = rounding_level(100.0, norms2)
    assert level[0] == pytest.approx(floor)  # a snapshot far from the mean: the basis' precision
    # near the mean, what eigh resolves (10 eps64 lambda_1) is a larger fraction of its norm
    assert level[2] == pytest.approx(np.sqrt(10 * np.finfo(np.float64).eps * 100.0 / 1e-12))
    assert np.all(np.diff(level[:3]) >= 0) and level[3] == np.inf  # a snapshot at the mean: all rounding


def test_rounding_level_residuals_are_annotated_not_drawn_as_a_shape() -> None:
    basis = dldr(trajectory(), T - 1)
    fig = basis_figure(basis, experiment="toy")
    ax = fig.axes[1]  # the second panel (the twin of the first comes last)
    assert np.all(basis.residuals() < 1e-6)  # d = t - 1: the residuals are rounding
    title = ax.get_title().replace("\n", " ")
    assert f"all {T} snapshots are at rounding level" in title and "(d = t − 1)" in title
    assert any(isinstance(c, PolyCollection) for c in ax.collections)  # the shaded band
    assert any("rounding level" in t.get_text() for t in ax.get_legend().get_texts())
    line = ax.get_lines()[0]
    # drawn on the band's top, flat, on an axis up to 1: no hump of 1e-8 filling the panel
    assert np.ptp(line.get_ydata()) == 0 and line.get_ydata()[0] >= rounding_level()
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] >= 1.0


def test_meaningful_residuals_are_drawn_as_they_are() -> None:
    basis = dldr(trajectory(), 4)
    ax = basis_figure(basis, experiment="toy").axes[1]
    residuals = basis.residuals()
    assert residuals.min() > 1e-3  # 4 of 11 directions leave a real remainder
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), residuals)  # the values, unchanged
    np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), np.arange(basis.start, basis.stop))
    title = ax.get_title().replace("\n", " ")
    assert "none at rounding level" in title and f"{residuals.max():.3g}" in title


def test_some_residuals_at_rounding_level_are_counted() -> None:
    fig, ax = plt.subplots()
    below = draw_residuals(ax, [np.array([0.0, 3e-8, 0.2, 0.05])], rounding_level(), 2)
    assert below == 2 and "2 of 4 residuals at rounding level" in ax.get_title()


def test_several_seeds_show_the_range_of_each_ratio() -> None:
    evr = np.array([[0.8, 0.15, 0.05], [0.7, 0.2, 0.1]])
    fig, ax = plt.subplots()
    draw_explained_variance(ax, evr, 10)
    assert np.allclose(_bars(ax), evr.mean(axis=0))  # the bars are the mean over seeds
    assert any("range over 2 seeds" in t.get_text() for t in fig.axes[1].get_legend().get_texts())


def test_seeds_that_agree_to_rounding_draw() -> None:
    # Regression: the same spectrum normalized per seed gives means a rounding below the min, and
    # errorbar refused the negative whisker ("'yerr' must not contain negative values").
    ratios = [np.exp(-np.arange(4) - 0.1 * s) for s in range(3)]
    evr = np.array([0.97 * r / r.sum() for r in ratios])
    assert np.any(evr.mean(axis=0) < evr.min(axis=0))  # the case: a mean below every seed's value
    fig, ax = plt.subplots()
    draw_explained_variance(ax, evr, 9)
    assert np.allclose(_bars(ax), evr[0])


def test_plural() -> None:
    assert plural(1, "seed") == "1 seed" and plural(3, "seed") == "3 seeds" and plural(0, "block") == "0 blocks"


class Vec(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))


def test_the_figure_carries_the_experiment_recorded_in_the_store(tmp_path: Path) -> None:
    model = Vec(N)
    with TrajectoryStore.create(tmp_path / "s.zarr", model, attrs={"experiment": {"name": "toy-exp"}, "seed": 3}) as s:
        for row in trajectory():
            model.w.data = torch.from_numpy(row)
            s.append(model)
    basis = dldr(tmp_path / "s.zarr", 5)
    assert "toy-exp, seed 3" in basis_figure(basis)._suptitle.get_text()  # read from attrs["experiment"]
    assert basis_figure(basis, experiment="named")._suptitle.get_text().startswith("named: ")
    png = plot_basis(basis, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
