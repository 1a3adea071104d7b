"""The store demo: record a small network's SGD trajectory into a store, describe it, and find
its DLDR subspace.

Runs in seconds on a CPU with data generated on the spot (a seeded Gaussian mixture, 10 classes,
32 features). Until the subspace-training pipelines exist this is trajstore's main job.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trajstore import TrajectoryStore, dldr
from trajstore._progress import progress_bar
from trajstore.info import format_info, store_info
from trajstore.plots import plot_basis

from .atomic import save_json
from .provenance import provenance


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"        # run folder; the store is OUT/trajectory.zarr
    seed: int = 0                 # seeds data, initialization and batch order
    epochs: int = 10              # SGD epochs; one snapshot per epoch plus the initialization
    samples: int = 4096           # training points in the generated mixture
    features: int = 32
    classes: int = 10
    hidden: int = 256
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    storage_dtype: str = "float32"
    dim: int = 5                  # directions of the DLDR basis of the whole trajectory
    threads: int = 1              # torch CPU threads: a model this small runs fastest on one


def make_data(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    centres = torch.randn(cfg.classes, cfg.features, generator=g) * 0.4  # overlapping classes
    y = torch.randint(cfg.classes, (cfg.samples,), generator=g)
    x = centres[y] + torch.randn(cfg.samples, cfg.features, generator=g)
    return x, y


def main(cfg: DemoConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "trajectory.zarr"
    if path.exists():
        shutil.rmtree(path)
    x, y = make_data(cfg)
    model = nn.Sequential(nn.Linear(cfg.features, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(),
                          nn.Linear(cfg.hidden, cfg.classes))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    started = time.time()
    with TrajectoryStore.create(path, model, storage_dtype=cfg.storage_dtype, attrs={"config": asdict(cfg)}) as store:
        store.append(model, step=0, epoch=0, lr=cfg.lr)  # snapshot 0 = the initialization
        step = 0
        for epoch in progress_bar(range(1, cfg.epochs + 1), desc="demo: SGD epochs", unit="epoch"):
            model.train()
            total, correct, loss_sum = 0, 0, 0.0
            for idx in torch.randperm(cfg.samples, generator=g).split(cfg.batch_size):
                opt.zero_grad()
                logits = model(x[idx])
                loss = nn.functional.cross_entropy(logits, y[idx])
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y[idx]).sum())
                total += len(idx)
            store.append(model, step=step, epoch=epoch, lr=cfg.lr,
                         metrics={"train_loss": loss_sum / total, "train_acc": 100.0 * correct / total})
    basis = dldr(path, cfg.dim, progress=True)
    png = plot_basis(basis, out / "basis.png")
    info = store_info(path)
    print(format_info(info))
    evr = basis.explained_variance_ratio
    print(f"DLDR: the top {cfg.dim} directions explain {evr.sum():.2%} of the trajectory's variance "
          f"(top 1: {evr[0]:.2%}); largest per-snapshot residual {basis.residuals().max():.3f}; wrote {png}")
    result = {"config": asdict(cfg), "provenance": provenance(), "wall_seconds": time.time() - started,
              "store": str(path), "info": info,
              "basis": {"name": basis.name, "d": basis.d, "singular_values": basis.singular_values.tolist(),
                        "explained_variance_ratio": evr.tolist(), "residuals": basis.residuals().tolist(),
                        "orthonormality": basis.orthonormality}}
    save_json(result, out / "results.json")
    print(f"wrote {out / 'results.json'}")
    return result
