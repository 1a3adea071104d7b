"""PBFGS and PSGD follow torch.optim's conventions: schedulers, parameter checks, return values.

``lr`` of PBFGS scales every step: the line search starts at ``alpha = lr`` and the P+ residual
moves by ``lr * residual_lr``. So every torch scheduler drives PBFGS's ``lr`` along the same
schedule it gives SGD, and each step's first trial is that ``lr`` (``stats["step_sizes"]``
records the accepted alpha: ``lr * beta**(trials - 1)``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from trajstore import PBFGS, PSGD, TrajectoryStore, dldr
from trajstore.errors import LayoutMismatchError


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "s.zarr"
    model = net()
    w = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    with TrajectoryStore.create(path, model) as store:
        for _ in range(8):
            store.append(model)
            w = w + 0.1 * torch.randn(w.shape, generator=gen)
            torch.nn.utils.vector_to_parameters(w, model.parameters())
    dldr(path, 5, name="b")
    return path


def basis_of(path: Path) -> Any:
    from trajstore import open_basis

    return open_basis(path, "b")


def readme_closure(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The README's closure for ``model`` on ``(x, y)``."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    return closure


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(64, 4, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


SCHEDULERS: list[tuple[str, Callable[[torch.optim.Optimizer], Any]]] = [
    ("StepLR", lambda o: S.StepLR(o, step_size=2, gamma=0.5)),
    ("MultiStepLR", lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.3)),
    ("ConstantLR", lambda o: S.ConstantLR(o, factor=0.5, total_iters=2)),
    ("LinearLR", lambda o: S.LinearLR(o, start_factor=0.25, total_iters=4)),
    ("ExponentialLR", lambda o: S.ExponentialLR(o, gamma=0.7)),
    ("PolynomialLR", lambda o: S.PolynomialLR(o, total_iters=5, power=2.0)),
    ("CosineAnnealingLR", lambda o: S.CosineAnnealingLR(o, T_max=5)),
    ("CosineAnnealingWarmRestarts", lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2)),
    ("LambdaLR", lambda o: S.LambdaLR(o, lambda e: 1 / (1 + e))),
    ("MultiplicativeLR", lambda o: S.MultiplicativeLR(o, lambda e: 0.8)),
    ("CyclicLR", lambda o: S.CyclicLR(o, base_lr=0.2, max_lr=1.0, step_size_up=2, cycle_momentum=False)),
    ("OneCycleLR", lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=8, cycle_momentum=False)),
    ("ReduceLROnPlateau", lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=10.0)),
    ("SequentialLR", lambda o: S.SequentialLR(o, [S.ConstantLR(o, factor=0.5, total_iters=2),
                                                  S.ExponentialLR(o, gamma=0.8)], milestones=[2])),
    ("ChainedScheduler", lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.9),
                                                       S.StepLR(o, step_size=2, gamma=0.5)])),
]


def test_the_table_covers_every_torch_scheduler() -> None:
    names = {n for n, c in vars(S).items() if isinstance(c, type) and issubclass(c, S.LRScheduler)
             and c is not S.LRScheduler and not n.startswith("_")}
    names |= {"ReduceLROnPlateau"}
    assert names - {n for n, _ in SCHEDULERS} <= {"LRScheduler"}, names - {n for n, _ in SCHEDULERS}


@pytest.mark.parametrize("name,make", SCHEDULERS, ids=[n for n, _ in SCHEDULERS])
def test_every_scheduler_drives_the_first_trial_step(stored: Path, name: str, make: Callable[..., Any]) -> None:
    model = net()
    opt = PBFGS(model.parameters(), basis_of(stored), beta=0.5)
    sched = make(opt)
    # the same scheduler on SGD: the schedule PBFGS's lr must follow
    twin = torch.optim.SGD(net().parameters(), lr=1.0)
    twin_sched = make(twin)
    x, y = data()
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        assert lrs[-1] == pytest.approx(twin.param_groups[0]["lr"], rel=1e-12), name

        loss = opt.step(readme_closure(opt, model, x, y))
        twin.step()  # (no gradients: a no-op that keeps torch's call-order warning quiet)
        if name == "ReduceLROnPlateau":
            sched.step(float(loss))
            twin_sched.step(float(loss))
        else:
            sched.step()
            twin_sched.step()
    stats = opt.stats
    for lr, k, alpha in zip(lrs, stats["trials"], stats["step_sizes"]):
        # each step's line search started at the scheduled lr and halved (beta) per rejected trial
        assert alpha == pytest.approx(lr * 0.5 ** (k - 1), rel=1e-12) or (alpha == 0 and k == 20)
    assert len(set(lrs)) > 1, f"{name} never changed lr: the table would not test it"


def test_residual_step_is_scaled_by_lr(stored: Path) -> None:
    """P+-BFGS's residual move is ``-lr * residual_lr * (g - U U^T g)`` at the first step."""
    basis = basis_of(stored)
    u = torch.from_numpy(basis.to_numpy()).double()
    x, y = data()
    moves = {}
    for lr in (1.0, 0.3):
        model = net().double()
        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=torch.float64), plus=True, lr=lr, residual_lr=0.01)
        w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

        opt.step(readme_closure(opt, model, x.double(), y))
        w1 = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        moves[lr] = (w1 - w0) - u @ (u.T @ (w1 - w0))  # the part of the move outside span(U)
        # U is float32: U^T U - I is about basis.orthonormality, which leaves that fraction of the
        # in-span move in the difference above
        atol = 10 * basis.orthonormality * float((w1 - w0).abs().max())
        model.zero_grad()
        with torch.enable_grad():
            torch.nn.utils.vector_to_parameters(w0, model.parameters())
            nn.functional.cross_entropy(model(x.double()), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        expected = -lr * 0.01 * (g - u @ (u.T @ g))
        assert torch.allclose(moves[lr], expected, rtol=1e-9, atol=atol), (lr, (moves[lr] - expected).abs().max())
    assert torch.allclose(moves[0.3], 0.3 * moves[1.0], rtol=1e-6, atol=atol)


def test_step_returns_a_tensor(stored: Path) -> None:
    model = net()
    opt = PBFGS(model.parameters(), basis_of(stored))
    x, y = data()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    loss = opt.step(readme_closure(opt, model, x, y))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-6)  # the loss before the step


@pytest.mark.parametrize("optimizer", [lambda p, b: PBFGS(p, b), lambda p, b: PSGD(p, b, lr=0.1)],
                         ids=["PBFGS", "PSGD"])
def test_parameters_are_checked_against_the_layout(stored: Path, optimizer: Callable[..., Any]) -> None:
    basis = basis_of(stored)
    model = net()
    with pytest.raises(LayoutMismatchError, match=r"parameter 0 has shape \(3,\); the basis's trajectory has "
                                                  r"'0.weight' of shape \(6, 4\)"):
        optimizer(list(model.parameters())[::-1], basis)  # reversed: the same n, in the wrong order

    class Other(nn.Module):  # another model with the same number of parameters (51)
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(2, 5, bias=False)
            self.c = nn.Parameter(torch.zeros(6))

    assert sum(p.numel() for p in Other().parameters()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(LayoutMismatchError, match=r"parameter 0 has shape \(6,\)"):  # its own c comes first
        optimizer(Other().parameters(), basis)
    optimizer(model.parameters(), basis)  # the right model is accepted


@pytest.mark.parametrize("optimizer", [lambda p, b: PBFGS(p, b), lambda p, b: PSGD(p, b, lr=0.1)],
                         ids=["PBFGS", "PSGD"])
def test_add_param_group_is_refused(stored: Path, optimizer: Callable[..., Any]) -> None:
    opt = optimizer(net().parameters(), basis_of(stored))
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


def test_state_dict_round_trips_step_sizes(stored: Path) -> None:
    model = net()
    opt = PBFGS(model.parameters(), basis_of(stored), lr=0.5)
    x, y = data()

    opt.step(readme_closure(opt, model, x, y))
    again = PBFGS(model.parameters(), basis_of(stored), lr=0.5)
    again.load_state_dict(opt.state_dict())
    assert again.stats == opt.stats and again.param_groups[0]["lr"] == 0.5
    assert np.isclose(opt.stats["step_sizes"][0], 0.5 * 0.55 ** (opt.stats["trials"][0] - 1))
