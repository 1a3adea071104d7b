"""Subspace training and recording on several processes (torch.distributed).

What trajstore does when a process group is initialized (or one is given as ``process_group=``):

- :class:`~trajstore.PBFGS` and :class:`~trajstore.PSGD` take the *mean over ranks* of every loss
  they decide on (one scalar all-reduce per closure call), so every rank takes the same
  line-search branch, and check after every step that the ranks still agree (their projected
  gradients bit for bit, and a float64 fingerprint of their gradients and parameters): gradients
  must reach the optimizer averaged over ranks already, as ``DistributedDataParallel`` leaves them.
  A disagreement raises :class:`RankMismatchError` instead of letting the ranks drift apart.
- :meth:`Basis.on(device, shard=True) <trajstore.Basis.on>` holds only this rank's rows of U
  (:func:`shard_bounds`); ``project`` all-reduces d partial sums and ``lift`` exchanges the rows
  each rank computed, so every rank's parameters move alike (or, given only this rank's slice of
  the flat parameter vector, moves that slice alone).
- :class:`~trajstore.Recorder` writes from rank 0 only (the others count snapshots and write
  nothing: under DDP every rank holds the same parameters), and
  :class:`trajstore.sharded.ShardedRecorder` records a flat parameter vector of which each rank
  holds one slice: each rank writes its own column chunks and rank 0 commits once all are written.

Collectives run on the CPU for gloo and on the current CUDA device for nccl.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import TrajstoreError

__all__ = ["RankMismatchError", "group_of", "mean_over_ranks", "rank_and_world", "shard_bounds"]


class RankMismatchError(TrajstoreError, RuntimeError):
    """The ranks of a process group hold different values where they must agree."""


def group_of(process_group: Any = None) -> Any:
    """The process group an optimizer or basis works with: ``process_group`` as given, else the
    default group when torch.distributed is initialized, else None (a single process). A group of
    one rank counts as a single process."""
    dist = torch.distributed
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def rank_and_world(group: Any) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` for None."""
    if group is None:
        return 0, 1
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def comm_device(group: Any) -> torch.device:
    """Where the tensors of ``group``'s collectives live (the current CUDA device for nccl)."""
    if group is not None and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(n: int, world: int, rank: int, align: int = 1) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``world`` holds.

    Contiguous ranges of ``ceil(n / world)`` rows rounded up to a multiple of ``align`` (the last
    rank takes what is left; ranks past the end hold an empty range). With ``align`` = the store's
    chunk size (:attr:`TrajectoryStore.chunk_elems`) each range is whole chunks, which is what
    :class:`~trajstore.sharded.ShardedRecorder` uses.
    """
    for name, value, lo in (("n", n, 0), ("world", world, 1), ("align", align, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank!r}")
    per = -(-n // world)
    per = -(-per // align) * align
    return min(n, rank * per), min(n, (rank + 1) * per)


def mean_over_ranks(value: float, group: Any) -> float:
    """The mean of ``value`` over the ranks of ``group`` (one float64 all-reduce; ``value`` itself
    for None). Every rank gets the same bits."""
    if group is None:
        return value
    return float(sum_over_ranks(torch.tensor([value], dtype=torch.float64), group)[0]) / rank_and_world(group)[1]


def sum_over_ranks(t: torch.Tensor, group: Any) -> torch.Tensor:
    """``t`` summed over the ranks of ``group``, in place (``t`` for None)."""
    if group is None:
        return t
    device = comm_device(group)
    moved = t if t.device == device else t.to(device)
    torch.distributed.all_reduce(moved, group=group)
    if moved is not t:
        t.copy_(moved)
    return t


def check_agreement(values: torch.Tensor, group: Any, what: str, fix: str) -> None:
    """Raise :class:`RankMismatchError` unless every rank of ``group`` holds the same ``values``
    (a 1-D tensor), bit for bit: one all-reduce (MAX) of ``[values, -values]``."""
    if group is None:
        return
    v = values.detach().to(comm_device(group), torch.float64).reshape(-1)
    both = torch.cat([v, -v])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    high, low = both[: v.numel()], -both[v.numel():]
    differ = high != low
    if bool(differ.any()):
        k = int(torch.nonzero(differ)[0, 0])
        spread = float((high - low).abs().max())
        rank, world = rank_and_world(group)
        raise RankMismatchError(f"the {world} ranks hold different {what} (value {k} ranges over [{float(low[k])!r}, "
                                f"{float(high[k])!r}]; largest spread {spread:.3g}; seen by rank {rank}): {fix}")


_NOT_AVERAGED = ("an optimizer on several ranks needs gradients averaged over the ranks before step() (wrap the "
                 "model in torch.nn.parallel.DistributedDataParallel, which does it in backward) and the same "
                 "parameters on every rank at the start (DDP broadcasts rank 0's when it wraps the model)")


def check_step(group: Any, projected: torch.Tensor, grads: list[torch.Tensor], params: list[torch.Tensor],
               replicated: bool) -> None:
    """Raise :class:`RankMismatchError` unless the ranks agree on a step: the projected gradient
    bit for bit, and, for parameters every rank holds whole (``replicated``), float64 sums of the
    gradients and of the parameters. One all-reduce of ``2 (d + 2)`` values."""
    if group is None:
        return
    parts = [projected.detach().to(torch.float64).reshape(-1).cpu()]
    if replicated:
        with torch.no_grad():
            sums = torch.stack([torch.stack([g.sum(dtype=torch.float64) for g in grads]).sum(),
                                torch.stack([p.sum(dtype=torch.float64) for p in params]).sum()])
        parts.append(sums.cpu())
    check_agreement(torch.cat(parts), group, "projected gradients, gradient sums or parameter sums", _NOT_AVERAGED)
