"""Per-block checkpoints of a pass over W, so a killed Gram or basis pass resumes where it stopped.

A pass is a list of block tasks whose small results (a t x t or d x d float64 partial) are summed
in block order. :class:`BlockCheckpoint` keeps each finished block's partial in the store, under a
group whose attributes name the pass (``identity``: window, block size, records digest, ...). A
restarted pass with the same identity loads the finished blocks' partials instead of recomputing
them; summing the same float64 partials in the same order gives the same bytes, so a resumed pass
equals an uninterrupted one bit for bit. A group of another identity is discarded.

Each partial is its own Zarr array with a crc32c codec; one that fails to decode, has the wrong
shape or holds non-finite values (a write cut short) counts as not done and is recomputed. A
basis pass saves a block's partial only after the block's rows of U are written, so a saved
partial means the block's rows are on the store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend

__all__ = ["BlockCheckpoint", "resumable"]

_CRC: dict[str, Any] = {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None}


class BlockCheckpoint:
    """The saved partials of one pass, in the store at ``path``; pickles to (store, path, identity)."""

    def __init__(self, zstore: zarr.abc.store.Store, path: str, identity: Mapping[str, Any]) -> None:
        self._zstore, self._path = zstore, path
        self._identity = dict(identity)
        self.saved = 0  # blocks found saved by prepare()

    def prepare(self) -> int:
        """Make the checkpoint group match this pass; returns (and keeps in ``saved``) how many
        blocks are already saved."""
        self.saved = self._prepare()
        return self.saved

    def _prepare(self) -> int:
        try:
            group = _backend.open_group(self._zstore, self._path, "r")
            same = group.attrs.get("trajstore_pass") == self._identity
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group, same = None, False
        except (ValueError, KeyError, TypeError):  # a damaged group document: start afresh
            group, same = None, False
        if same:
            assert group is not None
            return sum(1 for _ in group.array_keys())
        self.clear()
        zarr.open_group(self._zstore, path=self._path, mode="w", zarr_format=3,
                        attributes={"trajstore_pass": self._identity})
        return 0

    def load(self, k: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """Block ``k``'s saved partial, or None when it is absent or damaged."""
        try:
            array = zarr.open_array(self._zstore, path=f"{self._path}/b{k}", mode="r")
            if array.shape != shape or array.dtype != np.float64:
                return None
            value = np.asarray(array[...])
        except Exception:  # absent, or a partial write: either way the block is computed again
            return None
        return value if np.all(np.isfinite(value)) else None

    def save(self, k: int, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        array = zarr.create_array(self._zstore, name=f"{self._path}/b{k}", shape=value.shape, chunks=value.shape,
                                  dtype=np.float64, fill_value=np.nan, overwrite=True, **_CRC)
        array[...] = value

    def clear(self) -> None:
        try:
            _backend.sync(self._zstore.delete_dir(self._path))
        except FileNotFoundError:
            pass


def resumable(task: Callable[..., np.ndarray], k: int, shape: tuple[int, ...],
              checkpoint: BlockCheckpoint, *args: Any) -> np.ndarray:
    """``task(*args)`` for block ``k``, or its saved partial; a computed partial is saved first."""
    saved = checkpoint.load(k, shape)
    if saved is not None:
        return saved
    value = task(*args)
    checkpoint.save(k, value)
    return value
