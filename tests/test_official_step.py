"""``PBFGS(official=True)`` takes the official code's step: checked against a re-implementation
of ``train_pbfgs.py``'s step (tests/_official_step.py) on scikit-learn's digits with BatchNorm,
in float64 so that only rounding can tell them apart; and the paper's step (the default) is not it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from _official_step import OfficialStep
from trajstore import PBFGS, TrajectoryStore, dldr

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS, BATCH, D = 60, 64, 10


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).double()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = sklearn_datasets.load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float64), torch.tensor(data.target)


def batches(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen, out = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        out += [(x[order[a:a + BATCH]], y[order[a:a + BATCH]]) for a in range(0, len(y) - BATCH + 1, BATCH)]
    return out


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory, digits: tuple[torch.Tensor, torch.Tensor]) -> tuple[Path, torch.Tensor]:
    """SGD on digits, 21 snapshots every 8 steps; the basis of all of them in float64."""
    path = tmp_path_factory.mktemp("official") / "digits.zarr"
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrajectoryStore.create(path, model, storage_dtype="float32") as store:
        store.append(model, step=0)
        for k, (x, y) in enumerate(batches(*digits, 6, seed=1)[:160], start=1):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if k % 8 == 0:
                store.append(model, step=k)
    basis = dldr(path, D)
    return path, torch.from_numpy(basis.to_numpy()).double()


def start(path: Path) -> nn.Module:
    with TrajectoryStore.open(path) as store:
        return store.load_into(net(), 0)


def ours(path: Path, u: torch.Tensor, data: list[Any], *, penalty: float = 0.0, **kw: Any) -> tuple[nn.Module, PBFGS]:
    from trajstore import open_basis

    model = start(path)
    model.train()
    opt = PBFGS(model.parameters(), open_basis(path, "default-0-21-d10").on("cpu", dtype=torch.float64),
                buffers=model.buffers(), **kw)
    for x, y in data:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if torch.is_grad_enabled():
                loss.backward()
                return loss
            return loss + penalty

        opt.step(closure)
    return model, opt


def theirs(path: Path, u: torch.Tensor, data: list[Any], *, penalty: float = 0.0, alpha: float = 0.0) -> OfficialStep:
    ref = OfficialStep(start(path), u.T.contiguous(), alpha=alpha)
    for x, y in data:
        ref.step(x, y, trial_penalty=penalty)
    return ref


def state(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])



@pytest.mark.parametrize("plus", [False, True], ids=["P-BFGS", "P+-BFGS"])
def test_official_mode_takes_the_official_step(trajectory: tuple[Path, torch.Tensor],
                                               digits: tuple[torch.Tensor, torch.Tensor], plus: bool) -> None:
    """Equal to float64 rounding: 2e-16 after the first step. The two implementations order their
    sums differently (a chunked lift vs one matrix product) and BFGS amplifies the rounding
    from step to step, smoothly (measured: 6e-15 at step 6, 1e-10 at 24, 3e-8 at 60 for P+-BFGS;
    1.5e-10 at 60 for P-BFGS), with the same trial counts at every step; the paper's step is
    1e-3 and more away."""
    path, u = trajectory
    data = batches(*digits, 3, seed=2)[:STEPS]
    first, _ = ours(path, u, data[:1], official=True, plus=plus)
    first_ref = theirs(path, u, data[:1], alpha=0.01 if plus else 0.0)
    torch.testing.assert_close(state(first), state(first_ref.model), rtol=0, atol=1e-14)
    model, opt = ours(path, u, data, official=True, plus=plus)
    ref = theirs(path, u, data, alpha=0.01 if plus else 0.0)
    assert opt.stats["trials"] == [m + 1 for m in ref.search_times] and len(ref.search_times) == STEPS
    assert max(opt.stats["trials"]) > 1  # backtracking happened
    # parameters and BatchNorm statistics (one update per step: the origin's pass)
    torch.testing.assert_close(state(model), state(ref.model), rtol=0, atol=1e-6 if plus else 1e-9)
    assert int(model[1].num_batches_tracked) == STEPS
    paper, paper_opt = ours(path, u, data, plus=plus)
    assert int(paper[1].num_batches_tracked) == 2 * STEPS  # the paper's step: origin and accepted point
    assert float((state(paper) - state(ref.model)).abs().max()) > 1e-3
    assert paper_opt.stats["trials"] != opt.stats["trials"]  # beta 0.55 vs 0.4


def test_official_failure_rule_takes_the_untested_step_and_keeps_b(trajectory: tuple[Path, torch.Tensor],
                                                                   digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Every trial looks worse: the official code still moves, by 0.4**20 of the direction, keeps
    its B and its curvature pair; the paper's step does not move and resets B."""
    path, u = trajectory
    data = batches(*digits, 1, seed=3)[:4]
    model, opt = ours(path, u, data, official=True, penalty=1e3)
    ref = theirs(path, u, data, penalty=1e3)
    assert opt.stats["trials"] == [20] * 4 and opt.stats["failures"] == 4 and ref.search_times == []
    assert opt.stats["step_sizes"] == [pytest.approx(0.4 ** 20)] * 4
    torch.testing.assert_close(state(model), state(ref.model), rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[next(iter(model.parameters()))]["B"], ref.bk, rtol=1e-9, atol=1e-12)
    assert not torch.equal(state(model)[:100], state(start(path))[:100])
    paper, paper_opt = ours(path, u, data, penalty=1e3)
    assert paper_opt.stats["step_sizes"] == [0.0] * 4
    params = sum(p.numel() for p in paper.parameters())
    assert torch.equal(torch.nn.utils.parameters_to_vector(paper.parameters()),
                       torch.nn.utils.parameters_to_vector(start(path).parameters())) and params > 0


def test_official_defaults_and_overrides(trajectory: tuple[Path, torch.Tensor]) -> None:
    from trajstore import open_basis

    model = start(trajectory[0])
    basis = open_basis(trajectory[0], "default-0-21-d10")
    official = PBFGS(model.parameters(), basis, official=True)
    assert (official.defaults["beta"], official.defaults["eps"]) == (0.4, 1e-20)
    paper = PBFGS(model.parameters(), basis)
    assert (paper.defaults["beta"], paper.defaults["eps"], paper.defaults["official"]) == (0.55, 1e-10, False)
    assert PBFGS(model.parameters(), basis, official=True, beta=0.5).defaults["beta"] == 0.5
    with pytest.raises(TypeError, match="official must be True or False"):
        PBFGS(model.parameters(), basis, official="yes")
