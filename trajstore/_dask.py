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
    from .store import TrajectoryStore

__all__ = ["BlockTask", "WindowReader", "block_tasks", "column_block", "snapshots_to_dask"]


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


class BlockTask:
    """Reads one block of a window and applies a function to it, reusing one block buffer per
    thread for the life of this object (one computation): fresh memory is slow to touch here, and
    the block never leaves the task, so a reduction holds one block per worker thread."""

    def __init__(self, reader: WindowReader, block: int) -> None:
        self._reader, self._block = reader, block
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"_reader": self._reader, "_block": self._block}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_reader"], state["_block"])  # type: ignore[misc]

    def _buffers_of_thread(self) -> tuple[np.ndarray, np.ndarray]:
        from ._linalg import SUB_BLOCK

        key = threading.get_ident()
        with self._lock:
            bufs = self._buffers.get(key)
            if bufs is None:
                t = self._reader.shape[0]
                bufs = self._buffers[key] = (np.empty((t, self._block), dtype=np.float32),
                                             np.empty((t, SUB_BLOCK), dtype=np.float64))
        return bufs

    def __call__(self, c0: int, c1: int, func: Callable[..., Any], *args: Any) -> Any:
        block_buf, work = self._buffers_of_thread()
        block = self._reader.read_into(c0, c1, block_buf[:, :c1 - c0])
        return func(block, c0, *args, work=work)


def block_tasks(store: TrajectoryStore, t0: int, t1: int, block_bytes: int,
                func: Callable[..., Any], *args: Any) -> list[Any]:
    """One dask task per chunk-aligned parameter block of snapshots ``[t0, t1)``, in block order:
    ``func(block, c0, *args)`` with block (t1 - t0, b) float32. Compute them to get the results."""
    import dask

    block = column_block(store.chunk_elems, t1 - t0, block_bytes, store.n)
    task = BlockTask(WindowReader(store, t0, t1), block)
    return [dask.delayed(task, pure=False)(c0, min(c0 + block, store.n), func, *args)
            for c0 in range(0, store.n, block)]


def snapshots_to_dask(store: TrajectoryStore, t0: int, t1: int, block_bytes: int) -> Any:
    import dask.array as da

    block = column_block(store.chunk_elems, t1 - t0, block_bytes, store.n)
    reader = WindowReader(store, t0, t1)
    return da.from_array(reader, chunks=(t1 - t0, block), asarray=False, lock=False, fancy=False,
                         meta=np.empty((0, 0), dtype=np.float32), name=f"trajstore-{store.name}-{t0}-{t1}-{id(reader):x}")
