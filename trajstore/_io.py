"""Key-level I/O for the trajectory's own documents and chunks, on any Zarr store.

Chunks of ``params`` and ``buffers`` are read and written by key in the format Zarr keeps them in
for the array's ``bytes`` (little-endian) + ``crc32c`` codecs: the chunk's values, padded to the
chunk shape, then their crc32c. Going by key rather than through Zarr's array API means a chunk's
place is decided by the commit log (a physical row), not by the array's recorded shape, and the
stored crc32c is at hand to compare with the one the commit recorded.

On a local folder, documents and chunks are read through a descriptor opened without following a
link and without blocking, and anything that is not a regular file is refused before a byte is
read: a FIFO or a socket planted where a chunk should be must not hang or crash a reader.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype

from ._backend import fsync_path, local_root
from ._backend import open_regular as _backend_open_regular
from .errors import InvalidStoreError

__all__ = ["NotRegularFileError", "encode_chunk", "fsync_path", "get_bytes", "parse_json", "read_local", "set_bytes",
           "write_json_atomic"]

class NotRegularFileError(OSError):
    """A path that should hold a file holds a FIFO, socket, device or link."""


def open_regular(path: Path | str) -> int:
    """:func:`trajstore._backend.open_regular`, refusing with NotRegularFileError (the callers
    name the snapshot or document)."""
    return _backend_open_regular(path, lambda kind: NotRegularFileError(errno.EINVAL, f"is {kind}", str(path)))


def read_local(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of a regular file, or None when there is none; refuses files over ``limit`` bytes
    (InvalidStoreError, by size, before reading)."""
    try:
        fd = open_regular(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise InvalidStoreError(f"{path}: {size} bytes, more than the {limit} a document may have")
        chunks, got = [], 0
        while True:
            part = os.read(fd, max(size - got, 1 << 16))
            if not part:
                break
            chunks.append(part)
            got += len(part)
            if limit is not None and got > limit:
                raise InvalidStoreError(f"{path}: more than the {limit} bytes a document may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


async def get_bytes(store: Store, key: str, limit: int | None = None) -> bytes | None:
    """The value at ``key`` (None when absent). Local folders are read directly (see
    :func:`read_local`); elsewhere through the store, and the size checked after the read."""
    root = local_root(store)
    if root is not None:
        import asyncio

        return await asyncio.to_thread(read_local, root / key, limit)
    buf = await store.get(key, prototype=default_buffer_prototype())
    if buf is None:
        return None
    data = buf.to_bytes()
    if limit is not None and len(data) > limit:
        raise InvalidStoreError(f"{key}: {len(data)} bytes, more than the {limit} a document may have")
    return data


def parse_json(data: bytes | None, key: str) -> Any:
    """A JSON document (None for an absent key); anything that is not UTF-8 JSON is a ValueError."""
    if data is None:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{key}: not a JSON document ({type(e).__name__})") from None


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("utf-8")


async def set_bytes(store: Store, key: str, data: bytes) -> None:
    await store.set(key, default_buffer_prototype().buffer.from_bytes(data))


def write_json_atomic(store: Store, key: str, doc: Any, *, durable: bool) -> None:
    """Write one document in one atomic key write. On a local folder: a temporary file, fsynced
    when ``durable``, renamed into place, and the folder fsynced (so the new name is on disk too);
    elsewhere one ``set`` (object stores replace whole objects; ``local://`` stores rename too,
    see :class:`trajstore._backend.AtomicLocalFsspecStore`)."""
    from ._backend import sync

    data = _dumps(doc)
    root = local_root(store)
    if root is None:
        sync(set_bytes(store, key, data))
        return
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    if durable:
        fsync_path(path.parent)


def encode_chunk(values: np.ndarray, chunk_shape: tuple[int, ...], fill: Any) -> tuple[bytes, int]:
    """A chunk as stored (values padded to ``chunk_shape`` with ``fill``, little-endian, then the
    crc32c of those bytes) and that crc32c."""
    if values.shape != chunk_shape:
        padded = np.full(chunk_shape, fill, dtype=values.dtype)
        padded[tuple(slice(0, k) for k in values.shape)] = values
        values = padded
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
    crc = crc32c.crc32c(data)
    return data + crc.to_bytes(4, "little"), crc
