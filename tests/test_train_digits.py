"""P+-BFGS trains a network with BatchNorm and Dropout on real data (scikit-learn's digits,
shipped with the package: no download) to SGD's accuracy, from the same initialization, with a
basis found from SGD's own trajectory. Seeded; a few seconds on 2 cores."""

from __future__ import annotations

import uuid

import numpy as np
import torch
from torch import nn

from trajstore import PBFGS, TrajectoryStore, dldr


def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x = torch.tensor(x[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm])
    return x[:1200], y[:1200], x[1200:], y[1200:]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean()) * 100
    model.train()
    return acc


def test_pplus_bfgs_matches_sgd_on_digits_with_batchnorm_and_dropout() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))
    loss_fn = nn.CrossEntropyLoss()
    url = f"memory://digits-{uuid.uuid4().hex}"
    sgd_epochs = 20
    g = torch.Generator().manual_seed(1)
    with TrajectoryStore.create(url, model) as store:
        store.append(model)  # snapshot 0: the initialization
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(sgd_epochs):
            for idx in torch.randperm(len(ytr), generator=g).split(64):
                opt.zero_grad()
                loss_fn(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
            store.append(model)
    sgd_acc = accuracy(model, xte, yte)
    basis = dldr(url, 15)

    store = TrajectoryStore.open(url)
    store.load_into(model, 0)  # the same initialization, parameters and BatchNorm buffers
    opt = PBFGS(model.parameters(), basis, plus=True)
    for _ in range(sgd_epochs // 4):  # at most a quarter of SGD's epochs
        for idx in torch.randperm(len(ytr), generator=g).split(256):
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = loss_fn(model(xtr[idx]), ytr[idx])
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            opt.step(closure)
    pbfgs_acc = accuracy(model, xte, yte)
    print(f"\nSGD {sgd_epochs} epochs: {sgd_acc:.2f}%; P+-BFGS (d = 15) {sgd_epochs // 4} epochs: {pbfgs_acc:.2f}%; {opt.stats['failures']} failed line searches, trials {sum(opt.stats['trials'])}")
    assert sgd_acc > 90  # the baseline learned the task
    assert pbfgs_acc >= sgd_acc - 2.0, (pbfgs_acc, sgd_acc)  # the bar: within 2 points of SGD
    assert opt.stats["steps"] == 5 * 5 and opt.stats["failures"] <= opt.stats["steps"] // 2
