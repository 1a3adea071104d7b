"""The numerics of DLDR on arrays: no files, no dask, no torch.

Notation (paper, Algorithm 1): W is the n x t matrix whose columns are the sampled snapshots of a
window; here blocks arrive as (t, b) row-major slices of W^T (t snapshots of b parameters).
Every function works on one block, so the in-memory computation is the streaming one with one
block, and results do not depend on the block size beyond float64 summation order.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BASIS_SUB_BLOCK", "SUB_BLOCK", "basis_block", "centre_gram", "gram_block", "top_eigenpairs",
           "tail_residuals"]

# Columns converted to float64 at a time inside a block: bounds the float64 working set to
# t * SUB_BLOCK * 8 bytes (53 MB at t = 101) whatever the block size.
SUB_BLOCK = 1 << 16
# The basis pass's sub-block: its product (d + 1 rows of output) is memory-bound, and a float64
# sub-block of this width stays in cache between the widening and the product; per 65,536
# columns, one core: 218 ms at t = 801 and 17 ms at t = 51, against 237 and 24 ms with SUB_BLOCK
# (the Gram product, t rows of output, is fastest with SUB_BLOCK).
BASIS_SUB_BLOCK = 1 << 12


def gram_block(block: np.ndarray, ref_row: int = 0, first: int = 0, work: np.ndarray | None = None) -> np.ndarray:
    """Partial Gram matrix ``(X - x_ref)(X - x_ref)[first:]^T`` of one (t, b) block, float64 (t, t - first).

    The reference snapshot is subtracted in float64 before the product: the centred Gram matrix
    is shift-invariant, and working on differences avoids the cancellation that made float32
    products lose 2% on the small singular values (shared/MEASURED.md).

    ``first > 0`` computes only the columns of snapshots ``first..t-1``: what extending a cached
    Gram matrix by newly appended snapshots needs. ``work``, a reusable float64 buffer of shape
    (t, SUB_BLOCK), avoids touching fresh memory per call (slow on this VM).
    """
    t, b = block.shape
    work = _work(work, t)
    out = np.zeros((t, t - first), dtype=np.float64)
    for a in range(0, b, SUB_BLOCK):
        x = _differences(block, a, min(SUB_BLOCK, b - a), ref_row, work)
        out += x @ x[first:].T
    return out


def _differences(block: np.ndarray, a: int, m: int, ref_row: int, work: np.ndarray) -> np.ndarray:
    """``block[:, a:a + m] - block[ref_row, a:a + m]`` in float64, in ``work`` (exact for snapshots
    within a factor 2**29 of each other). Widened first, then subtracted in float64: the values of
    the mixed-type subtract this replaces, bit for bit (it widens and subtracts as well), in two
    thirds of its time (its casting loop is slow: at t = 801 per 65,536 columns, 116 ms against 172)."""
    x = work[:, :m]
    np.copyto(x, block[:, a:a + m])
    ref = x[ref_row].copy()
    np.subtract(x, ref, out=x)
    return x


def _work(work: np.ndarray | None, t: int, width: int = SUB_BLOCK) -> np.ndarray:
    if work is None or work.shape[0] != t or work.shape[1] < width or work.dtype != np.float64:
        return np.empty((t, width), dtype=np.float64)
    return work


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """``J G J`` with ``J = I - 11^T / t``: the Gram matrix of the mean-centred snapshots."""
    row_mean = gram.mean(axis=0)
    centred = gram - row_mean[None, :] - row_mean[:, None] + row_mean.mean()
    return (centred + centred.T) / 2  # exact symmetry for eigh


def top_eigenpairs(centred: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-d singular values and right singular vectors of the centred snapshots.

    Returns ``(sigma, V, eigenvalues, eigenvectors)``: sigma (d,) descending, V (t, d), and the
    full eigendecomposition (ascending, as numpy returns it) for residuals.

    Sign convention: each column of V is flipped so that its entry of largest magnitude (the
    snapshot that lies farthest along that direction; the first one on a tie) is positive. The
    basis vector ``u_i = W_c v_i / sigma_i`` inherits the sign, so the same trajectory always
    gives the same bytes.

    Raises
    ------
    ValueError
        When d exceeds the numerical rank of the centred snapshots (at most t - 1).
    """
    t = centred.shape[0]
    evals, evecs = np.linalg.eigh(centred)
    scale = max(float(evals[-1]), 0.0)
    # Eigenvalues of a float64 Gram matrix are accurate to about t * eps * ||G||; below ten times
    # that they are rounding noise, not directions.
    tol = 10.0 * t * np.finfo(np.float64).eps * scale
    rank = int(np.count_nonzero(evals > tol))
    if d > rank:
        raise ValueError(
            f"d = {d} exceeds the rank {rank} of the centred snapshots "
            f"({t} snapshots give at most rank {t - 1}); choose d <= {rank}"
        )
    order = np.argsort(evals)[::-1][:d]
    sigma = np.sqrt(evals[order])
    v = evecs[:, order].copy()
    pivots = np.argmax(np.abs(v), axis=0)
    signs = np.sign(v[pivots, np.arange(d)])
    v *= signs
    return sigma, v, evals, evecs


def tail_residuals(centred: np.ndarray, d: int) -> np.ndarray:
    """Relative projection error of each centred snapshot onto the top-d directions, shape (t,).

    ``||w_j - P w_j|| / ||w_j||`` with ``w_j`` the j-th centred snapshot, computed from the
    eigenvalues outside the top d (``sum_{i>d} lambda_i v_ji^2``), which has no cancellation.
    A snapshot at the mean (norm 0) has residual 0.
    """
    evals, evecs = np.linalg.eigh(centred)
    evals = np.clip(evals, 0.0, None)[::-1]
    evecs = evecs[:, ::-1]
    tail = (evecs[:, d:] ** 2) @ evals[d:]
    norms = np.clip(np.diag(centred), 0.0, None)
    out = np.zeros_like(norms)
    nz = norms > 0
    out[nz] = np.sqrt(np.clip(tail[nz], 0.0, None) / norms[nz])
    return np.minimum(out, 1.0)


def basis_block(block: np.ndarray, v_scaled: np.ndarray, ref_row: int = 0, work: np.ndarray | None = None,
                u: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Basis rows and mean of one (t, b) block: ``U_b = (X - mean)^T V Sigma^-1`` and ``mean_b``.

    ``v_scaled`` is ``V / sigma`` (t, d). Returns ``(u, mean)`` with u (b, d) float64 and mean (b,)
    float64 (``u`` is filled when given). The centring is applied exactly, not by relying on
    ``1^T V = 0`` (true only to rounding while ``X^T 1`` may be large), and without a pass over the
    block: ``(X - 1 c^T)^T V = X^T (V - 1 s^T / t)`` with ``c = X^T 1 / t`` and ``s = 1^T V``, so the
    columns of V are centred once (in float64), and one product per sub-block with one more column
    (``1 / t``) gives the rows of U and the block's mean together. (The earlier form, the product
    and then the outer product ``c s^T`` subtracted, took twice the time at t = 101.)
    Sub-blocks of BASIS_SUB_BLOCK columns: the float64 differences stay in the core's cache
    between their widening and the product.
    """
    t, b = block.shape
    d = v_scaled.shape[1]
    work = _work(work, t, BASIS_SUB_BLOCK)
    if u is None:
        u = np.empty((b, d), dtype=np.float64)
    mean = np.empty(b, dtype=np.float64)
    weights = np.empty((d + 1, t), dtype=np.float64)   # rows: the centred columns of V, then 1/t
    weights[:d] = (v_scaled - v_scaled.mean(axis=0)).T
    weights[d] = 1.0 / t
    product = np.empty((d + 1, min(BASIS_SUB_BLOCK, b)), dtype=np.float64)
    for a in range(0, b, BASIS_SUB_BLOCK):
        m = min(BASIS_SUB_BLOCK, b - a)
        x = _differences(block, a, m, ref_row, work)
        out = product[:, :m]
        np.matmul(weights, x, out=out)
        u[a:a + m] = out[:d].T
        mean[a:a + m] = block[ref_row, a:a + m] + out[d]
    return u, mean
