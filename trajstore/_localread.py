"""Reading snapshot chunks of a local store straight from their files.

A chunk file of ``params`` is the chunk's raw little-endian values followed by their crc32c (the
array's codecs are exactly ``bytes`` + ``crc32c``). Reading it with ``readinto`` into the rows of
the output array and checking the crc32c there skips zarr's decode path, which measured 0.24 GB/s
on a cold (101, 1M) read here against ~1.5 GB/s for the files themselves (shared/MEASURED.md: ~1.5x
faster). The bytes, checksum and failure modes are identical; only the copies are gone. Chunk
files are read by a small thread pool (I/O and crc32c release the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

__all__ = ["ChunkFault", "ColumnStream", "LocalChunkReader", "PIECE", "RowRef", "check_crc", "piece_size"]

THREADS = 8
# Values per row in one streamed piece: 256 KiB of float32 per snapshot file per read.
PIECE = 1 << 16


def piece_size(chunk: int) -> int:
    """Columns per streamed piece for a store chunk: PIECE when it divides the chunk, else the chunk."""
    return PIECE if chunk % PIECE == 0 else chunk


@dataclass(frozen=True)
class RowRef:
    """Where snapshot ``snapshot`` lives: its physical ``row`` and the crc32c its commit recorded
    for each chunk (None: not recorded, a format-1 commit)."""

    snapshot: int
    row: int
    crc: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ChunkFault(Exception):
    """A chunk that is missing, truncated or fails its checksum."""

    row: int
    chunk: int
    reason: str


class LocalChunkReader:
    """Reads snapshots (physical rows, see :class:`RowRef`) x columns ``[c0, c1)`` of a (rows, n)
    array with (1, chunk) chunks."""

    def __init__(self, folder: Path, n: int, chunk: int, dtype: np.dtype) -> None:
        self._folder = folder / "c"
        self._n, self._chunk, self._dtype = n, chunk, np.dtype(dtype)
        self._file_bytes = chunk * self._dtype.itemsize + 4

    def read(self, rows: Sequence[RowRef], c0: int, c1: int, out: np.ndarray) -> None:
        """Fill ``out`` (shape (len(rows), c1 - c0), this reader's dtype, C-contiguous rows)."""
        jobs = [(k, j) for k in range(len(rows)) for j in range(c0 // self._chunk, -(-c1 // self._chunk))]
        if len(jobs) == 1:
            self._read_one(rows, *jobs[0], c0, c1, out)
            return
        with ThreadPoolExecutor(max_workers=min(THREADS, len(jobs))) as pool:
            # list() re-raises the first ChunkFault in job order: the lowest snapshot is named.
            list(pool.map(lambda job: self._read_one(rows, *job, c0, c1, out), jobs))

    def open_ref(self, ref: RowRef, j: int) -> int:
        """:meth:`open_chunk` for a snapshot, its faults naming the snapshot (not the physical row)."""
        try:
            return self.open_chunk(ref.row, j)
        except ChunkFault as fault:
            raise ChunkFault(ref.snapshot, j, fault.reason) from None

    def open_chunk(self, row: int, j: int) -> int:
        """A descriptor of chunk file (row, j), checked to be a regular file of the size the format
        gives it; every read of a chunk file passes here.

        Never blocks: a FIFO, socket, device or symbolic link in a chunk's place is refused before
        it is opened (see :func:`trajstore._backend.open_regular`). A chunk longer than a snapshot
        (chunk > n; trajstore never writes one) is refused before its file is looked at: reading an
        edge chunk allocates the whole chunk, which must not be sized by hostile metadata.
        Every refusal is a ChunkFault (damage, named by snapshot and chunk).
        """
        from ._backend import open_regular

        if self._chunk > self._n:
            raise ChunkFault(row, j, f"the chunk shape claims {self._chunk} values, more than a snapshot's "
                                     f"n = {self._n} (trajstore never writes such chunks: damaged metadata)")

        def not_regular(kind: str) -> ChunkFault:
            return ChunkFault(row, j, f"chunk file is {kind}, not a regular file")

        try:
            fd = open_regular(self._folder / str(row) / str(j), not_regular)
        except (FileNotFoundError, NotADirectoryError):
            raise ChunkFault(row, j, "chunk file is missing") from None
        except IsADirectoryError:
            raise ChunkFault(row, j, "chunk file is a folder, not a regular file") from None
        except OSError as e:  # EACCES and the like: named by snapshot and chunk, as damage is
            raise ChunkFault(row, j, f"chunk file could not be opened ({e})") from e
        size = os.fstat(fd).st_size
        if size != self._file_bytes:
            os.close(fd)
            raise ChunkFault(row, j, f"chunk file has {size} bytes, expected {self._file_bytes} (truncated?)")
        return fd

    def _read_one(self, rows: Sequence[RowRef], k: int, j: int, c0: int, c1: int, out: np.ndarray) -> None:
        ref = rows[k]
        lo, hi = j * self._chunk, (j + 1) * self._chunk
        a, b = max(lo, c0), min(hi, c1, self._n)
        fd = self.open_ref(ref, j)
        try:
            target = out[k, a - c0:b - c0]
            if a == lo and b == hi:
                data = memoryview(target).cast("B")  # whole chunk: read straight into the output
            else:
                data = memoryview(bytearray(self._file_bytes - 4))
            stored = memoryview(bytearray(4))
            try:
                complete = _read_exact(fd, data) and _read_exact(fd, stored)
            except OSError as e:  # EIO and the like: named by snapshot and chunk, as damage is
                raise ChunkFault(ref.snapshot, j, f"chunk file could not be read ({e})") from e
            if not complete:
                raise ChunkFault(ref.snapshot, j, "chunk file ended early")
            check_crc(ref, j, crc32c.crc32c(data), int.from_bytes(stored, "little"))
            if not (a == lo and b == hi):
                values = np.frombuffer(data, dtype=self._dtype)
                target[...] = values[a - lo:b - lo]
        finally:
            os.close(fd)


def check_crc(ref: RowRef, j: int, computed: int, stored: int) -> None:
    """A chunk's bytes against its trailer, and the trailer against what its commit recorded."""
    if computed != stored:
        raise ChunkFault(ref.snapshot, j, "chunk failed its crc32c checksum")
    if ref.crc is not None and j < len(ref.crc) and ref.crc[j] != stored:
        raise ChunkFault(ref.snapshot, j, "chunk is not the one its commit recorded (a valid chunk of another "
                                          "row or snapshot in its place: crc32c differs from the commit's)")


def _read_exact(fd: int, view: memoryview) -> bool:
    done = 0
    while done < len(view):
        got = os.readv(fd, [view[done:]])
        if got == 0:
            return False
        done += got
    return True


class ColumnStream:
    """Chunk column ``j`` of the snapshots ``rows``, read piece by piece in order.

    Each row's crc32c is accumulated over the pieces and checked against the file's trailer in
    :meth:`finish` (after reading any padding of an edge chunk), so a pass holds one piece of all
    rows instead of a whole chunk column, and still verifies every byte it used. The kernel is asked
    to prefetch the next piece of every file while the current one is being computed on.
    """

    def __init__(self, reader: LocalChunkReader, rows: Sequence[RowRef], j: int) -> None:
        self._reader, self._rows, self._j = reader, rows, j
        self._fds: list[int] = []
        self._crcs = [0] * len(rows)
        self._pos = 0
        try:
            for ref in rows:
                self._fds.append(reader.open_ref(ref, j))
        except BaseException:
            self.close()
            raise

    def read(self, count: int, out: np.ndarray, rows: range | None = None) -> None:
        """The next ``count`` values of rows ``rows`` (default all) into ``out[:, :count]``.

        Several threads may read disjoint row sets of the same piece; call :meth:`advance` once
        all of a piece's rows are read.
        """
        item = self._reader._dtype.itemsize
        offset = self._pos * item
        for k in rows if rows is not None else range(len(self._fds)):
            view = memoryview(out[k, :count]).cast("B")
            if not _pread_checked(self._fds[k], view, offset, self._rows[k].snapshot, self._j):
                raise ChunkFault(self._rows[k].snapshot, self._j, "chunk file ended early")
            self._crcs[k] = crc32c.crc32c(view, self._crcs[k])

    def advance(self, count: int) -> None:
        self._pos += count

    def finish(self) -> None:
        """Read the rest of each chunk (edge padding) and the trailers; check every checksum."""
        item = self._reader._dtype.itemsize
        rest = self._reader._chunk * item - self._pos * item
        scratch = memoryview(bytearray(max(rest, 0) + 4))
        for k, fd in enumerate(self._fds):
            ref = self._rows[k]
            if not _pread_checked(fd, scratch, self._pos * item, ref.snapshot, self._j):
                raise ChunkFault(ref.snapshot, self._j, "chunk file ended early")
            crc = crc32c.crc32c(scratch[:rest], self._crcs[k]) if rest else self._crcs[k]
            check_crc(ref, self._j, crc, int.from_bytes(scratch[rest:rest + 4], "little"))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _pread_checked(fd: int, view: memoryview, offset: int, row: int, j: int) -> bool:
    """:func:`_pread_exact`, an I/O error (EIO...) raised as a ChunkFault naming the chunk."""
    try:
        return _pread_exact(fd, view, offset)
    except OSError as e:
        raise ChunkFault(row, j, f"chunk file could not be read ({e})") from e


def _pread_exact(fd: int, view: memoryview, offset: int) -> bool:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True
