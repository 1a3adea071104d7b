"""A committed window of a trajectory as a lazy dask array.

Each dask chunk holds every snapshot of the window for one chunk-aligned range of parameters,
read through :meth:`TrajectoryStore.read_rows` so corruption is reported per snapshot. The
reader object pickles to (store, trajectory, window) and re-opens the store read-only in the
process that reads, so the graph runs unchanged on ``dask.distributed`` workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .store import TrajectoryStore

__all__ = ["WindowReader", "snapshots_to_dask", "column_block"]


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


def snapshots_to_dask(store: TrajectoryStore, t0: int, t1: int, block_bytes: int) -> Any:
    import dask.array as da

    block = column_block(store.chunk_elems, t1 - t0, block_bytes, store.n)
    reader = WindowReader(store, t0, t1)
    return da.from_array(reader, chunks=(t1 - t0, block), asarray=False, lock=False, fancy=False,
                         meta=np.empty((0, 0), dtype=np.float32), name=f"trajstore-{store.name}-{t0}-{t1}-{id(reader):x}")
