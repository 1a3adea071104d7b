"""The Zarr v3 ``dimension_names`` of every array trajstore writes, in one place.

They make the store readable by tools that name axes, xarray first among them
(``xr.open_zarr`` refuses a Zarr v3 array without them)::

    trajectories/NAME/params      (row, parameter)          capacity rows, see below
    trajectories/NAME/buffers     (row, buffer_byte)        uint8, the persistent buffers' bytes
    trajectories/NAME/gram/g{t}   (snapshot, snapshot_2)    the cached Gram matrix of snapshots [0, t)
    bases/NAME/v-<uuid>/U         (parameter, direction)
    bases/NAME/v-<uuid>/mean      (parameter,)
    bases/NAME/v-<uuid>/gram      (snapshot, snapshot_2)    positions in the basis' window [start, stop)
    .../gram-pass/b{k}, .../pass/b{k}
                                  (partial_0, ...)          a block checkpoint's partial (transient)

The first axis of ``params`` and ``buffers`` is the *physical row*, not the snapshot index: the
arrays are grown by doubling, so they hold rows past the committed ones, and snapshot ``i`` lives
in row ``store.log.commits[i].row`` (``i`` itself unless a writer took over from one that may
still be running, or a session had several writers). :func:`trajstore.xarray.open_trajectory`
gives the committed snapshots with a ``snapshot`` axis. A square matrix has two distinct names:
xarray refuses an array that repeats a dimension.

Stores written before trajstore named dimensions have none; they are read exactly as before (the
names are never checked, and Zarr refuses names whose count differs from the array's rank).
"""

from __future__ import annotations

__all__ = ["BUFFERS_DIMS", "BUFFER_BYTE", "DIRECTION", "GRAM_DIMS", "MEAN_DIMS", "PARAMETER", "PARAMS_DIMS", "ROW",
           "SNAPSHOT", "U_DIMS", "partial_dims"]

ROW = "row"
PARAMETER = "parameter"
BUFFER_BYTE = "buffer_byte"
DIRECTION = "direction"
SNAPSHOT = "snapshot"

PARAMS_DIMS = (ROW, PARAMETER)
BUFFERS_DIMS = (ROW, BUFFER_BYTE)
GRAM_DIMS = (SNAPSHOT, f"{SNAPSHOT}_2")
U_DIMS = (PARAMETER, DIRECTION)
MEAN_DIMS = (PARAMETER,)


def partial_dims(ndim: int) -> tuple[str, ...]:
    """Names for a block checkpoint's partial of ``ndim`` axes (a flat or square float64 sum)."""
    return tuple(f"partial_{i}" for i in range(ndim))
