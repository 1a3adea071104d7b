"""trajstore: train deep networks in tiny subspaces found from their own training trajectories.

Implements DLDR and P-BFGS / P+-BFGS of Li et al., "Low Dimensional Trajectory Hypothesis is
True: DNNs can be Trained in Tiny Subspaces" / "Train Deep Neural Networks in 40-D Subspaces",
out of core: snapshots live in a Zarr v3 store and never have to fit in memory together.
"""

from __future__ import annotations

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .basis import Basis, open_basis
from .dldr import dldr, gram_matrix
from .layout import Layout
from .store import TrajectoryStore


def __getattr__(name: str) -> object:
    # The optimizers need torch; importing trajstore for the store and DLDR must not.
    if name in ("PBFGS", "ClosureError"):
        from . import pbfgs

        return getattr(pbfgs, name)
    if name == "PSGD":
        from .psgd import PSGD

        return PSGD
    if name == "Recorder":
        from .recorder import Recorder

        return Recorder
    if name == "ShardedRecorder":
        from .sharded import ShardedRecorder

        return ShardedRecorder
    if name == "RankMismatchError":
        from .distributed import RankMismatchError

        return RankMismatchError
    raise AttributeError(f"module 'trajstore' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["Basis", "ClosureError", "Layout", "PBFGS", "PSGD", "RankMismatchError", "Recorder", "ShardedRecorder",
           "TrajectoryStore", "dldr", "gram_matrix", "open_basis", "__version__", *_errors_all]
