"""Where a store lives: one Zarr store object for a local folder, an fsspec URL or a given Store.

Everything trajstore writes goes through a :class:`zarr.abc.store.Store`, so the same code runs on
a local folder, ``memory://`` in tests, an object store, or a test wrapper that injects faults.
Single-key writes are atomic on every backend we use: Zarr's LocalStore writes a temporary file
and renames it, object stores replace whole objects, and the in-memory store swaps references.
That atomicity is what a commit relies on.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .errors import InvalidStoreError, TrajstoreError

__all__ = ["StoreLike", "sync", "local_root", "open_zarr_store", "read_json", "write_json", "delete_key", "size_of"]

StoreLike = str | os.PathLike[str] | Store


def open_zarr_store(url: StoreLike, *, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A Zarr store for a path, a URL, or an existing Store (re-opened with the requested mode)."""
    if isinstance(url, Store):
        return url if url.read_only == read_only else url.with_read_only(read_only)
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" not in text:
        return LocalStore(Path(text).expanduser(), read_only=read_only)
    return FsspecStore.from_url(text, read_only=read_only, storage_options=storage_options)


def local_root(store: Store) -> Path | None:
    """The folder of a local store, or None for any other backend."""
    return Path(store.root) if isinstance(store, LocalStore) else None


def describe(url: StoreLike) -> str:
    return repr(url) if isinstance(url, Store) else os.fspath(url)


def read_json(store: Store, key: str) -> Any | None:
    """The JSON document at ``key``, or None when the key does not exist."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    return json.loads(buf.to_bytes().decode("utf-8"))


def write_json(store: Store, key: str, doc: Any) -> None:
    """Write one JSON document in a single (atomic) key write."""
    data = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("utf-8")
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_key(store: Store, key: str) -> None:
    sync(store.delete(key))


def size_of(store: Store, prefix: str) -> int:
    """Bytes stored under ``prefix`` (0 when the backend cannot list)."""
    try:
        return int(sync(store.getsize_prefix(prefix)))
    except (NotImplementedError, FileNotFoundError):
        return 0


@contextmanager
def metadata_errors(what: str) -> Iterator[None]:
    """Zarr's own errors on a malformed metadata document (wrong types, missing keys, bytes that are
    not JSON) as InvalidStoreError naming ``what``. A missing node stays a FileNotFoundError."""
    try:
        yield
    except (FileNotFoundError, TrajstoreError):
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ArithmeticError, RecursionError) as e:
        raise InvalidStoreError(f"{what}: malformed Zarr metadata ({type(e).__name__}: {e!s:.200})") from e


def child_nodes(store: Store, path: str) -> list[str]:
    """Names of the nodes directly under ``path`` (those with a ``zarr.json``), sorted. Listed by
    key, not through Zarr, which skips a node whose metadata it cannot read: a damaged trajectory
    or basis must be reported when opened, not silently missing."""

    async def names() -> list[str]:
        found = []
        async for name in store.list_dir(path):
            if not name.startswith(".") and await store.exists(f"{path}/{name}/zarr.json"):
                found.append(name)
        return sorted(found)

    try:
        return sync(names())
    except FileNotFoundError:
        return []


def open_group(store: Store, path: str, mode: str) -> zarr.Group:
    key = f"{path}/zarr.json" if path else "zarr.json"
    try:
        with metadata_errors(key):
            group = zarr.open_group(store=store, path=path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        if sync(store.exists(key)):  # there, but Zarr finds no group in it (node_type, say)
            raise InvalidStoreError(f"{key}: malformed Zarr metadata (not a group's)") from None
        raise
    if group.metadata.zarr_format != 3:  # Zarr takes the document's word for it; we write only v3
        raise InvalidStoreError(f"{key}: malformed Zarr metadata (zarr_format {group.metadata.zarr_format!r}, expected 3)")
    return group


def fsync_local(store: Store, keys: list[str], *, workers: int = 4) -> None:
    """fsync the files behind ``keys`` and their folders (local stores only; a no-op elsewhere).

    Zarr's LocalStore writes each key to a temporary file and renames it, which is atomic
    against a crashed process but not durable against a power loss until the data and the
    rename reach the disk; this makes them reach it.
    """
    root = local_root(store)
    if root is None or not keys:
        return
    from concurrent.futures import ThreadPoolExecutor

    paths = [root / k for k in keys]
    folders = sorted({p.parent for p in paths})

    def _sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_sync, paths))
        list(pool.map(_sync, folders))


def write_atomic(path: Path, write: Any) -> Path:
    """Call ``write(tmp)`` on ``path.tmp``, then rename it over ``path`` (atomic on POSIX): a reader,
    or a run resumed after a SIGKILL, finds the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_chunk_file(path: Path, values: np.ndarray, chunk_shape: tuple[int, ...], fill: Any, *,
                     durable: bool = False) -> None:
    """Write one chunk as a local Zarr v3 store keeps it for a ``bytes`` (little-endian) +
    ``crc32c`` codec chain: the chunk's raw values, padded to the chunk shape with ``fill`` (an
    edge chunk is stored whole), then their crc32c. Written to a temporary file and renamed, as
    Zarr does; with ``durable`` the file is fsynced before the rename.

    This skips Zarr's encode path and its copies of the chunk (measured: an append of a 213 MiB
    snapshot spent most of its time there once the disk was faster than it)."""
    import crc32c

    if values.shape != chunk_shape:
        padded = np.full(chunk_shape, fill, dtype=values.dtype)
        padded[tuple(slice(0, k) for k in values.shape)] = values
        values = padded
    data = memoryview(np.ascontiguousarray(values)).cast("B")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(crc32c.crc32c(data).to_bytes(4, "little"))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (a full disk) leaves no temporary file behind to hold on to the space.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write's own error is the one to raise
        raise
