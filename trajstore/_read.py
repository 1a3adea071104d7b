"""The read path: committed snapshots' chunks, by physical row, checked against their commits.

On a local folder chunk files are read directly (:mod:`trajstore._localread`); elsewhere
:class:`KeyChunkReader` fetches the chunks by key, concurrently, and checks each one the same way:
its length, its crc32c trailer, and the crc32c its commit recorded. A fault raises
:class:`~trajstore._localread.ChunkFault` naming the snapshot and chunk; the store turns it into
a CorruptSnapshotError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import crc32c
import numpy as np
from zarr.abc.store import Store

if TYPE_CHECKING:
    import torch

from . import _backend, _io
from ._localread import ChunkFault, ColumnStream, LocalChunkReader, RowRef, check_crc, piece_size
from .errors import CorruptSnapshotError, SnapshotIndexError, StoreUnreachableError

__all__ = ["KeyChunkReader", "ReadPath", "read_buffers"]

_CONCURRENCY = 16


class KeyChunkReader:
    """Reads snapshots x columns ``[c0, c1)`` of ``prefix/params`` through any Zarr store."""

    def __init__(self, store: Store, array_path: str, n: int, chunk: int, dtype: np.dtype) -> None:
        self._store, self._path = store, array_path
        self._n, self._chunk = n, chunk
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._file_bytes = chunk * self._dtype.itemsize + 4

    def read(self, rows: Sequence[RowRef], c0: int, c1: int, out: np.ndarray) -> None:
        jobs = [(k, j) for k in range(len(rows)) for j in range(c0 // self._chunk, -(-c1 // self._chunk))]
        _backend.sync(self._read_all(rows, jobs, c0, c1, out))

    async def _read_all(self, rows: Sequence[RowRef], jobs: list[tuple[int, int]], c0: int, c1: int,
                        out: np.ndarray) -> None:
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one(k: int, j: int) -> None:
            async with sem:
                data = await self._get(rows[k], j)
            lo = j * self._chunk
            a, b = max(lo, c0), min(lo + self._chunk, c1, self._n)
            out[k, a - c0:b - c0] = np.frombuffer(data, dtype=self._dtype, count=b - lo)[a - lo:]

        results = await asyncio.gather(*(one(k, j) for k, j in jobs), return_exceptions=True)
        for r in results:  # the first fault in job order: the lowest snapshot is named
            if isinstance(r, BaseException):
                raise r

    async def _get(self, ref: RowRef, j: int) -> bytes:
        key = f"{self._path}/c/{ref.row}/{j}"
        try:
            data = await _io.get_bytes(self._store, key, limit=self._file_bytes)
        except _io.NotRegularFileError:
            raise ChunkFault(ref.snapshot, j, "chunk file is not a regular file (a FIFO, socket, device or link)") \
                from None
        except StoreUnreachableError:  # not reaching the store says nothing about the chunk
            raise
        except (OSError, TimeoutError) as e:
            raise ChunkFault(ref.snapshot, j, f"chunk could not be read ({type(e).__name__}: {e})") from e
        except ValueError:  # over the limit: larger than a chunk can be
            raise ChunkFault(ref.snapshot, j, f"chunk is larger than the {self._file_bytes} bytes a chunk has") \
                from None
        if data is None:
            raise ChunkFault(ref.snapshot, j, "chunk file is missing")
        if len(data) != self._file_bytes:
            raise ChunkFault(ref.snapshot, j, f"chunk has {len(data)} bytes, expected {self._file_bytes} (truncated?)")
        payload = memoryview(data)[:-4]
        check_crc(ref, j, crc32c.crc32c(payload), int.from_bytes(data[-4:], "little"))
        return data


def read_buffers(store: Store, array_path: str, ref: RowRef, nbytes: int, expected: int | None) -> np.ndarray:
    """Snapshot ``ref``'s buffer record (one uint8 chunk of ``nbytes``), checked like a params chunk."""
    key = f"{array_path}/c/{ref.row}/0"
    try:
        data = _backend.sync(_io.get_bytes(store, key, limit=nbytes + 4))
    except _io.NotRegularFileError:
        raise ChunkFault(ref.snapshot, 0, "its buffers chunk is not a regular file") from None
    except StoreUnreachableError:
        raise
    except (OSError, TimeoutError) as e:
        raise ChunkFault(ref.snapshot, 0, f"its buffers chunk could not be read ({type(e).__name__}: {e})") from e
    except ValueError:
        raise ChunkFault(ref.snapshot, 0, f"its buffers chunk is larger than {nbytes + 4} bytes") from None
    if data is None:
        raise ChunkFault(ref.snapshot, 0, "its buffers chunk is missing")
    if len(data) != nbytes + 4:
        raise ChunkFault(ref.snapshot, 0, f"its buffers chunk has {len(data)} bytes, expected {nbytes + 4}")
    crc = crc32c.crc32c(memoryview(data)[:-4])
    if crc != int.from_bytes(data[-4:], "little"):
        raise ChunkFault(ref.snapshot, 0, "its buffers chunk failed its crc32c checksum")
    if expected is not None and crc != expected:
        raise ChunkFault(ref.snapshot, 0, "its buffers chunk is not the one its commit recorded")
    return np.frombuffer(data, dtype=np.uint8, count=nbytes).copy()


class ReadPath:
    """The read half of :class:`trajstore.TrajectoryStore`: committed snapshots by index, as
    float32 rows, pieces, dask arrays or a model's parameters and buffers.

    Every read goes through the commit log's view (``self._refs``: each snapshot's physical row
    and the crc32c its commit recorded per chunk), so it reads only committed data and checks
    each chunk against its commit. Mixed into TrajectoryStore, which sets the attributes used here.
    """

    _count: int
    _refs: list[RowRef]
    _commits: list[Any]
    _fast: LocalChunkReader | None
    _keys: KeyChunkReader
    _static: Any
    _name: str
    _where: str
    _zstore: Store
    _prefix: str
    n: int
    chunk_elems: int


    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"snapshot index must be an integer, got {type(i).__name__}")
        if not -self._count <= i < self._count:
            raise SnapshotIndexError(
                f"snapshot index {i} out of range for trajectory {self._name!r} with {self._count} committed snapshots"
            )
        return int(i) % self._count

    def read_rows(self, rows: slice, cols: slice, out: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of committed snapshots ``rows`` at parameters ``cols``.

        Checksum failures, truncated chunks and missing chunks (read as the NaN fill value)
        raise CorruptSnapshotError naming the snapshot.
        """
        r0, r1, _ = rows.indices(self._count)
        c0, c1, _ = cols.indices(self.n)
        shape = (max(r1 - r0, 0), max(c1 - c0, 0))
        float32 = self._static.dtype.numpy_dtype == np.float32
        raw = out if (float32 and out is not None) else np.empty(shape, dtype=self._static.dtype.numpy_dtype)
        if shape[0] and shape[1]:
            try:
                (self._fast or self._keys).read(self._refs[r0:r1], c0, c1, raw)
            except ChunkFault as fault:
                raise self._fault_error(fault) from None
        values = raw if raw.dtype == np.float32 else self._static.dtype.decode(raw, out)
        if not np.isfinite(values.sum(dtype=np.float64)):
            row = r0 + int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0])
            raise CorruptSnapshotError(
                f"snapshot {row} of trajectory {self._name!r} in {self._where}: parameters [{c0}, {c1}) "
                "read as non-finite (a missing or damaged chunk; appends never commit NaN or Inf)"
            )
        return values

    @property
    def piece(self) -> int:
        """Columns per piece in :meth:`iter_pieces` (divides the chunk; 65536 for default chunks)."""
        return piece_size(self._static.chunk_elems)

    @property
    def piece_buffers_dtype(self) -> np.dtype:
        return self._static.dtype.numpy_dtype

    def iter_pieces(self, rows: slice, c0: int, c1: int,
                    buffers: tuple[np.ndarray, ...] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(c, values)``: float32 values of snapshots ``rows`` at parameters ``[c, c + piece)``.

        Covers ``[c0, c1)`` (``c0`` a multiple of the chunk) in order. On a local store each chunk
        column is streamed a piece of every snapshot at a time, the next piece being read by a
        helper thread while the caller works on the current one, so memory is ``2 t * piece``
        values whatever the chunk size. A chunk's checksum is verified when it has been read
        through, before the next chunk starts (a CorruptSnapshotError then ends the pass). The
        yielded array is a view of ``buffers`` (two (t, piece) arrays of the storage dtype),
        valid until the next step. Elsewhere whole chunk columns are read through Zarr and yielded
        piece by piece.
        """
        r0, r1, _ = rows.indices(self._count)
        if c0 % self.chunk_elems:
            raise ValueError(f"c0 = {c0} is not a multiple of the chunk size {self.chunk_elems}")
        if buffers is None:
            from ._dask import read_buffer

            size = (r1 - r0) * self.piece
            buffers = tuple(read_buffer(size, self.piece_buffers_dtype).reshape(r1 - r0, self.piece) for _ in range(2))
        chunk, piece = self.chunk_elems, self.piece
        for lo in range(c0, min(c1, self.n), chunk):
            hi = min(lo + chunk, c1, self.n)
            if self._fast is None:
                block = self.read_rows(slice(r0, r1), slice(lo, hi))
                for a in range(lo, hi, piece):
                    yield a, block[:, a - lo:a - lo + piece]
                continue
            yield from self._stream_chunk(r0, r1, lo, hi, buffers)

    def _stream_chunk(self, r0: int, r1: int, lo: int, hi: int,
                      buffers: tuple[np.ndarray, ...]) -> Iterator[tuple[int, np.ndarray]]:
        from concurrent.futures import ThreadPoolExecutor

        assert self._fast is not None
        try:
            stream = ColumnStream(self._fast, self._refs[r0:r1], lo // self.chunk_elems)
        except ChunkFault as fault:
            raise self._fault_error(fault) from None
        starts = list(range(lo, hi, self.piece))
        sizes = [min(self.piece, hi - a) for a in starts]
        decoded = None if self._static.dtype.numpy_dtype == np.float32 else np.empty((r1 - r0, self.piece), np.float32)
        t = r1 - r0
        # Two reader threads, each over half of the snapshot files, keep two reads in flight
        # (measured: one in flight could not keep up with the arithmetic on the other core).
        halves = [range(0, t // 2), range(t // 2, t)] if t > 1 else [range(t)]
        try:
            with ThreadPoolExecutor(max_workers=len(halves)) as io:
                def submit(k: int) -> list[Any]:
                    return [io.submit(stream.read, sizes[k], buffers[k % 2], half) for half in halves]

                pending = submit(0)
                for k, (a, m) in enumerate(zip(starts, sizes)):
                    for future in pending:
                        future.result()
                    stream.advance(m)
                    raw = buffers[k % 2][:, :m]
                    if k + 1 < len(starts):
                        # The caller has finished with piece k - 1, whose buffer is refilled now.
                        pending = submit(k + 1)
                    # No finiteness check here: every byte is checksummed, a missing chunk file is
                    # an error, and passes check their (small) results for non-finite values.
                    yield a, raw if decoded is None else self._static.dtype.decode(raw, decoded[:, :m])
                stream.finish()
        except ChunkFault as fault:
            raise self._fault_error(fault) from None
        finally:
            stream.close()

    def _fault_error(self, fault: ChunkFault) -> CorruptSnapshotError:
        c = self.chunk_elems
        return CorruptSnapshotError(
            f"snapshot {fault.row} of trajectory {self._name!r} in {self._where}: chunk {fault.chunk} "
            f"(parameters [{fault.chunk * c}, {min(self.n, (fault.chunk + 1) * c)})) {fault.reason}"
        )

    def check_present(self, start: int = 0, stop: int | None = None) -> None:
        """Raise CorruptSnapshotError naming the first committed snapshot of ``[start, stop)`` whose
        row lacks chunk keys, from one listing of the chunk keys (no data read).

        A pass over W allocates t x t partials and runs for minutes: it checks first that the
        snapshots it is told about are there, so a store claiming thousands of snapshots it does
        not hold fails in milliseconds instead (work bounded by the bytes present)."""
        t0, t1, _ = slice(start, stop).indices(self._count)
        if t1 <= t0:
            return
        want = -(-self.n // self.chunk_elems)
        rows = {self._refs[i].row: i for i in range(t0, t1)}

        async def count() -> dict[int, int]:
            found: dict[int, int] = {}
            async for key in self._zstore.list_prefix(f"{self._prefix}/params/c/"):
                row, _, chunk = key.removeprefix(f"{self._prefix}/params/c/").partition("/")
                if row.isdigit() and chunk.isdigit() and int(row) in rows and int(chunk) < want:
                    found[int(row)] = found.get(int(row), 0) + 1
            return found

        try:
            found = _backend.sync(count())
        except FileNotFoundError:
            found = {}
        short = sorted(i for row, i in rows.items() if found.get(row, 0) < want)
        if short:
            i = short[0]
            raise CorruptSnapshotError(
                f"snapshot {i} of trajectory {self._name!r} in {self._where}: {want - found.get(self._refs[i].row, 0)} "
                f"of its {want} chunks are missing ({len(short)} snapshots of [{t0}, {t1}) are incomplete)"
            )

    def snapshot(self, i: int) -> np.ndarray:
        """Snapshot ``i`` (negative counts from the end) as a float32 vector of shape (n,)."""
        i = self._index(i)
        return self.read_rows(slice(i, i + 1), slice(0, self.n))[0]

    def iter_ranges(self, block: int | None = None) -> Iterator[tuple[int, int]]:
        """Parameter ranges ``[a, b)`` of ``block`` values (default: the staging size), chunk-aligned."""
        chunk = self._static.chunk_elems
        from .store import DEFAULT_STAGE_BYTES  # read when called: tests shrink it

        step = block or min(chunk * max(1, DEFAULT_STAGE_BYTES // (chunk * self._static.dtype.itemsize)), self.n)
        for a in range(0, self.n, step):
            yield a, min(a + step, self.n)

    def load_into(self, model: torch.nn.Module, i: int) -> torch.nn.Module:
        """Copy snapshot ``i``'s parameters and buffers into ``model`` (same layout), range by range."""
        import torch

        i = self._index(i)
        params, buffers = self._static.layout.check_model(model)
        specs = self._static.layout.params
        with torch.no_grad():
            k = 0
            for a, b in self.iter_ranges():
                values = torch.from_numpy(self.read_rows(slice(i, i + 1), slice(a, b))[0])
                while k < len(specs) and specs[k].offset < b:
                    spec, p = specs[k], params[k]
                    lo, hi = max(spec.offset, a), min(spec.stop, b)
                    p.view(-1)[lo - spec.offset:hi - spec.offset].copy_(values[lo - a:hi - a]) if p.is_contiguous() \
                        else _copy_strided(p, lo - spec.offset, values[lo - a:hi - a])
                    if spec.stop > b:
                        break
                    k += 1
            if buffers:
                self._load_buffers(i, buffers)
        return model

    def _load_buffers(self, i: int, buffers: list[torch.Tensor]) -> None:
        import torch

        raw = self.buffer_bytes(i)
        for spec, b in zip(self._static.layout.buffers, buffers):
            if not spec.nbytes:
                continue
            src = torch.frombuffer(bytearray(raw[spec.offset:spec.stop].tobytes()), dtype=torch.uint8)
            b.copy_(src.view(getattr(torch, spec.dtype)).reshape(spec.shape))

    def buffer_bytes(self, i: int) -> np.ndarray:
        """The raw bytes of snapshot ``i``'s persistent buffers (``layout.buffers`` at their offsets),
        uint8 of shape (layout.buffer_nbytes,); empty for a model without buffers."""
        i = self._index(i)
        if self._buffers is None:
            return np.empty(0, dtype=np.uint8)
        try:
            return read_buffers(self._zstore, f"{self._prefix}/buffers", self._refs[i],
                                self._static.layout.buffer_nbytes, self._commits[i].buffers_crc)
        except ChunkFault as fault:
            raise CorruptSnapshotError(
                f"snapshot {i} of trajectory {self._name!r} in {self._where}: {fault.reason}"
            ) from None

    def rng_state(self, i: int) -> torch.Tensor | None:
        """torch's CPU RNG state recorded with snapshot ``i`` (``append(..., rng_state=True)``)."""
        from ._records import decode_rng

        return decode_rng(self._commits[self._index(i)].record)

    def to_dask(self, start: int = 0, stop: int | None = None, *, block_bytes: int = 256 * 2**20) -> Any:
        """The committed snapshots ``[start, stop)`` as a lazy dask array of shape (t, n), float32.

        Chunked along parameters only: each dask chunk holds every snapshot of the window for
        one chunk-aligned parameter range of about ``block_bytes`` (all t rows of float32), which
        is the block a streaming pass over W (n x t in the paper's notation) needs.
        """
        from ._dask import snapshots_to_dask

        t0, t1, _ = slice(start, stop).indices(self._count)
        if t1 <= t0:
            raise SnapshotIndexError(f"empty window [{start}, {stop}) of a trajectory with {self._count} snapshots")
        return snapshots_to_dask(self, t0, t1, block_bytes)


def _copy_strided(p: torch.Tensor, lo: int, values: torch.Tensor) -> None:
    flat = p.detach().reshape(-1).clone()
    flat[lo:lo + values.numel()] = values
    p.copy_(flat.view_as(p))
