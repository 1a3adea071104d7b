"""Projection and lift through a basis on a device, against the dense products U^T g and U z.

Tolerance: a float32 product of n = 3,001 terms carries a relative error of about sqrt(n) * 2^-24
~ 3e-6 of the sum of |terms|; asserts use 1e-5 of that scale. In float64 the bar is 1e-12.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import TrajectoryStore, dldr

SHAPES = [(7, 13), (5,), (3, 4, 5), (1,), (311, 7), (), (4, 1, 3, 3)]  # odd sizes, a 0-d scalar


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in SHAPES)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("proj") / "s.zarr"
    model = Odd()
    n = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n) + np.cumsum(rng.standard_normal((12, n)), axis=0)
    # 100-value chunks (so U's row chunks are 100 rows too): boundaries fall inside tensors.
    with TrajectoryStore.create(path, model, chunk_bytes=400) as store:
        for row in w.astype(np.float32):
            torch.nn.utils.vector_to_parameters(torch.from_numpy(row), model.parameters())
            store.append(model)
    basis = dldr(path, 6)
    return path, basis.name


def _dense(path: Path, name: str) -> np.ndarray:
    from trajstore import open_basis

    return open_basis(path, name).to_numpy().astype(np.float64)


@pytest.mark.parametrize("mode", ["resident", "mmap", "stream"])
def test_project_and_lift_equal_dense_products(stored: tuple[Path, str], mode: str) -> None:
    from trajstore import open_basis

    path, name = stored
    basis = open_basis(path, name)
    u = _dense(path, name)
    on = basis.on("cpu", mode=mode)
    assert on.mode == mode and on.rows == 100
    if mode == "resident":
        on.step_rows = 37  # products in slices that cross both storage chunks and tensors
    rng = np.random.default_rng(1)
    g = rng.standard_normal(basis.n)
    z = rng.standard_normal(basis.d)
    model = Odd()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(g.astype(np.float32)), model.parameters())
    g32 = g.astype(np.float32).astype(np.float64)
    scale_p = np.abs(u).T @ np.abs(g32)  # sum of |terms| of each coordinate
    # Flat gradient and the list of parameter tensors (chunks straddle tensors) give the same result.
    for grad in (torch.from_numpy(g.astype(np.float32)), [p.detach() for p in model.parameters()]):
        got = on.project(grad).double().numpy()
        assert np.all(np.abs(got - u.T @ g32) <= 1e-5 * scale_p)  # U^T g to float32 rounding
    lifted = on.lift(torch.from_numpy(z)).double().numpy()
    z32 = z.astype(np.float32).astype(np.float64)
    assert np.all(np.abs(lifted - u @ z32) <= 1e-5 * (np.abs(u) @ np.abs(z32)))  # U z
    # In place: p += alpha U z on the parameter tensors, matching the flat lift.
    before = [p.detach().clone() for p in model.parameters()]
    on.lift(torch.from_numpy(z), out=[p.data for p in model.parameters()], alpha=-0.5)
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy()
    expected = torch.nn.utils.parameters_to_vector(before).double().numpy() - 0.5 * (u @ z32)
    assert np.all(np.abs(after - expected) <= 1e-5 * (np.abs(expected) + np.abs(u) @ np.abs(z32)))


def test_float64_arithmetic_is_exact_to_1e12(stored: tuple[Path, str]) -> None:
    from trajstore import open_basis

    path, name = stored
    on = open_basis(path, name).on("cpu", dtype=torch.float64, mode="stream")
    u = _dense(path, name)
    g = np.random.default_rng(2).standard_normal(u.shape[0])
    np.testing.assert_allclose(on.project(torch.from_numpy(g)).numpy(), u.T @ g, rtol=1e-12, atol=1e-12)


def test_auto_mode_and_errors(stored: tuple[Path, str]) -> None:
    from trajstore import open_basis

    path, name = stored
    basis = open_basis(path, name)
    assert basis.on("cpu").mode == "mmap"  # local store on a CPU
    with pytest.raises(ValueError, match="mode must be one of"):
        basis.on("cpu", mode="disk")
    on = basis.on("cpu", mode="resident")
    with pytest.raises(ValueError, match=r"coords must have shape \(6,\)"):
        on.lift(torch.zeros(5))
    with pytest.raises(ValueError, match="tensors hold 3 values in all, the basis has n = "):
        on.project(torch.zeros(3))
    with pytest.raises(ValueError, match="needs contiguous tensors"):
        on.lift(torch.zeros(6), out=[torch.zeros(basis.n * 2)[::2]])


def test_mmap_detects_a_damaged_basis_chunk(stored: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    from trajstore import CorruptSnapshotError, open_basis

    path, name = stored
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    chunk = copy / open_basis(copy, name).path / "U" / "c" / "3" / "0"  # its version folder
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshotError, match="chunk 3 of U"):
        open_basis(copy, name).on("cpu", mode="mmap")


def test_in_memory_basis_works_resident() -> None:
    w = np.cumsum(np.random.default_rng(4).standard_normal((9, 500)), axis=0)
    basis = dldr(w, 3)
    on = basis.on("cpu", dtype=torch.float64)
    assert on.mode == "resident"
    g = np.random.default_rng(5).standard_normal(500)
    np.testing.assert_allclose(on.project(torch.from_numpy(g)).numpy(), basis.to_numpy().T @ g, rtol=1e-12)
