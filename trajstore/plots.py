"""Figures in the style of the paper (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._backend import write_atomic
from ._names import is_valid_name
from .basis import Basis

__all__ = ["plot_basis"]


def plot_basis(basis: Basis, path: str | Path) -> Path:
    """Explained-variance ratios and per-snapshot residuals of a basis (paper, Figure 2a).

    Raises ValueError, writing nothing, for a path that climbs back out of a folder it names
    (``a/../b.png``: what a basis name holding ``/..`` makes of ``folder / f"{name}.png"``), and for
    a basis whose name breaks the naming rule (such a name is never used to build a path).
    """
    path = Path(path)
    parts = list(path.parts)
    while parts and parts[0] == "..":  # leading ones: a folder relative to the working directory
        parts.pop(0)
    if ".." in parts or (basis.name is not None and not is_valid_name(basis.name)):
        raise ValueError(f"refusing to write the plot of basis {basis.name!r:.200} to {str(path)!r:.300}: "
                         "the path leaves the folder it names")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evr = basis.explained_variance_ratio
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    k = np.arange(1, basis.d + 1)
    ax1.bar(k, evr, color="tab:blue", label="ratio")
    ax1b = ax1.twinx()
    ax1b.plot(k, np.cumsum(evr), color="tab:red", marker=".", label="cumulative")
    ax1b.set_ylim(0, 1.02)
    ax1.set_xlabel("principal direction")
    ax1.set_ylabel("explained variance ratio")
    ax1b.set_ylabel("cumulative", color="tab:red")
    ax1.set_title(f"top {basis.d} of {basis.t} snapshots: {np.sum(evr):.1%} explained")
    snaps = np.arange(basis.start, basis.stop)
    ax2.plot(snaps, basis.residuals(), marker="o", ms=3)
    ax2.set_xlabel("snapshot")
    ax2.set_ylabel(r"$\|w - P w\| / \|w\|$ (centred)")
    ax2.set_title(f"projection residual onto the {basis.d}-D subspace")
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"basis {basis.name or ''} (trajectory {basis.trajectory!r}, n = {basis.n:,})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
