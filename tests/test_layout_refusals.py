"""Layout.from_model refuses what a store cannot hold (float8, complex and integer parameters, meta
tensors, sparse tensors) with an error naming the tensor, before TrajectoryStore.create writes
anything; the meta device stays allowed for layouts that only plan."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from trajstore import TrajectoryStore
from trajstore.errors import LayoutMismatchError
from trajstore.layout import Layout


def _with_param(value: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.lin = nn.Linear(3, 2)
    model.odd = nn.Parameter(value, requires_grad=False)  # integer and meta tensors cannot require grad
    return model


def _with_buffer(value: torch.Tensor) -> nn.Module:
    model = nn.Module()
    model.lin = nn.Linear(3, 2)
    model.register_buffer("odd", value)
    return model


def _sparse(layout: torch.layout) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR support is "in beta"
        dense = torch.eye(3)
        return dense.to_sparse() if layout == torch.sparse_coo else dense.to_sparse_csr()


# (tensor, error class, message) for a parameter named 'odd'
REFUSED_PARAMS = [
    (torch.zeros(4, dtype=torch.float8_e4m3fn), TypeError, "parameter 'odd' has dtype torch.float8_e4m3fn; only float"),
    (torch.zeros(4, dtype=torch.float8_e5m2), TypeError, "parameter 'odd' has dtype torch.float8_e5m2; only float"),
    (torch.zeros(4, dtype=torch.complex64), TypeError, "parameter 'odd' has dtype torch.complex64; only float"),
    (torch.zeros(4, dtype=torch.int64), TypeError, "parameter 'odd' has dtype torch.int64; only float"),
    (torch.zeros(4, device="meta"), LayoutMismatchError, "parameter 'odd' is on the meta device"),
    (_sparse(torch.sparse_coo), LayoutMismatchError, r"parameter 'odd' is a torch.sparse_coo tensor; only dense"),
    (_sparse(torch.sparse_csr), LayoutMismatchError, r"parameter 'odd' is a torch.sparse_csr tensor; only dense"),
]


@pytest.mark.parametrize(("value", "error", "message"), REFUSED_PARAMS,
                         ids=["float8_e4m3fn", "float8_e5m2", "complex64", "int64", "meta", "sparse_coo", "sparse_csr"])
def test_unstorable_parameters_are_refused_by_name(value: torch.Tensor, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Layout.from_model(_with_param(value))


@pytest.mark.parametrize(("value", "message"), [
    (torch.zeros(4, device="meta"), "buffer 'odd' is on the meta device"),
    (_sparse(torch.sparse_coo), "buffer 'odd' is a torch.sparse_coo tensor; only dense"),
], ids=["meta", "sparse_coo"])
def test_unstorable_buffers_are_refused_by_name(value: torch.Tensor, message: str) -> None:
    with pytest.raises(LayoutMismatchError, match=message):
        Layout.from_model(_with_buffer(value))


def test_the_errors_are_the_builtins_users_catch() -> None:
    # LayoutMismatchError is a ValueError: `except ValueError` around a recorder keeps working
    assert issubclass(LayoutMismatchError, ValueError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_parameters_are_kept_with_their_dtype(dtype: torch.dtype) -> None:
    layout = Layout.from_model(_with_param(torch.zeros(4, dtype=dtype)))
    dtypes = {spec.name: spec.dtype for spec in layout.params}
    assert dtypes["odd"] == str(dtype).removeprefix("torch.")  # kept as it is: the store decides about precision


def test_a_meta_model_gives_a_layout_for_planning_only() -> None:
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    real = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(LayoutMismatchError, match="parameter '0.weight' is on the meta device"):
        Layout.from_model(meta)
    # shapes and dtypes are all a layout holds: the meta one equals the real one
    assert Layout.from_model(meta, allow_meta=True) == Layout.from_model(real)


@pytest.mark.parametrize(("value", "error"), [(torch.zeros(4, dtype=torch.float8_e4m3fn), TypeError),
                                               (torch.zeros(4, device="meta"), LayoutMismatchError),
                                               (_sparse(torch.sparse_coo), LayoutMismatchError)],
                         ids=["float8", "meta", "sparse"])
def test_create_refuses_before_writing_a_trajectory(tmp_path: Path, value: torch.Tensor,
                                                    error: type[Exception]) -> None:
    path = tmp_path / "s.zarr"
    with pytest.raises(error, match="parameter 'odd'"):
        TrajectoryStore.create(path, _with_param(value))
    # the layout is checked before the store is touched: no trajectory, not even a partial one
    assert not (path / "trajectories" / "default").exists()
    # ... where a storable model's creation puts one (the check above looks in the right place)
    TrajectoryStore.create(path, nn.Linear(3, 2)).close()
    assert (path / "trajectories" / "default").is_dir()
