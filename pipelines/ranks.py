"""The experiment pipeline on several processes (``--nproc N`` or ``torchrun``): who does what.

One global batch is what one process would see (the same seeded order, ``batch_size`` rows);
rank r takes the r-th of N nearly equal parts of each (``torch.tensor_split``). Losses are
scaled so that DDP's average of the ranks' gradients, and PBFGS's mean of their losses, is the
mean over the whole global batch even when it does not split evenly: rank r's loss is
``sum of its rows' losses * N / rows in the global batch``. Evaluation splits the test set the
same way and sums over ranks. Rank 0 alone writes: the trajectory (``Recorder``), checkpoints,
results and the report; every rank reads them back after a barrier.

BatchNorm statistics are per rank, as under DDP anywhere (a model with SyncBatchNorm syncs them).
Image data sets (DataLoader) draw their order from the same generator but not the same way as a
single process, so their batches differ from ``--nproc 1``'s; tensor data sets (digits,
MNIST-1D) give the same global batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["all_sum", "barrier", "is_main", "rank", "rank_batches", "scaled_loss", "world", "wrap"]


def _dist() -> Any:
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d and world() > 1:
        d.barrier()


def all_sum(values: list[float]) -> list[float]:
    """``values`` summed over the ranks (float64; the values themselves on one process)."""
    from trajstore.distributed import group_of, sum_over_ranks

    return [float(v) for v in sum_over_ranks(torch.tensor(values, dtype=torch.float64), group_of()).tolist()]


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel on several ranks (the module itself on one)."""
    if world() == 1:
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_threads() -> int:
    """CPU threads per rank: the cores shared out (at least 1), so N ranks do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // world())


# A training batch whose activations take less than this runs fastest on one CPU thread: the
# per-operation threading overhead exceeds the work (the demo's MLP, MNIST-1D's CNN, digits' MLP).
SMALL_BATCH_BYTES = 32 * 2**20


def threads_for(model_name: str, num_classes: int, input_shape: tuple[int, ...], batch_size: int) -> int:
    """CPU threads per rank for training ``model_name``: 1 when a training batch's activations
    (measured on torch's meta device: nothing allocated) are under SMALL_BATCH_BYTES, else the
    cores shared out (:func:`default_threads`)."""
    from trajstore.plan import activation_bytes

    from .models import build_model

    with torch.device("meta"):
        model = build_model(model_name, num_classes, input_shape)
    small = activation_bytes(model, input_shape, batch_size) < SMALL_BATCH_BYTES
    return 1 if small else default_threads()


def scaled_loss(logits: torch.Tensor, y: torch.Tensor, global_rows: int) -> torch.Tensor:
    """Cross-entropy over this rank's rows scaled so the mean over ranks is the global batch's mean."""
    if world() == 1:
        return nn.functional.cross_entropy(logits, y)
    return nn.functional.cross_entropy(logits, y, reduction="sum") * (world() / global_rows)


class _RankBatches(Sampler[list[int]]):
    """This rank's part of each global batch of one seeded permutation of ``n`` rows."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.generator is not None else torch.arange(self.n)
        for batch in order.split(self.batch_size):
            yield torch.tensor_split(batch, world())[rank()].tolist()

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def rank_batches(dataset: Dataset[Any], batch_size: int, device: torch.device, *, generator: torch.Generator | None,
                 num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(x, y, rows of the global batch)`` of this rank's part of every global batch."""
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, torch.utils.data.TensorDataset):
        x, y = dataset.tensors
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for batch in order.split(batch_size):
            idx = torch.tensor_split(batch, world())[rank()].to(x.device)
            yield x[idx], y[idx], len(batch)
        return
    sampler = _RankBatches(n, batch_size, generator)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=device.type == "cuda")
    sizes = iter([len(b) for b in torch.arange(n).split(batch_size)])
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), next(sizes)


def check_split(dataset: Dataset[Any], batch_size: int, what: str) -> None:
    """Every rank must get rows of every global batch (an empty part cannot go through DDP)."""
    n = len(dataset)  # type: ignore[arg-type]
    last = n % batch_size or batch_size
    if min(batch_size, last) < world():
        raise ValueError(f"{what}: a global batch of {min(batch_size, last)} rows cannot be split "
                         f"over {world()} processes (the {n} rows end in a batch of {last}); choose another batch size "
                         "or fewer processes")


def part_of(dataset: Dataset[Any]) -> Dataset[Any]:
    """This rank's contiguous part of ``dataset`` (for evaluation; the whole of it on one process)."""
    if world() == 1:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    idx = torch.tensor_split(torch.arange(n), world())[rank()]
    lo, hi = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(t[lo:hi] for t in dataset.tensors))
    return torch.utils.data.Subset(dataset, range(lo, hi))


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch, over the ranks,
    on any device (torch's SyncBatchNorm runs on GPUs only): two float64 all-reduces per forward
    (the sums, then the squared deviations from the global mean), differentiable
    (``torch.distributed.nn.functional.all_reduce``), so gradients flow across ranks as they would
    through one batch. The running statistics get the global mean and unbiased variance, as a
    single process's BatchNorm gets them from the whole batch. Same parameters and buffers as the
    module it replaces (the trajectory's layout does not change)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if world() == 1 or not (self.training or not self.track_running_stats):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        rows = x.new_full((1,), x.numel() // max(x.shape[1], 1), dtype=torch.float64)
        totals = all_reduce(torch.cat([x.sum(dims, dtype=torch.float64), rows]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.to(x.dtype).view(shape)
        var = all_reduce((centred * centred).sum(dims, dtype=torch.float64)) / count
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / max(float(count) - 1.0, 1.0)
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        y = centred * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm synchronized over the ranks (torch's SyncBatchNorm on CUDA,
    :class:`GlooSyncBatchNorm` elsewhere), in place; unchanged on one process."""
    if world() == 1:
        return model
    if model_device(model).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    _replace_batchnorm(model)
    return model


def _replace_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlooSyncBatchNorm):
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            _replace_batchnorm(child)
