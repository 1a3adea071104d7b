"""Shared fixtures: small models, their flat parameter vectors, and one URL per store backend."""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch import nn


def mlp(seed: int = 0) -> nn.Module:
    """Linear -> BatchNorm1d -> Linear: float parameters plus float and int64 buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def cnn(seed: int = 0) -> nn.Module:
    """Conv2d -> BatchNorm2d -> Dropout -> Linear, for 1 x 6 x 6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


class ShapesModel(nn.Module):
    """One parameter per shape (``params.0``, ``params.1``...), filled with ``fill`` when given.

    With ``transpose=True`` every 2-d parameter is a transposed (non-contiguous) view, which
    ``load_into`` cannot fill through ``view(-1)``.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], *, fill: float | None = None, seed: int = 0,
                 transpose: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        tensors = []
        for shape in shapes:
            shape = tuple(shape)
            if transpose and len(shape) == 2:
                t = torch.randn(shape[::-1], generator=gen).t()
            else:
                t = torch.randn(shape, generator=gen)
            if fill is not None:
                t.fill_(fill)
            tensors.append(nn.Parameter(t))
        self.params = nn.ParameterList(tensors)


def flat_params(model: nn.Module) -> np.ndarray:
    """The model's parameters in ``named_parameters()`` order, flattened in C order, as float32."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).numpy()


def assign_flat(model: nn.Module, values: np.ndarray) -> None:
    """Set the model's parameters from a flat vector (the inverse of :func:`flat_params`)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(values[offset:offset + p.numel()]).reshape(p.shape))
            offset += p.numel()
    assert offset == values.size


def train_steps(model: nn.Module, x_shape: Sequence[int], steps: int = 3, seed: int = 0) -> None:
    """A few SGD steps in train mode, so parameters, running stats and num_batches_tracked move."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(*x_shape, generator=gen)).square().mean().backward()
        opt.step()


def memory_url() -> str:
    return f"memory://trajstore-test-{uuid.uuid4().hex}"


def drop_memory(url: str) -> None:
    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(params=["local", "memory", "file-url"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same store contract on a local folder, fsspec's in-memory store and a file:// URL."""
    if request.param == "local":
        yield str(tmp_path / "store.zarr")
    elif request.param == "memory":
        url = memory_url()
        yield url
        drop_memory(url)
    else:
        yield (tmp_path / "store.zarr").as_uri()


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10) -> np.ndarray:
    """CIFAR-10's python format (pickled dicts of uint8 rows), as the real files are. Returns the
    test images as (N, 32, 32, 3)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (n_train // 5, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_train // 5).tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2 if i % 2 else 5))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n_test).tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    return test["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
