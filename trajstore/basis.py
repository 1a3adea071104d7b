"""A DLDR basis: the top-d directions of a window of a trajectory, with what they were made from.

A basis lives either in memory (from :func:`trajstore.dldr` on an array) or in a store under
``bases/NAME``, its arrays in a version folder of their own::

    bases/NAME/zarr.json          attrs {"trajstore": {"kind": "basis", "complete", "version", d, n, sigma, ...}}
    bases/NAME/v-<uuid>/zarr.json attrs {"trajstore_pass": what makes its rows, "trajstore_owner": host, pid}
    bases/NAME/v-<uuid>/U         (n, d) float32, row chunks, bytes + crc32c
    bases/NAME/v-<uuid>/mean      (n,) float32, the same row chunks
    bases/NAME/v-<uuid>/gram      (t, t) float64, the centred Gram matrix of the window

Every computation writes a fresh version folder (or resumes its own interrupted one), and only
after every row of U and the mean is written and their orthonormality measured does it commit:
one atomic write of ``bases/NAME/zarr.json`` that names the version. The superseded version is
deleted after the commit. So two processes computing the same name never write into each other's
arrays: the stored basis is always one whole computation, and a :class:`Basis` opened before a
recomputation reads only its own version, and says so once that version is gone.

Bases written before versions (format 1) keep their arrays in ``bases/NAME`` itself; they are
read as they are and replaced by a version at their next recomputation.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from . import _backend, _linalg
from ._names import check_name, check_stored_name
from ._records import MAX_SNAPSHOTS
from .errors import (CorruptSnapshotError, FormatVersionError, InvalidStoreError, StoreUnreachableError,
                     TrajectoryNotFoundError, WriterConflictError)
from .layout import MAX_ELEMENTS

__all__ = ["Basis", "BASES_ROOT", "list_bases", "open_basis"]

BASES_ROOT = "bases"
FORMAT_VERSION = 2      # 2: the arrays in the version folder the attributes name; 1: in the basis group itself
_OLD_FORMAT = 1
_VERSION = re.compile(r"v-[0-9a-f]{32}")
_OLD_LAYOUT = ("U", "mean", "gram", "pass")  # what a format-1 basis keeps in its group


class Basis:
    """Top-d principal directions of the centred snapshots of a window ``[start, stop)``.

    Attributes
    ----------
    d, n : int
        Number of directions and of parameters.
    singular_values : ndarray of shape (d,)
        Descending.
    explained_variance_ratio : ndarray of shape (d,)
        ``sigma_i^2 / sum of all squared singular values`` of the window.
    trajectory : str or None
        Source trajectory (None for an in-memory array).
    start, stop : int
        The window of snapshots, ``stop`` exclusive.
    orthonormality : float
        ``max |U^T U - I|`` of the stored (float32) basis, measured when it was written.
    name : str or None
        Its name in the store.
    """

    def __init__(self, meta: Mapping[str, Any], centred_gram: np.ndarray, *,
                 u: np.ndarray | zarr.Array, mean: np.ndarray | zarr.Array, origin: Store | None = None) -> None:
        self._meta = dict(meta)
        self._origin = origin  # the store it was opened from: asked, when a read fails, whether it changed
        self._gram = centred_gram
        self._u = u
        self._mean = mean
        self.d: int = int(meta["d"])
        self.n: int = int(meta["n"])
        self.singular_values = np.asarray(meta["singular_values"], dtype=np.float64)
        self.explained_variance_ratio = np.asarray(meta["explained_variance_ratio"], dtype=np.float64)
        self.trajectory: str | None = meta.get("trajectory")
        self.start: int = int(meta["start"])
        self.stop: int = int(meta["stop"])
        self.orthonormality: float = float(meta["orthonormality"])
        self.name: str | None = meta.get("name")

    @property
    def path(self) -> str | None:
        """Where U, mean and gram are in the store (its version folder), or None in memory."""
        return None if self._origin is None or self.name is None else data_path(self.name, self._meta)

    def __repr__(self) -> str:
        where = f"trajectory={self.trajectory!r}, " if self.trajectory else ""
        return (f"Basis(name={self.name!r}, {where}window=[{self.start}, {self.stop}), d={self.d}, n={self.n}, "
                f"explained={self.explained_variance_ratio.sum():.4f}, max|UᵀU-I|={self.orthonormality:.1e})")

    @property
    def t(self) -> int:
        return self.stop - self.start

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._u.dtype)

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of U, shape (b - a, d); reads only the chunks that hold them."""
        return self._read(self._u, (slice(a, b), slice(None)), "U")

    @property
    def mean(self) -> np.ndarray:
        """The mean snapshot of the window, shape (n,)."""
        return self._read(self._mean, (slice(None),), "mean")

    def to_numpy(self) -> np.ndarray:
        """The whole basis U, shape (n, d). Holds n * d values in memory: for small n."""
        return self.rows(0, self.n)

    def on(self, device: Any = "cpu", *, dtype: Any = None, mode: str = "auto", shard: Any = False,
           process_group: Any = None) -> Any:
        """This basis on a torch device, for projecting gradients and lifting steps.

        See :class:`trajstore.projection.DeviceBasis` for the modes (``auto``, ``resident``,
        ``mmap``, ``stream``) and for ``shard`` (each rank of a torch.distributed process group
        holding only its rows of U).
        """
        import torch

        from .projection import DeviceBasis

        return DeviceBasis(self, device, dtype=dtype or torch.float32, mode=mode,  # type: ignore[arg-type]
                           shard=shard, process_group=process_group)

    def coordinates(self) -> np.ndarray:
        """Coordinates ``U^T (w_j - mean)`` of the window's snapshots, shape (t, d): ``V Sigma``."""
        sigma, v, _, _ = _linalg.top_eigenpairs(self._gram, self.d)
        return v * sigma

    def residuals(self) -> np.ndarray:
        """Relative projection error of each centred snapshot, shape (t,); see ``tail_residuals``."""
        return _linalg.tail_residuals(self._gram, self.d)

    @property
    def centred_gram(self) -> np.ndarray:
        """The centred Gram matrix ``J W^T W J`` of the window, shape (t, t), float64."""
        return self._gram.copy()

    def _read(self, array: np.ndarray | zarr.Array, key: tuple[slice, ...], what: str) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array[key]
        try:
            values = np.asarray(array[key])
        except StoreUnreachableError:  # not reaching the store says nothing about the basis
            raise
        except Exception as e:
            self._raise_if_changed()
            raise CorruptSnapshotError(f"basis {self.name!r}: {what} failed to decode ({type(e).__name__}: {e})") from e
        # A missing chunk reads as the fill value, NaN; a basis is written finite, so this is damage,
        # or the version this basis was opened from was deleted by a recomputation.
        if not np.isfinite(values.sum(dtype=np.float64)):
            self._raise_if_changed()
            raise CorruptSnapshotError(f"basis {self.name!r}: {what} {key[0].start}:{key[0].stop} read as non-finite "
                                       "(a missing or damaged chunk)")
        return values

    def _raise_if_changed(self) -> None:
        """CorruptSnapshotError saying so when the store no longer holds the computation this basis
        was opened from (recomputed, replaced or deleted since)."""
        if self._origin is None or self.name is None:
            return
        try:
            now = current_version(read_pointer(self._origin, self.name)[1])
        except Exception:  # the store cannot even be asked: report the read's own failure
            return
        mine = current_version(self._meta)
        if now != mine:
            held = "no complete basis of that name" if now is None else "another computation of it"
            raise CorruptSnapshotError(f"basis {self.name!r} was recomputed, replaced or deleted since it was "
                                       f"opened (the store now holds {held}); open it again")


def basis_path(name: str) -> str:
    """The basis' group (its attributes say which version holds its arrays)."""
    return f"{BASES_ROOT}/{name}"


def version_path(name: str, version: str) -> str:
    return f"{basis_path(name)}/{version}"


def data_path(name: str, meta: Mapping[str, Any]) -> str:
    """The group holding U, mean and gram of a basis of validated metadata ``meta``."""
    if meta.get("format_version") == _OLD_FORMAT:
        return basis_path(name)
    return version_path(name, meta["version"])


def list_bases(zstore: Store) -> list[str]:
    """Names of the bases in the store, complete or not (a damaged one is listed, and refused by
    :func:`open_basis`). A stored name that breaks the naming rule is InvalidStoreError."""
    names = _backend.child_nodes(zstore, BASES_ROOT)
    for name in names:
        check_stored_name(name, "basis", f"{BASES_ROOT}/ of {zstore}")
    return names


def open_basis(url: _backend.StoreLike, name: str, *, storage_options: dict[str, Any] | None = None) -> Basis:
    """Open a complete basis stored under ``bases/NAME``.

    The basis reads the arrays of the computation that was stored when it was opened; when the
    name is recomputed (or the basis deleted) after that, its reads raise CorruptSnapshotError
    saying so, rather than mixing that computation's metadata with another's rows.
    """
    check_name(name, "basis")
    zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
    names = list_bases(zstore)
    if name not in names:
        raise TrajectoryNotFoundError(f"{_backend.describe(url)} holds no basis {name!r} (it has {names})")
    group = _backend.open_group(zstore, basis_path(name), "r")
    meta = validate_meta(group.attrs.get("trajstore"), name)
    if not meta.get("complete"):
        raise InvalidStoreError(f"basis {name!r} is incomplete (its computation was interrupted); compute it again")
    return open_arrays(zstore, name, meta)


def open_arrays(zstore: Store, name: str, meta: dict[str, Any]) -> Basis:
    """The complete basis of validated metadata ``meta``, its arrays checked before any is read."""
    path = data_path(name, meta)
    if path != basis_path(name) and not _backend.sync(zstore.exists(f"{path}/zarr.json")):
        raise InvalidStoreError(f"basis {name!r}: its version {meta['version']} is missing (deleted by a "
                                "recomputation of the same name since it was read?); open it again")
    group = _backend.open_group(zstore, path, "r")
    arrays = []
    for key in ("U", "mean", "gram"):
        if not _backend.sync(zstore.exists(f"{path}/{key}/zarr.json")):
            raise InvalidStoreError(f"basis {name!r}: its array {key} is missing")
        with _backend.metadata_errors(f"basis {name!r}: {key}/zarr.json"):
            arrays.append(group[key])
    u, mean, gram = arrays
    if not all(isinstance(a, zarr.Array) for a in arrays):
        raise InvalidStoreError(f"basis {name!r}: U, mean and gram must be arrays")
    t = meta["stop"] - meta["start"]
    # Shapes and dtypes are checked before the Gram matrix is read: it is allocated from its shape.
    if u.shape != (meta["n"], meta["d"]) or mean.shape != (meta["n"],) or gram.shape != (t, t):
        raise InvalidStoreError(f"basis {name!r}: arrays {u.shape}, {mean.shape}, {gram.shape} do not match n, d, t")
    if (u.dtype, mean.dtype, gram.dtype) != (np.float32, np.float32, np.float64):
        raise InvalidStoreError(f"basis {name!r}: arrays of dtypes {u.dtype}, {mean.dtype}, {gram.dtype}, "
                                "expected float32, float32, float64")
    try:
        values = np.asarray(gram[...])
    except StoreUnreachableError:
        raise
    except Exception as e:  # the codec pipeline raises ValueError/RuntimeError/... on bad bytes
        raise CorruptSnapshotError(f"basis {name!r}: gram failed to decode ({type(e).__name__}: {e})") from e
    if not np.isfinite(values).all():
        raise CorruptSnapshotError(f"basis {name!r}: its Gram matrix reads as non-finite (a missing chunk)")
    return Basis(meta, values, u=u, mean=mean, origin=zstore)


def _finite(value: object) -> bool:
    """A JSON number that converts to a finite float (bools, 400-digit integers and NaN do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def validate_meta(doc: object, name: str) -> dict[str, Any]:
    """The metadata of basis ``name`` (a name read from the store: checked against the naming rule
    too), or InvalidStoreError naming what is wrong. Names in it are checked before any is used."""
    check_stored_name(name, "basis", f"{BASES_ROOT}/")
    if not isinstance(doc, Mapping) or doc.get("kind") != "basis":
        raise InvalidStoreError(f"basis {name!r}: missing or wrong 'trajstore' attribute")
    version = doc.get("format_version")
    if type(version) is not int or version not in (_OLD_FORMAT, FORMAT_VERSION):
        raise FormatVersionError(f"basis {name!r} has format version {version!r:.100}, expected {FORMAT_VERSION} "
                                 f"(or {_OLD_FORMAT}, read as written before version folders)")
    meta = dict(doc)
    check_stored_name(meta.get("name"), "basis", f"basis {name!r}")
    if meta["name"] != name:
        raise InvalidStoreError(f"basis {name!r}: its metadata names it {meta['name']!r}")
    if meta.get("trajectory") is not None:
        check_stored_name(meta["trajectory"], "trajectory", f"basis {name!r}")
    if version == FORMAT_VERSION and (meta.get("complete") or "version" in meta):
        if not isinstance(meta.get("version"), str) or not _VERSION.fullmatch(meta["version"]):
            raise InvalidStoreError(f"basis {name!r}: version must match {_VERSION.pattern}, "
                                    f"got {meta.get('version')!r:.100}")
    limits = {"d": MAX_ELEMENTS, "n": MAX_ELEMENTS, "start": MAX_SNAPSHOTS, "stop": MAX_SNAPSHOTS}
    for key, limit in limits.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise InvalidStoreError(f"basis {name!r}: {key} must be an integer in [0, {limit}], got {value!r:.100}")
    if meta["stop"] <= meta["start"] or not 1 <= meta["d"] <= meta["n"]:
        raise InvalidStoreError(f"basis {name!r}: empty window [{meta['start']}, {meta['stop']}) or d = {meta['d']} "
                                f"outside [1, n = {meta['n']}]")
    for key in ("singular_values", "explained_variance_ratio"):
        value = meta.get(key)
        if not isinstance(value, list) or len(value) != meta["d"] or not all(_finite(v) for v in value):
            raise InvalidStoreError(f"basis {name!r}: {key} must be a list of {meta['d']} finite numbers, "
                                    f"got {value!r:.100}")
    value = meta.get("orthonormality")
    if not (_finite(value) or value == float("inf")):  # inf: written while the basis is incomplete
        raise InvalidStoreError(f"basis {name!r}: orthonormality must be a number, got {value!r:.100}")
    return meta


# ------------------------------------------------------------------ versions (written by dldr)
#
# Concurrency: every computation writes only into its own version folder (or into the interrupted
# version of the very same computation, whose rows it writes with the same bytes), and commits by
# one atomic key write; deletions come after a commit and are best effort. What a process may
# delete: the version its commit replaced, and versions no one will finish or use (marked deleted,
# unparseable, or written by a process of this host that is no longer running). A process whose
# version was deleted under it (taken for abandoned) finds out just before its commit.

def group_doc(attributes: Mapping[str, Any]) -> Any:
    """A Zarr v3 group document holding ``attributes``, as one buffer (for one atomic key write)."""
    return GroupMetadata(attributes=dict(attributes)).to_buffer_dict(default_buffer_prototype())["zarr.json"]


def _read_attrs(zstore: Store, path: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the group document at ``path`` exists, and its attributes (None when it does not
    parse). A failed read raises."""
    try:
        doc = _backend.read_json(zstore, f"{path}/zarr.json")
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        return True, None
    if doc is None:
        return False, None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    return True, attrs if isinstance(attrs, dict) else None


def read_pointer(zstore: Store, name: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether the basis group's document exists, and its 'trajstore' attribute (None when the
    document does not parse or holds none)."""
    exists, attrs = _read_attrs(zstore, basis_path(name))
    meta = attrs.get("trajstore") if attrs is not None else None
    return exists, meta if isinstance(meta, dict) else None


def current_version(meta: object) -> str | None:
    """The version that complete basis metadata names (``""`` for a format-1 basis, whose arrays
    are in its group), or None: no metadata, incomplete or malformed."""
    if not isinstance(meta, Mapping) or meta.get("complete") is not True:
        return None
    if type(meta.get("format_version")) is int and meta["format_version"] == _OLD_FORMAT:
        return ""
    version = meta.get("version")
    return version if isinstance(version, str) and _VERSION.fullmatch(version) else None


def init_pointer(zstore: Store, name: str, meta: Mapping[str, Any]) -> None:
    """Write the basis group's document holding ``meta`` (marked incomplete) unless there is one:
    never over a stored basis."""
    _backend.sync(zstore.set_if_not_exists(f"{basis_path(name)}/zarr.json", group_doc({"trajstore": dict(meta)})))


def _children(zstore: Store, path: str) -> list[str]:
    async def names() -> list[str]:
        return [n async for n in zstore.list_dir(path)]

    try:
        return _backend.sync(names())
    except FileNotFoundError:
        return []


def list_versions(zstore: Store, name: str) -> list[str]:
    """The version folders under ``bases/NAME``, sorted (listed by key: complete or not)."""
    return sorted(n for n in _children(zstore, basis_path(name)) if _VERSION.fullmatch(n))


def owner() -> dict[str, Any]:
    """Who writes a version: this process, on this host."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def create_version(zstore: Store, name: str, attributes: Mapping[str, Any]) -> zarr.Group:
    """A fresh version folder of ``name`` (a new uuid: no other process writes into it)."""
    path = version_path(name, f"v-{uuid.uuid4().hex}")
    return zarr.create_group(store=zstore, path=path, zarr_format=3,
                             attributes={**attributes, "trajstore_owner": owner()})


def version_attrs(zstore: Store, name: str, version: str) -> dict[str, Any] | None:
    """A version's attributes; None when it is missing, does not parse, or is marked deleted."""
    exists, attrs = _read_attrs(zstore, version_path(name, version))
    return attrs if exists and attrs is not None and not attrs.get("trajstore_deleted") else None


def commit(zstore: Store, name: str, meta: Mapping[str, Any]) -> None:
    """Make ``meta`` (complete, naming its version) the stored basis ``name``: one atomic write of
    the basis group's document. Then, best effort, delete what it replaced and abandoned versions.

    Raises WriterConflictError, committing nothing, when the version was deleted meanwhile."""
    version = meta["version"]
    if version_attrs(zstore, name, version) is None:
        raise WriterConflictError(f"basis {name!r}: the version this computation wrote ({version}) was deleted by "
                                  "another process computing the same name meanwhile; nothing was committed, "
                                  "call dldr again")
    replaced = current_version(read_pointer(zstore, name)[1])
    _backend.sync(zstore.set(f"{basis_path(name)}/zarr.json", group_doc({"trajstore": dict(meta)})))
    if replaced and replaced != version:
        delete_version(zstore, name, replaced)  # an opened Basis of it now says it changed
    collect_garbage(zstore, name)
    try:
        superseded = current_version(read_pointer(zstore, name)[1]) != version
    except (OSError, ValueError):
        superseded = False
    if superseded:  # another process committed right after this one (and read the pointer before)
        delete_version(zstore, name, version)


def delete_version(zstore: Store, name: str, version: str) -> None:
    """Best effort: marked deleted (one write), then its arrays, then its document; a deletion cut
    short is finished by a later call, and a process still writing into it finds out at its commit."""
    path = version_path(name, version)
    try:
        attrs = version_attrs(zstore, name, version)
        if attrs is not None:
            _backend.sync(zstore.set(f"{path}/zarr.json", group_doc({**attrs, "trajstore_deleted": True})))
        for child in _OLD_LAYOUT:
            _backend.sync(zstore.delete_dir(f"{path}/{child}"))
        _backend.delete_key(zstore, f"{path}/zarr.json")
        _backend.sync(zstore.delete_dir(path))
    except (OSError, ValueError):  # a concurrent deletion, a read-only or failing backend: left for later
        pass


def _abandoned(writer: object) -> bool:
    """Whether a version's writer is known to be gone: a process of this host no longer running."""
    if not isinstance(writer, Mapping) or writer.get("host") != socket.gethostname():
        return False  # another host's process may be running: never taken for gone
    pid = writer.get("pid")
    if type(pid) is not int or not 0 < pid < 2**31 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def collect_garbage(zstore: Store, name: str) -> None:
    """Best effort: delete the versions of ``name`` that nothing will finish or read (not the stored
    one; marked deleted, unparseable, or written by a process of this host no longer running: a
    killed computation whose call was not made again), and a format-1 basis' arrays once a
    version replaced them."""
    try:
        for version in list_versions(zstore, name):
            exists, attrs = _read_attrs(zstore, version_path(name, version))
            if not exists:
                continue  # being created (its folder comes before its document), or half deleted
            gone = attrs is None or attrs.get("trajstore_deleted") or _abandoned(attrs.get("trajstore_owner"))
            if not gone:
                continue
            # Read after the writer was found gone: a commit it made before dying is seen here.
            if version != current_version(read_pointer(zstore, name)[1]):
                delete_version(zstore, name, version)
        if current_version(read_pointer(zstore, name)[1]):
            for child in set(_OLD_LAYOUT) & set(_children(zstore, basis_path(name))):
                _backend.sync(zstore.delete_dir(f"{basis_path(name)}/{child}"))
    except (OSError, ValueError):
        pass
