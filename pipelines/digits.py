"""scikit-learn's 8 x 8 digits: ``trajstore run digits``.

1,797 images shipped with scikit-learn, a fixed 80/20 split. An MLP with BatchNorm is trained
with SGD; P-BFGS and P+-BFGS retrain it in the 40-D subspace of its early trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .experiment import ExperimentConfig, run

__all__ = ["Config", "main"]


@dataclass(frozen=True)
class Config(ExperimentConfig):
    name: str = "digits"
    data: str = "digits"
    model: str = "mlp"                        # 64 -> 128 -> 128 -> 10 with BatchNorm: 26,634 parameters
    lr: float = 0.1
    epochs: int = 40
    milestones: tuple[int, ...] = (20, 30)
    sample_epochs: int = 10
    snapshot_every: int = 3                   # 12 steps per epoch: 4 snapshots per epoch, 41 in the window
    dim: int = 40
    subspace_epochs: int = 10
    subspace_batch_size: int = 256            # 6 steps per epoch (1024 would give 2: too few for BFGS)
    threads: int = 1                          # a model this small runs fastest on one thread


def main(config: Config = Config()) -> dict[str, Any]:
    return run(config)
