"""Layout: the flat-vector map of a model, and the validation of layouts read from a store."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from conftest import ShapesModel, cnn, mlp
from trajstore.errors import InvalidStoreError
from trajstore.layout import MAX_ELEMENTS, Layout


@pytest.mark.parametrize("factory", [mlp, cnn, lambda: ShapesModel([(3,), (), (2, 5), (1, 1, 3)])],
                         ids=["mlp", "cnn", "shapes"])
def test_from_model_follows_named_parameters(factory: Callable[[], nn.Module]) -> None:
    model = factory()
    layout = Layout.from_model(model)
    named = list(model.named_parameters())
    # the flat vector is named_parameters() order, nothing reordered or skipped
    assert [s.name for s in layout.params] == [name for name, _ in named]
    assert [s.shape for s in layout.params] == [tuple(p.shape) for _, p in named]
    assert all(s.dtype == "float32" for s in layout.params)
    offset = 0
    for spec, (_, p) in zip(layout.params, named):
        assert spec.offset == offset, f"{spec.name} not contiguous with its predecessor"
        assert spec.numel == p.numel()
        offset += p.numel()
    assert layout.n == offset == sum(p.numel() for p in model.parameters())


def test_from_model_keeps_persistent_buffers_only() -> None:
    model = mlp()
    model.register_buffer("scratch", torch.zeros(4), persistent=False)
    model.register_buffer("kept", torch.arange(3, dtype=torch.int16))
    layout = Layout.from_model(model)
    names = [b.name for b in layout.buffers]
    # exactly the state_dict() buffers, in named_buffers() order (a module's own buffers first)
    assert names == ["kept", "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert names == [name for name, _ in model.named_buffers() if name != "scratch"]
    dtypes = {b.name: b.dtype for b in layout.buffers}
    assert dtypes["1.num_batches_tracked"] == "int64" and dtypes["kept"] == "int16"
    # byte ranges are contiguous: three int16, 7 + 7 float32, one int64
    assert [b.offset for b in layout.buffers] == [0, 6, 34, 62]
    assert layout.buffer_nbytes == 70


def test_fingerprint_depends_on_shapes_not_values() -> None:
    a, b = Layout.from_model(mlp(seed=0)), Layout.from_model(mlp(seed=1))
    assert a.fingerprint == b.fingerprint  # same architecture, different weights
    assert a == b
    bigger = mlp()
    bigger[3] = nn.Linear(7, 4)
    assert Layout.from_model(bigger).fingerprint != a.fingerprint
    # same number of values, different shape
    assert Layout.from_model(ShapesModel([(2, 3)])).fingerprint != Layout.from_model(ShapesModel([(3, 2)])).fingerprint


def test_json_round_trip() -> None:
    layout = Layout.from_model(cnn())
    doc = json.loads(json.dumps(layout.to_json()))  # through real JSON: tuples become lists
    assert Layout.from_json(doc) == layout
    assert doc["n"] == layout.n and doc["fingerprint"] == layout.fingerprint


def test_from_model_refuses_a_model_without_parameters() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        Layout.from_model(nn.ReLU())


# ------------------------------------------------------------------ malformed layout documents


def _doc() -> dict[str, Any]:
    """Two parameters (6 + 4 values) and one int64 buffer, as a store records them."""
    doc: dict[str, Any] = {
        "n": 10,
        "params": [["w", [2, 3], "float32", 0], ["b", [4], "float32", 6]],
        "buffers": [["count", [], "int64", 0]],
    }
    doc["fingerprint"] = Layout.from_json(doc).fingerprint
    return doc


def _mutate(fn: Callable[[dict[str, Any]], object]) -> Callable[[], object]:
    def build() -> object:
        doc = copy.deepcopy(_doc())
        out = fn(doc)
        return doc if out is None else out
    return build


def _set(doc: dict[str, Any], *path_and_value: Any) -> None:
    *path, value = path_and_value
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


BAD_LAYOUTS = [
    ("not-a-dict", _mutate(lambda d: [d]), "must be a JSON object, got list"),
    ("params-not-list", _mutate(lambda d: _set(d, "params", {"w": [2, 3]})), "'params' must be a list, got dict"),
    ("entry-wrong-length", _mutate(lambda d: _set(d, "params", 0, ["w", [2, 3], "float32"])),
     r"entry must be \[name, shape, dtype, offset\]"),
    ("negative-dimension", _mutate(lambda d: _set(d, "params", 0, 1, [-2, -3])), r"'w' has an invalid shape \[-2, -3\]"),
    ("huge-shape", _mutate(lambda d: _set(d, "params", 0, 1, [2**30, 2**30])), "larger than the limit"),
    ("huge-total", _mutate(lambda d: _set(d, "params", [["a", [MAX_ELEMENTS], "float32", 0],
                                                         ["b", [1], "float32", MAX_ELEMENTS]])),
     "more than the limit"),
    ("overlapping-offsets", _mutate(lambda d: _set(d, "params", 1, 3, 5)), "'b' starts at offset 5, expected 6"),
    ("gap-in-offsets", _mutate(lambda d: _set(d, "params", 1, 3, 7)), "'b' starts at offset 7, expected 6"),
    ("buffer-gap", _mutate(lambda d: _set(d, "buffers", 0, 3, 1)), "buffer 'count' starts at offset 1, expected 0"),
    ("duplicated-name", _mutate(lambda d: _set(d, "params", 1, 0, "w")), "'w' appears twice"),
    ("unknown-dtype", _mutate(lambda d: _set(d, "buffers", 0, 2, "int99")), "unknown torch dtype 'int99'"),
    ("non-dtype-attribute", _mutate(lambda d: _set(d, "buffers", 0, 2, "nn")), "unknown torch dtype 'nn'"),
    ("non-float-param", _mutate(lambda d: _set(d, "params", 0, 2, "int64")), "'w' has non-float dtype 'int64'"),
    ("bool-as-dimension", _mutate(lambda d: _set(d, "params", 1, 1, [True])), "'b' has an invalid shape"),
    ("bool-as-offset", _mutate(lambda d: _set(d, "params", 0, 3, False)), "'w' has an invalid offset False"),
    ("float-as-offset", _mutate(lambda d: _set(d, "params", 1, 3, 6.0)), "'b' has an invalid offset 6.0"),
    ("no-params", _mutate(lambda d: _set(d, "params", [])), "no parameters"),
    ("fingerprint-mismatch", _mutate(lambda d: _set(d, "fingerprint", "0" * 16)), "fingerprint '0{16}' does not match"),
    ("fingerprint-of-other-shape", _mutate(lambda d: _set(d, "params", 1, 1, [2, 2])), "fingerprint .* does not match"),
    ("n-mismatch", _mutate(lambda d: _set(d, "n", 11)), "n = 11 but its parameters add up to 10"),
]


def test_valid_doc_parses() -> None:
    # the table below mutates this document; it must be valid as it stands
    layout = Layout.from_json(_doc())
    assert layout.n == 10 and layout.buffer_nbytes == 8


@pytest.mark.parametrize("build, match", [pytest.param(b, m, id=i) for i, b, m in BAD_LAYOUTS])
def test_malformed_layout_is_refused(build: Callable[[], object], match: str) -> None:
    with pytest.raises(InvalidStoreError, match=match) as info:
        Layout.from_json(build())
    assert isinstance(info.value, ValueError)  # catchable as the builtin

