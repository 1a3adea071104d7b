"""Where a store lives: one Zarr store object for a local folder, an fsspec URL or a given Store.

Everything trajstore writes goes through a :class:`zarr.abc.store.Store`, so the same code runs on
a local folder, ``memory://`` in tests, an object store, or a test wrapper that injects faults.
Single-key writes are atomic on every backend we use: Zarr's LocalStore writes a temporary file
and renames it, object stores replace whole objects, and the in-memory store swaps references.
That atomicity is what a commit relies on.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ._remote import RemoteFsspecStore
from .errors import CorruptSnapshotError, InvalidStoreError, TrajstoreError

__all__ = ["MAX_JSON_BYTES", "RegularFileStore", "StoreLike", "sync", "local_root", "open_regular", "open_zarr_store",
           "read_json", "write_json", "delete_key", "size_of"]

StoreLike = str | os.PathLike[str] | Store

# The largest metadata document (a ``zarr.json``) trajstore reads, checked by size before a byte is
# read. The largest one it writes is a trajectory's group document, whose commit records take about
# 150 bytes per snapshot, 6.8 KB with an RNG state: 64 MiB holds ~9,800 snapshots with RNG states or
# ~400,000 without (the paper's runs: 101). Parsing costs a few times a document's size in Python
# objects, so without a cap a planted 512 MB document cost 1.6 GB of memory.
MAX_JSON_BYTES = 64 * 2**20
_V2_DOCUMENTS = frozenset({".zarray", ".zgroup", ".zattrs", ".zmetadata"})  # Zarr may probe these too
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def open_zarr_store(url: StoreLike, *, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A Zarr store for a path, a URL, or an existing Store (re-opened with the requested mode).

    A local folder, and a plain ``LocalStore`` given, become a :class:`RegularFileStore`: it reads
    only regular files, without blocking, and no metadata document over MAX_JSON_BYTES. Any other
    URL becomes a :class:`~trajstore._remote.RemoteFsspecStore` (``storage_options`` go to its
    fsspec file system): a backend that cannot be reached raises StoreUnreachableError. A Store
    given is used as it is, and ``storage_options`` are then not used."""
    if type(url) is LocalStore:  # exactly Zarr's: a subclass someone wrote is theirs to keep
        return RegularFileStore(url.root, read_only=read_only)
    if isinstance(url, Store):
        return url if url.read_only == read_only else url.with_read_only(read_only)
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if "://" not in text:
        return RegularFileStore(Path(text).expanduser(), read_only=read_only)
    store = FsspecStore.from_url(text, read_only=read_only, storage_options=storage_options)
    kind = AtomicLocalFsspecStore if _is_local_fs(store) else RemoteFsspecStore
    return kind(fs=store.fs, path=store.path, read_only=read_only, allowed_exceptions=store.allowed_exceptions)


def _is_local_fs(store: FsspecStore) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(getattr(store.fs, "sync_fs", store.fs), LocalFileSystem)


class AtomicLocalFsspecStore(FsspecStore):
    """An fsspec store over fsspec's local file system (``local://`` URLs) whose writes are atomic.

    fsspec's local ``pipe_file`` truncates the file and then writes it, so a reader racing a
    rewrite can find it empty or cut short (measured: a third of reads racing a rewriting thread
    found a torn document). Every commit, lease and metadata document relies on whole-key writes,
    so here each write goes to a temporary file that is renamed into place, as Zarr's LocalStore
    does. Everything else (the heartbeat lease, the key-level read and write paths) stays that of
    an fsspec store, which is what a ``local://`` URL is for."""

    async def set(self, key: str, value: Any, byte_range: tuple[int, int] | None = None) -> None:
        import asyncio

        if byte_range is not None:
            raise NotImplementedError
        self._check_writable()
        path = Path(self.path) / key
        data = value.to_bytes()

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        await asyncio.to_thread(write)


def open_regular(path: str | os.PathLike[str], not_regular: Callable[[str], Exception] | None = None) -> int:
    """A read-only descriptor of the regular file at ``path``; never blocks, never follows a link.

    Anything else where a store keeps a file is refused before it is opened (``lstat``), and again
    after (``fstat``, should it be swapped in between): ``open()`` of a FIFO blocks until a writer
    comes, of a socket fails with ENXIO, and of a device may have effects or yield endless bytes.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        Nothing is at ``path``.
    IsADirectoryError
        A folder is at ``path`` (what ``open()`` raises, so Zarr's "absent" handling applies).
    Exception
        ``not_regular(kind)``, ``kind`` naming what is there (``"a FIFO"``, ``"a socket"``,
        ``"a character device"``, ``"a block device"``, ``"a symbolic link"``). By default a
        CorruptSnapshotError naming the path: a non-regular file where data should be is damage.
    """
    def refuse(mode: int) -> Exception:
        if stat.S_ISDIR(mode):
            return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        if not_regular is not None:
            return not_regular(kind)
        return CorruptSnapshotError(f"{os.fspath(path)} is {kind}, not a regular file")

    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:  # ELOOP, ENXIO: swapped for a link or a socket since the lstat
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise e from None
        if stat.S_ISREG(mode):
            raise
        raise refuse(mode) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(mode)
    return fd


def is_document(key: str) -> bool:
    """Whether ``key`` names a metadata document (``zarr.json``, any ``.json``, Zarr v2's)."""
    name = key.rsplit("/", 1)[-1]
    return name.endswith(".json") or name in _V2_DOCUMENTS


class RegularFileStore(LocalStore):
    """Zarr's LocalStore, hardened for stores that may be damaged or hostile.

    Every read of a key (``get``, ``get_sync``, ``get_partial_values``, and what Zarr builds on
    them) goes through :func:`open_regular`: a FIFO, socket, device or symbolic link at a key is
    refused without blocking, with an InvalidStoreError for a metadata document and a
    CorruptSnapshotError for anything else (a chunk). A metadata document over MAX_JSON_BYTES is
    refused by its size, before it is read. A folder or nothing at a key reads as absent (None),
    as in Zarr. Listing and ``exists`` are Zarr's (``is_file``: a FIFO is not listed).
    """

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if not self._is_open:
            await self._open()
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)

    def get_sync(self, key: str, *, prototype: BufferPrototype | None = None,
                 byte_range: ByteRequest | None = None) -> Buffer | None:
        self._ensure_open_sync()
        return self._read(key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        args = [(self._read, key, prototype, byte_range) for key, byte_range in key_ranges]
        return await concurrent_map(args, asyncio.to_thread, limit=None)

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
        document = is_document(key)
        error = InvalidStoreError if document else CorruptSnapshotError

        def not_regular(kind: str) -> Exception:
            return error(f"{key} in {self} is {kind}, not a regular file")

        try:
            fd = open_regular(self.root / key, not_regular)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        with open(fd, "rb") as f:  # closes fd
            size = os.fstat(fd).st_size
            if document and size > MAX_JSON_BYTES:
                raise InvalidStoreError(f"{key} in {self}: a metadata document of {size} bytes, more than the "
                                        f"{MAX_JSON_BYTES} (MAX_JSON_BYTES) trajstore reads")
            return prototype.buffer.from_bytes(_read_range(f, size, byte_range))


def _read_range(f: BinaryIO, size: int, byte_range: ByteRequest | None) -> bytes:
    """Zarr's byte-range semantics (``zarr.storage._local._get``), never reading past ``size``: a
    huge range end must not size a read buffer."""
    if byte_range is None:
        start, stop = 0, size
    elif isinstance(byte_range, RangeByteRequest):
        start, stop = byte_range.start, min(byte_range.end, size)
    elif isinstance(byte_range, OffsetByteRequest):
        start, stop = byte_range.offset, size
    elif isinstance(byte_range, SuffixByteRequest):
        start, stop = max(0, size - byte_range.suffix), size
    else:
        raise TypeError(f"Unexpected byte_range, got {byte_range}.")
    f.seek(start, io.SEEK_SET)
    return f.read(max(0, stop - start))


def local_root(store: Store) -> Path | None:
    """The folder of a local store, or None for any other backend."""
    return Path(store.root) if isinstance(store, LocalStore) else None


def local_path(url: StoreLike) -> Path | None:
    """The local path a URL or path names (``file://`` included), or None for a Store object or
    any other backend."""
    if isinstance(url, Store):
        return local_root(url)
    text = os.fspath(url)
    if text.startswith("file://"):
        return Path(text[len("file://"):]).expanduser()
    return None if "://" in text else Path(text).expanduser()


def describe(url: StoreLike) -> str:
    return repr(url) if isinstance(url, Store) else os.fspath(url)


def read_json(store: Store, key: str) -> Any | None:
    """The JSON document at ``key``, or None when the key does not exist.

    At most MAX_JSON_BYTES are read: by size before the read on a local folder (a
    :class:`RegularFileStore`) and on fsspec stores (``getsize``), after it elsewhere (an in-memory
    value is in memory already). A larger document raises InvalidStoreError naming its size."""
    def too_large(size: int) -> InvalidStoreError:
        return InvalidStoreError(f"{key}: a metadata document of {size} bytes, more than the {MAX_JSON_BYTES} "
                                 "(MAX_JSON_BYTES) trajstore reads")

    if isinstance(store, FsspecStore):
        try:
            size = int(sync(store.getsize(key)))
        except FileNotFoundError:
            return None
        except NotImplementedError:  # a filesystem that cannot tell: checked after the read
            size = 0
        if size > MAX_JSON_BYTES:
            raise too_large(size)
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    if len(buf) > MAX_JSON_BYTES:
        raise too_large(len(buf))
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

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fsync_path, paths))
        list(pool.map(fsync_path, folders))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so the names created in it reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                     durable: bool = False) -> int:
    """Write one chunk as a local Zarr v3 store keeps it for a ``bytes`` (little-endian) +
    ``crc32c`` codec chain: the chunk's raw values, padded to the chunk shape with ``fill`` (an
    edge chunk is stored whole), then their crc32c. Written to a temporary file and renamed, as
    Zarr does; with ``durable`` the file is fsynced before the rename.

    This skips Zarr's encode path and its copies of the chunk (measured: an append of a 213 MiB
    snapshot spent most of its time there once the disk was faster than it). Returns the crc32c."""
    import crc32c

    if values.shape != chunk_shape:
        padded = np.full(chunk_shape, fill, dtype=values.dtype)
        padded[tuple(slice(0, k) for k in values.shape)] = values
        values = padded
    data = memoryview(np.ascontiguousarray(values)).cast("B")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        crc = crc32c.crc32c(data)
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(crc.to_bytes(4, "little"))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return crc
    except BaseException:
        # A failed write (a full disk) leaves no temporary file behind to hold on to the space.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the write's own error is the one to raise
        raise
