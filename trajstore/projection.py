"""A basis on a device: projecting gradients onto it and lifting coordinates back, chunk by chunk.

``DeviceBasis`` holds U (n x d) in one of three ways:

- ``resident``: the whole of U in device memory (a GPU with room, or host RAM for a CPU run);
- ``mmap``: memory-mapped from the store's chunk files (local stores; the OS pages it in, and the
  page cache it uses is not the process's private memory);
- ``stream``: each step reads U's row chunks from the store into a reused (pinned, on CUDA) host
  buffer and moves them to the device: for a basis that fits nowhere else.

``project`` and ``lift`` walk U's row chunks and the matching ranges of the model's parameters
(in the store's layout order), so no n x d copy and no full flat gradient is ever built: at most
one chunk of the gradient is gathered at a time.

With ``shard=True`` (or rows ``(lo, hi)``) under torch.distributed, each rank holds only its rows of
U (:func:`trajstore.distributed.shard_bounds`): ``project`` sums the ranks' partial products (one
all-reduce of d values) and ``lift`` exchanges the rows each rank computed, block by block, so
that every rank's parameters move alike; given only the rank's own slice of the flat parameter
vector (FSDP-style sharded parameters), ``project`` and ``lift`` work on that slice alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from . import _backend
from .distributed import comm_device, group_of, rank_and_world, shard_bounds, sum_over_ranks

if TYPE_CHECKING:
    from .basis import Basis

__all__ = ["DeviceBasis", "MODES", "SubspaceOptimizer", "bind_basis"]

MODES = ("auto", "resident", "mmap", "stream")
RESIDENT_STEP_ROWS = 1 << 22
log = logging.getLogger("trajstore")


class DeviceBasis:
    """U of a :class:`Basis` on ``device``, for ``project`` / ``lift`` during training.

    Parameters
    ----------
    basis : Basis
    device : torch.device or str
    dtype : torch.dtype
        The dtype U is held in on the device: float32 (default), float64 (reference checks), or
        bfloat16 / float16, which halve U's memory and the bytes read per product. With a
        half-precision U the vector is rounded to that dtype for the product, the device's
        matrix product accumulates in float32 (cuBLAS; torch's CPU kernels), and results come
        back in float32 (:attr:`compute_dtype`): ``project`` gives float32 coordinates, summed
        over chunks in float32. U's own rounding (relative 2**-9 in bfloat16) tilts the subspace
        by about 0.1 degree; both products use the rounded U, so training moves in its span (up
        to the rounding of each step's values, 2**-9 relative). On a CPU without bfloat16
        arithmetic the products are slower than in float32 (1.48x at n = 4M here,
        ``benchmarks/bf16_basis.py``): there, use it for memory, resident. In ``mmap`` and
        ``stream`` modes U is read from its float32 chunk files and converted on the host each
        time, so what is halved is what crosses to a GPU, not what is read.
    mode : {"auto", "resident", "mmap", "stream"}
        ``auto`` picks ``resident`` when U fits in a quarter of the free device memory (CUDA) or
        when the store is not local (CPU), else ``mmap`` on CPU and ``stream`` on CUDA, and logs
        its choice (also in :attr:`mode` and :attr:`reason`).
    shard : bool or (int, int)
        Hold only this rank's rows of U: ``True`` for :func:`~trajstore.distributed.shard_bounds`
        of the process group, or this rank's rows ``(lo, hi)`` (the ranks' rows must tile
        ``[0, n)`` in rank order; checked, collectively, here). Every rank must construct it.
        Without a process group (or with one rank) the whole of U is held.
    process_group : ProcessGroup, optional
        The group sharing U (default: the default group).

    Attributes
    ----------
    lo, hi : int
        The rows of U this rank holds (``0, n`` unsharded).
    nbytes : int
        Bytes of U this rank holds: ``(hi - lo) * d * itemsize``.
    compute_dtype : torch.dtype
        The dtype of the products' results: ``dtype``, or float32 for a half-precision U.
    """

    def __init__(self, basis: Basis, device: torch.device | str = "cpu", *, dtype: torch.dtype = torch.float32,
                 mode: Literal["auto", "resident", "mmap", "stream"] = "auto",
                 shard: bool | tuple[int, int] = False, process_group: object = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.basis = basis
        self.device = torch.device(device)
        self.dtype = dtype
        self.compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.n, self.d = basis.n, basis.d
        self.rows = int(basis.metadata.get("u_chunk_rows") or min(basis.n, 1 << 16))
        self._group, self.lo, self.hi, self._bounds = self._shard(shard, process_group)
        self.mode, self.reason = self._choose(mode)
        log.info("basis %s on %s: mode %s (%s)", basis.name, self.device, self.mode, self.reason)
        self._resident: torch.Tensor | None = None
        self._maps: dict[int, torch.Tensor] | None = None
        self._staging: torch.Tensor | None = None
        # Rows per product: the storage chunk, except for a resident U, where larger slices cut
        # the per-chunk overhead (measured on an H100: 853 chunks of 65,536 rows made a P+-BFGS
        # step 4.5x an SGD step of a 55.9M-parameter WRN).
        self.step_rows = self.rows
        if self.mode == "resident":
            self._resident = torch.empty((self.hi - self.lo, self.d), dtype=dtype, device=self.device)
            for a, b in self._ranges():
                self._resident[a - self.lo:b - self.lo] = torch.from_numpy(basis.rows(a, b)).to(self.device, dtype)
            self.step_rows = max(self.rows, RESIDENT_STEP_ROWS)
        elif self.mode == "mmap":
            self._maps = self._map_chunks()

    # ------------------------------------------------------------------ placement

    @property
    def nbytes(self) -> int:
        return (self.hi - self.lo) * self.d * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def sharded(self) -> bool:
        """True when U is split across the ranks of a process group."""
        return self._group is not None

    def _shard(self, shard: bool | tuple[int, int], process_group: object) -> tuple[object, int, int, list[tuple[int, int]]]:
        """(group, lo, hi, every rank's (lo, hi)) of this basis."""
        if shard is False or shard is None:
            return None, 0, self.n, [(0, self.n)]
        group = group_of(process_group)
        if group is None:
            if shard is not True and tuple(shard) != (0, self.n):  # type: ignore[arg-type]
                raise ValueError(f"shard={shard!r} without a process group of several ranks: a single process holds "
                                 f"all rows (0, {self.n})")
            return None, 0, self.n, [(0, self.n)]
        rank, world = rank_and_world(group)
        if shard is True:
            bounds = [shard_bounds(self.n, world, r) for r in range(world)]
            return group, *bounds[rank], bounds
        lo, hi = (int(v) for v in shard)  # type: ignore[union-attr]
        mine = torch.tensor([lo, hi], dtype=torch.int64, device=comm_device(group))
        every = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(every, mine, group=group)
        bounds = [(int(t[0]), int(t[1])) for t in every]
        ends = [0] + [b for _, b in bounds]
        if any(a != ends[r] or b < a for r, (a, b) in enumerate(bounds)) or ends[-1] != self.n:
            raise ValueError(f"shard: the ranks' rows {bounds} do not tile [0, {self.n}) in rank order")
        return group, lo, hi, bounds

    def _local_folder(self) -> object:
        u = getattr(self.basis, "_u", None)
        store = getattr(u, "store", None)
        root = _backend.local_root(store) if store is not None else None
        return None if root is None else root / u.path

    def _choose(self, mode: str) -> tuple[str, str]:
        local = self._local_folder() is not None
        if mode == "mmap" and not local:
            raise ValueError("mode='mmap' needs a basis stored in a local folder; use 'stream' or 'resident'")
        if mode != "auto":
            return mode, "requested"
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.nbytes <= free // 4:
                return "resident", f"U ({self.nbytes / 2**30:.2f} GiB) fits in a quarter of free device memory"
            return "stream", f"U ({self.nbytes / 2**30:.2f} GiB) exceeds a quarter of free device memory"
        if local:
            return "mmap", "local store on a CPU: the OS pages U in"
        return "resident", "basis not in a local folder"

    def _ranges(self, rows: int | None = None) -> Iterator[tuple[int, int]]:
        """This rank's rows in pieces that never cross a multiple of ``rows`` (a storage chunk
        boundary, for the default)."""
        rows = rows or self.rows
        a = self.lo
        while a < self.hi:
            b = min((a // rows + 1) * rows, self.hi)
            yield a, b
            a = b

    def _map_chunks(self) -> dict[int, torch.Tensor]:
        import crc32c

        folder = self._local_folder()
        maps = {}
        for a, b in self._ranges():
            i = a // self.rows
            path = folder / "c" / str(i) / "0"  # type: ignore[operator]
            raw = np.memmap(path, dtype=np.uint8, mode="r")
            nbytes = self.rows * self.d * 4
            if raw.shape[0] != nbytes + 4 or crc32c.crc32c(raw[:nbytes]) != int.from_bytes(raw[nbytes:].tobytes(), "little"):
                from .errors import CorruptSnapshotError

                raise CorruptSnapshotError(f"basis {self.basis.name!r}: chunk {i} of U is truncated or fails its crc32c")
            values = raw[:nbytes].view(np.float32).reshape(self.rows, self.d)[a - i * self.rows: b - i * self.rows]
            with warnings.catch_warnings():  # read-only mapping: torch warns, but we never write to it
                warnings.simplefilter("ignore", UserWarning)
                maps[i] = torch.from_numpy(values)
        return maps

    def chunk(self, a: int, b: int) -> torch.Tensor:
        """Rows ``[a, b)`` of U on the device, in ``dtype`` (rows this rank holds; in ``mmap``
        mode within one storage chunk, as :meth:`_ranges` cuts them)."""
        if self._resident is not None:
            return self._resident[a - self.lo:b - self.lo]
        if self._maps is not None:
            i = a // self.rows
            first = max(self.lo, i * self.rows)
            host = self._maps[i][a - first:b - first]
            if self.dtype != torch.float32:
                host = host.to(self.dtype)  # on the host: a half-precision U crosses the bus in half the bytes
            return host.to(self.device) if self.device.type != "cpu" else host
        values = self.basis.rows(a, b)
        if self.device.type == "cuda":
            if self._staging is None:
                self._staging = torch.empty((self.rows, self.d), dtype=self.dtype, pin_memory=True)
            staged = self._staging[: b - a]
            staged.copy_(torch.from_numpy(values))  # converted on the host, as above
            out = staged.to(self.device, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()  # the staging buffer is reused next
            return out
        return torch.from_numpy(values).to(self.dtype)

    # ------------------------------------------------------------------ products

    def _segments(self, tensors: Sequence[torch.Tensor], a: int, b: int, offsets: list[int]) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(flat view of a tensor, lo, hi) pieces covering flat range [a, b), with lo/hi inside the tensor."""
        k = int(np.searchsorted(offsets, a, side="right") - 1)
        while k < len(tensors) and offsets[k] < b:
            lo, hi = max(a, offsets[k]) - offsets[k], min(b, offsets[k + 1]) - offsets[k]
            if hi > lo:
                yield tensors[k].reshape(-1), lo, hi
            k += 1

    @staticmethod
    def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x] if isinstance(x, torch.Tensor) else list(x)

    def _offsets(self, tensors: Sequence[torch.Tensor]) -> tuple[list[int], bool]:
        """Global flat offsets of ``tensors``, and whether they hold all n values (from row 0)
        rather than, for a sharded basis, this rank's rows ``[lo, hi)`` alone (from row ``lo``)."""
        total = sum(t.numel() for t in tensors)
        if total == self.n:
            base = 0
        elif self.sharded and total == self.hi - self.lo:
            base = self.lo
        else:
            mine = f" or this rank's {self.hi - self.lo} rows [{self.lo}, {self.hi})" if self.sharded else ""
            raise ValueError(f"tensors hold {total} values in all, the basis has n = {self.n}{mine}")
        offsets = [base]
        for t in tensors:
            offsets.append(offsets[-1] + t.numel())
        return offsets, total == self.n

    def holds_shard_only(self, tensors: torch.Tensor | Sequence[torch.Tensor]) -> bool:
        """True when ``tensors`` are this rank's rows ``[lo, hi)`` alone (sharded parameters),
        False when they hold all n values."""
        return not self._offsets(self._as_list(tensors))[1]

    @torch.no_grad()
    def project(self, grad: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``U^T g`` of shape (d,): ``grad`` is a flat (n,) tensor or the parameters' tensors in
        layout order (for a sharded basis, possibly this rank's rows alone); sharded, the ranks'
        partial products are summed (one all-reduce of d values; every rank gets the same bits)."""
        tensors = self._as_list(grad)
        offsets, _ = self._offsets(tensors)
        out = torch.zeros(self.d, dtype=self.compute_dtype, device=self.device)
        gathered = torch.empty(min(self.step_rows, max(self.hi - self.lo, 1)), dtype=self.dtype, device=self.device)
        for a, b in self._ranges(self.step_rows):
            segs = list(self._segments(tensors, a, b, offsets))
            if len(segs) == 1 and segs[0][0].dtype == self.dtype and segs[0][0].device == self.device:
                g = segs[0][0][segs[0][1]:segs[0][2]]
            else:
                g, pos = gathered[: b - a], 0
                for flat, lo, hi in segs:
                    g[pos:pos + hi - lo].copy_(flat[lo:hi])
                    pos += hi - lo
            out += (self.chunk(a, b).T @ g).to(self.compute_dtype)
        return sum_over_ranks(out, self._group)

    @torch.no_grad()
    def lift(self, coords: torch.Tensor, out: Sequence[torch.Tensor] | None = None, *, alpha: float = 1.0) -> torch.Tensor | None:
        """``U z``: a new flat (n,) tensor, or, with ``out`` (tensors in layout order), ``out += alpha U z`` in place.

        Sharded, ``out`` holding all n values is moved on every rank alike (each rank computes its
        rows, and the ranks exchange them in blocks of at most ``step_rows`` rows per rank), and
        ``out`` holding this rank's rows alone is moved with no exchange.
        """
        z = coords.to(self.device, self.dtype)
        if z.shape != (self.d,):
            raise ValueError(f"coords must have shape ({self.d},), got {tuple(coords.shape)}")
        if out is None:
            flat = torch.zeros(self.n, dtype=self.compute_dtype, device=self.device)
            self.lift(z, out=[flat])
            return flat
        tensors = list(out)
        offsets, full = self._offsets(tensors)
        for k, t in enumerate(tensors):
            if not t.is_contiguous():
                raise ValueError(f"lift(out=...) adds in place and needs contiguous tensors; tensor {k} of shape "
                                 f"{tuple(t.shape)} is not (call .contiguous() on it first)")
        if self._group is not None and full:
            self._lift_exchanged(z, tensors, offsets, alpha)
            return None
        for a, b in self._ranges(self.step_rows):
            self._add(tensors, offsets, a, b, self.chunk(a, b) @ z, alpha)
        return None

    def _add(self, tensors: Sequence[torch.Tensor], offsets: list[int], a: int, b: int, step: torch.Tensor,
             alpha: float) -> None:
        """``tensors[a:b] += alpha * step`` over the flat range ``[a, b)``."""
        pos = 0
        for flat_view, lo, hi in self._segments(tensors, a, b, offsets):
            flat_view[lo:hi].add_(step[pos:pos + hi - lo].to(flat_view.dtype), alpha=alpha)
            pos += hi - lo

    def _lift_exchanged(self, z: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: list[int], alpha: float) -> None:
        """Every rank computes ``U z`` on its rows, ``block`` rows at a time, and all-gathers the
        blocks, so every rank adds the same values to its (replicated) tensors: memory of
        ``world * block`` values, not n."""
        world = len(self._bounds)
        block = self.step_rows
        longest = max(hi - lo for lo, hi in self._bounds)
        device = comm_device(self._group)
        mine = torch.zeros(block, dtype=self.dtype, device=device)
        parts = [torch.empty(block, dtype=self.dtype, device=device) for _ in range(world)]
        for start in range(0, longest, block):  # the same number of exchanges on every rank
            a, b = min(self.lo + start, self.hi), min(self.lo + start + block, self.hi)
            mine.zero_()
            for c, e in self._pieces(a, b):
                mine[c - a:e - a] = (self.chunk(c, e) @ z).to(device)
            torch.distributed.all_gather(parts, mine, group=self._group)
            for (lo, hi), part in zip(self._bounds, parts):
                c, e = min(lo + start, hi), min(lo + start + block, hi)
                if e > c:
                    self._add(tensors, offsets, c, e, part[: e - c].to(self.device), alpha)

    def _pieces(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """``[a, b)`` of this rank's rows cut as :meth:`chunk` takes them (at storage chunks)."""
        while a < b:
            e = min((a // self.rows + 1) * self.rows, b) if self.mode == "mmap" else b
            yield a, e
            a = e


class SubspaceOptimizer(torch.optim.Optimizer):
    """What :class:`~trajstore.PBFGS` and :class:`~trajstore.PSGD` share: one parameter group
    bound to a basis (:func:`bind_basis`), refusing a second group, and the process group they
    work in (see :mod:`trajstore.distributed`)."""

    def _bind(self, basis: Basis | DeviceBasis, process_group: object, check_ranks: bool) -> None:
        from .distributed import group_of

        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one parameter group (the whole model, in layout order)")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self._basis = bind_basis(self._params, basis)
        self._group = group_of(process_group)
        self._check_ranks = bool(check_ranks)
        self._replicated = not self._basis.holds_shard_only(self._params)
        self._constructed = True

    def add_param_group(self, param_group: dict[str, object]) -> None:
        """Refused once constructed: the basis spans the one group's parameters, and a second
        group would never move."""
        if getattr(self, "_constructed", False):
            raise ValueError(f"{type(self).__name__} optimizes one parameter group, the parameters its basis was made "
                             "from; a second group would never move (make another optimizer for other parameters)")
        super().add_param_group(param_group)  # type: ignore[arg-type]


def bind_basis(params: Sequence[torch.Tensor], basis: Basis | DeviceBasis) -> DeviceBasis:
    """The basis an optimizer of ``params`` works with: a :class:`DeviceBasis` as given, or a
    :class:`Basis` placed on the parameters' device and dtype (``mode="auto"``). Its n must be the
    parameters' total size (or, sharded, this rank's rows), and for a basis of a stored trajectory
    the parameters' shapes must be its layout's, in order (LayoutMismatchError naming the first
    that differs: a reversed parameter list or another model of the same size)."""
    placed = basis if isinstance(basis, DeviceBasis) else basis.on(params[0].device, dtype=params[0].dtype)
    n = sum(p.numel() for p in params)
    if placed.n != n and not (placed.sharded and n == placed.hi - placed.lo):
        mine = f" (or this rank's {placed.hi - placed.lo} rows of it)" if placed.sharded else ""
        raise ValueError(f"the parameters hold {n} values, the basis has n = {placed.n}{mine}: "
                         "pass model.parameters() of the model the trajectory was recorded from")
    if placed.n == n:
        layout = _source_layout(placed.basis)
        if layout is not None:
            layout.check_param_shapes(params)  # type: ignore[attr-defined]
    return placed


def _source_layout(basis: Basis) -> object:
    """The layout of the trajectory ``basis`` was made from, when it is still in the basis's store
    and still the one it was made from (None otherwise: an in-memory basis is checked by n only)."""
    origin, name = getattr(basis, "_origin", None), getattr(basis, "trajectory", None)
    recorded = (basis.metadata.get("source") or {}).get("layout")
    if origin is None or name is None or recorded is None:
        return None
    from .store import TrajectoryStore

    try:
        with TrajectoryStore.open(origin, "r", trajectory=name) as store:
            layout = store.layout
    except Exception:  # the trajectory is gone or unreadable: nothing to check against
        return None
    return layout if layout.fingerprint == recorded else None

