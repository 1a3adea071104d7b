"""MNIST-1D (Greydanus 2020), the embedded default: ``trajstore run mnist1d``.

4,000 training and 1,000 test sequences of 40 values, generated on the spot by the ``mnist1d``
package's ``make_dataset`` (never downloaded). A small 1-D CNN is trained with SGD; its
trajectory over the first epochs gives a 40-D subspace, in which P-BFGS and P+-BFGS retrain the
network from the same initialization in a quarter of SGD's epochs. Runs on 2 CPU cores in a
few minutes for three seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .experiment import ExperimentConfig, run

__all__ = ["Config", "main"]


@dataclass(frozen=True)
class Config(ExperimentConfig):
    name: str = "mnist1d"
    data: str = "mnist1d"
    model: str = "cnn1d"                      # 3 conv layers of 32 channels, BatchNorm: 9,738 parameters
    lr: float = 0.1                           # the paper's SGD: momentum 0.9, weight decay 5e-4, batch 128
    epochs: int = 40                          # the SGD baseline
    milestones: tuple[int, ...] = (20, 30)    # lr x 0.1 at these epochs
    sample_epochs: int = 10                   # the sampling window: the first quarter of the run
    snapshot_every: int = 8                   # 32 steps per epoch: 4 snapshots per epoch, 41 in the window
    dim: int = 40
    subspace_epochs: int = 10                 # a quarter of SGD's epochs
    subspace_batch_size: int = 256            # 16 steps per epoch (1024 would give 4: too few for BFGS)
    threads: int = 1                          # a model this small runs fastest on one thread


def main(config: Config = Config()) -> dict[str, Any]:
    return run(config)
