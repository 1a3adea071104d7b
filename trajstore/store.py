"""The trajectory store: append-only Zarr snapshots of a torch model, committed atomically.

On-disk layout (Zarr v3, store format 2)::

    STORE/zarr.json                          group, attrs {"trajstore": {"format_version", "kind": "store"}}
    STORE/trajectories/NAME/zarr.json        group, attrs {"trajstore": layout, dtype, chunk_elems, ...}
    STORE/trajectories/NAME/params           (capacity, n) array, one (1, chunk) chunk per row and
                                             parameter range, bytes + crc32c codecs
    STORE/trajectories/NAME/buffers          (capacity, nbytes) uint8, one chunk per row
    STORE/trajectories/NAME/log/...          the commit log (:mod:`trajstore._log`)
    STORE/trajectories/NAME/writer.json      who holds the write lease (:mod:`trajstore._lease`)

A snapshot is committed by one new document in the log naming the row that holds it and the
crc32c of each of its chunks; nothing older is rewritten, so a commit costs the same at snapshot
10 and at snapshot 10,000. Commits are fenced: a writer that lost its lease to another (say it was
paused past its lease's ttl) can still write, but nothing it writes counts for any reader, and
its chunk writes land in rows no valid commit names. Format-1 stores (one commit attribute
rewritten per commit) are read as they are, and migrated to format 2 when opened for appending.

The write path is :mod:`trajstore._write`, the read path :mod:`trajstore._read` and
:mod:`trajstore._localread`, the commit protocol :mod:`trajstore._log` and the lease
:mod:`trajstore._lease`; this module ties them to one object.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend, _create, _io, _log
from ._backend import StoreLike
from ._create import FORMAT_VERSION, GROUP_DOC, READABLE_VERSIONS, TRAJ_ROOT, check_version, read_root
from ._dtypes import StorageDtype, storage_dtype
from ._lease import DEFAULT_TTL, WriterLease
from ._localread import LocalChunkReader, RowRef
from ._names import check_name, is_valid_name
from ._read import KeyChunkReader, ReadPath
from ._records import SnapshotRecord, make_record, parse_commit
from ._append import AppendPath, read_only_error as _read_only_error
from ._write import RowWriter
from .errors import (
    InvalidStoreError,
    StoreExistsError,
    TrajectoryNotFoundError,
    TrajstoreError,
    WriterConflictError,
)
from .layout import Layout

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "TrajectoryStore"]

DEFAULT_CHUNK_BYTES = 4 * 2**20   # measured: 4 MB per-snapshot chunks read fastest for the Gram pass
DEFAULT_STAGE_BYTES = 64 * 2**20  # host staging buffer of an append, reused across appends
MAX_CHUNK_ELEMS = 2**26           # values per chunk a store may claim (256 MiB of float32): reads allocate one
DEFAULT_TRAJECTORY = "default"


def _chunk_elems(n: int, target: int) -> int:
    """Values per chunk: large chunks are whole multiples of the streaming piece (65536 values), so
    every piece of a pass lies in one chunk, and a snapshot has at least 4 chunks when n allows, so
    a pass over W has blocks for several workers (measured: at n = 1M a single 4 MiB chunk per
    snapshot left one core idle, 1.67x the floor). The last chunk may extend past n (Zarr pads it)."""
    from ._localread import PIECE

    target = min(target, MAX_CHUNK_ELEMS)
    if target < PIECE or n <= PIECE:
        return min(n, target)
    chunk = target - target % PIECE
    while chunk > PIECE and -(-n // chunk) < 4:
        chunk -= PIECE
    return chunk


@dataclass(frozen=True)
class _Static:
    """What a trajectory records once, at creation."""

    layout: Layout
    dtype: StorageDtype
    chunk_elems: int
    created: float
    attrs: dict[str, Any]
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"format_version": self.version, "kind": "trajectory", "layout": self.layout.to_json(),
                "storage_dtype": self.dtype.name, "chunk_elems": self.chunk_elems,
                "created": self.created, "attrs": self.attrs}

    @classmethod
    def from_json(cls, doc: object, where: str) -> _Static:
        if not isinstance(doc, Mapping) or doc.get("kind") != "trajectory":
            raise InvalidStoreError(f"{where}: not a trajectory (missing or wrong 'trajstore' attribute)")
        version = check_version(doc, where)
        layout = Layout.from_json(doc.get("layout"))
        try:
            dtype = storage_dtype(doc.get("storage_dtype"))
        except ValueError as e:
            raise InvalidStoreError(f"{where}: {e}") from None
        chunk = doc.get("chunk_elems")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 < chunk <= MAX_CHUNK_ELEMS:
            raise InvalidStoreError(f"{where}: chunk_elems must be an integer in [1, {MAX_CHUNK_ELEMS}], "
                                    f"got {chunk!r:.100}")
        created = doc.get("created", 0.0)
        attrs = doc.get("attrs", {})
        # A bound, not isfinite(): float() of a 400-digit JSON integer overflows.
        if isinstance(created, bool) or not isinstance(created, (int, float)) or not -1e18 < created < 1e18:
            raise InvalidStoreError(f"{where}: 'created' must be a Unix time, got {created!r:.100}")
        if not isinstance(attrs, dict):
            raise InvalidStoreError(f"{where}: 'attrs' must be a JSON object, got {attrs!r:.100}")
        return cls(layout, dtype, chunk, float(created), attrs, version)


def _exact_dtype(layout: Layout, requested: str | None) -> StorageDtype:
    """The storage dtype: ``requested``, or (None) float32, which holds float32, float16 and
    bfloat16 parameters exactly; float64 parameters would be rounded, so they are refused unless a
    lossy storage dtype is asked for by name."""
    if requested is not None:
        return storage_dtype(requested)
    wide = [p.name for p in layout.params if p.dtype == "float64"]
    if wide:
        raise ValueError(f"parameters {wide[:3]}{' ...' if len(wide) > 3 else ''} are float64, which the store keeps "
                         "as float32 at most: they would be rounded. Pass storage_dtype='float32' to accept the "
                         "rounding, or train in float32")
    return storage_dtype("float32")


class TrajectoryStore(ReadPath, AppendPath):
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
                 durable: bool = True, lease: WriterLease | None = None, lease_ttl: float = DEFAULT_TTL,
                 writers: int = 1) -> None:
        if isinstance(writers, bool) or not isinstance(writers, int) or not 1 <= writers <= _log.MAX_WRITERS:
            raise ValueError(f"writers must be an integer in [1, {_log.MAX_WRITERS}], got {writers!r}")
        self._writers = writers
        self._zstore = zstore
        self._durable = bool(durable)
        self._where = where
        self._name = trajectory
        self._mode = mode
        self._prefix = f"{TRAJ_ROOT}/{trajectory}"
        self._lease: WriterLease | None = lease
        self._lease_ttl = lease_ttl
        self._gen: _log.Generation | None = None
        self._writer: RowWriter | None = None
        self._poisoned: str | None = None  # why this handle may append no more
        self._commits: list[_log.Commit] = []
        try:
            self.refresh()
            if mode == "a":
                self._begin_writing()
        except BaseException:
            self._release()
            raise

    # ---------------------------------------------------------------- construction

    @classmethod
    def create(cls, url: StoreLike, model: torch.nn.Module, *, trajectory: str = DEFAULT_TRAJECTORY,
               storage_dtype: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               attrs: Mapping[str, Any] | None = None, durable: bool = True,
               storage_options: dict[str, Any] | None = None, lease_ttl: float = DEFAULT_TTL,
               writers: int = 1) -> TrajectoryStore:
        """Create a trajectory for ``model`` (and the store, if ``url`` holds none yet).

        Parameters
        ----------
        url : str, path or zarr Store
            A local folder, any fsspec URL (``memory://``, ``s3://``...) or a Zarr store object.
        model : torch.nn.Module
            Its parameters (``named_parameters()`` order) and persistent buffers define the layout.
        trajectory : str
            Name of the trajectory inside the store; a store may hold several (e.g. seeds). It must
            match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``.
        storage_dtype : {None, "float32", "bfloat16", "float16"}
            On-disk precision. None (the default) keeps every value exactly: float32, and float64
            parameters are refused (name ``"float32"`` to store them rounded). Reads return float32.
        chunk_bytes : int
            Target bytes per chunk of one snapshot (default 4 MiB, the fastest layout measured for
            reading all snapshots of a parameter range; at most 256 MiB of values).
        attrs : mapping, optional
            JSON-serializable user metadata kept with the trajectory.
        durable : bool
            On a local folder, fsync every chunk of a snapshot before its commit and the commit
            record after it, so a committed snapshot survives a power loss, not only a killed
            process (object stores are durable when a write returns; there this is a no-op).
        lease_ttl : float
            Seconds without a heartbeat after which another process may take the write lease over
            (object stores and other non-local backends; a local folder's lease is an flock).
        writers : int
            Processes that write this session's snapshots together (a
            :class:`~trajstore.sharded.ShardedRecorder` of that many ranks; 1 otherwise): recorded
            in the commit log, so the next session offsets its rows past any late write of theirs.

        Returns
        -------
        TrajectoryStore
            Open for appending (``mode="a"``), holding the write lease.

        Raises
        ------
        StoreExistsError
            The trajectory exists, another process is creating it, or ``url`` holds other data.
        ValueError, TypeError
            A bad name, option or model (checked before anything is written).
        """
        import json

        name = check_name(trajectory, "trajectory")
        layout = Layout.from_model(model)
        dtype = _exact_dtype(layout, storage_dtype)
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes < dtype.itemsize:
            raise ValueError(f"chunk_bytes must be an integer >= {dtype.itemsize}, got {chunk_bytes!r}")
        try:
            attrs = json.loads(json.dumps(dict(attrs or {}), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"attrs must be JSON-serializable (finite numbers), got {e}") from None
        static = _Static(layout, dtype, _chunk_elems(layout.n, chunk_bytes // dtype.itemsize), time.time(), attrs)
        if -(-layout.n // static.chunk_elems) > _log.MAX_CHUNKS:
            raise ValueError(f"chunk_bytes = {chunk_bytes} cuts a snapshot of {layout.n} values into more than "
                             f"{_log.MAX_CHUNKS} chunks (each commit records every chunk's checksum); use larger chunks")
        zstore = _backend.open_zarr_store(url, read_only=False, storage_options=storage_options)
        where = _backend.describe(url)
        try:
            _create.root_for_create(zstore, where)
            prefix = f"{TRAJ_ROOT}/{name}"
            lease = WriterLease(zstore, prefix, ttl=lease_ttl)
            try:
                lease.acquire(name)
            except WriterConflictError as e:
                raise StoreExistsError(f"{where}: another process is creating or writing trajectory {name!r} ({e})") \
                    from None
            try:
                _create.claim_name(zstore, where, prefix, name)
                _create.create_arrays(zstore, prefix, static)
                # The group document is written last: a trajectory is visible once it is complete.
                _io.write_json_atomic(zstore, f"{prefix}/zarr.json",
                                      {**GROUP_DOC, "attributes": {"trajstore": static.to_json()}}, durable=durable)
            except BaseException:
                lease.release()
                raise
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and not isinstance(e, TrajstoreError):
                raise _read_only_error(where, e) from None
            raise
        return cls(zstore, where, name, "a", durable, lease=lease, lease_ttl=lease_ttl, writers=writers)

    @classmethod
    def open(cls, url: StoreLike, mode: Literal["r", "a"] = "r", *, trajectory: str | None = None,
             durable: bool = True, storage_options: dict[str, Any] | None = None,
             lease_ttl: float = DEFAULT_TTL, writers: int = 1) -> TrajectoryStore:
        """Open a trajectory of an existing store.

        ``trajectory`` may be left out when the store holds one trajectory (or one named
        ``"default"``). ``mode="a"`` takes the write lease and fails with WriterConflictError while
        another live process holds it; a format-1 trajectory is then migrated to format 2 (its
        records written to the commit log once; readers of either version see the same snapshots).
        ``writers`` is :meth:`create`'s.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if trajectory is not None:
            check_name(trajectory, "trajectory")
        zstore = _backend.open_zarr_store(url, read_only=(mode == "r"), storage_options=storage_options)
        where = _backend.describe(url)
        names = cls._names(read_root(zstore, where))
        if trajectory is None:
            if len(names) == 1:
                trajectory = names[0]
            elif DEFAULT_TRAJECTORY in names:
                trajectory = DEFAULT_TRAJECTORY
            else:
                raise TrajectoryNotFoundError(f"{where} holds trajectories {names}; pass trajectory=NAME")
        if trajectory not in names:
            raise TrajectoryNotFoundError(f"{where} holds no trajectory {trajectory!r} (it has {names})")
        return cls(zstore, where, trajectory, mode, durable, lease_ttl=lease_ttl, writers=writers)

    @staticmethod
    def _names(root: zarr.Group) -> list[str]:
        """The trajectories' names (folders with a group document whose names follow the rule;
        ``trajstore verify`` reports any other folder)."""
        return [n for n in _backend.child_nodes(root.store, TRAJ_ROOT) if is_valid_name(n)]

    @classmethod
    def list_trajectories(cls, url: StoreLike, *, storage_options: dict[str, Any] | None = None) -> list[str]:
        """Names of the trajectories a store holds (``storage_options``: as for :meth:`open`)."""
        zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
        return cls._names(read_root(zstore, _backend.describe(url)))

    def refresh(self) -> None:
        """Re-read the commit log, to see snapshots appended by another process since opening."""
        where = f"{self._where} trajectory {self._name!r}"
        try:
            group = _backend.open_group(self._zstore, self._prefix, "r")
        except FileNotFoundError as e:
            raise InvalidStoreError(f"{where}: its group document {self._prefix}/zarr.json is missing") from e
        self._static = _Static.from_json(group.attrs.get("trajstore"), where)
        try:
            self._params = self._open_array("params")
            self._buffers = self._open_array("buffers") if self._static.layout.buffer_nbytes else None
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError) as e:
            raise InvalidStoreError(f"{where}: its arrays are missing") from e
        n_chunks = -(-self.n // self._static.chunk_elems)
        if self._static.version == 1:
            count, records = parse_commit(group.attrs.get("trajstore_commit"), where)
            self._log_gen, commits = _log.commits_from_format1(count, records)
            self._log_state = _log.LogState((self._log_gen,), tuple(commits), (), ())
        else:
            if "trajstore_commit" in group.attrs:  # the migration removes it in the write that sets version 2
                raise InvalidStoreError(f"{where}: a format-2 trajectory that still holds a format-1 commit record "
                                        "(a damaged or hand-edited group document)")
            self._log_state = _log.read_log(self._zstore, self._prefix, n_chunks, where)
        self._commits = list(self._log_state.commits)
        self._refs = [RowRef(c.index, c.row, c.crc) for c in self._commits]
        self._check_arrays(where)
        self._fast = self._local_reader()
        self._keys = KeyChunkReader(self._zstore, f"{self._prefix}/params", self.n, self._static.chunk_elems,
                                    self._static.dtype.numpy_dtype)

    @property
    def _count(self) -> int:
        return len(self._commits)

    def _open_array(self, name: str) -> zarr.Array:
        with _backend.metadata_errors(f"{self._where} trajectory {self._name!r}: {name}/zarr.json"):
            return zarr.open_array(self._zstore, path=f"{self._prefix}/{name}", mode="r")

    def _check_arrays(self, where: str) -> None:
        layout, arr = self._static.layout, self._params
        if arr.ndim != 2 or arr.shape[1] != layout.n or arr.dtype != self._static.dtype.numpy_dtype:
            raise InvalidStoreError(f"{where}: params array {arr.shape} {arr.dtype} does not match the layout (n = {layout.n})")
        if arr.chunks != (1, self._static.chunk_elems):
            raise InvalidStoreError(f"{where}: params chunks {arr.chunks} differ from the recorded {self._static.chunk_elems}")
        if self._static.version == 1 and arr.shape[0] < self._count:
            raise InvalidStoreError(f"{where}: {self._count} snapshots committed but the array holds only {arr.shape[0]} rows")
        buffers = self._buffers
        if buffers is not None and (buffers.ndim != 2 or buffers.shape[1] != layout.buffer_nbytes
                                    or buffers.dtype != np.uint8 or buffers.chunks != (1, layout.buffer_nbytes)
                                    or (self._static.version == 1 and buffers.shape[0] < self._count)):
            raise InvalidStoreError(f"{where}: buffers array {buffers.shape} {buffers.dtype} does not match the "
                                    f"layout ({layout.buffer_nbytes} bytes of uint8 per snapshot)")
        for array in (arr, buffers):
            if array is not None and not self._our_codecs(array):
                raise InvalidStoreError(f"{where}: array {array.path} does not use the bytes (little-endian) + "
                                        "crc32c codecs and default chunk keys trajstore writes")

    @staticmethod
    def _our_codecs(array: zarr.Array) -> bool:
        codecs = array.metadata.codecs
        if len(codecs) != 2 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], Crc32cCodec):
            return False
        if codecs[0].endian is not None and codecs[0].endian.value != "little":
            return False
        encoding = array.metadata.chunk_key_encoding
        return getattr(encoding, "name", None) == "default" and getattr(encoding, "separator", None) == "/"

    def _local_reader(self) -> LocalChunkReader | None:
        """The direct chunk-file reader, for a local store on a little-endian machine."""
        root = _backend.local_root(self._zstore)
        if root is None or sys.byteorder != "little":
            return None
        return LocalChunkReader(root / self._prefix / "params", self.n, self._static.chunk_elems,
                                self._static.dtype.numpy_dtype)

    # ---------------------------------------------------------------- taking the trajectory

    def _begin_writing(self) -> None:
        """Take the lease (if not taken yet), migrate a format-1 trajectory, and start a generation
        of the commit log fencing off every older writer's later commits."""
        if self._lease is None:
            self._lease = WriterLease(self._zstore, self._prefix, ttl=self._lease_ttl)
            try:
                self._lease.acquire(self._name)
            except OSError as e:
                if isinstance(e, TrajstoreError) or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                self._lease = None
                raise _read_only_error(self._where, e) from None
        if self._static.version == 1:
            self._migrate()
            self.refresh()
        gen, state = _log.start_generation(self._zstore, self._prefix, self._lease, -(-self.n // self.chunk_elems),
                                           durable=self._durable, name=self._name, where=self._where,
                                           writers=self._writers)
        self._gen = gen
        self._log_state = state
        self._commits = list(state.commits)
        self._refs = [RowRef(c.index, c.row, c.crc) for c in self._commits]
        self._writer = RowWriter(self._zstore, self._prefix, self.layout, self._static.dtype, self.chunk_elems,
                                 self._durable, stage_bytes=DEFAULT_STAGE_BYTES)

    def _migrate(self) -> None:
        """Format 1 -> 2: the commit attribute's records become log documents (once), then the
        group document is rewritten as format 2 in one atomic write; a migration killed before that
        write leaves a format-1 trajectory (and log documents that the next migration rewrites)."""
        _log.write_format1(self._zstore, self._prefix, self._log_gen, self._commits, durable=self._durable)
        key = f"{self._prefix}/zarr.json"
        doc = _backend.read_json(self._zstore, key)
        attrs = dict(doc.get("attributes", {}))
        attrs.pop("trajstore_commit", None)
        attrs["trajstore"] = {**attrs["trajstore"], "format_version": FORMAT_VERSION}
        _io.write_json_atomic(self._zstore, key, {**doc, "attributes": attrs}, durable=self._durable)

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
    def format_version(self) -> int:
        """The trajectory's on-disk format (1: read as written; 2: the fenced commit log)."""
        return self._static.version

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._static.attrs)

    @property
    def records(self) -> list[SnapshotRecord]:
        """Per-snapshot metadata (step, epoch, lr, metrics, time) of the committed snapshots."""
        return [c.record for c in self._commits]

    @property
    def log(self) -> _log.LogState:
        """The commit log as last read: generations, valid commits, and those that do not count."""
        return self._log_state

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

        Parameters are copied into a reused host staging buffer of whole chunks (many small
        tensors gathered by one copy), and each full buffer is written as new chunks of the new
        row; no concatenated copy of the parameter vector is made and no older chunk is read or
        rewritten. The snapshot becomes visible only when its commit document is written, after
        every chunk: a process killed at any moment leaves the committed snapshots intact.

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

        Raises
        ------
        WriterConflictError
            Another writer took the trajectory over; nothing of this append counts (or, if the
            message says so, it was committed just before the other writer started).

        Notes
        -----
        Cost: the snapshot's chunks plus one small commit document (the record and one crc32c per
        chunk), whatever the number of snapshots before it; every 256th commit also writes a seal
        of the last 256 records. Extra host memory: one staging buffer of ``min(n, 64 MiB /
        itemsize)`` values.
        """
        params, buffers = self._static.layout.check_model(model)
        return self._append(params, buffers, dict(step=step, epoch=epoch, lr=lr, metrics=metrics,
                                                  rng_state=rng_state), checked=True)

    def append_tensors(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor] = (), *,
                       step: int | None = None, epoch: int | float | None = None, lr: float | None = None,
                       metrics: Mapping[str, float] | None = None, rng_state: bool | torch.Tensor = False) -> int:
        """:meth:`append` for tensors given in layout order rather than a model: the parameters
        (``layout.params`` order) and persistent buffers (``layout.buffers`` order), on any device.
        Used by :class:`trajstore.Recorder` to write a host copy in the background."""
        return self._append(params, buffers, dict(step=step, epoch=epoch, lr=lr, metrics=metrics,
                                                  rng_state=rng_state), checked=False)

    def _append(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], meta: dict[str, Any],
                checked: bool) -> int:
        started = time.time()
        self._check_appendable()
        record = make_record(**meta, time=started)
        if not checked:
            self._static.layout.check_tensors(params, buffers)
        assert self._writer is not None
        index, row = self._begin_row()
        try:
            crcs = self._writer.write_params(row, list(params))
            buffers_crc = self._writer.write_buffers(row, list(buffers))
        except Exception as e:
            raise self._abort_row(index, row, e)  # type: ignore[misc]
        return self._commit_row(index, row, crcs, buffers_crc, record, started)

    def close(self) -> None:
        """Release the write lease (a no-op for read-only stores). Idempotent."""
        self._release()
        self._mode = "r" if self._mode == "a" else self._mode

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

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
