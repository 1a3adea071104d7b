"""Lightning (real ``lightning.pytorch``, on the CPU): the recording callback and P-BFGS in a
LightningModule.

- P-BFGS through :func:`line_search_step` runs one backward per step (counted by a gradient hook)
  and ends bit-identical to a plain loop over the same batches with the README's closure.
- The callback's snapshots follow ``trainer.global_step`` (optimizer steps, so gradient
  accumulation counts one step per accumulated batch group) or epochs.
- A fit that crashes and resumes from an epoch-end checkpoint leaves the store equal, snapshot
  for snapshot and bit for bit, to an uninterrupted fit's; a resumed run that diverges is refused.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from trajstore import PBFGS, TrajectoryStore, dldr, open_basis  # noqa: E402
from trajstore.errors import StoreExistsError  # noqa: E402
from trajstore.integrations.lightning import ResumeMismatchError, TrajectoryCallback, line_search_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

X = 2 * torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()


def batches(size: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=size, shuffle=False)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


class SGDModule(pl.LightningModule):
    def __init__(self, seed: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net, self.lr = net(), lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SubspaceModule(pl.LightningModule):
    def __init__(self, init: nn.Module, basis: Any) -> None:
        super().__init__()
        self.net, self.basis = init, basis
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return line_search_step(self, lambda: nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return PBFGS(self.parameters(), self.basis)


def trainer(callbacks: list[Any], epochs: int, **kw: Any) -> Any:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", enable_checkpointing=any(
                          isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks), **kw)


def contents(path: Path) -> tuple[list[Any], np.ndarray]:
    with TrajectoryStore.open(path) as store:
        meta = [(r["step"], r["epoch"]) for r in store.records]
        return meta, np.stack([store.snapshot(i) for i in range(len(store))])


def flat(module: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trajectory recorded by the callback from an SGD fit: 4 steps per epoch, 5 epochs."""
    path = tmp_path_factory.mktemp("lightning") / "sgd.zarr"
    pl.seed_everything(0, verbose=False)
    trainer([TrajectoryCallback(path, every_n_steps=2)], 5).fit(SGDModule(), batches())
    dldr(path, 6, name="b")
    return path


def test_callback_records_every_k_optimizer_steps(sgd_run: Path) -> None:
    meta, rows = contents(sgd_run)
    assert [s for s, _ in meta] == list(range(0, 21, 2))
    assert [e for _, e in meta] == [0] + [0.5 * k for k in range(1, 11)]
    module = SGDModule()
    assert np.array_equal(rows[0], flat(module).numpy())  # snapshot 0 = the initialization
    assert not np.array_equal(rows[-1], rows[0])


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: 8 batches per epoch are 4 optimizer steps; snapshots every 2
    steps, and every epoch, each at one step only (the epoch end coincides with step 4, 8)."""
    module = SGDModule()
    callbacks = [TrajectoryCallback(tmp_path / "a.zarr", every_n_steps=2), TrajectoryCallback(
        tmp_path / "e.zarr", every_n_epochs=1), TrajectoryCallback(tmp_path / "both.zarr", every_n_steps=3,
                                                                   every_n_epochs=1)]
    trainer(callbacks, 2, accumulate_grad_batches=2).fit(module, batches(8))
    assert [s for s, _ in contents(tmp_path / "a.zarr")[0]] == [0, 2, 4, 6, 8]
    assert contents(tmp_path / "e.zarr")[0] == [(0, 0), (4, 1), (8, 2)]
    assert [s for s, _ in contents(tmp_path / "both.zarr")[0]] == [0, 3, 4, 6, 8]
    assert np.array_equal(contents(tmp_path / "e.zarr")[1][-1], flat(module).numpy())


def test_pbfgs_one_backward_per_step_and_equal_to_a_plain_loop(sgd_run: Path) -> None:
    basis = open_basis(sgd_run, "b")
    with TrajectoryStore.open(sgd_run) as store:
        init = store.load_into(SGDModule(), 0).net
    backwards: dict[str, int] = {"plain": 0, "lightning": 0}

    def counted(model: nn.Module, key: str) -> nn.Module:
        last = list(model.parameters())[-1]
        last.register_hook(lambda g: backwards.__setitem__(key, backwards[key] + 1))
        return model

    plain = counted(_copy(init), "plain")
    opt = PBFGS(plain.parameters(), basis)
    for _ in range(2):
        for x, y in batches():
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(plain(x), y)
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            opt.step(closure)
    module = SubspaceModule(counted(_copy(init), "lightning"), basis)
    trainer([], 2).fit(module, batches())
    steps = 2 * len(batches())
    assert opt.stats["steps"] == steps and sum(opt.stats["trials"]) > steps  # trials did run
    assert backwards == {"plain": steps, "lightning": steps}
    assert torch.equal(flat(module.net), flat(plain))
    assert not torch.equal(flat(module.net), flat(init))


def _copy(model: nn.Module) -> nn.Module:
    fresh = net()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_line_search_step_needs_manual_optimization(sgd_run: Path) -> None:
    class Automatic(SubspaceModule):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            self.automatic_optimization = True

    module = Automatic(net(), open_basis(sgd_run, "b"))
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        trainer([], 1).fit(module, batches())


def test_fresh_fit_refuses_an_existing_trajectory(sgd_run: Path) -> None:
    with pytest.raises(StoreExistsError):
        trainer([TrajectoryCallback(sgd_run, every_n_steps=2)], 1).fit(SGDModule(), batches())
    assert len(contents(sgd_run)[0]) == 11


class Crash(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise ArithmeticError("crash")


def fit(folder: Path, *, crash_at: int | None = None, ckpt: str | None = None, flipped: bool = False) -> None:
    pl.seed_everything(3, verbose=False)
    callbacks = [TrajectoryCallback(folder / "t.zarr", every_n_steps=2),
                 pl.callbacks.ModelCheckpoint(dirpath=folder / "ck", every_n_epochs=1, save_top_k=-1)]
    callbacks += [Crash(crash_at)] if crash_at is not None else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = batches() if not flipped else torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X.flip(0), Y.flip(0)), batch_size=16)
        trainer(callbacks, 3).fit(SGDModule(), data, ckpt_path=ckpt)


def latest(folder: Path) -> str:
    return max(glob.glob(str(folder / "ck" / "*.ckpt")), key=os.path.getmtime)


@pytest.mark.slow
def test_resumed_fit_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    fit(tmp_path / "whole")
    # 4 steps per epoch: the epoch-0 checkpoint is at step 4; the crash at step 7 comes after the
    # snapshot of step 6, which the checkpoint does not know about.
    with pytest.raises(ArithmeticError):
        fit(tmp_path / "cut", crash_at=7)
    assert [s for s, _ in contents(tmp_path / "cut" / "t.zarr")[0]] == [0, 2, 4, 6]
    fit(tmp_path / "cut", ckpt=latest(tmp_path / "cut"))
    whole, cut = contents(tmp_path / "whole" / "t.zarr"), contents(tmp_path / "cut" / "t.zarr")
    assert whole[0] == cut[0] and [s for s, _ in whole[0]] == list(range(0, 13, 2))
    assert np.array_equal(whole[1], cut[1])


@pytest.mark.slow
def test_resumed_fit_that_diverges_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArithmeticError):
        fit(tmp_path, crash_at=7)
    with pytest.raises(ResumeMismatchError, match="snapshot 3 was recorded at step 6"):
        fit(tmp_path, ckpt=latest(tmp_path), flipped=True)  # other batches: step 6 reached elsewhere
    assert [s for s, _ in contents(tmp_path / "t.zarr")[0]] == [0, 2, 4, 6]
