"""What the framework callbacks share: when to take a snapshot, and how a resumed run lines up
with the snapshots already in the store.

A checkpoint remembers how many snapshots had been committed when it was saved. A run that
crashes after its last checkpoint may have recorded more; when training resumes from that
checkpoint and reaches the step of such a snapshot again, the model is compared with it bit
for bit: equal (training is deterministic across the resume) and the snapshot is kept, not
written twice; different and :class:`ResumeMismatchError` says so, since the store would
otherwise hold a trajectory that no single run followed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._dtypes import storage_dtype
from ..errors import InvalidStoreError, TrajstoreError
from ..recorder import Recorder
from ..store import DEFAULT_TRAJECTORY

__all__ = ["RecordingCallback", "ResumeMismatchError", "SnapshotSchedule"]

_STATE_VERSION = 1


class ResumeMismatchError(TrajstoreError, RuntimeError):
    """A resumed run reached a recorded step with parameters other than the recorded ones."""


def _positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


class SnapshotSchedule:
    """Record ``model`` every ``every_n_steps`` optimizer steps and/or every ``every_n_epochs``
    epochs into ``store``, with the bookkeeping a resumable callback needs.

    The framework adapters call :meth:`start` when training starts (after a checkpoint, if any,
    was restored through :meth:`load_state_dict`), :meth:`after_step` after every optimizer step,
    :meth:`after_epoch` after every epoch, :meth:`state_dict` when a checkpoint is saved, and
    :meth:`close` at the end.
    """

    def __init__(self, store: Any, *, every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 trajectory: str = DEFAULT_TRAJECTORY, resume: bool = False,
                 create_options: Mapping[str, Any] | None = None, background: bool = True) -> None:
        self.every_n_steps = _positive("every_n_steps", every_n_steps)
        self.every_n_epochs = _positive("every_n_epochs", every_n_epochs)
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ValueError("give every_n_steps, every_n_epochs or both")
        self.store, self.trajectory, self._resume = store, trajectory, bool(resume)
        self._options, self._background = dict(create_options or {}), background
        self.recorder: Recorder | None = None
        self._restored: dict[str, Any] | None = None
        self._replay: list[tuple[int, int | None]] = []
        self._last_step = -1

    # checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The snapshots committed so far and the last recorded step (waits for a pending write,
        so that a checkpoint never names a snapshot that is not committed)."""
        if self.recorder is not None:
            self.recorder.flush()
        count = len(self.recorder) if self.recorder is not None else 0
        return {"version": _STATE_VERSION, "snapshots": count, "last_step": self._last_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next :meth:`start` resumes the trajectory."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a trajectory-recording state of version {_STATE_VERSION}: {state!r:.200}")
        for key in ("snapshots", "last_step"):
            if isinstance(state.get(key), bool) or not isinstance(state.get(key), int):
                raise ValueError(f"trajectory-recording state: {key} must be an integer, got {state.get(key)!r:.80}")
        self._restored = dict(state)

    # training events --------------------------------------------------------------------------
    def start(self, model: torch.nn.Module, step: int, *, resuming: bool = False) -> None:
        """Open the trajectory when training starts from optimizer step ``step``: created
        (snapshot 0 = the model now) on a fresh run; reopened when a state was restored with
        :meth:`load_state_dict` or when ``resuming`` (a framework resuming from a checkpoint
        without callback state: the store's snapshots from ``step`` on are then the ones to
        line up with)."""
        if self.recorder is not None:
            return
        resumed = self._restored is not None or resuming
        self.recorder = Recorder(self.store, model, initial=not resumed, trajectory=self.trajectory,
                                 resume=resumed or self._resume, create_options=self._options,
                                 background=self._background)
        store = self.recorder.store
        if store is None:  # another rank writes
            self._last_step = self._restored["last_step"] if self._restored is not None else step
            return
        records = store.records
        if not resumed:  # a fresh run: snapshot 0 was just taken, or (resume=True) the store's last one
            self._last_step = step if len(records) <= 1 else (records[-1].get("step") or step)
            return
        if self._restored is not None:
            expected, self._last_step = self._restored["snapshots"], self._restored["last_step"]
        else:
            expected = next((i for i, r in enumerate(records) if (r.get("step") or 0) >= step), len(records))
            self._last_step = (records[expected - 1].get("step") or 0) if expected else -1
        if len(records) < expected:
            raise InvalidStoreError(f"trajectory {store.name!r} in {store.url} holds {len(records)} snapshots, but "
                                    f"the checkpoint being resumed was saved after {expected}: it is not this run's store")
        self._replay = [(i, records[i].get("step")) for i in range(expected, len(records))]
        while self._replay and self._replay[0][1] is not None and self._replay[0][1] <= step:
            self._match(model, step)
            self._last_step = step

    def after_step(self, model: torch.nn.Module, step: int, epoch: float | None = None, lr: float | None = None,
                   loss: float | None = None) -> bool:
        """Record when ``step`` (optimizer steps taken) is a multiple of ``every_n_steps``."""
        if self.every_n_steps is None or step % self.every_n_steps:
            return False
        return self._record(model, step, epoch, lr, loss)

    def after_epoch(self, model: torch.nn.Module, epochs_done: int, step: int, lr: float | None = None,
                    loss: float | None = None) -> bool:
        """Record when ``epochs_done`` (completed epochs) is a multiple of ``every_n_epochs``."""
        if self.every_n_epochs is None or epochs_done % self.every_n_epochs:
            return False
        return self._record(model, step, epochs_done, lr, loss)

    def close(self) -> None:
        """Wait for the last write and close the trajectory (idempotent)."""
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()

    # ------------------------------------------------------------------------------------------
    def _record(self, model: torch.nn.Module, step: int, epoch: float | None, lr: float | None,
                loss: float | None) -> bool:
        if self.recorder is None:
            raise RuntimeError("the recording callback was not started (training did not start through it)")
        if step <= self._last_step:  # several events at one step (gradient accumulation, epoch end)
            return False
        self._last_step = step
        if self._replay:
            self._match(model, step)
            return False
        metrics = {"loss": float(loss)} if loss is not None else None
        self.recorder.snapshot(step=step, epoch=epoch, lr=lr, metrics=metrics)
        return True

    def _match(self, model: torch.nn.Module, step: int) -> None:
        """The next snapshot recorded before the resume must be this step's, with these parameters."""
        index, recorded = self._replay.pop(0)
        store = self.recorder.store
        if recorded != step or not _same_parameters(store, model, index):
            what = "other parameters" if recorded == step else f"step {step}, not step {recorded}"
            raise ResumeMismatchError(
                f"trajectory {store.name!r} in {store.url}: snapshot {index} was recorded at step {recorded} before the "
                f"run was resumed, and the resumed run reached {what}: training is not deterministic across the "
                "resume (data order, dropout or other RNG state not restored), so the store would mix two runs. "
                "Record into a new trajectory, or resume from a checkpoint saved after the last snapshot.")


class RecordingCallback:
    """What the frameworks' ``TrajectoryCallback`` classes share: their constructor and
    :attr:`recorder`; each framework's class turns its events into :class:`SnapshotSchedule` calls."""

    def __init__(self, store: Any, *, every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 trajectory: str = DEFAULT_TRAJECTORY, resume: bool = False,
                 create_options: Mapping[str, Any] | None = None, background: bool = True) -> None:
        """
        Parameters
        ----------
        store : str, path, zarr Store or TrajectoryStore
            Where to record (created on a fresh run; an existing trajectory is refused unless
            ``resume=True``).
        every_n_steps, every_n_epochs : int, optional
            The schedule; at least one. Default: every epoch.
        trajectory : str
            Trajectory name.
        resume : bool
            Append to an existing trajectory on a fresh run too (without a checkpoint).
        create_options : mapping, optional
            Passed to :meth:`trajstore.TrajectoryStore.create` (``storage_dtype``, ``chunk_bytes``,
            ``attrs``, ``durable``, ``storage_options``).
        background : bool
            Write in a thread (default) or inside the training loop.
        """
        super().__init__()
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        self.schedule = SnapshotSchedule(store, every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                                         trajectory=trajectory, resume=resume, create_options=create_options,
                                         background=background)

    @property
    def recorder(self) -> Recorder | None:
        """The :class:`trajstore.Recorder` while training runs (None before and after)."""
        return self.schedule.recorder


def _same_parameters(store: Any, model: torch.nn.Module, index: int) -> bool:
    params, _ = store.layout.check_model(model)
    dtype = storage_dtype(store.storage_dtype).torch_dtype
    flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params]).to(dtype).float()
    return torch.equal(flat, torch.from_numpy(store.snapshot(index)))
