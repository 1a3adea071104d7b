"""The exceptions trajstore raises.

Every class derives from :class:`TrajstoreError` *and* from the builtin exception users
already catch for that situation, so ``except FileNotFoundError`` keeps working around
``TrajectoryStore.open`` and ``except ValueError`` around a bad option.
"""

from __future__ import annotations

__all__ = [
    "CorruptSnapshotError",
    "FormatVersionError",
    "InvalidStoreError",
    "LayoutMismatchError",
    "NonFiniteError",
    "NotAStoreError",
    "ReadOnlyError",
    "SnapshotIndexError",
    "StoreExistsError",
    "StoreUnreachableError",
    "TrajectoryNotFoundError",
    "TrajstoreError",
    "WriterConflictError",
]


class TrajstoreError(Exception):
    """Base class of every error trajstore raises on purpose."""


class NotAStoreError(TrajstoreError, FileNotFoundError):
    """The path or URL holds no trajstore store."""


class StoreExistsError(TrajstoreError, FileExistsError):
    """Creating something that already exists (a store over foreign data, a trajectory twice)."""


class TrajectoryNotFoundError(TrajstoreError, LookupError):
    """The store holds no trajectory (or basis) of that name."""


class FormatVersionError(TrajstoreError, ValueError):
    """The store was written by an incompatible version of the on-disk format."""


class InvalidStoreError(TrajstoreError, ValueError):
    """The store's metadata is malformed: wrong types, impossible shapes, inconsistent counts."""


class LayoutMismatchError(TrajstoreError, ValueError):
    """A model's parameters do not match the layout recorded in the store."""


class NonFiniteError(TrajstoreError, ValueError):
    """A parameter holds NaN or Inf; nothing was committed."""


class ReadOnlyError(TrajstoreError, PermissionError):
    """Writing through a store opened with ``mode="r"``."""


class SnapshotIndexError(TrajstoreError, IndexError):
    """A snapshot index outside ``[-len(store), len(store))``."""


class CorruptSnapshotError(TrajstoreError, OSError):
    """Stored data failed its checksum, is truncated, or is missing for a committed snapshot."""


class WriterConflictError(TrajstoreError, BlockingIOError):
    """Another live writer holds the trajectory's write lease."""


class StoreUnreachableError(TrajstoreError, ConnectionError):
    """The store's backend cannot be reached: connection refused or reset, a name that does not
    resolve, a timeout, or no credentials to sign a request with. Nothing is known about the
    store's data, so this is never damage (``trajstore verify`` exits 2 on it, not 1)."""
