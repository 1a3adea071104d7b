"""The report of a run: ``results.json``, the paper's figures as PNG, and a printed table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trajstore.plots import draw_explained_variance, draw_residuals, plural, rounding_level

from .atomic import save_figure, save_json
from .provenance import provenance

if TYPE_CHECKING:
    from .experiment import ExperimentConfig

__all__ = ["build_figures", "format_table", "redraw", "report_curves", "summarize", "write_figures", "write_report"]

LABELS = {"sgd": "SGD", "pbfgs": "P-BFGS", "pbfgs+": "P+-BFGS", "psgd": "P-SGD"}
COLORS = {"sgd": "tab:gray", "pbfgs": "tab:blue", "pbfgs+": "tab:red", "psgd": "tab:green"}


TIME_TO_ACCURACY_TOLERANCE = 0.5  # points of test accuracy below SGD's final one


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single seed)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _curves(histories: list[list[dict[str, Any]]], key: str) -> dict[str, list[float]]:
    """Per-epoch mean and std over seeds of one metric."""
    table = np.asarray([[row[key] for row in h] for h in histories], dtype=np.float64)
    std = table.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(table.shape[1])
    return {"mean": table.mean(axis=0).tolist(), "std": std.tolist()}


def summarize(cfg: ExperimentConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{method: {test_acc_mean, test_acc_std, epochs, ...}}`` for sgd and each subspace method:
    the test accuracy after the last epoch, in percent, mean +- std over seeds."""
    summary: dict[str, Any] = {}
    accs = [s["sgd"]["history"][-1]["test_acc"] for s in per_seed]
    mean, std = _mean_std(accs)
    summary["sgd"] = {"test_acc_mean": mean, "test_acc_std": std, "epochs": cfg.epochs, "test_acc": accs,
                      "train_seconds_mean": _mean_std([s["sgd"]["train_seconds"] for s in per_seed])[0],
                      "parameters": per_seed[0]["basis"]["n"]}
    for method in cfg.methods:
        runs = [s["subspace"][method] for s in per_seed]
        accs = [r["history"][-1]["test_acc"] if r["history"] else float("nan") for r in runs]
        mean, std = _mean_std(accs)
        summary[method] = {"test_acc_mean": mean, "test_acc_std": std, "epochs": runs[0]["epochs"],
                           "sampling_epochs": cfg.sample_epochs, "dim": cfg.dim, "test_acc": accs,
                           "train_seconds_mean": _mean_std([r["train_seconds"] for r in runs])[0],
                           "time_to_sgd_accuracy": time_to_accuracy_summary(cfg, per_seed, method)}
    return summary


def _first_reaching(history: list[dict[str, Any]], target: float) -> float | None:
    """Cumulative training seconds at the first epoch whose test accuracy reaches ``target``."""
    for row in history:
        if row["test_acc"] >= target:
            return row.get("seconds")
    return None


def time_to_accuracy(cfg: ExperimentConfig, seed: dict[str, Any], method: str,
                     tolerance: float = TIME_TO_ACCURACY_TOLERANCE) -> dict[str, Any] | None:
    """Wall time of the DLDR route (pre-training, SGD through the sampling window, the basis,
    then ``method`` until its test accuracy is within ``tolerance`` points of SGD's final one)
    against SGD's own time to that accuracy (paper: about 65%). None for histories recorded
    without per-epoch times; ``route_seconds`` None when the method never got there."""
    sgd = seed["sgd"]["history"]
    if not sgd or "seconds" not in sgd[-1]:
        return None
    target = sgd[-1]["test_acc"] - tolerance
    sgd_seconds = _first_reaching(sgd, target)
    window = next((row["seconds"] for row in sgd if row["epoch"] == cfg.sample_epochs), None)
    if sgd_seconds is None or window is None:
        return None
    reached = _first_reaching(seed["subspace"][method]["history"], target)
    pretrain = seed["sgd"].get("pretrain", {}).get("seconds", 0.0)
    route = None if reached is None else pretrain + window + seed["basis"]["seconds"] + reached
    return {"target_acc": target, "sgd_seconds": pretrain + sgd_seconds, "route_seconds": route,
            "ratio": None if route is None else route / (pretrain + sgd_seconds)}


def time_to_accuracy_summary(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    """:func:`time_to_accuracy` over the seeds: each seed's figures, the mean ratio over the
    seeds that reached the target, and how many did."""
    runs = [time_to_accuracy(cfg, s, method) for s in per_seed]
    if any(r is None for r in runs):
        return None
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
    return {"tolerance": TIME_TO_ACCURACY_TOLERANCE, "seeds": runs, "reached": len(ratios),
            "ratio_mean": float(np.mean(ratios)) if ratios else None}


def format_table(cfg: ExperimentConfig, summary: dict[str, Any], seeds: int) -> str:
    lines = [f"{cfg.name}: {cfg.model} on {cfg.data}, {summary['sgd']['parameters']:,} parameters, "
             f"{seeds} seed{'s' if seeds > 1 else ''}; subspace d = {cfg.dim} from the first "
             f"{cfg.sample_epochs} of {cfg.epochs} SGD epochs",
             f"{'method':<9} {'epochs':>6}  {'test accuracy (%)':>18}  {'train s':>8}"]
    for method, row in summary.items():
        lines.append(f"{LABELS[method]:<9} {row['epochs']:>6}  {row['test_acc_mean']:>9.2f} +- {row['test_acc_std']:<5.2f}"
                     f"  {row['train_seconds_mean']:>8.1f}")
    timed = [(m, r["time_to_sgd_accuracy"]) for m, r in summary.items() if r.get("time_to_sgd_accuracy")]
    if timed:
        lines.append(f"time to SGD's final accuracy - {TIME_TO_ACCURACY_TOLERANCE} points (sampling window + basis + "
                     "subspace epochs, over SGD's own time; paper: about 0.65):")
        for method, t in timed:
            ratio = f"{t['ratio_mean']:.2f}x SGD's time" if t["ratio_mean"] is not None else "not reached"
            n = len(t["seeds"])
            lines.append(f"  {LABELS[method]:<9} {ratio} (reached in {t['reached']} of {n} seed{'s' if n > 1 else ''})")
    return "\n".join(lines)


def report_curves(cfg: ExperimentConfig, per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``{method: {metric: {"mean": [...], "std": [...]}}}`` per epoch, over seeds, for sgd and each
    subspace method that ran (``results.json``'s ``curves``)."""
    keys = ("test_acc", "test_loss", "train_loss", "train_acc")
    curves = {"sgd": {k: _curves([s["sgd"]["history"] for s in per_seed], k) for k in keys}}
    for method in cfg.methods:
        runs = [s["subspace"][method]["history"] for s in per_seed]
        if all(runs):
            curves[method] = {k: _curves(runs, k) for k in keys}
    return curves


def write_report(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    out = cfg.folder
    summary = summarize(cfg, per_seed)
    curves = report_curves(cfg, per_seed)
    evr = np.asarray([s["basis"]["explained_variance_ratio"] for s in per_seed])
    figures = write_figures(cfg, per_seed, curves, out)
    result = {"config": cfg.to_json(), "provenance": provenance(), "wall_seconds": wall_seconds,
              "summary": summary, "curves": curves,
              "explained_variance_ratio": {"mean": evr.mean(axis=0).tolist(), "explained_mean": float(evr.sum(axis=1).mean())},
              "figures": [p.name for p in figures], "seeds": per_seed}
    save_json(result, out / "results.json")  # last: a results.json that exists is a finished run
    print(format_table(cfg, summary, len(per_seed)))
    print(f"wrote {out / 'results.json'} and {', '.join(p.name for p in figures)} ({wall_seconds:.0f} s)")
    return result


# ------------------------------------------------------------------------------- figures
#
# Each figure is built (and returned) by one function and saved by write_figures, so a test can
# read a figure's axes, scales and titles; every one carries the experiment's name in its suptitle.


def build_figures(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], curves: dict[str, Any]) -> dict[str, Any]:
    """The report's matplotlib Figures by file name, in the order ``results.json`` lists them.

    ``per_seed`` is ``results.json``'s ``seeds`` and ``curves`` its ``curves`` (:func:`report_curves`).
    The caller closes them (:func:`write_figures` does).
    """
    return {"explained_variance.png": _explained_figure(cfg, per_seed),
            "accuracy.png": _accuracy_figure(cfg, per_seed, curves),
            "residuals.png": _residuals_figure(cfg, per_seed),
            "projection.png": _projection_figure(cfg, per_seed)}


def write_figures(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], curves: dict[str, Any],
                  folder: Path) -> list[Path]:
    """Save :func:`build_figures` as PNG files in ``folder`` (each written whole, then renamed)."""
    return [_save(fig, Path(folder) / name) for name, fig in build_figures(cfg, per_seed, curves).items()]


def redraw(folder: str | Path) -> list[Path]:
    """Draw a finished run's figures again from its ``results.json``, without training anything.

    ``python -m pipelines.report RUN_FOLDER``; ``results.json`` itself is left as it is.
    """
    import json

    from .experiment import load_config

    folder = Path(folder)
    doc = json.loads((folder / "results.json").read_text())
    cfg = load_config(doc["config"])
    return write_figures(cfg, doc["seeds"], doc["curves"], folder)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=110)
    finally:
        _pyplot().close(fig)
    return path


def _over(seeds: int) -> str:
    """How a curve over seeds is summarized, for a title."""
    return f"mean ± std over {seeds} seeds (shaded)" if seeds > 1 else "1 seed"


def _window(per_seed: list[dict[str, Any]]) -> int:
    start, stop = per_seed[0]["basis"]["window"]
    return int(stop - start)


def _explained_figure(cfg: ExperimentConfig, per_seed: list[dict[str, Any]]) -> Any:
    evr = np.asarray([s["basis"]["explained_variance_ratio"] for s in per_seed], dtype=np.float64)
    fig, ax = _pyplot().subplots(figsize=(7, 4.2))
    draw_explained_variance(ax, evr, _window(per_seed))
    fig.suptitle(f"{cfg.name}: explained variance of the {_window(per_seed)} sampled snapshots "
                 f"({plural(len(per_seed), 'seed')})", fontsize=10)
    return fig


def _band(ax: Any, x: np.ndarray, curve: dict[str, list[float]], color: str, label: str, band: bool) -> None:
    mean, std = np.asarray(curve["mean"]), np.asarray(curve["std"])
    ax.plot(x, mean, color=color, label=label)
    if band:  # one seed has no spread to shade
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _accuracy_figure(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], curves: dict[str, Any]) -> Any:
    seeds = len(per_seed)
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4.2), sharey=True)
    sgd = curves["sgd"]["test_acc"]
    _band(left, np.arange(1, len(sgd["mean"]) + 1), sgd, COLORS["sgd"], "SGD", seeds > 1)
    left.axvspan(0, cfg.sample_epochs, color="tab:orange", alpha=0.15,
                 label=f"sampling window ({plural(_window(per_seed), 'snapshot')})")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy (%)")
    left.set_title("SGD, with the sampled window shaded")
    left.legend(loc="lower right")
    for method in cfg.methods:
        if method in curves:
            acc = curves[method]["test_acc"]
            _band(right, np.arange(1, len(acc["mean"]) + 1), acc, COLORS[method], LABELS[method], seeds > 1)
    right.axhline(sgd["mean"][-1], color=COLORS["sgd"], linestyle="--", label=f"SGD after {plural(cfg.epochs, 'epoch')}")
    right.set_xlabel("epoch in the subspace")
    right.set_title(f"{cfg.dim}-D subspace, from the same initialization")
    right.legend(loc="lower right")
    fig.suptitle(f"{cfg.name}: test accuracy, {_over(seeds)}", fontsize=10)
    return fig


def _residuals_figure(cfg: ExperimentConfig, per_seed: list[dict[str, Any]]) -> Any:
    fig, ax = _pyplot().subplots(figsize=(7, 4.2))
    # results.json keeps no snapshot norms, so the level is the stored basis' (float32) alone
    draw_residuals(ax, [np.asarray(s["basis"]["residuals"]) for s in per_seed], rounding_level(),
                   per_seed[0]["basis"]["d"], labels=[f"seed {s['seed']}" for s in per_seed])
    fig.suptitle(f"{cfg.name}: how far each sampled snapshot lies from the subspace "
                 f"({plural(len(per_seed), 'seed')})", fontsize=10)
    return fig


def _projection_figure(cfg: ExperimentConfig, per_seed: list[dict[str, Any]]) -> Any:
    seeds = len(per_seed)
    fig, ax = _pyplot().subplots(figsize=(7, 4.2))
    k = per_seed[0]["projection"]["k"]
    rows = [s["projection"]["snapshots"] for s in per_seed]
    x = np.asarray([r["snapshot"] for r in rows[0]])
    for key, color, label in (("test_acc", "tab:blue", "snapshot"),
                              ("projected_test_acc", "tab:red", f"its projection onto the top {k} directions")):
        table = np.asarray([[r[key] for r in seed] for seed in rows], dtype=np.float64)
        std = table.std(axis=0, ddof=1) if seeds > 1 else np.zeros(len(x))
        _band(ax, x, {"mean": table.mean(axis=0).tolist(), "std": std.tolist()}, color, label, seeds > 1)
    ax.set_xlabel("snapshot")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Figure 2b: each snapshot and its {k}-D projection", fontsize=10)
    ax.legend(loc="lower right")
    fig.suptitle(f"{cfg.name}: test accuracy, {_over(seeds)}", fontsize=10)
    return fig


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipelines.report RUN_FOLDER   (draws the figures again from RUN_FOLDER/results.json)")
    print("wrote", ", ".join(str(p) for p in redraw(sys.argv[1])))
