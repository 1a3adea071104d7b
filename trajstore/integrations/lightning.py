"""Lightning: record a trajectory from ``Trainer.fit``, and train with P-BFGS in a LightningModule.

    from trajstore.integrations.lightning import TrajectoryCallback, line_search_step

    trainer = L.Trainer(callbacks=[TrajectoryCallback("runs/traj.zarr", every_n_steps=50)])
    trainer.fit(module)                                    # snapshot 0 = the initialization

    class Subspace(L.LightningModule):                     # later: train in the subspace
        def __init__(self, net, basis):
            super().__init__()
            self.net, self.basis = net, basis
            self.automatic_optimization = False            # the line search calls the closure
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = line_search_step(self, lambda: F.cross_entropy(self.net(x), y))
            self.log("train_loss", loss)
        def configure_optimizers(self):
            return trajstore.PBFGS(self.parameters(), self.basis)

Why manual optimization: Lightning's automatic closure always runs under ``torch.enable_grad()``
and always calls ``backward``, so every line-search trial of P-BFGS would pay a backward pass
(measured on a small MLP: 21 backward calls for 8 steps). :func:`line_search_step` hands the
optimizer a closure that calls :meth:`~lightning.pytorch.core.LightningModule.manual_backward`
only when the optimizer asks for a gradient: one backward per step, the trials forward only, and
the parameters bit-identical to a plain loop over the same batches.

Works with the ``lightning`` package (``lightning.pytorch``) or, when that is not installed, with
``pytorch_lightning``. Install with ``pip install 'trajstore[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..store import TrajectoryStore
from ._recording import RecordingCallback, ResumeMismatchError

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - exercised where only pytorch_lightning is installed
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError("trajstore.integrations.lightning needs Lightning: pip install 'trajstore[lightning]'") from e

__all__ = ["ResumeMismatchError", "TrajectoryCallback", "line_search_step"]


def _learning_rate(trainer: Any) -> float | None:
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers or not optimizers[0].param_groups:
        return None
    lr = optimizers[0].param_groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None


def _loss_of(outputs: Any) -> float | None:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None


class TrajectoryCallback(RecordingCallback, pl.Callback):
    """Record the module's parameters (and persistent buffers) into a trajectory during ``fit``.

    Snapshot 0 is the module when training starts; then one snapshot every ``every_n_steps``
    optimizer steps (``trainer.global_step``, so under gradient accumulation a step is one
    optimizer step, not one batch) and/or at the end of every ``every_n_epochs``-th epoch.
    Each snapshot carries the step, the epoch (completed epochs for epoch-end snapshots, the
    fractional epoch otherwise), the first parameter group's ``lr`` and the batch loss when
    ``training_step`` returned one. Writes run in a background thread (:class:`trajstore.Recorder`).

    Resuming: the callback's state goes into Lightning's checkpoints. ``fit(ckpt_path=...)``
    reopens the trajectory and goes on appending, so the store after a resumed run equals the
    uninterrupted run's: snapshots recorded after the checkpoint (before a crash) are not written
    again but compared bit for bit with the resumed run's parameters when it reaches their step,
    and :class:`ResumeMismatchError` is raised if they differ (training was not deterministic
    across the resume). Under DDP only rank 0 writes.

    The constructor's parameters: :class:`~trajstore.integrations._recording.RecordingCallback`.
    """

    @property
    def state_key(self) -> str:
        """One per store and trajectory, so that several callbacks can share a Trainer."""
        store = self.schedule.store
        where = store.url if isinstance(store, TrajectoryStore) else str(store)
        return f"{type(self).__qualname__}[{where}#{self.schedule.trajectory}]"

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # resuming: from this callback's state in the checkpoint, or (a checkpoint saved without
        # it) from a trainer that starts past step 0
        self.schedule.start(pl_module, trainer.global_step, resuming=trainer.global_step > 0)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        epoch = trainer.current_epoch + (batch_idx + 1) / max(1, _batches_per_epoch(trainer, batch_idx))
        self.schedule.after_step(pl_module, trainer.global_step, epoch=epoch, lr=_learning_rate(trainer),
                                 loss=_loss_of(outputs))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.after_epoch(pl_module, trainer.current_epoch + 1, trainer.global_step,
                                  lr=_learning_rate(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.schedule.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.schedule.close()

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)


def _batches_per_epoch(trainer: Any, batch_idx: int) -> int:
    total = getattr(trainer, "num_training_batches", None)
    return int(total) if isinstance(total, (int, float)) and 0 < total < float("inf") else batch_idx + 1


def line_search_step(module: Any, loss_fn: Callable[[], torch.Tensor], optimizer: Any = None) -> torch.Tensor:
    """One step of a line-search optimizer (P-BFGS, or any closure optimizer) from a
    LightningModule's ``training_step`` under manual optimization.

    ``loss_fn()`` computes the loss on the current batch (a forward pass, no backward). The
    optimizer calls it once with gradients, through :meth:`manual_backward` (so precision
    plugins and DDP see the backward), and once per line-search trial without gradients and
    without backward. Returns the optimizer's loss (for P-BFGS the objective before the step).

    Parameters
    ----------
    module : LightningModule
        The module, with ``self.automatic_optimization = False``.
    loss_fn : callable
        Returns the batch loss, a 0-d tensor.
    optimizer : LightningOptimizer, optional
        Default ``module.optimizers()`` when it returns exactly one.
    """
    if getattr(module, "automatic_optimization", False):
        raise RuntimeError("line_search_step needs manual optimization: set self.automatic_optimization = False in "
                           "the LightningModule's __init__ (Lightning's automatic closure runs a backward pass on "
                           "every line-search trial)")
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, (list, tuple)):
            if len(optimizer) != 1:
                raise ValueError(f"the module has {len(optimizer)} optimizers: pass the one to step as optimizer=")
            optimizer = optimizer[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        if torch.is_grad_enabled():
            module.manual_backward(loss)
        return loss

    loss = optimizer.step(closure=closure)
    return loss if isinstance(loss, torch.Tensor) else torch.as_tensor(loss)
