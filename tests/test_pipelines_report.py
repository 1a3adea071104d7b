"""The report's figures (pipelines/report.py), built from synthetic per-seed results and read back
from the matplotlib objects: bands, scales and titles a reader relies on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from pipelines.experiment import ExperimentConfig
from pipelines.report import build_figures, redraw, report_curves, write_report
from trajstore.plots import rounding_level

EPOCHS, SUBSPACE_EPOCHS, T = 6, 3, 9
METHODS = ("pbfgs", "psgd")


def _history(epochs: int, rng: np.random.Generator) -> list[dict[str, float]]:
    acc = np.minimum(50 + 10 * np.arange(1, epochs + 1) + rng.normal(0, 2, epochs), 100)
    return [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "train_acc": float(acc[e]), "test_loss": 1.2 / (e + 1),
             "test_acc": float(acc[e]), "lr": 0.1} for e in range(epochs)]


def per_seed(seeds: int, d: int, residual: float | None = None) -> list[dict[str, Any]]:
    """``results.json``'s ``seeds``: an SGD run, a basis of d directions over T snapshots, the
    subspace runs and the projections. ``residual`` sets every snapshot's residual (default: a
    real remainder that grows along the window)."""
    out = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        ratios = np.exp(-np.arange(d) - 0.1 * seed)
        evr = ratios / ratios.sum() if d >= T - 1 else 0.97 * ratios / ratios.sum()
        residuals = np.full(T, residual) if residual is not None else np.linspace(0.01, 0.2, T)
        out.append({
            "seed": seed,
            "sgd": {"history": _history(EPOCHS, rng), "train_seconds": 1.0},
            "basis": {"name": f"window-d{d}", "window": [0, T], "d": d, "n": 1000,
                      "explained_variance_ratio": evr.tolist(), "residuals": residuals.tolist()},
            "subspace": {m: {"history": _history(SUBSPACE_EPOCHS, rng), "train_seconds": 1.0, "epochs": SUBSPACE_EPOCHS}
                         for m in METHODS},
            "projection": {"k": 2, "snapshots": [{"snapshot": j, "test_acc": 50.0 + j + rng.normal(),
                                                  "projected_test_acc": 55.0 + j} for j in range(T)]},
        })
    return out


def config(tmp_path: Path, d: int) -> ExperimentConfig:
    return ExperimentConfig(name="toy-experiment", epochs=EPOCHS, sample_epochs=2, dim=d, methods=METHODS,
                            subspace_epochs=SUBSPACE_EPOCHS, out=str(tmp_path / "run"))


def figures(tmp_path: Path, seeds: int, d: int = T - 1, residual: float | None = None) -> dict[str, Any]:
    cfg = config(tmp_path, d)
    runs = per_seed(seeds, d, residual)
    return build_figures(cfg, runs, report_curves(cfg, runs))


@pytest.fixture(autouse=True)
def _close_figures() -> None:
    yield
    plt.close("all")


def _bands(ax: Any) -> int:
    return sum(isinstance(c, PolyCollection) for c in ax.collections)


def test_every_figure_carries_the_experiment_name(tmp_path: Path) -> None:
    for seeds in (1, 3):
        for name, fig in figures(tmp_path, seeds).items():
            assert fig._suptitle is not None and "toy-experiment" in fig._suptitle.get_text(), name


def test_accuracy_over_three_seeds_has_a_band_and_says_mean_plus_minus_std(tmp_path: Path) -> None:
    fig = figures(tmp_path, 3)["accuracy.png"]
    left, right = fig.axes
    assert _bands(left) == 1 and _bands(right) == len(METHODS)  # one std band per curve
    title = fig._suptitle.get_text()
    assert "mean ± std over 3 seeds" in title and "+-" not in title and "seed(s)" not in title


def test_accuracy_band_is_the_std_over_seeds(tmp_path: Path) -> None:
    cfg = config(tmp_path, T - 1)
    runs = per_seed(3, T - 1)
    curves = report_curves(cfg, runs)
    left = build_figures(cfg, runs, curves)["accuracy.png"].axes[0]
    band = next(c for c in left.collections if isinstance(c, PolyCollection)).get_paths()[0].vertices[:, 1]
    acc = np.asarray([[h["test_acc"] for h in s["sgd"]["history"]] for s in runs])
    mean, std = acc.mean(axis=0), acc.std(axis=0, ddof=1)
    # the band's outline runs through mean - std and mean + std (sample std, ddof = 1)
    assert np.allclose(band.min(), (mean - std).min()) and np.allclose(band.max(), (mean + std).max())


def test_one_seed_has_no_band_and_says_1_seed(tmp_path: Path) -> None:
    figs = figures(tmp_path, 1)
    fig = figs["accuracy.png"]
    assert all(_bands(ax) == 0 for ax in fig.axes)  # no spread to shade
    title = fig._suptitle.get_text()
    assert title.endswith("1 seed") and "1 seeds" not in title and "±" not in title
    assert all(_bands(ax) == 0 for ax in figs["projection.png"].axes)
    assert "(1 seed)" in figs["explained_variance.png"]._suptitle.get_text()


def test_projection_over_seeds_is_a_mean_with_a_band(tmp_path: Path) -> None:
    fig = figures(tmp_path, 3)["projection.png"]
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2 and _bands(ax) == 2  # snapshot and projection, not one line per seed
    assert "mean ± std over 3 seeds" in fig._suptitle.get_text() and "Figure 2b" in ax.get_title()


def test_explained_variance_is_log_scale_and_states_the_rank(tmp_path: Path) -> None:
    ax = figures(tmp_path, 3, d=T - 1)["explained_variance.png"].axes[0]
    assert ax.get_yscale() == "log"
    title = ax.get_title().replace("\n", " ")
    assert f"d = {T - 1} = t − 1" in title and "by construction" in title
    ax = figures(tmp_path, 3, d=4)["explained_variance.png"].axes[0]
    title = ax.get_title().replace("\n", " ")
    assert f"at most t − 1 = {T - 1}" in title and "by construction" not in title


def test_rounding_level_residuals_are_annotated(tmp_path: Path) -> None:
    # the hump the issue measured: d = t - 1 residuals of ~1e-8 drawn on a linear axis of their own
    ax = figures(tmp_path, 3, residual=5e-8)["residuals.png"].axes[0]
    title = ax.get_title().replace("\n", " ")
    assert f"all {T} snapshots (of each of 3 seeds) are at rounding level" in title
    assert _bands(ax) == 1 and ax.get_yscale() == "log" and ax.get_ylim()[1] >= 1.0
    for line in ax.get_lines():
        assert np.all(line.get_ydata() == pytest.approx(rounding_level()))  # on the band, not a shape


def test_real_residuals_are_not_called_rounding(tmp_path: Path) -> None:
    ax = figures(tmp_path, 3, d=4)["residuals.png"].axes[0]
    assert "none at rounding level" in ax.get_title()
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), np.linspace(0.01, 0.2, T))


def test_redraw_reads_results_json(tmp_path: Path) -> None:
    cfg = config(tmp_path, T - 1)
    cfg.folder.mkdir()
    runs = per_seed(2, T - 1)
    result = write_report(cfg, runs, 0.0)
    written = {p: p.read_bytes() for p in cfg.folder.glob("*.png")}
    assert sorted(p.name for p in written) == sorted(result["figures"])
    for p in written:
        p.unlink()
    drawn = redraw(cfg.folder)  # from results.json alone
    assert [p.name for p in drawn] == result["figures"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in drawn)
    assert json.loads((cfg.folder / "results.json").read_text())["figures"] == result["figures"]  # left as it was


def _seed(sgd_accs: list[float], method_accs: list[float], basis_seconds: float = 2.0) -> dict:
    """A seed's record: SGD epochs of 1 s each, subspace epochs of 0.5 s each."""
    sgd = [{"epoch": e, "test_acc": a, "seconds": float(e)} for e, a in enumerate(sgd_accs, start=1)]
    sub = [{"epoch": e, "test_acc": a, "seconds": 0.5 * e} for e, a in enumerate(method_accs, start=1)]
    return {"sgd": {"history": sgd}, "basis": {"seconds": basis_seconds}, "subspace": {"pbfgs": {"history": sub}}}


def test_time_to_accuracy_counts_the_window_the_basis_and_the_subspace_epochs() -> None:
    from pipelines.report import time_to_accuracy, time_to_accuracy_summary

    cfg = ExperimentConfig(epochs=10, sample_epochs=3, methods=("pbfgs",))
    # SGD ends at 90; 89.5 first reached at epoch 8 (8 s). The route: the window (3 epochs, 3 s),
    # the basis (2 s), and P-BFGS's second epoch (1 s): 6 s, 0.75 of SGD's.
    seed = _seed([50, 60, 70, 80, 85, 88, 89, 89.6, 89.9, 90], [80, 89.5, 90])
    t = time_to_accuracy(cfg, seed, "pbfgs")
    assert t == {"target_acc": 89.5, "sgd_seconds": 8.0, "route_seconds": 6.0, "ratio": 0.75}
    never = _seed([50, 60, 70, 80, 85, 88, 89, 89.6, 89.9, 90], [80, 85, 89])
    assert time_to_accuracy(cfg, never, "pbfgs")["route_seconds"] is None
    summary = time_to_accuracy_summary(cfg, [seed, never], "pbfgs")
    assert summary["reached"] == 1 and summary["ratio_mean"] == 0.75
    untimed = {**seed, "sgd": {"history": [{"epoch": 1, "test_acc": 90.0}]}}
    assert time_to_accuracy(cfg, untimed, "pbfgs") is None  # a record from before per-epoch times
