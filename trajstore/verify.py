"""Check a whole store: every chunk's checksum, the metadata, the commits and the bases (``trajstore verify``).

What is checked, per trajectory: its metadata parses and matches its arrays (layout, dtype, chunks,
committed count), every chunk of every committed snapshot is present, has its size and passes its
crc32c checksum, every snapshot's buffers chunk is present and decodes, recorded RNG states
decode, and the cached Gram matrix is current. Per basis: it is complete, its metadata and
arrays agree, every chunk of U and of the mean is present and passes its checksum, its stored
centred Gram matrix has the recorded singular values, and, in one streaming pass over its window,
that it still matches the snapshots it was made from: their content fingerprints (recorded when
the basis was computed), the mean, ``U^T U = I`` and ``U^T (W - mean) (W - mean)^T U = Sigma^2``.

Findings are errors (data is damaged or inconsistent: a result built on it would be wrong) or
warnings (left-overs of interrupted work that the library recovers from by itself: an uncommitted
row, block checkpoints of a killed pass, an incomplete basis, stray temporary files).

A trajectory or basis folder whose group document is gone while its chunks remain is an error (it
no longer opens, so it would otherwise be silently missing from the listing). verify never raises
on a damaged store: an exception in any one check becomes an error finding. A store it cannot
reach (connection refused, no such host, a timeout, no credentials) is not a damaged one: verify
raises StoreUnreachableError then, at the first read that fails, and reports nothing; a local path
where nothing exists raises NotAStoreError. It never
blocks on a FIFO or socket planted in the store (see :class:`trajstore._backend.RegularFileStore`), and never
sizes a read from metadata beyond SCAN_VALUES (see :func:`_scan_snapshots`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr

from . import _backend, _linalg, _log
from ._backend import StoreLike, describe
from ._fingerprint import piece_fingerprints
from ._names import NAME_PATTERN, is_valid_name
from ._localread import PIECE
from .basis import BASES_ROOT, Basis, basis_path, list_bases, open_basis, validate_meta
from .errors import CorruptSnapshotError, NotAStoreError, StoreUnreachableError, TrajstoreError
from ._create import read_root
from .store import TrajectoryStore

__all__ = ["Finding", "VerifyReport", "format_report", "verify"]

# Tolerances of the basis checks. A float32 basis of d <= 100 directions has max |U^T U - I| of
# about 1e-6 (measured: 4e-7 to 3e-6 from n = 1e3 to 5.6e7); the bars sit two orders above what
# float32 rounding gives, and far below what a basis of other data gives (order 1).
ORTHONORMALITY_TOL = 1e-4
SPECTRUM_TOL = 1e-4        # max |U^T Wc Wc^T U - Sigma^2| / sigma_1^2
MEAN_TOL = 1e-6            # |mean_stored - mean| / |mean| (float32 rounding: 6e-8)
SINGULAR_VALUE_TOL = 1e-6  # recorded sigma vs. the stored Gram matrix's, relative to sigma_1
MAX_LISTED = 20            # findings of one kind listed per trajectory or basis before a summary
# Values of one snapshot verify reads at once: 4 MiB of float32, a default chunk (DEFAULT_CHUNK_BYTES).
# A chunk up to this size is read whole, a larger one streamed in pieces of 65536 values.
SCAN_VALUES = 2**20


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a store. ``level``: ``"error"`` (damage) or ``"warning"`` (left-overs)."""

    level: Literal["error", "warning"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.where}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` found; ``ok`` when there is no error (warnings allowed)."""

    store: str
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=lambda: {
        "trajectories": 0, "snapshots": 0, "chunks": 0, "bases": 0, "basis_chunks": 0})

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: Literal["error", "warning"], where: str, message: str) -> None:
        self.findings.append(Finding(level, where, message))

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "ok": self.ok, "checked": dict(self.checked),
                "findings": [{"level": f.level, "where": f.where, "message": f.message} for f in self.findings]}


class _Limited:
    """Adds findings of one kind to a report, listing the first MAX_LISTED and counting the rest."""

    def __init__(self, report: VerifyReport, where: str) -> None:
        self._report, self._where, self.count = report, where, 0

    def add(self, message: str) -> None:
        self.count += 1
        if self.count <= MAX_LISTED:
            self._report.add("error", self._where, message)

    def close(self, what: str) -> None:
        if self.count > MAX_LISTED:
            self._report.add("error", self._where, f"... and {self.count - MAX_LISTED} more {what}")


def verify(url: StoreLike, *, storage_options: dict[str, Any] | None = None, sources: bool = True,
           progress: bool = False) -> VerifyReport:
    """Check every chunk, commit and basis of a store; see the module docstring for the list.

    Parameters
    ----------
    url : str, path or zarr Store
        The store (opened read-only: verify writes nothing).
    storage_options : dict, optional
        Options of the URL's fsspec file system (credentials, ``endpoint_url``...).
    sources : bool
        Also check each basis against the snapshots of its window (a streaming pass per basis).
    progress : bool
        Show a progress bar per trajectory and basis.

    Raises
    ------
    StoreUnreachableError
        The store's backend cannot be reached; nothing is reported about its data.

    Notes
    -----
    I/O: every committed chunk is read once, every basis is read once, and with ``sources`` each
    basis' window once more. Memory: at most SCAN_VALUES values of a snapshot (4 MiB of float32;
    larger chunks are streamed, see :func:`_scan_snapshots`), plus a pass's blocks (as in
    :func:`trajstore.dldr`) and d x t matrices.
    """
    report = VerifyReport(describe(url))
    local = _backend.local_path(url)
    if local is not None and not local.exists():  # nothing there is not a damaged store
        raise NotAStoreError(f"{url} does not exist")
    try:
        zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
        root = read_root(zstore, report.store)
        names = TrajectoryStore._names(root)
    except StoreUnreachableError:
        raise
    except TrajstoreError as e:
        report.add("error", report.store, str(e))
        return report
    except Exception as e:  # a store too damaged for Zarr to list
        report.add("error", report.store, f"cannot read the store's groups ({type(e).__name__}: {e})")
        return report
    _guarded(report, report.store, "listing the trajectories' folders", _orphans, zstore, "trajectories", names,
             "trajectory", report, "its snapshots may be recoverable")
    stores: dict[str, TrajectoryStore] = {}
    for name in names:
        store = _guarded(report, f"trajectory {name!r}", "checking it", _check_trajectory, zstore, name, report,
                         progress)
        if store is not None:
            stores[name] = store
    bases = _basis_names(zstore, report)
    _guarded(report, BASES_ROOT, "listing the bases' folders", _orphans, zstore, BASES_ROOT, bases, "basis", report,
             "the basis cannot be opened; delete the folder and compute it again")
    for name in bases:
        _guarded(report, f"basis {name!r}", "checking it", _check_basis, zstore, name, stores, report, sources,
                 progress)
    _guarded(report, report.store, "looking for temporary files", _stray_files, zstore, report)
    return report


def _guarded(report: VerifyReport, where: str, what: str, check: Callable[..., Any], *args: Any,
             default: Any = None) -> Any:
    """``check(*args)``; an exception it raises becomes an error finding and ``default`` is
    returned: verify reports a damaged store, it does not crash on one."""
    try:
        return check(*args)
    except StoreUnreachableError:
        raise
    except Exception as e:
        report.add("error", where, f"{what} failed ({type(e).__name__}: {e!s:.300})")
        return default


def _orphans(zstore: zarr.abc.store.Store, folder: str, listed: Collection[str], kind: str, report: VerifyReport,
             hint: str) -> None:
    """Folders under ``folder`` that hold files but no group document (``folder/NAME/zarr.json``
    missing, or not a regular file). Listed by key: the library lists only folders with a group
    document, so such a trajectory or basis would otherwise just not be there."""
    async def scan() -> list[tuple[str, int, int]]:
        found = []
        async for name in zstore.list_dir(folder):
            if name in listed or name.startswith(".") or _backend.is_document(name):
                continue
            files = chunks = 0
            async for key in zstore.list_prefix(f"{folder}/{name}/"):
                files += 1
                chunks += "/c/" in key
            if files:
                found.append((name, files, chunks))
        return sorted(found)

    for name, files, chunks in _backend.sync(scan()):
        if not is_valid_name(name):
            report.add("error", f"{kind} {name!r:.200}", f"its folder's name does not match {NAME_PATTERN}, so it "
                       f"cannot be opened ({chunks} chunk files, {files} files in all): rename the folder to a valid "
                       "name to recover it")
            continue
        report.add("error", f"{kind} {name!r}", f"its group document {folder}/{name}/zarr.json is missing (or not a "
                   f"regular file), but {chunks} chunk files remain ({files} files in all): {hint}")


# ------------------------------------------------------------------ trajectories

def _check_trajectory(zstore: zarr.abc.store.Store, name: str, report: VerifyReport,
                      progress: bool) -> TrajectoryStore | None:
    where = f"trajectory {name!r}"
    try:
        store = TrajectoryStore.open(zstore, "r", trajectory=name)
    except StoreUnreachableError:
        raise
    except TrajstoreError as e:
        report.add("error", where, str(e))
        return None
    except Exception as e:
        report.add("error", where, f"cannot be opened ({type(e).__name__}: {e})")
        return None
    report.checked["trajectories"] += 1
    report.checked["snapshots"] += len(store)
    damaged = _guarded(report, where, "reading its snapshots", _scan_snapshots, store, report, where, progress,
                       default=1)
    _guarded(report, where, "checking its records", _check_records, store, report, where)
    _guarded(report, where, "looking for uncommitted rows", _uncommitted_rows, zstore, store, report, where)
    _guarded(report, where, "checking its cached Gram matrix", _check_gram_cache, store, report, where)
    return None if damaged else store


def _scan_snapshots(store: TrajectoryStore, report: VerifyReport, where: str, progress: bool) -> int:
    """Read every chunk of every committed snapshot once; returns how many were damaged.

    Memory is bounded by SCAN_VALUES, not by the metadata: a chunk of at most SCAN_VALUES values
    is read whole into one reused buffer; a larger one is streamed, on a local folder, in pieces of
    65536 values (:meth:`TrajectoryStore.iter_pieces`; on other backends it reads whole chunks,
    as every reader of such a store does). A chunk shape no trajstore writes (longer than a
    snapshot, or large and not a multiple of the piece) is reported, not read.
    """
    chunk, n = store.chunk_elems, store.n
    refused = _refused_chunks(chunk, n, store.piece)
    if refused is not None:
        report.add("error", where, refused)
        return 1
    starts = range(0, n, chunk)
    bad = _Limited(report, where)
    read = _chunk_reader(store, chunk, n)
    bar = _bar(progress, len(store) * len(starts), f"verify {where}")
    try:
        for r in range(len(store)):
            for a in starts:
                try:
                    read(r, a, min(a + chunk, n))
                except CorruptSnapshotError as e:
                    bad.add(str(e))
                report.checked["chunks"] += 1
                if bar is not None:
                    bar.update(1)
            try:
                store.buffer_bytes(r)
            except CorruptSnapshotError as e:
                bad.add(str(e))
    finally:
        if bar is not None:
            bar.close()
    bad.close("damaged chunks")
    return bad.count


def _refused_chunks(chunk: int, n: int, piece: int) -> str | None:
    """Why chunks of this shape are not read (None: they are). Both shapes below are ones trajstore
    never writes, and reading them would size a buffer from the claim."""
    if n and chunk > n:
        return (f"its params chunks claim {chunk} values, more than a snapshot's n = {n} (trajstore never writes "
                "such chunks: damaged metadata); its chunks were not read")
    if chunk > SCAN_VALUES and piece > SCAN_VALUES:
        return (f"its params chunks of {chunk} values are larger than {SCAN_VALUES} and not a multiple of {PIECE} "
                "(trajstore never writes such chunks: damaged metadata); its chunks were not read")
    return None


def _chunk_reader(store: TrajectoryStore, chunk: int, n: int) -> Callable[[int, int, int], None]:
    """``read(r, a, b)``: read parameters ``[a, b)`` (one chunk) of snapshot ``r``, raising
    CorruptSnapshotError for damage, holding at most SCAN_VALUES values (two pieces when streamed)."""
    if chunk <= SCAN_VALUES:
        out = np.empty((1, min(chunk, n)), dtype=np.float32)

        def whole(r: int, a: int, b: int) -> None:
            store.read_rows(slice(r, r + 1), slice(a, b), out=out[:, :b - a])

        return whole
    buffers = tuple(np.empty((1, store.piece), dtype=store.piece_buffers_dtype) for _ in range(2))

    def streamed(r: int, a: int, b: int) -> None:
        for c, values in store.iter_pieces(slice(r, r + 1), a, b, buffers):
            # iter_pieces checks every byte's checksum but not finiteness (read_rows does).
            if not np.isfinite(values.sum(dtype=np.float64)):
                raise CorruptSnapshotError(f"snapshot {r} of trajectory {store.name!r}: parameters "
                                           f"[{c}, {c + values.shape[1]}) read as non-finite (appends never commit "
                                           "NaN or Inf)")

    return streamed


def _check_records(store: TrajectoryStore, report: VerifyReport, where: str) -> None:
    for i in range(len(store)):
        try:
            store.rng_state(i)
        except ValueError as e:  # not base64
            report.add("error", where, f"snapshot {i}: its recorded RNG state does not decode ({e})")


def _uncommitted_rows(zstore: zarr.abc.store.Store, store: TrajectoryStore, report: VerifyReport, where: str) -> None:
    """Rows holding chunks that no valid commit names (an interrupted append, or the in-flight
    writes of a writer that lost the trajectory), and what the commit log could not use."""
    named = {c.row for c in store.log.commits}

    async def rows() -> list[str]:
        return [r async for r in zstore.list_dir(f"{store.prefix}/params/c")]

    try:
        found = sorted(int(r) for r in _backend.sync(rows()) if r.isdigit())
    except FileNotFoundError:
        found = []
    stray = [r for r in found if r not in named]
    if stray:
        listed = ", ".join(map(str, stray[:MAX_LISTED])) + (" ..." if len(stray) > MAX_LISTED else "")
        report.add("warning", where, f"rows {listed} of params hold no committed snapshot (an interrupted append, "
                   "or a writer that lost the trajectory; the space is reused or can be freed)")
    log = store.log
    fence = _log.fences(log.generations)
    # Valid by the fencing rule but past a gap: a damaged or missing commit hides snapshots after it.
    unreachable = [c for c in log.fenced if c.generation in fence and c.index < fence[c.generation]
                   and c.index > len(store)]
    fenced = [c for c in log.fenced if c not in unreachable]
    if fenced:
        report.add("warning", where, f"{len(fenced)} commit documents do not count (fenced off by a later writer): "
                   + ", ".join(f"snapshot {c.index} by writer {c.seq}" for c in fenced[:MAX_LISTED]))
    if unreachable:
        report.add("error", where, f"snapshot {len(store)} has no readable commit, so {len(unreachable)} later "
                   f"commits (snapshots {min(c.index for c in unreachable)}..{max(c.index for c in unreachable)}) "
                   "cannot be reached by readers; their data may be recoverable")
    for problem in log.problems[:MAX_LISTED]:
        report.add("error" if unreachable else "warning", where, f"commit log: {problem}")


def _check_gram_cache(store: TrajectoryStore, report: VerifyReport, where: str) -> None:
    from .dldr import GRAM_PASS, _read_cached_gram

    zstore = store.zarr_store
    if _exists_group(zstore, f"{store.prefix}/gram"):
        try:
            cached = _read_cached_gram(store, zstore)
        except StoreUnreachableError:
            raise
        except Exception as e:
            cached = None
            report.add("warning", where, f"the cached Gram matrix does not decode ({type(e).__name__}: {e}); "
                       "the next basis computation recomputes it")
        else:
            if cached is None:
                report.add("warning", where, "the cached Gram matrix is stale, damaged or from an older trajstore; "
                           "the next basis computation recomputes it")
        if cached is not None and not np.array_equal(cached, cached.T):
            report.add("error", where, "the cached Gram matrix is not symmetric")
    if _exists_group(zstore, f"{store.prefix}/{GRAM_PASS}"):
        report.add("warning", where, "block checkpoints of an interrupted Gram pass (the next run resumes from them)")


def _exists_group(zstore: zarr.abc.store.Store, path: str) -> bool:
    return bool(_backend.sync(zstore.exists(f"{path}/zarr.json")))


# ------------------------------------------------------------------ bases

def _basis_names(zstore: zarr.abc.store.Store, report: VerifyReport) -> list[str]:
    try:
        return list_bases(zstore)
    except StoreUnreachableError:
        raise
    except Exception as e:
        report.add("error", BASES_ROOT, f"cannot list the bases ({type(e).__name__}: {e})")
        return []


def _check_basis(zstore: zarr.abc.store.Store, name: str, stores: dict[str, TrajectoryStore],
                 report: VerifyReport, sources: bool, progress: bool) -> None:
    where = f"basis {name!r}"
    try:
        group = _backend.open_group(zstore, basis_path(name), "r")
        meta = validate_meta(group.attrs.get("trajstore"), name)
    except StoreUnreachableError:
        raise
    except TrajstoreError as e:
        report.add("error", where, str(e))
        return
    except Exception as e:
        report.add("error", where, f"cannot be opened ({type(e).__name__}: {e})")
        return
    if meta.get("complete") is not True:
        report.add("warning", where, "incomplete: its computation was interrupted (computing it again resumes it)")
        return
    try:
        basis = open_basis(zstore, name)
    except StoreUnreachableError:
        raise
    except TrajstoreError as e:
        report.add("error", where, str(e))
        return
    report.checked["bases"] += 1
    # U and the mean live in the folder the basis' metadata names (its version folder).
    if _scan_basis(_backend.open_group(zstore, basis.path or basis_path(name), "r"), basis, report, where, progress):
        return
    _check_spectrum(basis, report, where)
    if not sources:
        return
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    store = stores.get(str(source.get("trajectory", meta.get("trajectory"))))
    if store is None:
        report.add("error", where, f"its source trajectory {meta.get('trajectory')!r} is missing or damaged; "
                   "the basis cannot be checked against it")
        return
    _check_source(store, basis, meta, report, where, progress)


def _scan_basis(group: zarr.Group, basis: Basis, report: VerifyReport, where: str, progress: bool) -> int:
    """Read every chunk of U and of the mean; returns how many were damaged or missing."""
    bad = _Limited(report, where)
    rows = group["U"].chunks[0]
    bar = _bar(progress, -(-basis.n // rows), f"verify {where}")
    for a in range(0, basis.n, rows):
        b = min(a + rows, basis.n)
        for key in ("U", "mean"):
            try:
                values = np.asarray(group[key][a:b])
            except StoreUnreachableError:
                raise
            except Exception as e:
                bad.add(f"{key} rows [{a}, {b}) failed to decode ({type(e).__name__}: {e})")
                continue
            if not np.isfinite(values.sum(dtype=np.float64)):
                bad.add(f"{key} rows [{a}, {b}) read as non-finite (a missing chunk)")
            report.checked["basis_chunks"] += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    bad.close("damaged chunks")
    return bad.count


def _check_spectrum(basis: Basis, report: VerifyReport, where: str) -> None:
    gram = basis.centred_gram
    if not np.all(np.isfinite(gram)) or not np.allclose(gram, gram.T, rtol=0, atol=1e-12 * np.abs(gram).max()):
        report.add("error", where, "its stored centred Gram matrix is not finite and symmetric")
        return
    sigma = _linalg.top_eigenpairs(gram, basis.d)[0]
    err = float(np.abs(sigma - basis.singular_values).max() / max(sigma[0], np.finfo(float).tiny))
    if err > SINGULAR_VALUE_TOL:
        report.add("error", where, f"its recorded singular values differ from its stored Gram matrix's "
                   f"(relative {err:.1e} > {SINGULAR_VALUE_TOL:.0e})")


def _source_task(piece: np.ndarray, c: int, u: zarr.Array, mean: zarr.Array, scratch: Any = None) -> np.ndarray:
    """[fingerprints (t), |mean_s - mean|^2, |mean|^2, U^T U (d^2), U^T (W - mean) (d t)] of one piece."""
    m = piece.shape[1]
    rows = np.asarray(u[c:c + m], dtype=np.float64)
    stored_mean = np.asarray(mean[c:c + m], dtype=np.float64)
    own_mean = piece.mean(axis=0, dtype=np.float64)
    centred = piece - own_mean  # float64 (t, m)
    diff = float(np.square(stored_mean - own_mean).sum())
    return np.concatenate([piece_fingerprints(piece, c), [diff, float(np.square(own_mean).sum())],
                           (rows.T @ rows).ravel(), (rows.T @ centred.T).ravel()])


def _check_source(store: TrajectoryStore, basis: Basis, meta: dict[str, Any], report: VerifyReport, where: str,
                  progress: bool) -> None:
    from ._dask import block_tasks
    from .dldr import DEFAULT_BLOCK_BYTES, _compute_ordered, _sum_in_order

    t0, t1, d, t = basis.start, basis.stop, basis.d, basis.t
    if t1 > len(store) or basis.n != store.n:
        report.add("error", where, f"its window [{t0}, {t1}) of n = {basis.n} is not in trajectory {store.name!r} "
                   f"(t = {len(store)}, n = {store.n})")
        return
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if source.get("layout") not in (None, store.layout.fingerprint):
        report.add("error", where, "its source's parameter layout differs from the trajectory's now")
    group = _backend.open_group(store.zarr_store, basis.path or basis_path(basis.name or ""), "r")
    tasks = block_tasks(store, t0, t1, DEFAULT_BLOCK_BYTES, _source_task, group["U"], group["mean"])
    try:
        total = _sum_in_order(_compute_ordered(tasks, None, None, f"verify {where} against its source" if progress else None))
    except CorruptSnapshotError as e:
        report.add("error", where, f"its source cannot be read: {e}")
        return
    fingerprints, (diff, norm) = total[:t], total[t:t + 2]
    utu = total[t + 2:t + 2 + d * d].reshape(d, d)
    coords = total[t + 2 + d * d:].reshape(d, t)
    recorded = meta.get("source_fingerprints")
    if isinstance(recorded, list) and len(recorded) == t:
        changed = [t0 + j for j in range(t) if recorded[j] != int(fingerprints[j])]
        if changed:
            listed = ", ".join(map(str, changed[:MAX_LISTED])) + (" ..." if len(changed) > MAX_LISTED else "")
            report.add("error", where, f"snapshots {listed} of trajectory {store.name!r} changed since the basis "
                       "was computed from them (content fingerprints differ)")
    else:
        report.add("warning", where, "no content fingerprints recorded (a basis from an older trajstore); "
                   "checked against its source by its spectrum only")
    ortho = float(np.abs(utu - np.eye(d)).max())
    if ortho > max(ORTHONORMALITY_TOL, 10 * basis.orthonormality):
        report.add("error", where, f"max |U^T U - I| = {ortho:.1e} (recorded {basis.orthonormality:.1e}): "
                   "U is not orthonormal")
    mean_err = float(np.sqrt(diff / max(norm, np.finfo(float).tiny)))
    if mean_err > MEAN_TOL:
        report.add("error", where, f"its stored mean differs from the mean of its window by {mean_err:.1e} "
                   f"(relative, > {MEAN_TOL:.0e})")
    sigma2 = basis.singular_values**2
    spectrum_err = float(np.abs(coords @ coords.T - np.diag(sigma2)).max() / max(sigma2[0], np.finfo(float).tiny))
    if spectrum_err > SPECTRUM_TOL:
        report.add("error", where, f"U does not hold its window's principal directions: "
                   f"max |U^T Wc Wc^T U - Sigma^2| / sigma_1^2 = {spectrum_err:.1e} (> {SPECTRUM_TOL:.0e})")


# ------------------------------------------------------------------ left-overs

def _stray_files(zstore: zarr.abc.store.Store, report: VerifyReport) -> None:
    """Temporary files of writes a killed process never renamed (local folders only)."""
    root = _backend.local_root(zstore)
    if root is None:
        return
    count, nbytes = 0, 0
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".partial"):
                count += 1
                nbytes += os.path.getsize(os.path.join(folder, f))
    if count:
        report.add("warning", report.store, f"{count} temporary files ({nbytes} bytes) left by killed writers "
                   "(`*.partial`; safe to delete while no writer runs)")


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from ._progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="chunk")


def format_report(report: VerifyReport) -> str:
    """The report as text: what was checked, then every finding, then the verdict."""
    c = report.checked
    lines = [f"{report.store}: {c['trajectories']} trajectories, {c['snapshots']} snapshots, {c['chunks']} chunks, "
             f"{c['bases']} bases ({c['basis_chunks']} chunks) checked"]
    lines += [str(f) for f in report.findings]
    verdict = "OK" if report.ok else f"DAMAGED: {len(report.errors)} errors"
    lines.append(f"{verdict}, {len(report.warnings)} warnings")
    return "\n".join(lines)
