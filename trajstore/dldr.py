"""Streaming DLDR: the exact top-d basis of a window of a stored trajectory, in bounded memory.

Algorithm 1 of Li et al. done out of core, in two passes over W (the n x t matrix of snapshots):

1. **Gram pass** (dask, over chunk-aligned parameter blocks): ``G = (W - w_0 1^T)^T (W - w_0 1^T)``
   in float64, cached in the store per trajectory and extended, when snapshots are appended,
   by computing only the new columns.
2. Centre (``J G J``) and eigendecompose the t x t window of G; keep the top d.
3. **Basis pass** (dask, block by block): ``U_b = (W_b - mean_b)^T V Sigma^-1`` and the mean, written
   to the store; ``U^T U`` is accumulated from the stored float32 values.

Each dask task returns a small (t x t or d x d) partial, and the driver sums the partials in block
order, so results are bit-identical for any number of workers or scheduler.

Both passes survive a kill: each finished block's partial is saved in the store (``_checkpoint``),
and the same call restarted computes only the blocks that were not finished, giving the bytes an
uninterrupted run gives. A basis is marked complete only after its last block, and records the
content fingerprints of its window's snapshots, which ``trajstore verify`` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import _backend, _linalg, _progress
from . import basis as _bases
from ._blas import one_thread_on_workers
from ._checkpoint import BlockCheckpoint, lost_race
from ._dask import Scratch, block_size, block_tasks
from ._dims import GRAM_DIMS, MEAN_DIMS, U_DIMS
from ._fingerprint import piece_fingerprints
from ._names import check_name
from .basis import BASES_ROOT, FORMAT_VERSION, Basis, list_bases, open_basis
from .errors import CorruptSnapshotError, InvalidStoreError, SnapshotIndexError, TrajectoryNotFoundError
from .store import TrajectoryStore

__all__ = ["DEFAULT_BLOCK_BYTES", "dldr", "gram_matrix"]

# float32 bytes of one block of all t snapshots. With 4 MiB store chunks and t = 101 a block is
# at least one chunk per snapshot (404 MiB); the float64 work inside a block is sub-blocked
# (_linalg.SUB_BLOCK), so peak memory is about (workers + 1) blocks.
DEFAULT_BLOCK_BYTES = 256 * 2**20
GRAM_PASS = "gram-pass"  # the Gram pass's block checkpoints, inside the trajectory's group
BASIS_PASS = "pass"      # the basis pass's block checkpoints, inside the basis' group
_CRC = {"serializer": BytesCodec(), "compressors": [Crc32cCodec()], "filters": None,
        "config": {"write_empty_chunks": True}}


# ------------------------------------------------------------------ dask tasks (module level: picklable)

def _gram_task(piece: np.ndarray, c: int, first: int, scratch: Scratch | None = None) -> np.ndarray:
    work = scratch.get("x", (piece.shape[0], _linalg.SUB_BLOCK), np.float64) if scratch else None
    with one_thread_on_workers():
        return _linalg.gram_block(piece, 0, first, work)


class _BasisWriter:
    """Writes basis rows from inside dask tasks; pickles to (store, path) and re-opens lazily.

    Every write covers whole chunks of U and the mean (the pieces are the chunks). On a local
    folder they are written as chunk files directly, in Zarr's own format for these arrays (raw
    little-endian values padded to the chunk, then their crc32c; temporary file + rename, as Zarr
    does), skipping Zarr's encode path and its copies; elsewhere through Zarr.
    """

    def __init__(self, zstore: zarr.abc.store.Store, path: str, rows: int) -> None:
        self._zstore, self._path, self._rows = zstore, path, rows
        self._arrays: tuple[zarr.Array, zarr.Array] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def write(self, a: int, u: np.ndarray, mean: np.ndarray) -> None:
        root = _backend.local_root(self._zstore)
        if root is not None and sys.byteorder == "little" and a % self._rows == 0:
            i = a // self._rows
            folder = root / self._path
            _backend.write_chunk_file(folder / "U" / "c" / str(i) / "0", u, (self._rows, u.shape[1]), np.nan)
            _backend.write_chunk_file(folder / "mean" / "c" / str(i), mean, (self._rows,), np.nan)
            return
        if self._arrays is None:
            group = _backend.open_group(self._zstore, self._path, "r+")
            self._arrays = tuple(group[k].with_config({"write_empty_chunks": True}) for k in ("U", "mean"))  # type: ignore[assignment]
        self._arrays[0][a:a + u.shape[0]] = u
        self._arrays[1][a:a + u.shape[0]] = mean


def _basis_task(piece: np.ndarray, c: int, v_scaled: np.ndarray, writer: _BasisWriter,
                scratch: Scratch | None = None) -> np.ndarray:
    """Writes the piece's rows of U and of the mean (whole chunks of U) and returns the partial
    U^T U of the stored float32 values (raveled) followed by the pieces' source fingerprints."""
    scratch = scratch or Scratch()
    t, m = piece.shape
    d = v_scaled.shape[1]
    u = scratch.get("u", (m, d), np.float64)
    with one_thread_on_workers():
        u, mean = _linalg.basis_block(piece, v_scaled, 0, scratch.get("x", (t, _linalg.BASIS_SUB_BLOCK), np.float64), u)
    u32 = scratch.get("u32", (m, d), np.float32)
    np.copyto(u32, u, casting="same_kind")
    writer.write(c, u32, mean.astype(np.float32))
    np.copyto(u, u32)  # U^T U is measured on what is stored
    with one_thread_on_workers():
        gram = u.T @ u
    return np.concatenate([gram.ravel(), piece_fingerprints(piece, c)])


def _memory_basis_task(block: np.ndarray, v_scaled: np.ndarray) -> np.ndarray:
    """In memory: U^T and the mean stacked, (d + 1, b)."""
    with one_thread_on_workers():
        u, mean = _linalg.basis_block(block, v_scaled)
    return np.vstack([u.T, mean[None, :]])


def _memory_gram_task(block: np.ndarray) -> np.ndarray:
    with one_thread_on_workers():
        return _linalg.gram_block(block)


def _compute_ordered(tasks: list[Any], client: Any, num_workers: int | None, desc: str | None) -> list[np.ndarray]:
    """Results of ``tasks`` in order. On the local threaded scheduler with several threads, BLAS is
    held to one thread meanwhile (process-wide, restored after): each dask thread runs its own
    products, and OpenBLAS threads on top of them spun against each other and the reads (measured:
    a 16M-parameter Gram pass took 19-37 s that way, 11.5 s with single-threaded BLAS).
    On dask.distributed workers each task holds the limit itself (:mod:`trajstore._blas`), whatever
    the worker was started with."""
    if client is None and num_workers != 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            results = _progress.compute(tasks, client=None, num_workers=num_workers, desc=desc)
    else:
        results = _progress.compute(tasks, client=client, num_workers=num_workers, desc=desc)
    return [np.asarray(r) for r in results]


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    """Sum partials in block order: the result does not depend on the scheduler or worker count."""
    out = np.zeros_like(parts[0])
    for part in parts:
        out += part
    return out


def _gram_pass(store: TrajectoryStore, stop: int, first: int, client: Any, num_workers: int | None,
               block_bytes: int, progress: bool, checkpoint: BlockCheckpoint | None = None) -> np.ndarray:
    """Columns ``first..stop-1`` of the Gram matrix of snapshots ``[0, stop)``, relative to snapshot 0.

    With ``checkpoint``, finished blocks' partials are kept in the store: a killed pass restarted
    with the same arguments computes only the blocks it had not finished."""
    tasks = block_tasks(store, 0, stop, block_bytes, _gram_task, first, checkpoint=checkpoint,
                        shape=(stop, stop - first))
    desc = _pass_desc("Gram pass", stop, len(tasks), checkpoint) if progress else None
    return _sum_in_order(_compute_ordered(tasks, client, num_workers, desc))


def _pass_desc(what: str, t: int, blocks: int, checkpoint: BlockCheckpoint | None) -> str:
    """The progress bar's title: how many snapshots and blocks, and how many were done before a kill."""
    saved = checkpoint.saved if checkpoint is not None else 0
    return (f"{what} ({t} snapshots, {blocks} block{'' if blocks == 1 else 's'}"
            + (f", {saved} done before)" if saved else ")"))


def _drop_stale_checkpoint(zstore: zarr.abc.store.Store, path: str) -> None:
    """Remove the block checkpoints of a pass whose result was committed just before a kill (the
    checkpoints go after the commit); best effort: a read-only backend keeps them, harmlessly."""
    try:
        BlockCheckpoint(zstore, path, {}).clear()  # also a half-removed one, without its group document
    except (OSError, ValueError):
        pass


def _pass_checkpoint(zstore: zarr.abc.store.Store, path: str, identity: dict[str, Any]) -> BlockCheckpoint | None:
    """A checkpoint for a pass, or None when the store cannot take one (a read-only backend)."""
    checkpoint = BlockCheckpoint(zstore, path, identity)
    try:
        checkpoint.prepare()
    except (PermissionError, OSError, ValueError) as e:
        warnings.warn(f"no resume checkpoint for this pass ({type(e).__name__}: {e}); "
                      "a killed pass will start again from the beginning", RuntimeWarning, stacklevel=3)
        return None
    return checkpoint


# ------------------------------------------------------------------ the cached Gram matrix

def _records_digest(store: TrajectoryStore, count: int) -> str:
    items = [store.layout.fingerprint] + [[r.get("time"), r.get("step")] for r in store.records[:count]]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _gram_digest(gram: np.ndarray) -> str:
    """A hash of the cached values themselves: metadata that decodes the chunk differently (another
    dtype or byte order, under a valid checksum) must not be trusted."""
    return hashlib.sha256(np.ascontiguousarray(gram, dtype="<f8").tobytes()).hexdigest()[:32]


def _cache_name(doc: object) -> str | None:
    """The cache's array name, ``g<count>`` as written; anything else (a path) is not followed."""
    name = doc.get("array") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name[:1] == "g" and name[1:].isdigit() and len(name) < 12 else None


def _read_cached_gram(store: TrajectoryStore, zstore: zarr.abc.store.Store) -> np.ndarray | None:
    """The cached Gram matrix, or None when there is none or it is stale or damaged in any way
    (it is derived data: recomputing it is always possible, trusting a wrong one never is)."""
    try:
        group = _backend.open_group(zstore, f"{store.prefix}/gram", "r")
    except (FileNotFoundError, InvalidStoreError):
        return None
    doc = group.attrs.get("trajstore")
    name = _cache_name(doc)
    if name is None or type(doc.get("count")) is not int:
        return None
    count = doc["count"]
    if not 0 < count <= len(store) or doc.get("digest") != _records_digest(store, count):
        return None  # stale (a different trajectory under the same name) or damaged: recompute
    try:
        with _backend.metadata_errors(f"{store.prefix}/gram/{name}/zarr.json"):
            array = group[name]
        # Shape and dtype before reading: the read allocates from the shape; and the chunk's
        # stored size, so a cache claiming a large matrix it does not hold allocates nothing.
        if not isinstance(array, zarr.Array) or array.shape != (count, count) or array.dtype != np.float64:
            return None
        if array.chunks != (count, count) or \
                _backend.sync(zstore.getsize(f"{store.prefix}/gram/{name}/c/0/0")) != count * count * 8 + 4:
            return None
        gram = np.asarray(array[...])
    except Exception:  # missing, undecodable (the codec pipeline raises many types): recompute
        return None
    if not np.all(np.isfinite(gram)) or doc.get("sha256") != _gram_digest(gram):
        return None
    return gram


def _write_cached_gram(store: TrajectoryStore, zstore: zarr.abc.store.Store, gram: np.ndarray) -> None:
    """Cache ``gram``; when another process writes the cache at the same moment and one of them
    trips over the other's files, the loser leaves it to the winner (the cache is checked by its
    values' hash when read: a mix of the two is recomputed, never trusted)."""
    try:
        _commit_cached_gram(store, zstore, gram)
    except (OSError, ValueError) as e:
        if not lost_race(e):
            raise


def _commit_cached_gram(store: TrajectoryStore, zstore: zarr.abc.store.Store, gram: np.ndarray) -> None:
    path = f"{store.prefix}/gram"
    try:
        group = _backend.open_group(zstore, path, "a")
        old = _cache_name(group.attrs.get("trajstore"))
    except InvalidStoreError:  # a cache too damaged for Zarr to open: derived data, replaced whole
        _backend.sync(zstore.delete_dir(path))
        group, old = _backend.open_group(zstore, path, "a"), None
    count = gram.shape[0]
    name = f"g{count}"
    array = group.create_array(name, shape=gram.shape, chunks=gram.shape, dtype=np.float64, fill_value=np.nan,
                               dimension_names=GRAM_DIMS, overwrite=True, **_CRC)
    array[...] = gram
    # The pointer is the commit: one atomic attribute write after the data.
    group.update_attributes({"trajstore": {"count": count, "array": name, "digest": _records_digest(store, count),
                                           "sha256": _gram_digest(gram), "reference": 0, "written": time.time()}})
    if old is not None and old != name:
        _backend.sync(zstore.delete_dir(f"{path}/{old}"))  # by key: its metadata may not even parse


def _writable(store: TrajectoryStore) -> zarr.abc.store.Store:
    """The store's backend opened for writing: the Gram cache and bases are written even when the
    trajectory itself was opened read-only (they are derived data, not snapshots)."""
    zstore = store.zarr_store
    return zstore.with_read_only(False) if zstore.read_only else zstore


def gram_matrix(store: TrajectoryStore, stop: int | None = None, *, client: Any = None,
                block_bytes: int = DEFAULT_BLOCK_BYTES, num_workers: int | None = None,
                cache: bool = True, progress: bool = False) -> np.ndarray:
    """Gram matrix of snapshots ``[0, stop)`` relative to snapshot 0, float64 of shape (stop, stop).

    Reads the cache when it covers ``stop``; otherwise computes only the missing columns (a pass
    over snapshots ``[0, stop)`` costing ``n * stop * (stop - cached)`` multiply-adds) and caches
    the result (when the store's backend is writable).
    """
    stop = len(store) if stop is None else stop
    zstore = _writable(store)
    cached = _read_cached_gram(store, zstore) if cache else None
    if cached is not None and cached.shape[0] >= stop:
        if cache:
            _drop_stale_checkpoint(zstore, f"{store.prefix}/{GRAM_PASS}")
        return cached[:stop, :stop].copy()
    have = 0 if cached is None else cached.shape[0]
    checkpoint = None
    if cache:
        identity = {"kind": "gram", "stop": stop, "first": have, "n": store.n, "reference": 0,
                    "block": block_size(store, 0, stop, block_bytes), "digest": _records_digest(store, stop)}
        checkpoint = _pass_checkpoint(zstore, f"{store.prefix}/{GRAM_PASS}", identity)
    store.check_present(0, stop)  # before t x t partials are allocated for snapshots that are not there
    new = _gram_pass(store, stop, have, client, num_workers, block_bytes, progress, checkpoint)
    if not np.all(np.isfinite(new)):
        raise CorruptSnapshotError(f"trajectory {store.name!r} in {store.url}: snapshots [0, {stop}) hold non-finite "
                                   "values under valid checksums (a damaged or hand-made store)")
    gram = np.zeros((stop, stop), dtype=np.float64)
    if cached is not None:
        gram[:have, :have] = cached
    gram[:, have:] = new
    gram[have:, :have] = new[:have].T
    if cache:
        _write_cached_gram(store, zstore, gram)
    if checkpoint is not None:
        checkpoint.clear()  # after the commit: a kill in between leaves only a stale checkpoint
    return gram


# ------------------------------------------------------------------ dldr

def _metadata(sigma: np.ndarray, evals: np.ndarray, **extra: Any) -> dict[str, Any]:
    total = float(np.clip(evals, 0.0, None).sum())
    return {"kind": "basis", "format_version": FORMAT_VERSION, "d": int(sigma.shape[0]),
            "singular_values": sigma.tolist(), "explained_variance_ratio": (sigma**2 / total).tolist(), **extra}


def _eig(gram: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    centred = _linalg.centre_gram(gram)
    sigma, v, evals, _ = _linalg.top_eigenpairs(centred, d)
    return centred, sigma, v, evals


def _check_d(d: object) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return int(d)


def _dldr_array(x: Any, d: int, client: Any, block_bytes: int, num_workers: int | None) -> Basis:
    import dask.array as da

    arr = x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=-1)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"snapshots must be a (t, n) array with t >= 2, got shape {arr.shape}")
    t, n = arr.shape
    arr = arr.rechunk((t, max(1, block_bytes // (t * arr.dtype.itemsize))))
    blocks = list(arr.to_delayed().ravel())
    import dask

    grams = [dask.delayed(_memory_gram_task)(b) for b in blocks]
    centred, sigma, v, evals = _eig(_sum_in_order(_compute_ordered(grams, client, num_workers, None)), d)
    parts = [dask.delayed(_memory_basis_task)(b, v / sigma) for b in blocks]
    out = np.concatenate(_compute_ordered(parts, client, num_workers, None), axis=1)
    u, mean = out[:d].T.copy(), out[d].copy()
    ortho = float(np.abs(u.T @ u - np.eye(d)).max())
    meta = _metadata(sigma, evals, n=n, start=0, stop=t, trajectory=None, name=None, orthonormality=ortho)
    return Basis(meta, centred, u=u, mean=mean)


def dldr(store: Any, d: int = 40, *, start: int = 0, stop: int | None = None, trajectory: str | None = None,
         client: Any = None, block_bytes: int = DEFAULT_BLOCK_BYTES, name: str | None = None,
         num_workers: int | None = None, overwrite: bool = False, progress: bool = False,
         storage_options: dict[str, Any] | None = None) -> Basis:
    """The top-``d`` DLDR basis of snapshots ``[start, stop)`` of a trajectory.

    Parameters
    ----------
    store : TrajectoryStore, str, path, zarr Store, or array of shape (t, n)
        A trajectory (opened read-only if given by URL), or snapshots held in memory (numpy or
        dask), for which the basis is returned in memory and nothing is written.
    d : int
        Number of directions; at most the rank of the centred window (<= t - 1).
    start, stop : int
        The window (Python slice semantics over committed snapshots).
    trajectory : str, optional
        Which trajectory of the store (needed when it holds several).
    client : dask.distributed.Client, optional
        Run both passes on this cluster; default: the local threaded scheduler.
    block_bytes : int
        Target float32 bytes of one block of all t snapshots (rounded to whole store chunks).
    name : str, optional
        Name of the basis in the store (default ``"{trajectory}-{start}-{stop}-d{d}"``): a letter or
        digit, then letters, digits, ``.``, ``_`` or ``-``, at most 128 characters (ValueError, before
        any work, otherwise). A stored basis of that name made of another window is replaced.
    num_workers : int, optional
        Threads of the local scheduler (default: one per core).
    overwrite : bool
        Recompute even when a complete basis of that name and source exists.
    progress : bool
        Show progress per pass: a tqdm bar on a terminal, a short line every 10 s elsewhere
        (``TRAJSTORE_PROGRESS_INTERVAL``); ``distributed.progress`` on a cluster's terminal.
    storage_options : dict, optional
        Options of the URL's fsspec file system (``key``, ``secret``, ``endpoint_url``...), as for
        :meth:`TrajectoryStore.open`. Only with a URL or path: an open TrajectoryStore or a Zarr
        Store already has its file system, and arrays have none (ValueError).

    Returns
    -------
    Basis
        This call's computation (or an equal one stored meanwhile by another process). Should the
        name be recomputed afterwards, its reads raise CorruptSnapshotError saying so.

    Raises
    ------
    StoreUnreachableError
        The store's backend cannot be reached (refused, unresolvable, timed out, no credentials).
    WriterConflictError
        Rarely, when another process computing the same name deleted this computation's version
        folder, taking it for abandoned, before its commit; nothing was committed.

    Notes
    -----
    Memory does not grow with n or t beyond one block per worker: each task holds one
    (t, b) float32 block plus a float64 sub-block of ``t * 65536`` values; the driver holds t x t
    and d x d matrices. I/O: the Gram pass reads snapshots ``[0, stop)`` once (skipped when the
    cached Gram matrix covers them); the basis pass reads the window once and writes
    ``n * (d + 1)`` float32 values. FLOPs: ``n t^2`` (Gram, float64) + ``2 n t d`` (basis).

    A call killed at any moment and made again resumes: blocks finished before the kill are
    loaded from their checkpoints (a t x t or d x d float64 partial each), and the result is the
    one an uninterrupted call gives, bit for bit.

    Concurrent calls (other processes, other hosts sharing the store) never mix their results:
    each computation writes its own version folder and commits it with one atomic write of the
    basis' group document (see :mod:`trajstore.basis`). The stored basis is then the last one
    committed, each caller gets its own, and equal computations running at once share one folder.

    The Gram matrix is taken relative to snapshot 0 of the trajectory and centred exactly
    (``J G J``); in float64 the centring loses about ``eps * |w_j - w_0|^2 / sigma_d^2`` in relative
    terms, far below float32 resolution for training trajectories.

    References
    ----------
    Li, Tan, Tao, Liu, Huang. Train Deep Neural Networks in 40-D Subspaces (DLDR, Algorithm 1).

    See Also
    --------
    gram_matrix : the cached pass 1 on its own.
    Basis : what is returned.
    """
    d = _check_d(d)
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
        raise ValueError(f"block_bytes must be a positive integer, got {block_bytes!r}")
    if name is not None:
        check_name(name, "basis")  # before any work: the name becomes a folder of the store
    if storage_options is not None and not isinstance(store, (str, os.PathLike)):
        raise ValueError(f"storage_options apply to a store given by URL or path, not to a {type(store).__name__} "
                         "(it already has its file system): open it with them, or pass the URL")
    if not isinstance(store, TrajectoryStore):
        if isinstance(store, np.ndarray) or type(store).__module__.startswith("dask"):
            return _dldr_array(store, d, client, block_bytes, num_workers)
        store = TrajectoryStore.open(store, "r", trajectory=trajectory, storage_options=storage_options)
    elif trajectory is not None and trajectory != store.name:
        store = TrajectoryStore.open(store.zarr_store, "r", trajectory=trajectory)
    t0, t1, _ = slice(start, stop).indices(len(store))
    if t1 - t0 < 2:
        raise SnapshotIndexError(f"window [{start}, {stop}) of trajectory {store.name!r} with {len(store)} "
                                 "snapshots holds fewer than 2 snapshots")
    name = check_name(f"{store.name}-{t0}-{t1}-d{d}" if name is None else name, "basis")
    zstore = _writable(store)
    source = {"trajectory": store.name, "start": t0, "stop": t1, "layout": store.layout.fingerprint,
              "digest": _records_digest(store, t1)}
    existing = _stored_basis(zstore, name)
    if existing is not None and not overwrite and existing.d == d and existing.metadata.get("source") == source:
        _bases.collect_garbage(zstore, name)  # versions of killed or superseded computations, if any
        return existing
    gram = gram_matrix(store, t1, client=client, block_bytes=block_bytes, num_workers=num_workers, progress=progress)
    centred, sigma, v, evals = _eig(gram[t0:t1, t0:t1], d)
    return _write_basis(store, zstore, name, d, centred, sigma, v, evals, source, client, block_bytes, num_workers,
                        progress)


def _stored_basis(zstore: zarr.abc.store.Store, name: str) -> Basis | None:
    """The complete basis stored under ``name``, or None: none, incomplete, unreadable, or its
    version deleted by a concurrent recomputation (all of which a computation replaces)."""
    if name not in list_bases(zstore):
        return None
    _backend.open_group(zstore, BASES_ROOT, "r")  # a damaged bases/ group is an error, raised
    try:
        return open_basis(zstore, name)
    except (InvalidStoreError, CorruptSnapshotError, TrajectoryNotFoundError):
        return None


def _write_basis(store: TrajectoryStore, zstore: zarr.abc.store.Store, name: str, d: int, centred: np.ndarray,
                 sigma: np.ndarray, v: np.ndarray, evals: np.ndarray, source: dict[str, Any], client: Any,
                 block_bytes: int, num_workers: int | None, progress: bool) -> Basis:
    """The basis pass, into a version folder of its own (or its own interrupted one), committed by
    one atomic write of the basis group's document (see :mod:`trajstore.basis`)."""
    t0, t1 = source["start"], source["stop"]
    n = store.n
    u_rows = store.piece  # U chunks = the pieces the basis pass writes, whole; divides every block
    v_scaled = v / sigma
    # What makes the rows of U: a restarted pass resumes only an unfinished basis made of the same.
    identity = {"kind": "basis", "d": d, "source": source, "u_chunk_rows": u_rows,
                "block": block_size(store, t0, t1, block_bytes),
                "v": hashlib.sha256(np.ascontiguousarray(v_scaled).tobytes()).hexdigest()}
    meta = _metadata(sigma, evals, n=n, start=t0, stop=t1, trajectory=store.name, name=name, source=source,
                     complete=False, created=time.time(), u_chunk_rows=u_rows)
    stored = _prepare_basis_group(zstore, name, {**meta, "orthonormality": float("inf")})
    group = _unfinished_version(zstore, name, identity, n, centred, stored)
    if group is None:
        group = _bases.create_version(zstore, name, {"trajstore_pass": identity, "created": meta["created"]})
        group.create_array("U", shape=(n, d), chunks=(u_rows, d), dtype=np.float32, fill_value=np.nan,
                           dimension_names=U_DIMS, **_CRC)
        group.create_array("mean", shape=(n,), chunks=(u_rows,), dtype=np.float32, fill_value=np.nan,
                           dimension_names=MEAN_DIMS, **_CRC)
        group.create_array("gram", shape=centred.shape, chunks=centred.shape, dtype=np.float64, fill_value=np.nan,
                           dimension_names=GRAM_DIMS, **_CRC)
        group["gram"][...] = centred
    else:
        meta["created"] = group.attrs.get("created", meta["created"])
        group.update_attributes({"trajstore_owner": _bases.owner()})  # so it is not taken for abandoned
    path = group.path
    checkpoint = _pass_checkpoint(zstore, f"{path}/{BASIS_PASS}", identity)
    writer = _BasisWriter(zstore, path, u_rows)
    tasks = block_tasks(store, t0, t1, block_bytes, _basis_task, v_scaled, writer, checkpoint=checkpoint,
                        shape=(d * d + t1 - t0,))
    desc = _pass_desc("basis pass", t1 - t0, len(tasks), checkpoint) if progress else None
    total = _sum_in_order(_compute_ordered(tasks, client, num_workers, desc))
    utu = total[:d * d].reshape(d, d)
    meta["orthonormality"] = float(np.abs(utu - np.eye(d)).max())
    meta["source_fingerprints"] = [int(f) for f in total[d * d:]]
    meta["complete"] = True
    meta["version"] = version = path.rsplit("/", 1)[1]
    if checkpoint is not None:
        checkpoint.clear()  # before the commit: a complete basis holds U, mean and gram only
    # Opened before the commit: what is returned is this computation, whatever commits next.
    basis = _bases.open_arrays(zstore, name, _bases.validate_meta(meta, name))
    twin = _concurrent_twin(zstore, name, identity, (stored, version))
    if twin is not None:
        _bases.delete_version(zstore, name, version)
        return twin
    _bases.commit(zstore, name, meta)
    return basis


def _concurrent_twin(zstore: zarr.abc.store.Store, name: str, identity: dict[str, Any],
                     known: tuple[str | None, str]) -> Basis | None:
    """The basis another process committed while this one computed the very same thing (the same
    pass identity, in a version of its own): returned rather than replaced by a copy, which would
    pull its rows from under whoever opened it. None when there is none (or it cannot be read)."""
    try:
        meta = _bases.read_pointer(zstore, name)[1]
        now = _bases.current_version(meta)
        if not now or now in known:  # none, the one stored before this call began, or this one
            return None
        attrs = _bases.version_attrs(zstore, name, now)
        if attrs is None or attrs.get("trajstore_pass") != identity:
            return None
        return _bases.open_arrays(zstore, name, _bases.validate_meta(meta, name))
    except (OSError, ValueError):  # TrajstoreErrors included: then this computation is committed
        return None


def _prepare_basis_group(zstore: zarr.abc.store.Store, name: str, incomplete: dict[str, Any]) -> str | None:
    """Make ``bases/`` and the basis group ready for a new version: ``bases/zarr.json`` created, or
    rewritten when it does not parse (the bases under it are untouched); the basis group's document
    written, marked incomplete, where there is none, and replaced where it does not parse (no one
    can use it). Returns the version of the basis stored now (None for none)."""
    _backend.open_group(zstore, "", "r")  # the store's own root must be sound: not repaired here
    try:
        _backend.open_group(zstore, BASES_ROOT, "r")
    except FileNotFoundError:
        _backend.sync(zstore.set_if_not_exists(f"{BASES_ROOT}/zarr.json", _bases.group_doc({})))
    except InvalidStoreError:
        _backend.sync(zstore.set(f"{BASES_ROOT}/zarr.json", _bases.group_doc({})))
    exists, stored = _bases.read_pointer(zstore, name)
    if exists:
        try:
            _backend.open_group(zstore, _bases.basis_path(name), "r")  # what Zarr asks of a version's parent
        except (InvalidStoreError, FileNotFoundError):
            stored = None
        if stored is None:  # by key: its document may not even parse
            _backend.delete_key(zstore, f"{_bases.basis_path(name)}/zarr.json")
    _bases.init_pointer(zstore, name, incomplete)
    return _bases.current_version(stored)


def _unfinished_version(zstore: zarr.abc.store.Store, name: str, identity: dict[str, Any], n: int,
                        centred: np.ndarray, stored: str | None) -> zarr.Group | None:
    """The version folder of an interrupted computation of this very basis (not the stored one),
    whose finished blocks can be kept; None when there is none (or it was made of something else,
    or is damaged). It may belong to a computation still running: both write the same bytes."""
    for version in _bases.list_versions(zstore, name):
        if version == stored:
            continue
        try:
            attrs = _bases.version_attrs(zstore, name, version)
            if attrs is None or attrs.get("trajstore_pass") != identity:
                continue
            group = _backend.open_group(zstore, _bases.version_path(name, version), "r+")
            if group["U"].shape != (n, identity["d"]) or group["mean"].shape != (n,):
                continue
            if np.array_equal(np.asarray(group["gram"][...]), centred):
                return group
        except Exception:  # missing arrays, a damaged document: not this one
            continue
    return None
