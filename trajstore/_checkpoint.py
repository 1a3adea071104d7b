"""Per-block checkpoints of a pass over W, so a killed Gram or basis pass resumes where it stopped.

A pass is a list of block tasks whose small results (a t x t or d x d float64 partial) are summed
in block order. :class:`BlockCheckpoint` keeps each finished block's partial in the store, under a
group whose attributes name the pass (``identity``: window, block size, records digest, ...). A
restarted pass with the same identity loads the finished blocks' partials instead of recomputing
them; summing the same float64 partials in the same order gives the same bytes, so a resumed pass
equals an uninterrupted one bit for bit. A group of another identity is discarded.

Each partial is its own Zarr array with a crc32c codec, tagged with a hash of its pass' identity;
one that fails to decode, has the wrong shape or tag, or holds non-finite values (a write cut
short) counts as not done and is recomputed. A basis pass saves a block's partial only after the
block's rows of U are written, so a saved partial means the block's rows are on the store.

Two processes may run the same pass at once (the Gram pass of one trajectory, for two bases):
they save the same partials, and one's removal of the checkpoint may pull files from under the
other's save. Such a lost race costs a recomputation, never an error, and the tag keeps a
partial of one pass from being summed into another.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend
from ._dims import partial_dims

__all__ = ["BlockCheckpoint", "lost_race", "resumable"]

_CRC: dict[str, Any] = {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None}
_TAG = "trajstore_pass"


def lost_race(e: BaseException) -> bool:
    """Whether ``e`` is what a concurrent writer of the same derived data causes (a node created, or
    a folder removed, under this writer's feet), not a failure of the backend."""
    if isinstance(e, (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileNotFoundError)):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST)


class BlockCheckpoint:
    """The saved partials of one pass, in the store at ``path``; pickles to (store, path, identity)."""

    def __init__(self, zstore: zarr.abc.store.Store, path: str, identity: Mapping[str, Any]) -> None:
        self._zstore, self._path = zstore, path
        self._identity = dict(identity)
        self._tag = hashlib.sha256(json.dumps(self._identity, sort_keys=True, default=str).encode()).hexdigest()[:32]
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
        try:
            zarr.create_group(store=self._zstore, path=self._path, zarr_format=3, overwrite=False,
                              attributes={"trajstore_pass": self._identity})
        except (OSError, ValueError) as e:
            if not lost_race(e):
                raise
            return self._prepare_again()
        return 0

    def _prepare_again(self) -> int:
        """After another process created the group first: its pass is this one, or (once) start afresh."""
        try:
            group = _backend.open_group(self._zstore, self._path, "r")
            if group.attrs.get("trajstore_pass") == self._identity:
                return sum(1 for _ in group.array_keys())
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.clear()
        zarr.create_group(store=self._zstore, path=self._path, zarr_format=3, overwrite=True,
                          attributes={"trajstore_pass": self._identity})
        return 0

    def load(self, k: int, shape: tuple[int, ...]) -> np.ndarray | None:
        """Block ``k``'s saved partial, or None when it is absent or damaged."""
        try:
            array = zarr.open_array(self._zstore, path=f"{self._path}/b{k}", mode="r")
            if array.shape != shape or array.dtype != np.float64 or array.attrs.get(_TAG) != self._tag:
                return None
            value = np.asarray(array[...])
        except Exception:  # absent, or a partial write: either way the block is computed again
            return None
        return value if np.all(np.isfinite(value)) else None

    def save(self, k: int, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        try:
            array = zarr.create_array(self._zstore, name=f"{self._path}/b{k}", shape=value.shape, chunks=value.shape,
                                      dtype=np.float64, fill_value=np.nan, overwrite=True, attributes={_TAG: self._tag},
                                      dimension_names=partial_dims(value.ndim), **_CRC)
            array[...] = value
        except (OSError, ValueError) as e:
            if not lost_race(e):
                raise  # a failing backend (a full disk, say) is the caller's to hear about

    def clear(self) -> None:
        """Remove the checkpoint; a concurrent writer's files appearing meanwhile are retried, then
        left (a stale checkpoint is dropped by a later pass)."""
        for _ in range(3):
            try:
                _backend.sync(self._zstore.delete_dir(self._path))
                return
            except (OSError, ValueError) as e:
                if not lost_race(e):
                    raise
                if isinstance(e, FileNotFoundError):
                    return


def resumable(task: Callable[..., np.ndarray], k: int, shape: tuple[int, ...],
              checkpoint: BlockCheckpoint, *args: Any) -> np.ndarray:
    """``task(*args)`` for block ``k``, or its saved partial; a computed partial is saved first."""
    saved = checkpoint.load(k, shape)
    if saved is not None:
        return saved
    value = task(*args)
    checkpoint.save(k, value)
    return value
