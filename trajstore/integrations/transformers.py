"""Hugging Face ``transformers``: record a trajectory from ``Trainer.train``, and train with P-BFGS
through the Trainer.

    from trajstore.integrations.transformers import SubspaceTrainer, TrajectoryCallback

    Trainer(model, args, train_dataset=data,
            callbacks=[TrajectoryCallback("runs/traj.zarr", every_n_steps=50)]).train()

    basis = trajstore.dldr("runs/traj.zarr", 40)
    model = ...                                              # the same initialization
    SubspaceTrainer(model, args, train_dataset=data,
                    optimizers=(trajstore.PBFGS(model.parameters(), basis, plus=True), None)).train()

``Trainer`` calls ``optimizer.step()`` without a closure, after a ``training_step`` that has
already run the backward pass; a line-search optimizer needs a closure it can call again.
:class:`SubspaceTrainer` runs the whole step inside ``training_step``: the closure computes
``compute_loss`` on the batch, calls the accelerator's backward only when the optimizer asks for
a gradient (once per step; the trials run forward only), and the Trainer's own
``optimizer.step()`` that follows does nothing. Everything else (data, logging, checkpoints,
the learning-rate scheduler, callbacks) is the Trainer's. With any other optimizer it is the
plain ``Trainer``.

Install with ``pip install 'trajstore[transformers]'``.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("trajstore.integrations.transformers needs transformers: "
                      "pip install 'trajstore[transformers]'") from e

from ..pbfgs import PBFGS
from ._recording import RecordingCallback, ResumeMismatchError

__all__ = ["ResumeMismatchError", "SubspaceTrainer", "TrajectoryCallback"]


def _learning_rate(optimizer: Any) -> float | None:
    groups = getattr(optimizer, "param_groups", None)
    lr = groups[0].get("lr") if groups else None
    return float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None


class TrajectoryCallback(RecordingCallback, TrainerCallback):
    """Record the model's parameters (and persistent buffers) into a trajectory during
    ``Trainer.train``.

    Snapshot 0 is the model when training starts; then one snapshot every ``every_n_steps``
    optimizer steps (``state.global_step``: with gradient accumulation, one per accumulated
    step) and/or at the end of every ``every_n_epochs``-th epoch, with the step, the (fractional)
    epoch and the learning rate. Writes run in a background thread (:class:`trajstore.Recorder`);
    under several processes only the main one writes.

    Resuming: ``train(resume_from_checkpoint=...)`` reopens the trajectory (the Trainer's
    restored ``global_step`` is where it goes on). Snapshots from that step on, recorded before
    a crash, are not written again: the resumed run's parameters are compared with them bit for
    bit when it reaches their step (the Trainer restores the data order and RNG state, so they
    match), and :class:`ResumeMismatchError` is raised if they differ.

    The constructor's parameters: :class:`~trajstore.integrations._recording.RecordingCallback`.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.schedule.start(_model(model), state.global_step, resuming=state.global_step > 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        self.schedule.after_step(_model(model), state.global_step, epoch=state.epoch, lr=_learning_rate(optimizer))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                     **kwargs: Any) -> None:
        self.schedule.after_epoch(_model(model), round(state.epoch or 0), state.global_step,
                                  lr=_learning_rate(optimizer))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.schedule.close()


def _model(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise TypeError("TrajectoryCallback needs the Trainer to pass the model to its callbacks")
    return model


class _StepTaken:
    """The Trainer's optimizer, whose ``step()`` without a closure does nothing: the step was
    taken in ``training_step``. Everything else goes to the optimizer."""

    def __init__(self, optimizer: Any) -> None:
        self.__dict__["_optimizer"] = optimizer

    def step(self, closure: Any = None) -> Any:
        return None if closure is None else self._optimizer.step(closure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)


def _line_search(optimizer: Any) -> PBFGS | None:
    """The PBFGS under the Trainer's wrappers (accelerate's AcceleratedOptimizer, _StepTaken)."""
    for _ in range(4):
        if isinstance(optimizer, PBFGS):
            return optimizer
        optimizer = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
    return None


class SubspaceTrainer(Trainer):
    """A :class:`transformers.Trainer` that steps P-BFGS / P+-BFGS with a proper closure.

    Pass the optimizer as ``optimizers=(PBFGS(model.parameters(), basis, ...), scheduler or
    None)``. Each training step calls :meth:`PBFGS.step` with a closure over the batch: one
    forward and backward (``compute_loss`` and the accelerator's backward, so loss scaling and
    DDP see it), then forward-only line-search trials. ``training_step`` returns the loss
    before the step, which the Trainer logs as usual.

    With P-BFGS, ``args.learning_rate`` is not used (the optimizer's ``lr`` is, default 1, the
    paper's first trial step) and the Trainer's scheduler scales that ``lr`` as it scales SGD's:
    use ``lr_scheduler_type="constant"`` for the paper's schedule (the Trainer's default,
    ``"linear"``, shrinks the first trial step to 0 over training). ``max_grad_norm`` does not
    change the step (the Trainer clips after it); the logged ``grad_norm`` is the gradient at the
    step's origin. ``gradient_accumulation_steps`` must be 1: a line search evaluates the loss of
    the whole step's batch, which accumulation splits across calls.
    """

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        optimizer = _line_search(self.optimizer)
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(f"P-BFGS takes one line search per batch: gradient_accumulation_steps must be 1, got "
                             f"{self.args.gradient_accumulation_steps} (use a larger per_device_train_batch_size)")
        if not isinstance(self.optimizer, _StepTaken):
            self.optimizer = _StepTaken(self.optimizer)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            grad = torch.is_grad_enabled()
            if grad:
                optimizer.zero_grad()
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            if grad:
                self.accelerator.backward(loss)
            return loss

        loss = optimizer.step(closure)
        return loss.detach().to(device=self.args.device, dtype=torch.float32)
