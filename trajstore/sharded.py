"""Recording a trajectory from several ranks at once, each writing its own columns of every snapshot.

    recorder = ShardedRecorder("runs/traj.zarr", model)   # on every rank; snapshot 0 = the model now
    lo, hi = recorder.bounds                               # this rank's slice of the flat parameter vector
    ...
        recorder.snapshot(flat_slice, step=step)           # collective: every rank, every time
    recorder.close()

A snapshot is a row of column chunks (:attr:`TrajectoryStore.chunk_elems` values each), so ranks
that own whole chunks can write one row together without touching each other's keys. Rank 0
holds the write lease and the commit: for every snapshot it picks the row (and grows the arrays),
every rank writes its chunks (rank 0 also the buffers), the ranks hand rank 0 their chunks'
crc32c, and rank 0 writes the one commit document only when every rank's write succeeded.
Until then nothing of the snapshot is visible, so a rank killed at any moment leaves only whole
committed snapshots, and a rank that fails makes every rank raise. The session is recorded in
the commit log as one of several writers, so the next session offsets its rows past any late
write of a rank that outlived the job.

Under DDP every rank holds the whole model: ``snapshot()`` without a slice takes this rank's
range from the model, and the ranks share the writing (plain :class:`~trajstore.Recorder` writes
from rank 0 alone). With sharded parameters (each rank owning the slice ``bounds`` of the flat
vector, FSDP-style), pass that slice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import _backend
from ._backend import StoreLike
from ._dtypes import storage_dtype
from ._records import make_record
from ._write import RowWriter
from .distributed import comm_device, group_of, rank_and_world, shard_bounds
from .errors import TrajstoreError
from .layout import unwrap_model
from .recorder import _existing
from .store import DEFAULT_TRAJECTORY, TrajectoryStore

__all__ = ["ShardedRecorder", "ShardedWriteError"]

_OK, _FAILED = 0, 1


class ShardedWriteError(TrajstoreError, OSError):
    """Another rank failed to write its part of a snapshot; nothing of the snapshot was committed."""


class ShardedRecorder:
    """Append snapshots written by every rank of a torch.distributed job, each its own columns.

    Parameters
    ----------
    store : str or path
        Where to record (every rank must name the same store; a URL or folder the ranks share).
        Rank 0 creates the trajectory, or reopens it with ``resume=True``.
    model : torch.nn.Module
        The model (or its DDP wrapper): its layout defines the snapshot (rank 0 needs the real
        model; every rank needs one of the same layout, for ``snapshot()`` without a slice).
    initial : bool
        Record the model as it is now as snapshot 0 when the trajectory is empty.
    resume : bool
        Reopen an existing trajectory for appending instead of refusing to overwrite it.
    trajectory : str
    process_group : ProcessGroup, optional
        The ranks writing together (default: the default group; without one, a single writer).
    create_options : mapping, optional
        ``storage_dtype``, ``chunk_bytes``, ``attrs``, ``durable``, ``storage_options`` (as for
        :meth:`TrajectoryStore.create`).

    Attributes
    ----------
    bounds : (int, int)
        This rank's range of the flat parameter vector: whole chunks
        (:func:`~trajstore.distributed.shard_bounds` aligned to the store's chunk size).
    store : TrajectoryStore or None
        The trajectory, open for appending, on rank 0 (None on the other ranks).

    Notes
    -----
    Every method is collective: every rank calls it, in the same order. Per snapshot: three small
    collectives (the row; the chunks' checksums, ``ceil(n / world / chunk) + 2`` int64 per rank;
    the outcome) and this rank's chunks, through a staging buffer of at most 64 MiB. Writes happen
    in the calling thread (a background thread would interleave its collectives with training's).
    """

    def __init__(self, store: StoreLike, model: torch.nn.Module, *, initial: bool = True, resume: bool = False,
                 trajectory: str = DEFAULT_TRAJECTORY, process_group: Any = None,
                 create_options: Mapping[str, Any] | None = None) -> None:
        self._group = group_of(process_group)
        self.rank, self.world = rank_and_world(self._group)
        self._model = unwrap_model(model)
        options = dict(create_options or {})
        self.store: TrajectoryStore | None = None
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.store = self._open_as_writer(store, trajectory, resume, options)
            except BaseException as e:  # the other ranks must hear of it, not wait for a store
                error = e
        self._agree(error, "rank 0 could not create or open the trajectory")
        # Every rank writes through its own handle on the same store (no lease: rank 0's covers them).
        reader = self.store or TrajectoryStore.open(store, "r", trajectory=trajectory,
                                                    storage_options=options.get("storage_options"))
        self._layout = reader.layout
        self._params, self._buffers = reader.layout.check_model(self._model)
        self._chunk = reader.chunk_elems
        self.bounds = shard_bounds(reader.n, self.world, self.rank, align=self._chunk)
        if self.store is not None:
            self._writer = self.store._writer
        else:
            zstore = _backend.open_zarr_store(store, read_only=False, storage_options=options.get("storage_options"))
            self._writer = RowWriter(zstore, reader.prefix, reader.layout, storage_dtype(reader.storage_dtype),
                                     self._chunk, options.get("durable", True))
            reader.close()
        self._count = self._broadcast_ints([len(self.store) if self.store is not None else 0])[0]
        if initial and self._count == 0:
            self.snapshot(step=0, epoch=0)

    def _open_as_writer(self, store: StoreLike, trajectory: str, resume: bool, options: dict[str, Any]) -> TrajectoryStore:
        if resume and trajectory in _existing(store, options):
            return TrajectoryStore.open(store, "a", trajectory=trajectory, writers=self.world,
                                        storage_options=options.get("storage_options"),
                                        durable=options.get("durable", True))
        return TrajectoryStore.create(store, self._model, trajectory=trajectory, writers=self.world, **options)

    def __len__(self) -> int:
        """Snapshots committed (the same on every rank)."""
        return self._count

    # ---------------------------------------------------------------- collectives

    def _broadcast_ints(self, values: Sequence[int]) -> list[int]:
        if self._group is None:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=comm_device(self._group))
        torch.distributed.broadcast(t, src=torch.distributed.get_global_rank(self._group, 0), group=self._group)
        return [int(v) for v in t.tolist()]

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Every rank learns whether rank 0 (or any rank) failed; the failed rank raises its own
        error, the others a :class:`ShardedWriteError` naming ``what``."""
        failed = self._any([error is not None])
        if error is not None:
            raise error
        if failed:
            raise ShardedWriteError(f"{what}; nothing was committed (see that rank's error)")

    def _any(self, flags: Sequence[bool]) -> bool:
        if self._group is None:
            return any(flags)
        t = torch.tensor([int(any(flags))], dtype=torch.int64, device=comm_device(self._group))
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self._group)
        return bool(t[0])

    def _gather_crcs(self, crcs: list[int] | None) -> list[list[int]] | None:
        """Every rank's chunk checksums (None if some rank's write failed)."""
        longest = -(-(-(-self._layout.n // self.world)) // self._chunk) + 1
        mine = torch.full((longest + 2,), -1, dtype=torch.int64)
        mine[0] = _OK if crcs is not None else _FAILED
        if crcs is not None:
            mine[1] = len(crcs)
            mine[2:2 + len(crcs)] = torch.tensor(crcs, dtype=torch.int64)
        if self._group is None:
            every = [mine]
        else:
            device = comm_device(self._group)
            mine = mine.to(device)
            every = [torch.empty_like(mine) for _ in range(self.world)]
            torch.distributed.all_gather(every, mine, group=self._group)
        if any(int(t[0]) != _OK for t in every):
            return None
        return [[int(v) for v in t[2:2 + int(t[1])].tolist()] for t in every]

    # ---------------------------------------------------------------- snapshots

    def _own_pieces(self) -> list[torch.Tensor]:
        """This rank's range of the model's flat parameter vector, as views of its parameters."""
        lo, hi = self.bounds
        pieces = []
        for spec, p in zip(self._layout.params, self._params):
            a, b = max(lo, spec.offset), min(hi, spec.stop)
            if b > a:
                pieces.append(p.detach().reshape(-1)[a - spec.offset:b - spec.offset])
        return pieces

    def snapshot(self, shard: torch.Tensor | None = None, *, step: int | None = None,
                 epoch: int | float | None = None, lr: float | None = None,
                 metrics: Mapping[str, float] | None = None) -> int:
        """Write this rank's part of the next snapshot; returns its index once it is committed.

        ``shard``: this rank's values ``bounds`` of the flat parameter vector (1-D, any device);
        None takes them from the model. The record (step, epoch, lr, metrics) and the buffers are
        rank 0's. Collective.
        """
        started = time.time()
        lo, hi = self.bounds
        error: BaseException | None = None
        pieces: list[torch.Tensor] = []
        try:
            if shard is None:
                pieces = self._own_pieces()
            elif not isinstance(shard, torch.Tensor) or shard.dim() != 1 or shard.numel() != hi - lo:
                raise ValueError(f"shard must be this rank's slice [{lo}, {hi}) of the flat parameter vector: a 1-D "
                                 f"tensor of {hi - lo} values, got {getattr(shard, 'shape', type(shard))}")
            else:
                pieces = [shard]
            record = make_record(step=step, epoch=epoch, lr=lr, metrics=dict(metrics) if metrics else None,
                                 rng_state=False, time=started) if self.rank == 0 else None
            index, row = self.store._begin_row() if self.store is not None else (0, 0)
        except BaseException as e:
            error = e
        self._agree(error, f"rank 0 could not start snapshot {self._count}" if self.rank else "a rank refused the snapshot")
        index, row = self._broadcast_ints([index, row])
        crcs: list[int] | None = None
        buffers_crc = None
        try:
            with torch.no_grad():
                crcs = self._writer.write_range(row, lo, pieces)
                if self.store is not None:
                    buffers_crc = self._writer.write_buffers(row, self._buffers)
                if self.store is None:
                    self._writer.sync_row(row, buffers=False)  # rank 0 writes and syncs those
        except BaseException as e:
            error = e
        every = self._gather_crcs(crcs)
        committed = False
        if self.store is not None:
            if every is None:
                failure = self.store._abort_row(index, row, error or ShardedWriteError("another rank failed"))
                error = error or failure
            else:
                try:
                    self.store._commit_row(index, row, [c for part in every for c in part], buffers_crc, record,
                                           started)
                    committed = True
                except BaseException as e:
                    error = e
        committed = not self._any([self.rank == 0 and not committed])
        if error is not None:
            raise error
        if not committed:
            raise ShardedWriteError(f"snapshot {index} was not committed (another rank failed; see its error)")
        self._count = index + 1
        return index

    def close(self) -> None:
        """Release the write lease on rank 0 and the writers. Collective."""
        if self.store is not None:
            self.store.close()
        else:
            self._writer.close()
        if self._group is not None:
            torch.distributed.barrier(group=self._group)

    def __enter__(self) -> ShardedRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

