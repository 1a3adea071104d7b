"""Record a trajectory from your own training loop, with the disk writes off the training path.

    recorder = trajstore.Recorder("runs/traj.zarr", model)        # snapshot 0: the initialization
    ...                                                            # your loop
        recorder.snapshot(step=step, epoch=epoch, lr=lr)           # every epoch or every k steps
    recorder.close()                                               # waits for the last write

:meth:`Recorder.snapshot` copies the parameters and persistent buffers into one reused host copy
(pinned memory when they live on a GPU) and hands it to a writer thread; training goes on while
the copy is written and committed. At most one snapshot is pending: the next ``snapshot`` first
waits for the previous write, so host memory stays at one copy of the model and a slow disk
slows training down rather than piling up snapshots. :attr:`Recorder.stats` says what recording
cost the training loop (copy + wait) and what it cost the writer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ._backend import StoreLike
from .distributed import group_of, rank_and_world
from .errors import InvalidStoreError, NotAStoreError, StoreExistsError
from .store import DEFAULT_TRAJECTORY, TrajectoryStore

__all__ = ["Recorder"]


class Recorder:
    """Append snapshots of ``model`` to a trajectory in the background.

    Parameters
    ----------
    store : str, path, zarr Store or TrajectoryStore
        Where to record. A URL or path creates the trajectory (keyword arguments of
        :meth:`TrajectoryStore.create` pass through ``create_options``), or, with
        ``resume=True``, reopens an existing one for appending (its layout must match ``model``).
        A :class:`TrajectoryStore` open for appending is used as it is and left open by
        :meth:`close`.
    model : torch.nn.Module
        The model whose parameters and persistent buffers are recorded.
    initial : bool
        Record the model as it is now as the first snapshot (snapshot 0 = the initialization)
        when the trajectory is empty.
    background : bool
        Write in a thread (default). ``False`` writes inside :meth:`snapshot`.
    trajectory : str
        Trajectory name when the recorder creates or opens the store.
    resume : bool
        Reopen an existing trajectory instead of refusing to overwrite it (one whose creation was
        interrupted before its first commit is created anew).
    create_options : mapping, optional
        ``storage_dtype``, ``chunk_bytes``, ``attrs``, ``durable``, ``storage_options``.
    process_group : ProcessGroup, optional
        Under torch.distributed (the default group when one is initialized), only rank 0 records:
        under DDP every rank holds the same parameters. On the other ranks the recorder writes
        nothing and opens nothing (``store`` is None, :attr:`writes` False); ``snapshot`` returns
        the index the snapshot gets on rank 0 when this rank's calls match rank 0's. Nothing here
        is collective, so creating a Recorder on rank 0 alone works too. To share the writing
        between the ranks, or to record sharded parameters, use
        :class:`trajstore.sharded.ShardedRecorder`.

    Notes
    -----
    Extra host memory: one copy of the parameters and buffers (``4 n`` bytes for float32
    parameters) plus the store's append staging buffer. An error in the writer thread (a full
    disk, a non-finite parameter) is raised by the next :meth:`snapshot` or by :meth:`close`;
    the snapshot it concerns is not committed.
    """

    def __init__(self, store: StoreLike | TrajectoryStore, model: torch.nn.Module, *, initial: bool = True,
                 background: bool = True, trajectory: str = DEFAULT_TRAJECTORY, resume: bool = False,
                 create_options: Mapping[str, Any] | None = None, process_group: Any = None) -> None:
        self.writes = rank_and_world(group_of(process_group))[0] == 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[int] | None = None
        self._copy = self._wait = self._write = 0.0
        if not self.writes:  # another rank records; this one only counts
            self.store: TrajectoryStore | None = None
            self._owns, self._count = False, 0
            if resume and not isinstance(store, TrajectoryStore) and trajectory in _existing(store, create_options):
                opts = dict(create_options or {})
                try:
                    with TrajectoryStore.open(store, "r", trajectory=trajectory,
                                              storage_options=opts.get("storage_options")) as found:
                        self._count = len(found)
                except InvalidStoreError:  # rank 0 is creating it right now (or finds it damaged and raises)
                    self._count = 0
            if initial and self._count == 0:
                self._count = 1
            return
        self._owns = not isinstance(store, TrajectoryStore)
        if isinstance(store, TrajectoryStore):
            self.store = store
        elif resume and trajectory in _existing(store, create_options):
            self.store = _reopen(store, model, trajectory, create_options)
        else:
            self.store = TrajectoryStore.create(store, model, trajectory=trajectory, **dict(create_options or {}))
        self._params, self._buffers = self.store.layout.check_model(model)
        self._host_params = [_host_like(p) for p in self._params]
        self._host_buffers = [_host_like(b) for b in self._buffers]
        self._on_cuda = any(t.is_cuda for t in self._params + self._buffers)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trajstore-recorder") if background else None
        self._count = len(self.store)
        if initial and self._count == 0:
            self.snapshot(step=0, epoch=0)

    def __len__(self) -> int:
        """Snapshots committed or pending."""
        return self._count

    @property
    def stats(self) -> dict[str, float]:
        """Seconds spent by the training loop copying snapshots off the device (``copy``) and
        waiting for the previous write (``wait``), their sum (``overhead``), and the writer's own
        time (``write``, overlapped with training when ``background``)."""
        return {"snapshots": self._count, "copy": self._copy, "wait": self._wait,
                "overhead": self._copy + self._wait, "write": self._write}

    def snapshot(self, *, step: int | None = None, epoch: int | float | None = None, lr: float | None = None,
                 metrics: Mapping[str, float] | None = None, rng_state: bool = False) -> int:
        """Copy the model's current state and append it (in the background); returns its index."""
        if not self.writes:
            self._count += 1
            return self._count - 1
        self._finish_pending()
        started = time.perf_counter()
        with torch.no_grad():
            for dst, src in zip(self._host_params + self._host_buffers, self._params + self._buffers):
                dst.copy_(src.detach(), non_blocking=dst.is_pinned())
        if self._on_cuda:
            torch.cuda.synchronize()
        self._copy += time.perf_counter() - started
        kwargs = {"step": step, "epoch": epoch, "lr": lr, "metrics": dict(metrics) if metrics else None,
                  "rng_state": torch.get_rng_state() if rng_state else False}  # the state *now*, not when written
        index = self._count
        if self._pool is None:
            self._timed_append(kwargs)
        else:
            self._pending = self._pool.submit(self._timed_append, kwargs)
        self._count += 1
        return index

    def _timed_append(self, kwargs: dict[str, Any]) -> int:
        started = time.perf_counter()
        try:
            return self.store.append_tensors(self._host_params, self._host_buffers, **kwargs)
        finally:
            self._write += time.perf_counter() - started

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except BaseException:
            self._count -= 1  # it was never committed
            raise
        finally:
            self._wait += time.perf_counter() - started

    def flush(self) -> None:
        """Wait until every snapshot taken so far is committed."""
        self._finish_pending()

    def close(self) -> None:
        """Wait for the last write, stop the writer thread and (if the recorder opened it) close
        the store. Raises the last write's error, if any."""
        try:
            self._finish_pending()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._owns and self.store is not None:
                self.store.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)


def _reopen(store: StoreLike, model: torch.nn.Module, trajectory: str,
            create_options: Mapping[str, Any] | None) -> TrajectoryStore:
    """The trajectory open for appending. One whose creation was killed before its first commit
    record holds nothing and is created anew (``create`` replaces only such a trajectory); any
    other damage is raised as found."""
    options = dict(create_options or {})
    try:
        return TrajectoryStore.open(store, "a", trajectory=trajectory, storage_options=options.get("storage_options"))
    except InvalidStoreError as damaged:
        try:
            return TrajectoryStore.create(store, model, trajectory=trajectory, **options)
        except StoreExistsError:
            raise damaged from None  # it had been committed: not ours to replace


def _existing(store: StoreLike, create_options: Mapping[str, Any] | None) -> list[str]:
    try:
        return TrajectoryStore.list_trajectories(store, storage_options=(create_options or {}).get("storage_options"))
    except NotAStoreError:
        return []
