"""Content fingerprints of snapshots, taken in a pass that reads them anyway.

The fingerprint of snapshot ``j`` over a set of pieces is ``sum_c crc32c(bytes of w_j[c:c + m],
seed c mod 2**32)``: an integer below 2**53 for any store (at most 2**21 pieces per snapshot), held
exactly in float64, so block partials add up to the same value in any order, whatever the block
size. The seed ties each piece's checksum to its place, so moving values between pieces changes it
too. A basis records the fingerprints of its window when it is computed; ``trajstore verify``
recomputes them to tell whether the snapshots it was made from have changed since.
"""

from __future__ import annotations

import numpy as np

__all__ = ["piece_fingerprints"]


def piece_fingerprints(piece: np.ndarray, c: int) -> np.ndarray:
    """Per-row checksums of a (t, m) float32 piece starting at parameter ``c``: float64 (t,)."""
    import crc32c

    seed = c % 2**32
    out = np.empty(piece.shape[0], dtype=np.float64)
    for j, row in enumerate(piece):
        out[j] = crc32c.crc32c(memoryview(np.ascontiguousarray(row, dtype=np.float32)).cast("B"), seed)
    return out
