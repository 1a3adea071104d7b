"""The paper's CIFAR set-ups: ``trajstore run cifar10-resnet20 --set data_root=DIR`` and friends.

CIFAR-10 with the CIFAR ResNet-20/32 (Table 1 of the paper) and CIFAR-100 with any model of
Table 3 (``cifar100-wrn-40-10``, ``cifar100-inception-v4``, ``cifar100-vgg11_bn``,
``cifar100-mobilenet``, ``cifar100-densenet121``, ``cifar100-xception``, ``cifar100-googlenet``,
``cifar100-shufflenetv2``, ``cifar100-squeezenet``, ``cifar100-seresnet18``, ``cifar100-nasnet``),
or any other model name (``cifar100-resnet32``, ``cifar100-torchvision:NAME``). As in the paper,
MobileNet and Inception-v4 are pre-trained for one epoch before snapshot 0 (``pretrain_epochs``).
The data is read from a local folder holding the python version of the data set (nothing is
downloaded), with the paper's augmentation: 4-pixel pad and random crop, horizontal flip,
per-channel normalization.

Defaults follow the paper's recipe: SGD with lr 0.1, momentum 0.9, weight decay 5e-4, batch 128,
step decay; snapshots during the first 30 epochs (3 per epoch, 91 in all) give the 40-D subspace,
where P-BFGS trains from the same initialization with batch 1024 for 20 epochs (a fifth of SGD's
100). This is GPU work: on a CPU one ResNet-20 epoch takes minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .experiment import ExperimentConfig, run

__all__ = ["Config", "config_for", "main"]

# Table 3's models that the paper pre-trains for one epoch before sampling starts.
PRETRAINED = ("mobilenet", "inception-v4")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    name: str = "cifar10-resnet20"
    data: str = "cifar10"
    data_root: str | None = None              # the folder that holds cifar-10-batches-py/ or cifar-100-python/
    model: str = "resnet20"
    lr: float = 0.1
    epochs: int = 100
    milestones: tuple[int, ...] = (50, 75)
    sample_epochs: int = 30
    snapshot_every: int = 130                 # 391 steps per epoch: 3 snapshots per epoch, 91 in the window
    dim: int = 40
    subspace_epochs: int = 20
    subspace_batch_size: int = 1024
    projection_snapshots: int = 31            # Figure 2b on every third snapshot
    num_workers: int = 4


def config_for(name: str) -> Config:
    """``cifar10-MODEL`` or ``cifar100-MODEL`` (MODEL as in ``pipelines.models.build_model``)."""
    data, _, model = name.partition("-")
    if data not in ("cifar10", "cifar100") or not model:
        raise ValueError(f"CIFAR experiments are named cifar10-MODEL or cifar100-MODEL, got {name!r}")
    pretrain = 1 if data == "cifar100" and model in PRETRAINED else 0
    return Config(name=name.replace(":", "_"), data=data, model=model, pretrain_epochs=pretrain)


def main(config: Config = Config()) -> dict[str, Any]:
    return run(config)
