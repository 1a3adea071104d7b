"""A DLDR basis: the top-d directions of a window of a trajectory, with what they were made from.

A basis lives either in memory (from :func:`trajstore.dldr` on an array) or in a store under
``bases/NAME``::

    bases/NAME/zarr.json   attrs {"trajstore": {"kind": "basis", "complete", d, n, window, sigma, ...}}
    bases/NAME/U           (n, d) float32, row chunks, bytes + crc32c
    bases/NAME/mean        (n,) float32, the same row chunks
    bases/NAME/gram        (t, t) float64, the centred Gram matrix of the window

The group is marked complete only after every row of U and the mean are written and their
orthonormality is measured, so an interrupted computation is never mistaken for a basis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from . import _backend, _linalg
from ._records import MAX_SNAPSHOTS
from .errors import CorruptSnapshotError, FormatVersionError, InvalidStoreError, TrajectoryNotFoundError
from .layout import MAX_ELEMENTS

__all__ = ["Basis", "BASES_ROOT", "list_bases", "open_basis"]

BASES_ROOT = "bases"
FORMAT_VERSION = 1


class Basis:
    """Top-d principal directions of the centred snapshots of a window ``[start, stop)``.

    Attributes
    ----------
    d, n : int
        Number of directions and of parameters.
    singular_values : ndarray of shape (d,)
        Descending.
    explained_variance_ratio : ndarray of shape (d,)
        ``sigma_i^2 / sum of all squared singular values`` of the window.
    trajectory : str or None
        Source trajectory (None for an in-memory array).
    start, stop : int
        The window of snapshots, ``stop`` exclusive.
    orthonormality : float
        ``max |U^T U - I|`` of the stored (float32) basis, measured when it was written.
    name : str or None
        Its name in the store.
    """

    def __init__(self, meta: Mapping[str, Any], centred_gram: np.ndarray, *,
                 u: np.ndarray | zarr.Array, mean: np.ndarray | zarr.Array) -> None:
        self._meta = dict(meta)
        self._gram = centred_gram
        self._u = u
        self._mean = mean
        self.d: int = int(meta["d"])
        self.n: int = int(meta["n"])
        self.singular_values = np.asarray(meta["singular_values"], dtype=np.float64)
        self.explained_variance_ratio = np.asarray(meta["explained_variance_ratio"], dtype=np.float64)
        self.trajectory: str | None = meta.get("trajectory")
        self.start: int = int(meta["start"])
        self.stop: int = int(meta["stop"])
        self.orthonormality: float = float(meta["orthonormality"])
        self.name: str | None = meta.get("name")

    def __repr__(self) -> str:
        where = f"trajectory={self.trajectory!r}, " if self.trajectory else ""
        return (f"Basis(name={self.name!r}, {where}window=[{self.start}, {self.stop}), d={self.d}, n={self.n}, "
                f"explained={self.explained_variance_ratio.sum():.4f}, max|UᵀU-I|={self.orthonormality:.1e})")

    @property
    def t(self) -> int:
        return self.stop - self.start

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._u.dtype)

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` of U, shape (b - a, d); reads only the chunks that hold them."""
        return self._read(self._u, (slice(a, b), slice(None)), "U")

    @property
    def mean(self) -> np.ndarray:
        """The mean snapshot of the window, shape (n,)."""
        return self._read(self._mean, (slice(None),), "mean")

    def to_numpy(self) -> np.ndarray:
        """The whole basis U, shape (n, d). Holds n * d values in memory: for small n."""
        return self.rows(0, self.n)

    def on(self, device: Any = "cpu", *, dtype: Any = None, mode: str = "auto") -> Any:
        """This basis on a torch device, for projecting gradients and lifting steps.

        See :class:`trajstore.projection.DeviceBasis` for the modes (``auto``, ``resident``,
        ``mmap``, ``stream``).
        """
        import torch

        from .projection import DeviceBasis

        return DeviceBasis(self, device, dtype=dtype or torch.float32, mode=mode)  # type: ignore[arg-type]

    def coordinates(self) -> np.ndarray:
        """Coordinates ``U^T (w_j - mean)`` of the window's snapshots, shape (t, d): ``V Sigma``."""
        sigma, v, _, _ = _linalg.top_eigenpairs(self._gram, self.d)
        return v * sigma

    def residuals(self) -> np.ndarray:
        """Relative projection error of each centred snapshot, shape (t,); see ``tail_residuals``."""
        return _linalg.tail_residuals(self._gram, self.d)

    @property
    def centred_gram(self) -> np.ndarray:
        """The centred Gram matrix ``J W^T W J`` of the window, shape (t, t), float64."""
        return self._gram.copy()

    def _read(self, array: np.ndarray | zarr.Array, key: tuple[slice, ...], what: str) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array[key]
        try:
            values = np.asarray(array[key])
        except Exception as e:
            raise CorruptSnapshotError(f"basis {self.name!r}: {what} failed to decode ({type(e).__name__}: {e})") from e
        # A missing chunk reads as the fill value, NaN; a basis is written finite, so this is damage.
        if not np.isfinite(values.sum(dtype=np.float64)):
            raise CorruptSnapshotError(f"basis {self.name!r}: {what} {key[0].start}:{key[0].stop} read as non-finite "
                                       "(a missing or damaged chunk)")
        return values


def basis_path(name: str) -> str:
    return f"{BASES_ROOT}/{name}"


def list_bases(zstore: Store) -> list[str]:
    """Names of the bases in the store, complete or not (a damaged one is listed, and refused by
    :func:`open_basis`)."""
    return _backend.child_nodes(zstore, BASES_ROOT)


def open_basis(url: _backend.StoreLike, name: str, *, storage_options: dict[str, Any] | None = None) -> Basis:
    """Open a complete basis stored under ``bases/NAME``."""
    zstore = _backend.open_zarr_store(url, read_only=True, storage_options=storage_options)
    if name not in list_bases(zstore):
        raise TrajectoryNotFoundError(f"{_backend.describe(url)} holds no basis {name!r} (it has {list_bases(zstore)})")
    group = _backend.open_group(zstore, basis_path(name), "r")
    meta = validate_meta(group.attrs.get("trajstore"), name)
    if not meta.get("complete"):
        raise InvalidStoreError(f"basis {name!r} is incomplete (its computation was interrupted); compute it again")
    arrays = []
    for key in ("U", "mean", "gram"):
        if not _backend.sync(zstore.exists(f"{basis_path(name)}/{key}/zarr.json")):
            raise InvalidStoreError(f"basis {name!r}: its array {key} is missing")
        with _backend.metadata_errors(f"basis {name!r}: {key}/zarr.json"):
            arrays.append(group[key])
    u, mean, gram = arrays
    if not all(isinstance(a, zarr.Array) for a in arrays):
        raise InvalidStoreError(f"basis {name!r}: U, mean and gram must be arrays")
    t = meta["stop"] - meta["start"]
    # Shapes and dtypes are checked before the Gram matrix is read: it is allocated from its shape.
    if u.shape != (meta["n"], meta["d"]) or mean.shape != (meta["n"],) or gram.shape != (t, t):
        raise InvalidStoreError(f"basis {name!r}: arrays {u.shape}, {mean.shape}, {gram.shape} do not match n, d, t")
    if (u.dtype, mean.dtype, gram.dtype) != (np.float32, np.float32, np.float64):
        raise InvalidStoreError(f"basis {name!r}: arrays of dtypes {u.dtype}, {mean.dtype}, {gram.dtype}, "
                                "expected float32, float32, float64")
    try:
        values = np.asarray(gram[...])
    except Exception as e:  # the codec pipeline raises ValueError/RuntimeError/... on bad bytes
        raise CorruptSnapshotError(f"basis {name!r}: gram failed to decode ({type(e).__name__}: {e})") from e
    if not np.isfinite(values).all():
        raise CorruptSnapshotError(f"basis {name!r}: its Gram matrix reads as non-finite (a missing chunk)")
    return Basis(meta, values, u=u, mean=mean)


def _finite(value: object) -> bool:
    """A JSON number that converts to a finite float (bools, 400-digit integers and NaN do not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def validate_meta(doc: object, name: str) -> dict[str, Any]:
    if not isinstance(doc, Mapping) or doc.get("kind") != "basis":
        raise InvalidStoreError(f"basis {name!r}: missing or wrong 'trajstore' attribute")
    if doc.get("format_version") != FORMAT_VERSION:
        raise FormatVersionError(f"basis {name!r} has format version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    meta = dict(doc)
    limits = {"d": MAX_ELEMENTS, "n": MAX_ELEMENTS, "start": MAX_SNAPSHOTS, "stop": MAX_SNAPSHOTS}
    for key, limit in limits.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise InvalidStoreError(f"basis {name!r}: {key} must be an integer in [0, {limit}], got {value!r:.100}")
    if meta["stop"] <= meta["start"] or not 1 <= meta["d"] <= meta["n"]:
        raise InvalidStoreError(f"basis {name!r}: empty window [{meta['start']}, {meta['stop']}) or d = {meta['d']} "
                                f"outside [1, n = {meta['n']}]")
    for key in ("singular_values", "explained_variance_ratio"):
        value = meta.get(key)
        if not isinstance(value, list) or len(value) != meta["d"] or not all(_finite(v) for v in value):
            raise InvalidStoreError(f"basis {name!r}: {key} must be a list of {meta['d']} finite numbers, "
                                    f"got {value!r:.100}")
    value = meta.get("orthonormality")
    if not (_finite(value) or value == float("inf")):  # inf: written while the basis is incomplete
        raise InvalidStoreError(f"basis {name!r}: orthonormality must be a number, got {value!r:.100}")
    return meta
