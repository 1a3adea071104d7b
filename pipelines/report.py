"""The report of a run: ``results.json``, the paper's figures as PNG, and a printed table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import save_figure, save_json
from .provenance import provenance

if TYPE_CHECKING:
    from .experiment import ExperimentConfig

__all__ = ["format_table", "summarize", "write_report"]

LABELS = {"sgd": "SGD", "pbfgs": "P-BFGS", "pbfgs+": "P+-BFGS", "psgd": "P-SGD"}
COLORS = {"sgd": "tab:gray", "pbfgs": "tab:blue", "pbfgs+": "tab:red", "psgd": "tab:green"}


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
                           "train_seconds_mean": _mean_std([r["train_seconds"] for r in runs])[0]}
    return summary


def format_table(cfg: ExperimentConfig, summary: dict[str, Any], seeds: int) -> str:
    lines = [f"{cfg.name}: {cfg.model} on {cfg.data}, {summary['sgd']['parameters']:,} parameters, "
             f"{seeds} seed{'s' if seeds > 1 else ''}; subspace d = {cfg.dim} from the first "
             f"{cfg.sample_epochs} of {cfg.epochs} SGD epochs",
             f"{'method':<9} {'epochs':>6}  {'test accuracy (%)':>18}  {'train s':>8}"]
    for method, row in summary.items():
        lines.append(f"{LABELS[method]:<9} {row['epochs']:>6}  {row['test_acc_mean']:>9.2f} +- {row['test_acc_std']:<5.2f}"
                     f"  {row['train_seconds_mean']:>8.1f}")
    return "\n".join(lines)


def write_report(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    out = cfg.folder
    summary = summarize(cfg, per_seed)
    curves = {"sgd": {k: _curves([s["sgd"]["history"] for s in per_seed], k) for k in ("test_acc", "test_loss", "train_loss", "train_acc")}}
    for method in cfg.methods:
        runs = [s["subspace"][method]["history"] for s in per_seed]
        if all(runs):
            curves[method] = {k: _curves(runs, k) for k in ("test_acc", "test_loss", "train_loss", "train_acc")}
    evr = np.asarray([s["basis"]["explained_variance_ratio"] for s in per_seed])
    figures = [_plot_explained(cfg, evr, out / "explained_variance.png"),
               _plot_accuracy(cfg, per_seed, curves, out / "accuracy.png"),
               _plot_residuals(per_seed, out / "residuals.png"),
               _plot_projection(per_seed, out / "projection.png")]
    result = {"config": cfg.to_json(), "provenance": provenance(), "wall_seconds": wall_seconds,
              "summary": summary, "curves": curves,
              "explained_variance_ratio": {"mean": evr.mean(axis=0).tolist(), "explained_mean": float(evr.sum(axis=1).mean())},
              "figures": [p.name for p in figures], "seeds": per_seed}
    save_json(result, out / "results.json")  # last: a results.json that exists is a finished run
    print(format_table(cfg, summary, len(per_seed)))
    print(f"wrote {out / 'results.json'} and {', '.join(p.name for p in figures)} ({wall_seconds:.0f} s)")
    return result


# ------------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    _pyplot().close(fig)
    return path


def _plot_explained(cfg: ExperimentConfig, evr: np.ndarray, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    k = np.arange(1, evr.shape[1] + 1)
    ax.bar(k, evr.mean(axis=0), yerr=evr.std(axis=0) if len(evr) > 1 else None, color="tab:blue", label="ratio")
    ax2 = ax.twinx()
    ax2.plot(k, np.cumsum(evr, axis=1).mean(axis=0), color="tab:red", marker=".")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative", color="tab:red")
    ax.set_xlabel("principal direction")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"{cfg.name}: top {cfg.dim} directions explain {evr.sum(axis=1).mean():.1%}")
    return _save(fig, path)


def _band(ax: Any, x: np.ndarray, curve: dict[str, list[float]], color: str, label: str) -> None:
    mean, std = np.asarray(curve["mean"]), np.asarray(curve["std"])
    ax.plot(x, mean, color=color, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _plot_accuracy(cfg: ExperimentConfig, per_seed: list[dict[str, Any]], curves: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    sgd = curves["sgd"]["test_acc"]
    _band(left, np.arange(1, len(sgd["mean"]) + 1), sgd, COLORS["sgd"], "SGD")
    left.axvspan(0, cfg.sample_epochs, color="tab:orange", alpha=0.15, label=f"sampling window ({per_seed[0]['basis']['window'][1]} snapshots)")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy (%)")
    left.set_title("SGD, with the sampled window shaded")
    left.legend(loc="lower right")
    final = curves["sgd"]["test_acc"]["mean"][-1]
    for method in cfg.methods:
        if method in curves:
            acc = curves[method]["test_acc"]
            _band(right, np.arange(1, len(acc["mean"]) + 1), acc, COLORS[method], LABELS[method])
    right.axhline(final, color=COLORS["sgd"], linestyle="--", label=f"SGD after {cfg.epochs} epochs")
    right.set_xlabel("epoch in the subspace")
    right.set_title(f"{cfg.dim}-D subspace, from the same initialization")
    right.legend(loc="lower right")
    fig.suptitle(f"{cfg.name}: mean +- std over {len(per_seed)} seed(s)", fontsize=10)
    return _save(fig, path)


def _plot_residuals(per_seed: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in per_seed:
        ax.plot(s["basis"]["residuals"], marker="o", ms=2, label=f"seed {s['seed']}")
    ax.set_xlabel("snapshot")
    ax.set_ylabel(r"$\|w - P w\| / \|w\|$ (centred)")
    ax.set_title(f"residual of each snapshot outside the {per_seed[0]['basis']['d']}-D subspace")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, path)


def _plot_projection(per_seed: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    k = per_seed[0]["projection"]["k"]
    for i, s in enumerate(per_seed):
        rows = s["projection"]["snapshots"]
        x = [r["snapshot"] for r in rows]
        ax.plot(x, [r["test_acc"] for r in rows], color="tab:blue", alpha=0.8, label="snapshot" if i == 0 else None)
        ax.plot(x, [r["projected_test_acc"] for r in rows], color="tab:red", alpha=0.8,
                label=f"projection onto top {k}" if i == 0 else None)
    ax.set_xlabel("snapshot")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Figure 2b: snapshots and their {k}-D projections")
    ax.legend(loc="lower right")
    return _save(fig, path)
