"""xarray views of a store: a trajectory's committed snapshots and a basis, as lazy Datasets.

Every array trajstore writes names its dimensions (see :mod:`trajstore._dims`), so
``xr.open_zarr(url, group="trajectories/NAME", consolidated=False)`` and
``xr.open_zarr(url, group=basis.path, consolidated=False)`` open a store as it is. What they show
is the arrays as stored: ``params`` and ``buffers`` by *physical row*, capacity rows past the
committed snapshots included (their values are the NaN fill), and no per-snapshot metadata. The
functions here give the view a reader wants, from what only the commit log and the metadata know:
the committed snapshots in index order, with ``step``, ``epoch``, ``lr`` and ``time`` as
coordinates. They also open stores written before dimensions were named, which ``xr.open_zarr``
refuses.

xarray is not a dependency of trajstore: it is imported when one of these functions is called.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from . import _backend
from ._backend import StoreLike
from ._dims import BUFFER_BYTE, DIRECTION, GRAM_DIMS, PARAMETER, SNAPSHOT
from ._dtypes import storage_dtype
from ._records import SnapshotRecord
from .basis import open_basis as _open_basis
from .store import TrajectoryStore

if TYPE_CHECKING:
    import xarray

__all__ = ["open_basis", "open_trajectory"]


def _xarray() -> Any:
    try:
        import xarray
    except ImportError as e:
        raise ImportError("trajstore.xarray needs xarray (pip install xarray)") from e
    return xarray


def _column(records: list[SnapshotRecord], key: str, *, integer: bool = False) -> np.ndarray:
    """One record field over the snapshots: int64 when ``integer`` and every snapshot has it,
    else float64 with NaN where a snapshot has none."""
    values = [r.get(key) for r in records]
    if integer and all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _lazy(zstore: zarr.abc.store.Store, path: str, chunks: Any, rows: np.ndarray | None = None) -> Any:
    """The array at ``path`` as a dask array of ``chunks`` (None: its own), of ``rows`` only if given."""
    import dask.array as da

    array = zarr.open_array(zstore, path=path, mode="r")
    lazy = da.from_array(array, chunks=array.chunks if chunks is None else chunks, asarray=True,
                         name=f"trajstore-{path}-{uuid.uuid4().hex}")
    if rows is None:
        return lazy
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return lazy[int(rows[0]):int(rows[0]) + len(rows)]  # a slice: no gather in the graph
    return lazy[rows]


def open_trajectory(url: StoreLike | TrajectoryStore, trajectory: str | None = None, *, chunks: Any = None,
                    storage_options: dict[str, Any] | None = None) -> xarray.Dataset:
    """The committed snapshots of a trajectory as a lazy (dask-backed) xarray Dataset.

    Parameters
    ----------
    url : str, path, zarr Store or TrajectoryStore
        The store, as for :meth:`TrajectoryStore.open` (opened read-only), or an open trajectory
        (its store is opened again, read-only: a writer's own handle stays as it is).
    trajectory : str, optional
        Which trajectory; may be left out as for :meth:`TrajectoryStore.open`.
    chunks : optional
        Dask chunks of the arrays (default: the store's, one row by one chunk of parameters).
    storage_options : dict, optional
        Options of the URL's fsspec file system.

    Returns
    -------
    xarray.Dataset
        ``params`` of dims (snapshot, parameter), float32 of shape (t, n) whatever the storage
        dtype (float16 and bfloat16 widened exactly, as :meth:`TrajectoryStore.read_rows` does);
        ``buffers`` of dims (snapshot, buffer_byte), uint8, the persistent buffers' bytes in
        layout order (absent for a model without buffers). Coordinates over ``snapshot``: the
        index ``0 .. t-1``, the physical ``row`` that holds it, ``step`` (int64, or float64 with
        NaN when some snapshot has none), ``epoch``, ``lr`` and ``time`` (float64, NaN where
        absent). Attributes: ``trajectory``, ``store``, ``storage_dtype``, ``n``.

    Notes
    -----
    The snapshots are those committed when this is called (the commit log is read once). Reads go
    through Zarr's codecs, so each chunk's crc32c is checked, but not through trajstore's check of
    each chunk against its commit (a valid chunk of another row copied into place is not caught):
    use :class:`TrajectoryStore` reads, or ``trajstore verify``, where that matters. I/O on
    opening: the commit log and the arrays' metadata; values are read when computed.

    See Also
    --------
    open_basis : a basis as a Dataset.
    """
    xr = _xarray()
    where = None
    if isinstance(url, TrajectoryStore):  # read afresh: a writer's own view of the log is not kept in .log
        if trajectory is not None and trajectory != url.name:
            raise ValueError(f"trajectory={trajectory!r} given with an open TrajectoryStore of {url.name!r}")
        url, trajectory, where = url.zarr_store, url.name, url.url
    store = TrajectoryStore.open(url, "r", trajectory=trajectory, storage_options=storage_options)
    zstore, prefix = store.zarr_store, store.prefix
    rows = np.asarray([c.row for c in store.log.commits], dtype=np.int64)
    records = store.records
    dtype = storage_dtype(store.storage_dtype)
    attrs = {"trajectory": store.name, "store": where or store.url, "storage_dtype": dtype.name, "n": store.n}
    params = _lazy(zstore, f"{prefix}/params", chunks, rows)
    if dtype.numpy_dtype != np.float32:
        params = params.map_blocks(dtype.decode, dtype=np.float32)
    data_vars = {"params": ((SNAPSHOT, PARAMETER), params)}
    if store.layout.buffer_nbytes:
        data_vars["buffers"] = ((SNAPSHOT, BUFFER_BYTE), _lazy(zstore, f"{prefix}/buffers", chunks, rows))
    coords = {SNAPSHOT: np.arange(len(rows), dtype=np.int64), "row": (SNAPSHOT, rows),
              "step": (SNAPSHOT, _column(records, "step", integer=True)),
              **{key: (SNAPSHOT, _column(records, key)) for key in ("epoch", "lr", "time")}}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def open_basis(url: StoreLike, name: str, *, chunks: Any = None,
               storage_options: dict[str, Any] | None = None) -> xarray.Dataset:
    """A complete basis of a store as a lazy (dask-backed) xarray Dataset.

    Parameters
    ----------
    url : str, path or zarr Store
        The store (opened read-only).
    name : str
        The basis' name (as for :func:`trajstore.open_basis`, which checks it first).
    chunks : optional
        Dask chunks of ``U`` and ``mean`` (default: the store's row chunks).
    storage_options : dict, optional
        Options of the URL's fsspec file system.

    Returns
    -------
    xarray.Dataset
        ``U`` of dims (parameter, direction), float32 of shape (n, d); ``mean`` (parameter,);
        ``gram`` (snapshot, snapshot_2), the centred Gram matrix of the window, float64 of shape
        (t, t); ``singular_values`` and ``explained_variance_ratio`` (direction,). Coordinates:
        ``direction`` ``0 .. d-1``, and ``snapshot`` and ``snapshot_2`` the window's snapshot
        indices ``start .. stop-1``. Attributes: ``name``, ``trajectory``, ``start``, ``stop``,
        ``orthonormality``, ``path`` (the version folder the arrays are read from).

    Notes
    -----
    The arrays are those of the computation stored when this is called; a recomputation of the
    same name deletes them afterwards (reads then fail), as for :class:`trajstore.Basis`.

    See Also
    --------
    open_trajectory : a trajectory's snapshots as a Dataset.
    """
    xr = _xarray()
    zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
    basis = _open_basis(zstore, name)  # validates the metadata and the arrays' shapes and dtypes
    path = basis.path
    assert path is not None  # a stored basis
    window = np.arange(basis.start, basis.stop, dtype=np.int64)
    data_vars = {"U": ((PARAMETER, DIRECTION), _lazy(zstore, f"{path}/U", chunks)),
                 "mean": ((PARAMETER,), _lazy(zstore, f"{path}/mean", chunks[:1] if isinstance(chunks, tuple)
                                               else chunks)),
                 "gram": (GRAM_DIMS, basis.centred_gram),
                 "singular_values": ((DIRECTION,), basis.singular_values),
                 "explained_variance_ratio": ((DIRECTION,), basis.explained_variance_ratio)}
    coords = {DIRECTION: np.arange(basis.d, dtype=np.int64), GRAM_DIMS[0]: window, GRAM_DIMS[1]: window}
    attrs = {"name": basis.name, "trajectory": basis.trajectory, "start": basis.start, "stop": basis.stop,
             "orthonormality": basis.orthonormality, "path": path}
    return xr.Dataset(data_vars, coords=coords, attrs={k: v for k, v in attrs.items() if v is not None})
