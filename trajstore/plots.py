"""Figures in the style of the paper (matplotlib, Agg backend, PNG).

The panels are drawn by functions that take an Axes and plain arrays, so that the CLI's figure of
one basis (:func:`basis_figure`) and an experiment's report over several seeds
(``pipelines/report.py``) draw explained variance and residuals the same way.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._backend import write_atomic
from ._names import is_valid_name
from .basis import Basis

__all__ = ["basis_figure", "draw_explained_variance", "draw_residuals", "plot_basis", "plural",
           "rank_statement", "rounding_level"]

# The basis U is stored in float32: a residual within ten float32 epsilons (1.2e-6) of a
# snapshot's norm cannot be told from an exact fit by the stored basis.
BASIS_EPS = float(np.finfo(np.float32).eps)
# eigh is backward stable: each eigenvalue of the float64 Gram matrix is off by a few eps * lambda_1
# (measured: 2 eps * lambda_1 for MNIST-1D's 41 snapshots); ten of them bound that with a margin.
GRAM_EPS = float(np.finfo(np.float64).eps)
BAND = {"color": "0.6", "alpha": 0.25, "linewidth": 0}
TITLE_WIDTH = 64  # characters per line of a panel's title at fontsize 9 in a 5.5-inch panel


def plural(count: int, word: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def rounding_level(lambda_1: float | None = None, norms2: np.ndarray | None = None) -> np.ndarray | float:
    """Relative residual ``||w - P w|| / ||w||`` below which a snapshot's residual is rounding.

    The larger of ``10 eps_float32`` (the stored basis' precision, 1.19e-6) and, when the top
    eigenvalue ``lambda_1`` and the squared centred norms ``norms2`` (shape (t,)) are given, the
    eigendecomposition's resolution ``sqrt(10 eps_float64 lambda_1 / ||w_j||^2)``, which exceeds the
    first only for a snapshot within ``lambda_1 / 3000`` of the window's mean.

    Returns
    -------
    float, or ndarray of shape (t,) when ``norms2`` is given.
    """
    floor = 10.0 * BASIS_EPS
    if lambda_1 is None or norms2 is None:
        return floor
    norms2 = np.asarray(norms2, dtype=np.float64)
    with np.errstate(divide="ignore"):
        gram = np.sqrt(10.0 * GRAM_EPS * max(lambda_1, 0.0) / np.where(norms2 > 0, norms2, 0.0))
    return np.maximum(floor, gram)


def _spans(evr: np.ndarray, t: int) -> bool:
    """Whether the top d directions span every centred snapshot: d = t - 1 (the most a window of t
    snapshots has), or a smaller rank, where the ratios sum to 1 within the Gram matrix's rounding."""
    d = evr.shape[-1]
    return d >= t - 1 or float(1.0 - np.mean(evr.sum(axis=-1))) <= 10.0 * t * GRAM_EPS


def _percent(fraction: float) -> str:
    """A fraction as a percentage with the decimals it needs not to read as 100% unless it is
    (99.996% is not "100.0%")."""
    for decimals in range(1, 7):
        text = f"{fraction:.{decimals}%}"
        if not text.startswith("100.") or fraction >= 1.0 - 1e-9:  # 1 to the Gram's rounding
            return text
    return text


def rank_statement(evr: np.ndarray, t: int) -> str:
    """One line on what the explained fraction means: ``evr`` (d,) or (seeds, d), ``t`` snapshots.

    At d = t - 1 the top d directions span all t centred snapshots (they sum to zero, so their
    rank is at most t - 1) and 100% is true by construction, which the line says.
    """
    d = evr.shape[-1]
    explained = _percent(float(np.mean(evr.sum(axis=-1))))
    if d >= t - 1:
        return (f"d = {d} = t − 1: the top {d} directions span all {t} centred snapshots "
                f"({explained} by construction)")
    if _spans(evr, t):
        return (f"the top {d} directions span all {t} centred snapshots (their rank is {d} < t − 1 = {t - 1}; "
                f"{explained} by construction)")
    return f"the top {d} of at most t − 1 = {t - 1} directions explain {explained}"


def draw_explained_variance(ax: Any, evr: np.ndarray, t: int) -> None:
    """Explained-variance ratio of each direction, log scale, and the cumulative fraction.

    ``evr`` is (d,) or (seeds, d); with several seeds the bars are the mean and the whiskers the
    range over seeds (a standard deviation below a small ratio has no place on a log axis).
    """
    from matplotlib.ticker import MaxNLocator

    evr = np.atleast_2d(np.asarray(evr, dtype=np.float64))
    seeds, d = evr.shape
    k = np.arange(1, d + 1)
    mean = evr.mean(axis=0)
    # clipped: seeds that agree leave a mean a rounding off their min or max, which errorbar refuses
    spread = np.clip(np.stack([mean - evr.min(axis=0), evr.max(axis=0) - mean]), 0, None) if seeds > 1 else None
    label = f"ratio (mean, range over {seeds} seeds)" if seeds > 1 else "ratio"
    ax.bar(k, mean, yerr=spread, color="tab:blue", label=label, error_kw={"lw": 0.8})
    ax.set_yscale("log")  # the ratios fall over orders of magnitude: a linear axis hides all but the first few
    ax.set_xlabel("principal direction")
    ax.set_ylabel("explained variance ratio (log)")
    twin = ax.twinx()
    cumulative = np.cumsum(evr, axis=1).mean(axis=0)
    reach = ", ".join(f"{p:.0%} by {int(np.argmax(cumulative >= p)) + 1}" for p in (0.9, 0.99) if cumulative[-1] >= p)
    twin.plot(k, cumulative, color="tab:red", marker=".", ms=3, label=f"cumulative ({reach})" if reach else "cumulative")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative", color="tab:red")
    bars, labels = ax.get_legend_handles_labels()
    lines, more = twin.get_legend_handles_labels()
    twin.legend(bars + lines, labels + more, fontsize=8, loc="center right")
    ax.set_xlim(0.3, d + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(textwrap.fill(rank_statement(evr, t), TITLE_WIDTH), fontsize=9)


def draw_residuals(ax: Any, residuals: Sequence[np.ndarray], floor: np.ndarray | float, d: int,
                   labels: Sequence[str | None] | None = None, x: np.ndarray | None = None) -> int:
    """Per-snapshot relative residuals on a log axis, with the rounding level shaded.

    ``residuals`` holds one (t,) array per seed (``labels``, one each, name them in the legend),
    ``x`` the snapshots' indices (default 0 to t - 1) and ``floor`` the level of
    :func:`rounding_level` (a number, or (t,) for one seed). A residual below the floor is drawn on
    it, as a hollow marker inside the band: its value is rounding, not a distance from the
    subspace. Returns how many residuals lie at rounding level.
    """
    from matplotlib.ticker import MaxNLocator

    floors = np.broadcast_to(np.asarray(floor, dtype=np.float64), np.shape(residuals[0]))
    t = len(floors)
    xs = np.arange(t) if x is None else np.asarray(x)
    labels = [None] * len(residuals) if labels is None else list(labels)
    below = 0
    for r, label in zip(residuals, labels, strict=True):
        r = np.asarray(r, dtype=np.float64)
        low = r <= floors
        shown = np.where(low, floors, r)
        line, = ax.plot(xs, shown, marker="o", ms=3, label=label)
        ax.plot(xs[low], shown[low], "o", ms=4, color=line.get_color(), mfc="white")  # rounding: hollow
        below += int(low.sum())
    # A relative residual lies in [0, 1]: the axis always spans the rounding level up to 1, so
    # rounding-level residuals sit at the bottom instead of filling the axis as a shape of their own.
    lo = float(floors.min()) / 10
    ax.set_yscale("log")
    ax.set_ylim(lo, 1.5)
    level = f"{floors[0]:.1e}" if np.all(floors == floors[0]) else f"{floors.min():.1e} to {floors.max():.1e}"
    ax.fill_between(xs, lo, floors, step="mid", label=f"rounding level ({level} of ‖w‖)", **BAND)
    ax.set_xlabel("snapshot")
    ax.set_ylabel(r"$\|w - P w\| / \|w\|$ (centred, log)")
    seeds = len(residuals)
    if below == t * seeds:
        each = f" (of each of {plural(seeds, 'seed')})" if seeds > 1 else ""
        why = " (d = t − 1)" if d >= t - 1 else ""
        note = f"all {t} snapshots{each} are at rounding level: the subspace holds every one{why}"
    elif below:
        note = f"{below} of {t * seeds} residuals at rounding level (hollow markers)"
    else:
        worst = int(np.argmax([np.max(r) for r in residuals]))
        j = int(np.argmax(residuals[worst]))
        of = f", {labels[worst]}" if seeds > 1 and labels[worst] else ""
        note = f"none at rounding level; the largest is {residuals[worst][j]:.3g} (snapshot {xs[j]}{of})"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"residual of each snapshot outside the {d}-D subspace\n{textwrap.fill(note, TITLE_WIDTH)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    return below


def _experiment_of(basis: Basis) -> str | None:
    """The experiment (and seed) recorded in the attributes of the basis' trajectory, if any."""
    if basis._origin is None:  # in memory
        return None
    try:
        from .store import TrajectoryStore

        attrs = TrajectoryStore.open(basis._origin, trajectory=basis.trajectory).attrs
        name = attrs.get("experiment", {}).get("name")
    except Exception:  # a figure is labelled from what can be read; nothing else depends on it
        return None
    if not isinstance(name, str):
        return None
    seed = attrs.get("seed")
    return f"{name:.80}, seed {seed}" if isinstance(seed, int) else f"{name:.80}"


def basis_figure(basis: Basis, *, experiment: str | None = None) -> Any:
    """The Figure of :func:`plot_basis`: explained variance (log) and per-snapshot residuals.

    ``experiment`` titles the figure; by default it is read from the trajectory's attributes
    (``attrs["experiment"]["name"]``, as ``trajstore run`` and ``sample`` record it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gram = basis.centred_gram
    floor = rounding_level(float(np.linalg.eigvalsh(gram)[-1]), np.diag(gram))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_explained_variance(ax1, basis.explained_variance_ratio, basis.t)
    draw_residuals(ax2, [basis.residuals()], floor, basis.d, x=np.arange(basis.start, basis.stop))
    experiment = experiment or _experiment_of(basis)
    where = f"{experiment}: " if experiment else ""
    fig.suptitle(f"{where}basis {basis.name or ''} of trajectory {basis.trajectory!r}, snapshots "
                 f"[{basis.start}, {basis.stop}), n = {basis.n:,}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_basis(basis: Basis, path: str | Path, *, experiment: str | None = None) -> Path:
    """Explained-variance ratios and per-snapshot residuals of a basis (paper, Figure 2a), as PNG.

    Raises ValueError, writing nothing, for a path that climbs back out of a folder it names
    (``a/../b.png``: what a basis name holding ``/..`` makes of ``folder / f"{name}.png"``), and for
    a basis whose name breaks the naming rule (such a name is never used to build a path).

    See Also
    --------
    basis_figure : the Figure it saves.
    """
    path = Path(path)
    parts = list(path.parts)
    while parts and parts[0] == "..":  # leading ones: a folder relative to the working directory
        parts.pop(0)
    if ".." in parts or (basis.name is not None and not is_valid_name(basis.name)):
        raise ValueError(f"refusing to write the plot of basis {basis.name!r:.200} to {str(path)!r:.300}: "
                         "the path leaves the folder it names")
    fig = basis_figure(basis, experiment=experiment)
    import matplotlib.pyplot as plt  # after basis_figure chose the Agg backend
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
