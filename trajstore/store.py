"""The trajectory store: append-only Zarr snapshots of a torch model, committed atomically.

On-disk layout (Zarr v3)::

    STORE/zarr.json                          group, attrs {"trajstore": {"format_version", "kind": "store"}}
    STORE/trajectories/NAME/zarr.json        group, attrs {"trajstore": layout, dtype, ...,
                                                           "trajstore_commit": {"count", "records"}}
    STORE/trajectories/NAME/params           (capacity, n) array, one (1, chunk) chunk per
                                             snapshot and parameter range, bytes + crc32c codecs
    STORE/trajectories/NAME/buffers          (capacity, nbytes) uint8, one row per snapshot
    STORE/trajectories/NAME/writer.json      who holds the write lease

Snapshots are rows (snapshot-major): an append writes whole new chunks and never touches older
ones. The row count of ``params`` is *not* the commit marker (Zarr resizes before data is written);
the commit is the ``trajstore_commit`` attribute, rewritten in one atomic key write after every
chunk of the new snapshot is on the store.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend
from ._backend import StoreLike
from ._dtypes import StorageDtype, storage_dtype
from ._lease import WriterLease
from ._localread import ChunkFault, ColumnStream, LocalChunkReader, piece_size
from .errors import (
    CorruptSnapshotError,
    FormatVersionError,
    InvalidStoreError,
    NonFiniteError,
    NotAStoreError,
    ReadOnlyError,
    SnapshotIndexError,
    StoreExistsError,
    TrajectoryNotFoundError,
    TrajstoreError,
    WriterConflictError,
)
from .layout import MAX_ELEMENTS, Layout
from ._records import SnapshotRecord, make_record, parse_commit

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT_VERSION", "TrajectoryStore"]

FORMAT_VERSION = 1
DEFAULT_CHUNK_BYTES = 4 * 2**20   # measured: 4 MB per-snapshot chunks read fastest for the Gram pass
DEFAULT_STAGE_BYTES = 64 * 2**20  # host staging buffer of an append, reused across appends
DEFAULT_TRAJECTORY = "default"
_TRAJ_ROOT = "trajectories"


def _chunk_elems(n: int, target: int) -> int:
    """Values per chunk: large chunks are whole multiples of the streaming piece (65536 values), so
    every piece of a pass lies in one chunk, and a snapshot has at least 4 chunks when n allows, so
    a pass over W has blocks for several workers (measured: at n = 1M a single 4 MiB chunk per
    snapshot left one core idle, 1.67x the floor). The last chunk may extend past n (Zarr pads it)."""
    from ._localread import PIECE

    if target < PIECE or n <= PIECE:
        return min(n, target)
    chunk = target - target % PIECE
    while chunk > PIECE and -(-n // chunk) < 4:
        chunk -= PIECE
    return chunk


def _name_ok(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or len(name) > 200:
        raise ValueError(f"trajectory name must be a non-empty string without '/', got {name!r}")
    return name


def _read_root(store: zarr.abc.store.Store, where: str) -> zarr.Group:
    try:
        root = _backend.open_group(store, "", "r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise NotAStoreError(f"{where} is not a trajstore store (no Zarr v3 group there)") from e
    except (ValueError, KeyError, TypeError) as e:
        raise NotAStoreError(f"{where} is not a trajstore store ({e})") from e
    meta = root.attrs.get("trajstore")
    if not isinstance(meta, dict) or meta.get("kind") != "store":
        raise NotAStoreError(f"{where} is a Zarr group but not a trajstore store (no 'trajstore' attribute)")
    _check_version(meta, where)
    return root


def _only_partial_writes(zstore: zarr.abc.store.Store, limit: int = 100) -> bool:
    """Whether the store holds nothing but temporary files of interrupted writes (``*.partial``,
    what Zarr's local store and trajstore's chunk writer rename into place when a write ends)."""

    async def keys() -> list[str]:
        out = []
        async for key in zstore.list():
            out.append(key)
            if len(out) > limit:
                break
        return out

    found = _backend.sync(keys())
    return 0 < len(found) <= limit and all(k.rsplit("/", 1)[-1].endswith(".partial") for k in found)


def _check_version(meta: Mapping[str, Any], where: str) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{where} was written with trajstore format version {version!r}; "
            f"this trajstore reads version {FORMAT_VERSION}"
        )


@dataclass(frozen=True)
class _Static:
    """What a trajectory records once, at creation."""

    layout: Layout
    dtype: StorageDtype
    chunk_elems: int
    created: float
    attrs: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "kind": "trajectory", "layout": self.layout.to_json(),
                "storage_dtype": self.dtype.name, "chunk_elems": self.chunk_elems,
                "created": self.created, "attrs": self.attrs}

    @classmethod
    def from_json(cls, doc: object, where: str) -> _Static:
        if not isinstance(doc, Mapping) or doc.get("kind") != "trajectory":
            raise InvalidStoreError(f"{where}: not a trajectory (missing or wrong 'trajstore' attribute)")
        _check_version(doc, where)
        layout = Layout.from_json(doc.get("layout"))
        try:
            dtype = storage_dtype(doc.get("storage_dtype"))
        except ValueError as e:
            raise InvalidStoreError(f"{where}: {e}") from None
        chunk = doc.get("chunk_elems")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 < chunk <= MAX_ELEMENTS:
            raise InvalidStoreError(f"{where}: chunk_elems must be a positive integer, got {chunk!r:.100}")
        created = doc.get("created", 0.0)
        attrs = doc.get("attrs", {})
        # A bound, not isfinite(): float() of a 400-digit JSON integer overflows.
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not -1e18 < created < 1e18:
            raise InvalidStoreError(f"{where}: 'created' must be a Unix time, got {created!r:.100}")
        if not isinstance(attrs, dict):
            raise InvalidStoreError(f"{where}: 'attrs' must be a JSON object, got {attrs!r:.100}")
        return cls(layout, dtype, chunk, float(created), attrs)


class TrajectoryStore:
    """One trajectory of a store: create, append, read.

    Construct with :meth:`create` or :meth:`open`, not directly. A store opened with ``mode="a"``
    holds the trajectory's write lease until :meth:`close` (or the end of a ``with`` block).

    Examples
    --------
    >>> store = TrajectoryStore.create("runs/traj.zarr", model)        # doctest: +SKIP
    >>> for epoch in range(epochs):                                     # doctest: +SKIP
    ...     train_one_epoch(model)
    ...     store.append(model, epoch=epoch, lr=lr, metrics={"loss": loss})
    >>> TrajectoryStore.open("runs/traj.zarr").snapshot(-1).shape       # doctest: +SKIP
    (n,)
    """

    def __init__(self, zstore: zarr.abc.store.Store, where: str, trajectory: str, mode: str,
                 durable: bool = True) -> None:
        self._zstore = zstore
        self._durable = bool(durable)
        self._where = where
        self._name = trajectory
        self._mode = mode
        self._prefix = f"{_TRAJ_ROOT}/{trajectory}"
        self._lease: WriterLease | None = None
        self._staging: np.ndarray | None = None
        self._writers: Any = None  # the threads writing an append's chunk files (local folders)
        self.refresh()

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(cls, url: StoreLike, model: torch.nn.Module, *, trajectory: str = DEFAULT_TRAJECTORY,
               storage_dtype: str = "float32", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               attrs: Mapping[str, Any] | None = None, durable: bool = True,
               storage_options: dict[str, Any] | None = None) -> TrajectoryStore:
        """Create a trajectory for ``model`` (and the store, if ``url`` holds none yet).

        Parameters
        ----------
        url : str, path or zarr Store
            A local folder, any fsspec URL (``memory://``, ``s3://``...) or a Zarr store object.
        model : torch.nn.Module
            Its parameters (``named_parameters()`` order) and persistent buffers define the layout.
        trajectory : str
            Name of the trajectory inside the store; a store may hold several (e.g. seeds).
        storage_dtype : {"float32", "bfloat16", "float16"}
            On-disk precision. Reads always return float32.
        chunk_bytes : int
            Target bytes per chunk of one snapshot (default 4 MiB, the fastest layout measured for
            reading all snapshots of a parameter range).
        attrs : mapping, optional
            JSON-serializable user metadata kept with the trajectory.
        durable : bool
            On a local folder, fsync every chunk of a snapshot before its commit and the commit
            record after it, so a committed snapshot survives a power loss, not only a killed
            process (object stores are durable when a write returns; there this is a no-op).

        Returns
        -------
        TrajectoryStore
            Open for appending (``mode="a"``), holding the write lease.
        """
        name = _name_ok(trajectory)
        dtype = globals()["storage_dtype"](storage_dtype)
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < dtype.itemsize:
            raise ValueError(f"chunk_bytes must be an integer >= {dtype.itemsize}, got {chunk_bytes!r}")
        layout = Layout.from_model(model)
        static = _Static(layout, dtype, _chunk_elems(layout.n, chunk_bytes // dtype.itemsize), time.time(),
                         dict(attrs or {}))
        zstore = _backend.open_zarr_store(url, read_only=False, storage_options=storage_options)
        where = _backend.describe(url)
        root = cls._root_for_create(zstore, where)
        parent = root.require_group(_TRAJ_ROOT)
        if name in cls._names(root):
            if "trajstore_commit" in parent[name].attrs:
                raise StoreExistsError(f"{where} already holds a trajectory named {name!r}")
            # A creation that was killed before its first commit record: nothing was ever
            # committed there, so it is replaced rather than left blocking the name.
            del parent[name]
        group = parent.create_group(name, attributes={"trajstore": static.to_json()})
        cls._create_arrays(group, static)
        # The group's commit attribute is written last: a trajectory is visible once it is complete.
        group.update_attributes({"trajstore_commit": {"count": 0, "records": []}})
        return cls(zstore, where, name, "a", durable)

    @staticmethod
    def _root_for_create(zstore: zarr.abc.store.Store, where: str) -> zarr.Group:
        try:
            _read_root(zstore, where)  # validates kind and format version
            return _backend.open_group(zstore, "", "r+")
        except NotAStoreError:
            pass
        try:
            empty = _backend.sync(zstore.is_empty(""))
        except FileNotFoundError:
            empty = True
        if not empty and _only_partial_writes(zstore):
            empty = True  # a creation killed while writing its first key left only its temporary file
        if not empty:
            raise StoreExistsError(f"{where} exists and holds data that is not a trajstore store; refusing to write there")
        meta = {"format_version": FORMAT_VERSION, "kind": "store", "created": time.time()}
        return zarr.open_group(store=zstore, mode="w", zarr_format=3, attributes={"trajstore": meta})

    @staticmethod
    def _create_arrays(group: zarr.Group, static: _Static) -> None:
        common: dict[str, Any] = {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None,
                                  "config": {"write_empty_chunks": True}}
        group.create_array("params", shape=(0, static.layout.n), chunks=(1, static.chunk_elems),
                           dtype=static.dtype.numpy_dtype, fill_value=static.dtype.fill_value, **common)
        if static.layout.buffer_nbytes:
            group.create_array("buffers", shape=(0, static.layout.buffer_nbytes),
                               chunks=(1, static.layout.buffer_nbytes), dtype=np.uint8, fill_value=0, **common)

    @classmethod
    def open(cls, url: StoreLike, mode: Literal["r", "a"] = "r", *, trajectory: str | None = None,
             durable: bool = True, storage_options: dict[str, Any] | None = None) -> TrajectoryStore:
        """Open a trajectory of an existing store.

        ``trajectory`` may be left out when the store holds one trajectory (or one named
        ``"default"``). ``mode="a"`` takes the write lease and fails with WriterConflictError while
        another live process holds it.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        zstore = _backend.open_zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
        where = _backend.describe(url)
        names = cls._names(_read_root(zstore, where))
        if trajectory is None:
            if len(names) == 1:
                trajectory = names[0]
            elif DEFAULT_TRAJECTORY in names:
                trajectory = DEFAULT_TRAJECTORY
            else:
                raise TrajectoryNotFoundError(f"{where} holds trajectories {names}; pass trajectory=NAME")
        if _name_ok(trajectory) not in names:
            raise TrajectoryNotFoundError(f"{where} holds no trajectory {trajectory!r} (it has {names})")
        return cls(zstore, where, trajectory, mode, durable)

    @staticmethod
    def _names(root: zarr.Group) -> list[str]:
        return _backend.child_nodes(root.store, _TRAJ_ROOT)

    @classmethod
    def list_trajectories(cls, url: StoreLike, **kw: Any) -> list[str]:
        """Names of the trajectories a store holds."""
        zstore = _backend.open_zarr_store(url, read_only=True, **kw)
        return cls._names(_read_root(zstore, _backend.describe(url)))

    def refresh(self) -> None:
        """Re-read the commit record, to see snapshots appended by another process since opening."""
        group = _backend.open_group(self._zstore, self._prefix, "r" if self._mode == "r" else "r+")
        self._group = group  # a writer commits through it: no re-read of the group per append
        where = f"{self._where} trajectory {self._name!r}"
        self._static = _Static.from_json(group.attrs.get("trajstore"), where)
        self._count, self._records = parse_commit(group.attrs.get("trajstore_commit"), where)
        try:
            self._params = self._open_array("params")
            self._buffers = self._open_array("buffers") if self._static.layout.buffer_nbytes else None
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError) as e:
            raise InvalidStoreError(f"{where}: its arrays are missing") from e
        self._check_arrays(where)
        self._fast = self._local_reader()
        if self._mode == "a" and self._lease is None:
            self._lease = WriterLease(self._zstore, self._prefix)
            self._lease.acquire(self._name)

    def _open_array(self, name: str) -> zarr.Array:
        with _backend.metadata_errors(f"{self._where} trajectory {self._name!r}: {name}/zarr.json"):
            array = zarr.open_array(self._zstore, path=f"{self._prefix}/{name}", mode="r" if self._mode == "r" else "r+")
        # Zarr does not persist this option: without it a chunk equal to the fill value (an all-zero
        # buffer row) would not be written, and a missing chunk would no longer signal damage.
        return array.with_config({"write_empty_chunks": True})

    def _check_arrays(self, where: str) -> None:
        layout, arr = self._static.layout, self._params
        if arr.ndim != 2 or arr.shape[1] != layout.n or arr.dtype != self._static.dtype.numpy_dtype:
            raise InvalidStoreError(f"{where}: params array {arr.shape} {arr.dtype} does not match the layout (n = {layout.n})")
        if arr.chunks != (1, self._static.chunk_elems):
            raise InvalidStoreError(f"{where}: params chunks {arr.chunks} differ from the recorded {self._static.chunk_elems}")
        if arr.shape[0] < self._count:
            raise InvalidStoreError(f"{where}: {self._count} snapshots committed but the array holds only {arr.shape[0]} rows")
        buffers = self._buffers
        if buffers is not None and (buffers.ndim != 2 or buffers.shape[1] != layout.buffer_nbytes
                                    or buffers.shape[0] < self._count or buffers.dtype != np.uint8):
            raise InvalidStoreError(f"{where}: buffers array {buffers.shape} {buffers.dtype} does not match the "
                                    f"layout ({layout.buffer_nbytes} bytes of uint8 per snapshot)")

    def _local_reader(self) -> LocalChunkReader | None:
        """The direct chunk-file reader, when the store is local and its codecs are the ones we write."""
        root = _backend.local_root(self._zstore)
        codecs = self._params.metadata.codecs
        if root is None or sys.byteorder != "little" or len(codecs) != 2:
            return None
        serializer, checksum = codecs
        if not (isinstance(serializer, BytesCodec) and isinstance(checksum, Crc32cCodec)):
            return None
        if serializer.endian is not None and serializer.endian.value != "little":
            return None
        encoding = self._params.metadata.chunk_key_encoding
        if getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/":
            return None
        return LocalChunkReader(root / self._prefix / "params", self.n, self._static.chunk_elems,
                                self._static.dtype.numpy_dtype)

    # ---------------------------------------------------------------- properties

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"TrajectoryStore({self._where!r}, trajectory={self._name!r}, mode={self._mode!r}, "
                f"n={self.n}, t={self._count}, storage_dtype={self.storage_dtype!r})")

    @property
    def name(self) -> str:
        return self._name

    @property
    def url(self) -> str:
        return self._where

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def layout(self) -> Layout:
        return self._static.layout

    @property
    def n(self) -> int:
        """Number of parameters in one snapshot."""
        return self._static.layout.n

    @property
    def storage_dtype(self) -> str:
        return self._static.dtype.name

    @property
    def chunk_elems(self) -> int:
        return self._static.chunk_elems

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._static.attrs)

    @property
    def records(self) -> list[SnapshotRecord]:
        """Per-snapshot metadata (step, epoch, lr, metrics, time) of the committed snapshots."""
        return list(self._records)

    @property
    def zarr_store(self) -> zarr.abc.store.Store:
        return self._zstore

    @property
    def prefix(self) -> str:
        return self._prefix

    def nbytes_stored(self) -> int:
        """Bytes this trajectory occupies in the store."""
        return _backend.size_of(self._zstore, self._prefix)

    # ---------------------------------------------------------------- writing

    def append(self, model: torch.nn.Module, *, step: int | None = None, epoch: int | float | None = None,
               lr: float | None = None, metrics: Mapping[str, float] | None = None,
               rng_state: bool = False) -> int:
        """Write the model's parameters and buffers as the next snapshot and commit it.

        Parameters are copied one at a time (from any device) into a reused host staging buffer
        of whole chunks, and each full buffer is written as new chunks of the new row; no
        concatenated copy of the parameter vector is made and no older chunk is read or rewritten.
        The snapshot becomes visible only when every chunk is written: a process killed at any
        moment leaves the committed snapshots intact, and the next append overwrites the partial row.

        Parameters
        ----------
        step, epoch, lr, metrics
            Recorded as JSON with the snapshot; ``metrics`` maps names to numbers.
        rng_state : bool
            Also record torch's CPU RNG state (about 6.7 kB of JSON per snapshot).

        Returns
        -------
        int
            The index of the new snapshot.

        Notes
        -----
        Extra host memory: one staging buffer of ``min(n, 64 MiB / itemsize)`` values. On a local
        folder its chunks are written as chunk files directly, four at a time (measured on a
        WRN-40-10: 0.59 of a snapshot's bytes at peak, staging included); elsewhere through Zarr,
        plus its encoding buffers for the chunks in flight.
        """
        params, buffers = self._static.layout.check_model(model)
        return self.append_tensors(params, buffers, step=step, epoch=epoch, lr=lr, metrics=metrics,
                                   rng_state=rng_state)

    def append_tensors(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = (), *,
                       step: int | None = None, epoch: int | float | None = None, lr: float | None = None,
                       metrics: Mapping[str, float] | None = None, rng_state: bool | torch.Tensor = False) -> int:
        """:meth:`append` for tensors given in layout order rather than a model: the parameters
        (``layout.params`` order) and persistent buffers (``layout.buffers`` order), on any device.
        Used by :class:`trajstore.Recorder` to write a host copy in the background."""
        if self._mode != "a":
            raise ReadOnlyError(f"{self._where} trajectory {self._name!r} is open read-only; open it with mode='a' to append")
        assert self._lease is not None
        started = time.time()
        record = make_record(step=step, epoch=epoch, lr=lr, metrics=metrics, rng_state=rng_state, time=started)
        self._static.layout.check_tensors(params, buffers)
        params, buffers = list(params), list(buffers)
        index = self._count
        self._lease.check(self._name)
        rows = [None if array is None else array.shape[0] for array in (self._params, self._buffers)]
        committing = False
        try:
            # Each array grows on its own: a writer killed between the two resizes leaves them uneven.
            for array in (self._params, self._buffers):
                if array is not None and array.shape[0] <= index:
                    array.resize((index + 1, array.shape[1]))
            self._write_params(index, params)
            if self._buffers is not None:
                self._buffers[index, :] = self._buffer_bytes(buffers)
            if self._durable:
                self._sync_row(index)
            self._lease.check(self._name)
            record["append_seconds"] = time.time() - started
            committing = True
            self._commit(self._records + [record])
        except Exception as e:
            error = self._append_failed(index, rows, e, self._records + [record] if committing else None)
            if error is None:
                return index  # the commit record was written after all
            if error is e:
                raise
            raise error from e
        return index

    def _append_failed(self, index: int, rows: list[int | None], error: Exception,
                       records: list[SnapshotRecord] | None) -> Exception | None:
        """After a failed append of row ``index``: undo what it wrote and return the error to raise.

        ``records`` is the commit the append was writing when it failed (None: it failed before).
        A commit write that raised but is found on the store (a reply lost after the write) is
        adopted and None returned. Otherwise the row's chunks are deleted and the arrays shrunk
        back to ``rows``, so a full disk gets its space back; each step is best effort (what is
        left is an uncommitted row, which the next append overwrites). Nothing is removed once the
        commit may be on the store, nor when the lease was lost (another writer may own the row).
        """
        what = f"snapshot {index} of trajectory {self._name!r} in {self._where}"
        if self._count > index:
            error.add_note(f"{what} was committed, but its commit record could not be made durable")
            return error
        if isinstance(error, WriterConflictError):
            return error
        if records is not None:
            stored = self._stored_records()
            if stored == json.loads(json.dumps(records)):
                self._records, self._count = records, len(records)
                return None
            if stored != json.loads(json.dumps(self._records)):
                # Neither record reads back (a backend that wrote part of it): the old one is put back.
                try:
                    self._group.update_attributes({"trajstore_commit": {"count": index, "records": self._records}})
                except Exception:
                    error.add_note(f"whether {what} was committed is unknown (its commit record could not be "
                                   "read back nor restored); reopen the store to see")
                    return error
        state = "the store is unchanged" if self._discard_row(index, rows) else \
            "its partial row could not all be removed (the next append overwrites it)"
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and not isinstance(error, TrajstoreError):
            return OSError(errno.ENOSPC, f"no space left on device while writing {what}: nothing was committed "
                                         f"and {state} ({error})")
        error.add_note(f"{what} was not committed; {state}")
        return error

    def _stored_records(self) -> list[Any] | None:
        """The commit records on the store now (as JSON), or None when they cannot be read."""
        try:
            doc = _backend.read_json(self._zstore, f"{self._prefix}/zarr.json")
            return doc["attributes"]["trajstore_commit"]["records"]
        except Exception:
            return None

    def _discard_row(self, index: int, rows: list[int | None]) -> bool:
        """Delete row ``index``'s chunks and shrink the arrays back to ``rows``; True if all went."""
        clean = True
        for name, array, before in zip(("params", "buffers"), (self._params, self._buffers), rows):
            if array is None or before is None:
                continue
            try:
                _backend.sync(self._zstore.delete_dir(f"{self._prefix}/{name}/c/{index}"))
            except Exception:
                clean = False
            try:
                # Also when the shape looks unchanged: a resize whose reply was lost may have landed.
                array.resize((before, array.shape[1]))
            except Exception:
                clean = False
        return clean

    def _stage(self) -> np.ndarray:
        chunk = self._static.chunk_elems
        chunks_per_stage = max(1, DEFAULT_STAGE_BYTES // (chunk * self._static.dtype.itemsize))
        elems = min(chunk * chunks_per_stage, self.n)
        if self._staging is None or self._staging.shape[0] != elems:
            self._staging = np.empty(elems, dtype=self._static.dtype.numpy_dtype)
        return self._staging

    def _write_params(self, index: int, params: list[torch.Tensor]) -> None:
        import torch

        staging = self._stage()
        view = self._static.dtype.as_torch(staging)
        size, start, fill = staging.shape[0], 0, 0
        for spec, p in zip(self._static.layout.params, params):
            flat = p.detach().reshape(-1)
            done = 0
            while done < spec.numel:
                take = min(spec.numel - done, size - fill)
                dst = view[fill:fill + take]
                dst.copy_(flat[done:done + take])
                # A float64 sum is non-finite iff some value is (it cannot overflow for
                # float32 inputs), without allocating a mask the size of the chunk.
                if not torch.isfinite(dst.sum(dtype=torch.float64)):
                    bad = done + int(torch.nonzero(~torch.isfinite(dst))[0])
                    raise NonFiniteError(
                        f"parameter {spec.name!r} holds a non-finite value at flat index {bad} "
                        f"(value {flat[bad].item()!r}) as {self.storage_dtype}; nothing was committed"
                    )
                fill, done = fill + take, done + take
                if fill == size:
                    self._write_stage(index, start, staging)
                    start, fill = start + fill, 0
        if fill:
            self._write_stage(index, start, staging[:fill])

    def _write_stage_zarr(self, index: int, start: int, values: np.ndarray) -> None:
        """:meth:`_write_stage` through Zarr: one write per chunk, all at once, and every one ended
        before an error is raised. (A single Zarr write of several chunks raises at the first that
        fails while the others go on, and they would land after a failed append's clean-up.)"""
        import asyncio

        chunk, target = self._static.chunk_elems, self._params._async_array

        async def write_all() -> list[Any]:
            return await asyncio.gather(*(target.setitem((index, slice(start + a, start + a + len(part))), part)
                                          for a in range(0, values.shape[0], chunk)
                                          for part in [values[a:a + chunk]]), return_exceptions=True)

        for result in _backend.sync(write_all()):
            if isinstance(result, BaseException):
                raise result

    def _write_stage(self, index: int, start: int, values: np.ndarray) -> None:
        """Write ``values`` (whole chunks, the last one possibly short) at ``start`` of row ``index``.

        On a local folder the chunk files are written directly, a few at a time, in Zarr's own
        format for this array (:func:`_backend.write_chunk_file`); elsewhere through Zarr."""
        root = _backend.local_root(self._zstore)
        if root is None or sys.byteorder != "little":
            self._write_stage_zarr(index, start, values)
            return
        from concurrent.futures import ThreadPoolExecutor, wait

        chunk = self._static.chunk_elems
        folder = root / self._prefix / "params" / "c" / str(index)
        fill = self._static.dtype.fill_value
        if self._writers is None:
            self._writers = ThreadPoolExecutor(4, thread_name_prefix="trajstore-append")
        # Durable: each chunk is fsynced by the thread that wrote it, in parallel (_sync_row then
        # syncs only the folders and the metadata).
        futures = [self._writers.submit(_backend.write_chunk_file, folder / str((start + a) // chunk),
                                        values[a:a + chunk], (chunk,), fill, durable=self._durable)
                   for a in range(0, values.shape[0], chunk)]
        # Every write has ended before an error is raised: a failed append then removes what they wrote.
        wait(futures)
        for future in futures:
            future.result()  # the staging buffer is refilled only when all of it is written

    def _buffer_bytes(self, buffers: list[torch.Tensor]) -> np.ndarray:
        import torch

        out = np.empty(self._static.layout.buffer_nbytes, dtype=np.uint8)
        for spec, b in zip(self._static.layout.buffers, buffers):
            raw = b.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) if b.numel() else torch.empty(0, dtype=torch.uint8)
            out[spec.offset:spec.stop] = raw.numpy()
        return out

    def _sync_row(self, index: int) -> None:
        chunks = -(-self.n // self._static.chunk_elems)
        direct = sys.byteorder == "little"  # local chunk files were fsynced as they were written
        keys = [] if direct else [f"{self._prefix}/params/c/{index}/{j}" for j in range(chunks)]
        # The row's folders and the folders that hold them: new directory entries must reach the disk too.
        keys += [f"{self._prefix}/params/c/{index}/0", f"{self._prefix}/params/c/{index}", f"{self._prefix}/params/zarr.json"]
        if self._buffers is not None:
            keys += [f"{self._prefix}/buffers/c/{index}/0", f"{self._prefix}/buffers/c/{index}",
                     f"{self._prefix}/buffers/zarr.json"]
        _backend.fsync_local(self._zstore, keys)

    def _commit(self, records: list[SnapshotRecord]) -> None:
        self._group.update_attributes({"trajstore_commit": {"count": len(records), "records": records}})
        # The record is on the store: the handle agrees with it even if making it durable fails.
        self._records = records
        self._count = len(records)
        if self._durable:
            _backend.fsync_local(self._zstore, [f"{self._prefix}/zarr.json"])

    def close(self) -> None:
        """Release the write lease (a no-op for read-only stores). Idempotent."""
        if self._writers is not None:
            self._writers.shutdown(wait=True)
            self._writers = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self._mode = "r" if self._mode == "a" else self._mode

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No store I/O here: at interpreter exit Zarr's event loop may be gone (a read would hang).
        # Dropping the flock and stopping the heartbeat is enough; writer.json is only informative.
        lease = getattr(self, "_lease", None)
        if lease is not None:
            try:
                lease.release(quiet=True)
            except Exception:
                pass

    # ---------------------------------------------------------------- reading

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
        if self._fast is not None:
            raw = self._read_fast(r0, r1, c0, c1, out)
        else:
            raw = self._read_zarr(r0, r1, c0, c1)
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
            stream = ColumnStream(self._fast, r0, r1, lo // self.chunk_elems)
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

    def _read_fast(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None) -> np.ndarray:
        assert self._fast is not None
        shape = (r1 - r0, c1 - c0)
        float32 = self._static.dtype.numpy_dtype == np.float32
        raw = out if (float32 and out is not None) else np.empty(shape, dtype=self._static.dtype.numpy_dtype)
        try:
            self._fast.read(r0, r1, c0, c1, raw)
        except ChunkFault as fault:
            raise self._fault_error(fault) from None
        return raw

    def _read_zarr(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        try:
            return self._params[r0:r1, c0:c1]
        except Exception as e:  # the codec pipeline raises ValueError/RuntimeError/... on bad bytes
            bad = self._find_bad_row(r0, r1, c0, c1)
            raise CorruptSnapshotError(
                f"snapshot {bad} of trajectory {self._name!r} in {self._where}: a chunk of parameters "
                f"[{c0}, {c1}) failed to decode ({type(e).__name__}: {e})"
            ) from e

    def _find_bad_row(self, r0: int, r1: int, c0: int, c1: int) -> int:
        for r in range(r0, r1):
            try:
                self._params[r, c0:c1]
            except Exception:
                return r
        return r0

    def snapshot(self, i: int) -> np.ndarray:
        """Snapshot ``i`` (negative counts from the end) as a float32 vector of shape (n,)."""
        i = self._index(i)
        return self.read_rows(slice(i, i + 1), slice(0, self.n))[0]

    def iter_ranges(self, block: int | None = None) -> Iterator[tuple[int, int]]:
        """Parameter ranges ``[a, b)`` of ``block`` values (default: the staging size), chunk-aligned."""
        step = block or self._stage().shape[0]
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
        key = f"{self._prefix}/buffers/c/{i}/0"
        # The buffers' fill value (0) is a plausible value, so a missing chunk must be looked for.
        if not _backend.sync(self._zstore.exists(key)):
            raise CorruptSnapshotError(
                f"snapshot {i} of trajectory {self._name!r} in {self._where}: its buffers chunk is missing"
            )
        try:
            raw = np.asarray(self._buffers[i, :])
        except Exception as e:
            raise CorruptSnapshotError(
                f"snapshot {i} of trajectory {self._name!r} in {self._where}: its buffers failed to decode ({e})"
            ) from e
        return raw

    def rng_state(self, i: int) -> torch.Tensor | None:
        """torch's CPU RNG state recorded with snapshot ``i`` (``append(..., rng_state=True)``)."""
        from ._records import decode_rng

        return decode_rng(self._records[self._index(i)])

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
