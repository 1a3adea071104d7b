"""A committed window of a trajectory as a lazy dask array.

Each dask chunk holds every snapshot of the window for one chunk-aligned range of parameters,
read through :meth:`TrajectoryStore.read_rows` so corruption is reported per snapshot. The
reader object pickles to (store, trajectory, window) and re-opens the store read-only in the
process that reads, so the graph runs unchanged on ``dask.distributed`` workers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._checkpoint import BlockCheckpoint
    from .store import TrajectoryStore

__all__ = ["BlockTask", "WindowReader", "block_size", "block_tasks", "column_block", "snapshots_to_dask"]


def column_block(chunk_elems: int, rows: int, block_bytes: int, n: int) -> int:
    """Parameters per block: a multiple of the store's chunk, about ``block_bytes`` of float32 rows."""
    per_chunk = chunk_elems * rows * 4
    return min(n, chunk_elems * max(1, block_bytes // per_chunk))


class WindowReader:
    """Array-like over snapshots ``[t0, t1)`` of a trajectory: shape (t1 - t0, n), float32."""

    def __init__(self, store: TrajectoryStore, t0: int, t1: int) -> None:
        self._zstore = store.zarr_store.with_read_only(True) if not store.zarr_store.read_only else store.zarr_store
        self._name = store.name
        self._t0, self._t1 = t0, t1
        self.shape = (t1 - t0, store.n)
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self._store: TrajectoryStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def _open(self) -> TrajectoryStore:
        from .store import TrajectoryStore

        if self._store is None:
            self._store = TrajectoryStore.open(self._zstore, "r", trajectory=self._name)
        return self._store

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        r0, r1, _ = rows.indices(self.shape[0])
        return self._open().read_rows(slice(self._t0 + r0, self._t0 + r1), cols)

    def read_into(self, c0: int, c1: int, out: np.ndarray) -> np.ndarray:
        """All snapshots of the window at parameters ``[c0, c1)``, into ``out`` (t, c1 - c0)."""
        return self._open().read_rows(slice(self._t0, self._t1), slice(c0, c1), out=out)


class Scratch:
    """Named arrays reused across calls by one thread (fresh memory is slow to touch on this VM)."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: Any, *, read_target: bool = False) -> np.ndarray:
        """An uninitialised array of ``shape``: a view of the kept buffer when it is large enough.

        ``read_target``: the buffer receives file reads, so it is mapped with plain pages (see
        :func:`read_buffer`)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        buf = self._arrays.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = self._arrays[name] = read_buffer(size, dtype) if read_target else np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def read_buffer(size: int, dtype: Any) -> np.ndarray:
    """A 1-D array backed by an anonymous ``mmap``, for ``readinto``/``preadv`` targets.

    numpy asks for transparent huge pages on large arrays; reading files into such memory cost
    2.4x the kernel time of plain pages on this VM (1.33 s vs 0.55 s of system time for 1.7 GB),
    which made the read, not the arithmetic, the bottleneck of a pass.
    """
    import mmap

    dtype = np.dtype(dtype)
    region = mmap.mmap(-1, max(1, size * dtype.itemsize))
    return np.frombuffer(region, dtype=dtype, count=size)


class BlockTask:
    """Applies a function to every piece of one parameter block of a window and sums the results.

    The store streams the block a piece at a time into buffers this object reuses, one set per
    thread for the life of one computation, so a reduction holds ``t * piece`` values (plus the
    function's scratch arrays) per worker thread, whatever n, t or the block size.
    """

    def __init__(self, reader: WindowReader, block: int) -> None:
        self._reader, self._block = reader, block
        self._scratch: dict[int, Scratch] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"_reader": self._reader, "_block": self._block}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_reader"], state["_block"])  # type: ignore[misc]

    def _thread_scratch(self) -> Scratch:
        key = threading.get_ident()
        with self._lock:
            if key not in self._scratch:
                self._scratch[key] = Scratch()
            return self._scratch[key]

    def __call__(self, c0: int, c1: int, func: Callable[..., Any], *args: Any) -> Any:
        store = self._reader._open()
        scratch = self._thread_scratch()
        t = self._reader.shape[0]
        buffers = tuple(scratch.get(f"raw{k}", (t, store.piece), store.piece_buffers_dtype, read_target=True)
                        for k in range(2))
        total = None
        rows = slice(self._reader._t0, self._reader._t1)
        for c, piece in store.iter_pieces(rows, c0, c1, buffers):
            part = func(piece, c, *args, scratch=scratch)
            total = part if total is None else total + part
        return total


def block_tasks(store: TrajectoryStore, t0: int, t1: int, block_bytes: int,
                func: Callable[..., Any], *args: Any, checkpoint: BlockCheckpoint | None = None,
                shape: tuple[int, ...] = ()) -> list[Any]:
    """One dask task per chunk-aligned parameter block of snapshots ``[t0, t1)``, in block order.

    Each task returns ``sum(func(piece, c, *args, scratch=Scratch))`` over the pieces of its block,
    with piece (t1 - t0, <= store.piece) float32 starting at parameter c. With ``checkpoint``, each
    block's result (of ``shape``) is saved there when done and loaded instead of recomputed when a
    restarted pass finds it.
    """
    import dask

    from ._checkpoint import resumable

    block = block_size(store, t0, t1, block_bytes)
    task = BlockTask(WindowReader(store, t0, t1), block)
    starts = range(0, store.n, block)
    if checkpoint is None:
        return [dask.delayed(task, pure=False)(c0, min(c0 + block, store.n), func, *args) for c0 in starts]
    return [dask.delayed(resumable, pure=False)(task, k, shape, checkpoint, c0, min(c0 + block, store.n), func, *args)
            for k, c0 in enumerate(starts)]


def block_size(store: TrajectoryStore, t0: int, t1: int, block_bytes: int) -> int:
    """Parameters per block of :func:`block_tasks` (part of a pass's identity)."""
    return column_block(store.chunk_elems, t1 - t0, block_bytes, store.n)


def snapshots_to_dask(store: TrajectoryStore, t0: int, t1: int, block_bytes: int) -> Any:
    import dask.array as da
    from dask.base import tokenize

    block = block_size(store, t0, t1, block_bytes)
    reader = WindowReader(store, t0, t1)
    name = "trajstore-" + tokenize(store.url, store.name, t0, t1, len(store), store.layout.fingerprint, block)
    return da.from_array(reader, chunks=(t1 - t0, block), asarray=False, lock=False, fancy=False,
                         meta=np.empty((0, 0), dtype=np.float32), name=name)
