"""A half-precision basis on the device (``basis.on(device, dtype=torch.bfloat16)``): U held in
bfloat16 (half the bytes) in every mode, the products' results in float32, and both products
through the same rounded U, so that training moves in the span of what is held (up to the
rounding of each step's values to bfloat16).

Tolerances: the reference is float64 arithmetic on U and the vector rounded to bfloat16 (what
the device multiplies). A bfloat16 product accumulated in float32 and rounded to bfloat16 per
slice is within 2**-8 of the sum of |terms| per slice; asserts use 1e-2 of that scale. Against
the float32 basis, U's own rounding (2**-9 relative per entry) bounds the difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import PBFGS, TrajectoryStore, dldr, open_basis

MODES = ["resident", "mmap", "stream"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(9, 13), nn.Linear(13, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 9, generator=gen)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real SGD trajectory of a small net, in 100-value chunks (chunk boundaries inside tensors)."""
    path = tmp_path_factory.mktemp("bf16") / "s.zarr"
    torch.manual_seed(0)
    model = Net()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with TrajectoryStore.create(path, model, chunk_bytes=400) as store:
        store.append(model)
        for step in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            store.append(model, step=step + 1)
    return path, dldr(path, 8).name


def _rounded_u(path: Path, name: str) -> np.ndarray:
    u = open_basis(path, name).to_numpy()
    return torch.from_numpy(u).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_holds_half_the_bytes_and_gives_float32_results(stored: tuple[Path, str], mode: str) -> None:
    path, name = stored
    basis = open_basis(path, name)
    full, half = basis.on("cpu", mode=mode), basis.on("cpu", mode=mode, dtype=torch.bfloat16)
    assert (half.mode, half.dtype, half.compute_dtype) == (mode, torch.bfloat16, torch.float32)
    assert half.nbytes * 2 == full.nbytes
    assert half.chunk(0, 100).dtype == torch.bfloat16
    g = torch.randn(basis.n, generator=torch.Generator().manual_seed(1))
    coords = half.project(g)
    assert coords.dtype == torch.float32 and coords.shape == (basis.d,)
    assert half.lift(coords).dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_project_equals_the_rounded_product(stored: tuple[Path, str], mode: str) -> None:
    path, name = stored
    half = open_basis(path, name).on("cpu", mode=mode, dtype=torch.bfloat16)
    if mode == "resident":
        half.step_rows = 37  # slices that cross storage chunks and tensors
    u = _rounded_u(path, name)
    g = torch.randn(half.n, generator=torch.Generator().manual_seed(2))
    gb = g.to(torch.bfloat16).double().numpy()
    exact = u.T @ gb
    scale = np.abs(u).T @ np.abs(gb)
    got = half.project(g).double().numpy()
    assert np.all(np.abs(got - exact) <= 1e-2 * scale + 1e-30)
    # and near the float32 basis's product: U's and g's rounding, 2**-9 each, relative
    exact32 = open_basis(path, name).to_numpy().astype(np.float64).T @ g.double().numpy()
    assert np.all(np.abs(got - exact32) <= 2 * 2.0 ** -8 * scale)


@pytest.mark.parametrize("mode", MODES)
def test_lift_moves_in_the_span_of_the_rounded_basis(stored: tuple[Path, str], mode: str) -> None:
    """``lift(e_i)`` is column i of the rounded U exactly: the products use what is held."""
    path, name = stored
    half = open_basis(path, name).on("cpu", mode=mode, dtype=torch.bfloat16)
    u = _rounded_u(path, name)
    for i in range(half.d):
        e = torch.zeros(half.d)
        e[i] = 1.0
        assert np.array_equal(half.lift(e).double().numpy(), u[:, i])
    # a general z: the rounded z through the rounded U, each row within bfloat16's rounding
    z = torch.randn(half.d, generator=torch.Generator().manual_seed(4))
    zb = z.to(torch.bfloat16).double().numpy()
    moved = half.lift(z).double().numpy()
    assert np.all(np.abs(moved - u @ zb) <= 2.0 ** -8 * (np.abs(u) @ np.abs(zb)) + 1e-30)


def test_modes_agree_on_lift_bit_for_bit(stored: tuple[Path, str]) -> None:
    path, name = stored
    basis = open_basis(path, name)
    z = torch.randn(basis.d, generator=torch.Generator().manual_seed(5))
    lifted = [basis.on("cpu", mode=m, dtype=torch.bfloat16).lift(z) for m in MODES]
    assert all(torch.equal(lifted[0], other) for other in lifted[1:])


def test_pbfgs_with_a_bfloat16_basis_trains_in_its_span(stored: tuple[Path, str]) -> None:
    """P-BFGS on the bfloat16 basis: the loss falls as with float32 (within 5% of its drop), and
    the parameters' move lies in the span of the rounded U up to each step's rounding to
    bfloat16 (2**-9 of the step per value; bar 2**-8 of the whole move)."""
    path, name = stored
    basis = open_basis(path, name)
    x, y = _data()
    finals, moves = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Net()  # the trajectory's initialization
        start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt = PBFGS(model.parameters(), basis.on("cpu", dtype=dtype))

        def closure() -> torch.Tensor:
            if torch.is_grad_enabled():
                opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        first = float(closure().detach())
        for _ in range(25):
            opt.step(closure)
        finals[dtype] = (first, float(closure().detach()))
        moves[dtype] = (torch.nn.utils.parameters_to_vector(model.parameters()).detach() - start).double().numpy()
    (f0, f32), (_, fb) = finals[torch.float32], finals[torch.bfloat16]
    assert f32 < 0.5 * f0
    assert abs(fb - f32) <= 0.05 * (f0 - f32)
    u = _rounded_u(path, name)
    move = moves[torch.bfloat16]
    coords, *_ = np.linalg.lstsq(u, move, rcond=None)
    assert np.linalg.norm(move - u @ coords) <= 2.0 ** -8 * np.linalg.norm(move)


def test_the_pipeline_takes_basis_dtype_and_refuses_others(tmp_path: Path) -> None:
    from pipelines.validate import ConfigError, configure

    cfg = configure("digits", {"basis_dtype": "bfloat16"}, out=str(tmp_path / "r"))
    assert cfg.basis_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="basis_dtype"):
        configure("digits", {"basis_dtype": "float16"}, out=str(tmp_path / "r"))


def test_a_folder_of_a_run_before_a_field_existed_is_the_same_config(tmp_path: Path) -> None:
    """A config.json written before ``basis_dtype`` existed resumes with the default, not refused."""
    from pipelines.experiment import _check_folder
    from pipelines.validate import configure

    cfg = configure("digits", out=str(tmp_path / "r"))
    _check_folder(cfg)
    doc = json.loads((tmp_path / "r" / "config.json").read_text())
    del doc["basis_dtype"]
    (tmp_path / "r" / "config.json").write_text(json.dumps(doc))
    (tmp_path / "r" / "seed-0").mkdir()
    (tmp_path / "r" / "seed-0" / "sgd.json").write_text("{}")
    _check_folder(cfg)  # the same config: no error
    other = configure("digits", {"basis_dtype": "bfloat16"}, out=str(tmp_path / "r"))
    with pytest.raises(Exception, match="basis_dtype"):
        _check_folder(other)
