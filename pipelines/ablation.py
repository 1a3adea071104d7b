"""The shape of the paper's Table 1 on MNIST-1D: ``trajstore run ablation``.

Which trajectory gives a good subspace? For each seed, the 1-D CNN of ``trajstore run mnist1d``
is trained twice, by SGD (lr 0.1, momentum 0.9) and by Adam (lr 1e-3), through the sampling
window only (4 snapshots per epoch). From each trajectory, the bases of two windows (the first
``short`` and the first ``long`` epochs) and of each d in ``dims`` that the window's snapshots
span (d <= t - 1) are computed (the Gram matrix is cached, so each extra basis costs one pass),
and P-BFGS retrains the network from the initialization in each subspace for ``epochs`` epochs.

Written to OUT: ``ablation.json`` (the config, per-seed test accuracies, mean ± std, provenance),
``ablation.png`` (test accuracy against d, one line per sampler and window, ± std bands) and a
printed table. Every stage resumes (the sampling and P-BFGS runs are those of
:mod:`pipelines.experiment`). About 10 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["AblationConfig", "main", "format_table"]

SAMPLERS = {"sgd": {"optimizer": "sgd", "lr": 0.1}, "adam": {"optimizer": "adam", "lr": 1e-3}}  # the paper's rates


@dataclass(frozen=True)
class AblationConfig:
    out: str = "runs/ablation"
    seed: int = 0
    seeds: int = 3
    short: int = 5               # epochs of the short window (21 snapshots)
    long: int = 10               # epochs of the long window (41 snapshots)
    dims: tuple[int, ...] = (5, 10, 20, 40)
    epochs: int = 10             # P-BFGS epochs in each subspace
    samplers: tuple[str, ...] = ("sgd", "adam")

    def __post_init__(self) -> None:
        if not 1 <= self.short < self.long:
            raise ValueError(f"windows must satisfy 1 <= short < long, got short={self.short}, long={self.long}")
        if not self.dims or min(self.dims) < 1 or self.seeds < 1 or self.epochs < 1:
            raise ValueError("dims, seeds and epochs must be positive")
        bad = [s for s in self.samplers if s not in SAMPLERS]
        if bad:
            raise ValueError(f"unknown samplers {bad}; choose among {', '.join(SAMPLERS)}")


def _experiment(cfg: AblationConfig, sampler: str) -> Any:
    from .mnist1d import Config

    return replace(Config(), name=f"ablation-{sampler}", out=str(Path(cfg.out) / sampler), epochs=cfg.long,
                   sample_epochs=cfg.long, milestones=(), subspace_epochs=cfg.epochs, methods=("pbfgs",),
                   **SAMPLERS[sampler])


def _one_seed(cfg: AblationConfig, sampler: str, seed: int) -> list[dict[str, Any]]:
    import trajstore
    from trajstore import TrajectoryStore

    from .experiment import STORE, _check_folder, _Setup, sample, train_subspace

    exp = _experiment(cfg, sampler)
    _check_folder(exp)  # a folder of other settings is refused, not mixed in
    folder = Path(exp.out) / f"seed-{seed}"
    setup = _Setup(exp, seed)
    sampled = sample(exp, folder, seed, setup)
    with TrajectoryStore.open(folder / STORE) as store:
        epochs = [r.get("epoch") or 0 for r in store.records]
    rows = []
    for window in (cfg.short, cfg.long):
        stop = max(i for i, e in enumerate(epochs) if e <= window) + 1  # the snapshots of the first `window` epochs
        for d in cfg.dims:
            row = {"sampler": sampler, "seed": seed, "window_epochs": window, "snapshots": stop, "d": d,
                   "sampler_test_acc": sampled["history"][-1]["test_acc"]}
            if d > stop - 1:  # t snapshots span at most t - 1 directions
                rows.append({**row, "test_acc": None})
                continue
            basis = trajstore.dldr(folder / STORE, d, stop=stop, name=f"w{window}-d{d}")
            result = train_subspace(exp, folder, seed, "pbfgs", basis, setup, tag=f"pbfgs-w{window}-d{d}")
            rows.append({**row, "test_acc": result["history"][-1]["test_acc"],
                         "explained": float(basis.explained_variance_ratio.sum())})
    return rows


def _summary(cfg: AblationConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for sampler in cfg.samplers:
        for window in (cfg.short, cfg.long):
            for d in cfg.dims:
                accs = [r["test_acc"] for r in rows if (r["sampler"], r["window_epochs"], r["d"]) == (sampler, window, d)]
                mine = [r for r in rows if (r["sampler"], r["window_epochs"]) == (sampler, window)]
                base = [r["sampler_test_acc"] for r in mine if r["d"] == d]
                reached = [a for a in accs if a is not None]
                out.append({"sampler": sampler, "window_epochs": window, "snapshots": mine[0]["snapshots"], "d": d,
                            "test_acc_mean": float(np.mean(reached)) if reached else None,
                            "test_acc_std": float(np.std(reached, ddof=1)) if len(reached) > 1 else 0.0,
                            "sampler_test_acc_mean": float(np.mean(base)), "seeds": len(reached)})
    return out


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def format_table(cfg: AblationConfig, summary: list[dict[str, Any]]) -> str:
    head = ("| sampler | window (snapshots) | " + " | ".join(f"d = {d}" for d in cfg.dims)
            + f" | the sampler after {_epochs(cfg.long)} |")
    lines = [f"P-BFGS test accuracy (%) after {_epochs(cfg.epochs)} on MNIST-1D, mean ± std over {cfg.seeds} "
             f"seed{'s' if cfg.seeds > 1 else ''} (— where d > t - 1):", "", head, "|---" * (len(cfg.dims) + 3) + "|"]
    for sampler in cfg.samplers:
        for window in (cfg.short, cfg.long):
            cells = [r for r in summary if (r["sampler"], r["window_epochs"]) == (sampler, window)]
            acc = ["—" if r["test_acc_mean"] is None else f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}" for r in cells]
            lines.append(f"| {sampler.upper() if sampler == 'sgd' else 'Adam'} | {_epochs(window)} ({cells[0]['snapshots']}) | "
                         + " | ".join(acc) + f" | {cells[0]['sampler_test_acc_mean']:.2f} |")
    return "\n".join(lines)


def _figure(cfg: AblationConfig, summary: list[dict[str, Any]]) -> Any:
    from .report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (sampler, window), style in zip([(s, w) for s in cfg.samplers for w in (cfg.short, cfg.long)],
                                        ["-o", "--o", "-s", "--s"]):
        cells = [r for r in summary if (r["sampler"], r["window_epochs"]) == (sampler, window)
                 and r["test_acc_mean"] is not None]
        d = np.array([r["d"] for r in cells])
        mean = np.array([r["test_acc_mean"] for r in cells])
        std = np.array([r["test_acc_std"] for r in cells])
        label = f"{'SGD' if sampler == 'sgd' else 'Adam'}, {_epochs(window)} ({cells[0]['snapshots']} snapshots)"
        line = ax.plot(d, mean, style, label=label)[0]
        if cfg.seeds > 1:
            ax.fill_between(d, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(cfg.dims), [str(v) for v in cfg.dims])
    ax.set_xlabel("d, the dimension of the subspace")
    ax.set_ylabel("test accuracy (%)")
    over = f"mean ± std over {cfg.seeds} seeds" if cfg.seeds > 1 else "1 seed"
    ax.set_title(f"ablation (MNIST-1D): P-BFGS after {_epochs(cfg.epochs)}, {over}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def configure(overrides: dict[str, str] | None = None, **given: Any) -> AblationConfig:
    """The ablation's config with ``--set`` overrides (``short``, ``long``, ``dims``, ``epochs``,
    ``samplers``) and ``out`` / ``seed`` / ``seeds``; ConfigError naming the flag otherwise."""
    from .config import _parse
    from .validate import ConfigError

    base = AblationConfig()
    values: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for key, text in (overrides or {}).items():
        if key not in ("short", "long", "dims", "epochs", "samplers"):
            raise ConfigError(f"--set {key}={text}: the ablation takes short, long, dims, epochs and samplers")
        try:
            values[key] = _parse(text, getattr(base, key))
        except ValueError:
            raise ConfigError(f"--set {key}={text}: not a value for {key} (default {getattr(base, key)!r})") from None
    try:
        return replace(base, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ablation: {e}") from None


def main(cfg: AblationConfig = AblationConfig()) -> dict[str, Any]:
    from .atomic import save_json
    from .provenance import provenance
    from .report import _save

    started = time.perf_counter()
    rows = [row for seed in range(cfg.seed, cfg.seed + cfg.seeds) for sampler in cfg.samplers
            for row in _one_seed(cfg, sampler, seed)]
    summary = _summary(cfg, rows)
    out = Path(cfg.out)
    result = {"config": asdict(cfg), "rows": rows, "summary": summary, "wall_seconds": time.perf_counter() - started,
              "provenance": provenance()}
    save_json(result, out / "ablation.json")
    _save(_figure(cfg, summary), out / "ablation.png")
    print(format_table(cfg, summary))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'} ({result['wall_seconds']:.0f} s)")
    return result
