"""TrajectoryStore: the backend contract, write -> read round trips, bad inputs, corruption.

Reduced-precision tolerances: round to nearest even into a format with a p-bit significand
(implicit bit included) is off by at most the unit roundoff u = 2**-p relative to the value,
p = 8 for bfloat16 and p = 11 for float16; below the smallest normal number the error is at most
half the subnormal spacing instead (2**-25 for float16, 2**-134 for bfloat16).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zarr.storage import LocalStore, WrapperStore

import trajstore.store as store_module
from conftest import ShapesModel, assign_flat, cnn, drop_memory, flat_params, memory_url, mlp, train_steps
from trajstore import TrajectoryStore
from trajstore.cli import main as cli_main
from trajstore.errors import (
    CorruptSnapshotError,
    FormatVersionError,
    LayoutMismatchError,
    NonFiniteError,
    NotAStoreError,
    ReadOnlyError,
    SnapshotIndexError,
    StoreExistsError,
    TrajectoryNotFoundError,
    WriterConflictError,
)
from trajstore.info import store_info

MLP_INPUT = (8, 5)
CNN_INPUT = (4, 1, 6, 6)
_AMBIGUOUS = r"holds trajectories \['seed0', 'seed1'\]; pass trajectory=NAME"


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns, so -0.0 != 0.0 and NaN payloads count."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@dataclass
class Written:
    store: TrajectoryStore
    model: nn.Module
    flats: list[np.ndarray]                   # parameters at each append
    states: list[dict[str, torch.Tensor]]     # state_dict() at each append


def _write(url: Any, factory: Callable[[], nn.Module] = mlp, k: int = 3, x_shape: tuple[int, ...] = MLP_INPUT,
           **create_kw: Any) -> Written:
    """A store with ``k`` snapshots of a model trained between appends."""
    model = factory()
    store = TrajectoryStore.create(url, model, **create_kw)
    out = Written(store, model, [], [])
    for i in range(k):
        train_steps(model, x_shape, seed=i)
        store.append(model, step=10 * i, epoch=i / 2, lr=0.1 / (i + 1), metrics={"loss": 1.0 / (i + 1), "acc": i})
        out.flats.append(flat_params(model))
        out.states.append({name: t.clone() for name, t in model.state_dict().items()})
    return out


# ---------------------------------------------------------------- the backend contract


class TestStoreContract:
    """What every backend (local folder, memory://, file://) must do identically."""

    def test_create_append_len(self, store_url: str) -> None:
        model = mlp()
        with TrajectoryStore.create(store_url, model) as store:
            assert len(store) == 0 and store.mode == "a"
            assert store.n == sum(p.numel() for p in model.parameters())
            assert [store.append(model) for _ in range(3)] == [0, 1, 2]  # append returns the new index
            assert len(store) == 3

    def test_snapshot_is_bit_exact(self, store_url: str) -> None:
        w = _write(store_url, chunk_bytes=100)  # 25 values per chunk: chunks straddle tensors
        with w.store:
            for i, want in enumerate(w.flats):
                got = w.store.snapshot(i)
                assert got.dtype == np.float32 and got.shape == (w.store.n,)
                np.testing.assert_array_equal(_bits(got), _bits(want))
            # snapshots differ, so an off-by-one row would be caught
            assert not np.array_equal(w.flats[0], w.flats[1])
            np.testing.assert_array_equal(w.store.snapshot(-1), w.flats[2])
            np.testing.assert_array_equal(w.store.snapshot(-3), w.flats[0])
            np.testing.assert_array_equal(w.store.snapshot(np.int64(1)), w.flats[1])

    @pytest.mark.parametrize("factory, x_shape", [(mlp, MLP_INPUT), (cnn, CNN_INPUT)], ids=["mlp", "cnn"])
    def test_load_into_restores_parameters_and_buffers(self, store_url: str, factory: Callable[[], nn.Module],
                                                        x_shape: tuple[int, ...]) -> None:
        w = _write(store_url, factory, k=2, x_shape=x_shape, chunk_bytes=64)
        with w.store:
            fresh = factory()
            fresh.load_state_dict({k: torch.full_like(v, 3) for k, v in fresh.state_dict().items()})
            assert w.store.load_into(fresh, 0) is fresh
            state = fresh.state_dict()
            assert state.keys() == w.states[0].keys()
            for name, want in w.states[0].items():
                # every entry exactly, dtype included (num_batches_tracked stays int64)
                assert state[name].dtype == want.dtype, name
                assert torch.equal(state[name], want), name
            assert int(state["1.num_batches_tracked"]) == 3  # 3 train steps before snapshot 0
            w.store.load_into(fresh, -1)
            assert int(fresh.state_dict()["1.num_batches_tracked"]) == 6
            np.testing.assert_array_equal(flat_params(fresh), w.flats[1])

    def test_records_round_trip_and_read_only_reopen(self, store_url: str) -> None:
        w = _write(store_url, k=3, attrs={"seed": 7, "note": "contract"})
        w.store.close()
        with TrajectoryStore.open(store_url) as reader:
            assert reader.mode == "r" and len(reader) == 3 and reader.n == w.store.n
            assert reader.attrs == {"seed": 7, "note": "contract"}
            for i, rec in enumerate(reader.records):
                assert rec["step"] == 10 * i and rec["epoch"] == i / 2 and rec["lr"] == 0.1 / (i + 1)
                assert rec["metrics"] == {"loss": 1.0 / (i + 1), "acc": i}
                assert rec["time"] > 0 and rec["append_seconds"] >= 0
                np.testing.assert_array_equal(_bits(reader.snapshot(i)), _bits(w.flats[i]))
            assert reader.layout == w.store.layout

    def test_to_dask_window_equals_stacked_snapshots(self, store_url: str) -> None:
        w = _write(store_url, k=5, chunk_bytes=64)
        with w.store:
            arr = w.store.to_dask(1, 4, block_bytes=1)
            assert arr.shape == (3, w.store.n) and arr.dtype == np.float32
            assert len(arr.chunks[1]) > 1  # several parameter blocks, so block edges are exercised
            np.testing.assert_array_equal(arr.compute(), np.stack([w.store.snapshot(i) for i in range(1, 4)]))
            np.testing.assert_array_equal(w.store.to_dask(-2).compute(), np.stack(w.flats[3:]))
            np.testing.assert_array_equal(w.store.to_dask().compute(), np.stack(w.flats))
            with pytest.raises(SnapshotIndexError, match=r"empty window \[3, 3\)"):
                w.store.to_dask(3, 3)

    def test_rng_state_round_trip(self, store_url: str) -> None:
        model = mlp()
        with TrajectoryStore.create(store_url, model) as store:
            store.append(model)
            torch.manual_seed(1234)
            torch.rand(5)
            expected = torch.get_rng_state()
            store.append(model, rng_state=True)
            torch.rand(5)  # the global state moves on; the record must not
            assert store.rng_state(0) is None
            got = store.rng_state(1)
            assert got is not None and got.dtype == torch.uint8
            assert torch.equal(got, expected)
        with TrajectoryStore.open(store_url) as reader:
            assert torch.equal(reader.rng_state(-1), expected)
            torch.set_rng_state(reader.rng_state(-1))
            resumed = torch.rand(3)
        torch.set_rng_state(expected)
        assert torch.equal(resumed, torch.rand(3))  # the state resumes the same random stream

    def test_several_named_trajectories(self, store_url: str) -> None:
        a = _write(store_url, lambda: mlp(0), k=2, trajectory="seed0")
        a.store.close()
        b = _write(store_url, lambda: cnn(1), k=1, x_shape=CNN_INPUT, trajectory="seed1", storage_dtype="float16")
        b.store.close()
        assert TrajectoryStore.list_trajectories(store_url) == ["seed0", "seed1"]
        with pytest.raises(TrajectoryNotFoundError, match=_AMBIGUOUS):
            TrajectoryStore.open(store_url)
        with TrajectoryStore.open(store_url, trajectory="seed1") as r1, \
                TrajectoryStore.open(store_url, trajectory="seed0") as r0:
            assert (len(r0), len(r1)) == (2, 1)
            assert r1.storage_dtype == "float16" and r0.storage_dtype == "float32"
            np.testing.assert_array_equal(r0.snapshot(1), a.flats[1])  # the trajectories do not mix
        # with a trajectory called "default" among several, open() picks it
        _write(store_url, k=1).store.close()
        with TrajectoryStore.open(store_url) as default:
            assert default.name == "default" and len(default) == 1

    def test_store_info(self, store_url: str) -> None:
        w = _write(store_url, k=2, storage_dtype="bfloat16")
        w.store.close()
        info = store_info(store_url)
        assert info["store"] == store_url
        (tr,) = info["trajectories"]
        assert tr["name"] == "default" and tr["n"] == w.store.n and tr["t"] == 2
        assert tr["storage_dtype"] == "bfloat16"
        assert tr["parameters"] == 6 and tr["buffers"] == 3 and tr["buffer_bytes"] == 7 * 4 * 2 + 8
        # 2 snapshots of n bfloat16 values at least, checksums and metadata on top
        assert tr["bytes_stored"] > 2 * w.store.n * 2
        assert [s["step"] for s in tr["snapshots"]] == [0, 10]


def _merged_store(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, Written]]:
    """One local store holding a trajectory per name, assembled from single-trajectory stores.

    Copying the trajectory folders sidesteps create() of a second trajectory, which fails
    (see test_several_named_trajectories); what is tested here is how open() chooses.
    """
    written = {}
    for name in names:
        w = _write(tmp_path / name, k=len(written) + 1, trajectory=name)
        w.store.close()
        written[name] = w
    root = tmp_path / names[0]
    for name in names[1:]:
        shutil.copytree(tmp_path / name / "trajectories" / name, root / "trajectories" / name)
    return root, written


def test_open_without_a_name_is_ambiguous_between_trajectories(tmp_path: Path) -> None:
    root, written = _merged_store(tmp_path, ["seed0", "seed1"])
    assert TrajectoryStore.list_trajectories(root) == ["seed0", "seed1"]
    with pytest.raises(TrajectoryNotFoundError, match=_AMBIGUOUS) as info:
        TrajectoryStore.open(root)
    assert isinstance(info.value, LookupError)
    with TrajectoryStore.open(root, trajectory="seed1") as r1, TrajectoryStore.open(root, trajectory="seed0") as r0:
        assert (len(r0), len(r1)) == (1, 2)
        np.testing.assert_array_equal(r1.snapshot(1), written["seed1"].flats[1])  # the trajectories do not mix


def test_open_without_a_name_prefers_default(tmp_path: Path) -> None:
    root, _ = _merged_store(tmp_path, ["seed0", "default"])
    with TrajectoryStore.open(root) as store:
        assert store.name == "default" and len(store) == 2


# ---------------------------------------------------------------- round trips over random layouts

_SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)  # () is a 0-d scalar, 0 an empty dim
_SHAPES = st.lists(_SHAPE, min_size=1, max_size=6).filter(lambda s: sum(math.prod(x) for x in s) > 0)
_EDGE = st.floats(-6e4, 6e4, width=32)  # float16 max is 65504: every value here stays finite
_UNIT = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}
_SUBNORMAL_HALF_SPACING = {"float32": 0.0, "bfloat16": 2.0**-134, "float16": 2.0**-25}


@settings(max_examples=30, deadline=None)
@given(shapes=_SHAPES, dtype=st.sampled_from(["float32", "bfloat16", "float16"]), chunk_elems=st.integers(1, 24),
       chunk_slack=st.integers(0, 3), stage_chunks=st.integers(1, 3), transpose=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.integers(-7, 3),
       edges=st.lists(st.tuples(st.integers(0), _EDGE), max_size=8))
@pytest.mark.slow
def test_round_trip_over_random_layouts(shapes: list[tuple[int, ...]], dtype: str, chunk_elems: int,
                                        chunk_slack: int, stage_chunks: int, transpose: bool, seed: int,
                                        scale: int, edges: list[tuple[int, float]]) -> None:
    n = sum(math.prod(s) for s in shapes)
    rng = np.random.default_rng(seed)
    values = np.clip(rng.standard_normal((2, n)) * 10.0**scale, -6e4, 6e4).astype(np.float32)
    for pos, v in edges:  # hypothesis' edge cases: ties, subnormals, -0.0, the largest finite values
        values[pos % 2, pos // 2 % n] = v
    itemsize = 4 if dtype == "float32" else 2
    elems = min(n, chunk_elems)
    url = memory_url()
    # a small staging buffer too, so appends and load_into stream range by range across tensors
    with mock.patch.object(store_module, "DEFAULT_STAGE_BYTES", stage_chunks * elems * itemsize):
        try:
            model = ShapesModel(shapes, transpose=transpose)
            chunk_bytes = chunk_elems * itemsize + chunk_slack % itemsize  # not always a whole item
            with TrajectoryStore.create(url, model, storage_dtype=dtype, chunk_bytes=chunk_bytes) as store:
                assert store.chunk_elems == elems
                # load_into streams range by range: several ranges whenever a stage is shorter than n
                assert len(list(store.iter_ranges())) == -(-n // min(n, stage_chunks * elems))
                for row in values:
                    assign_flat(model, row)
                    store.append(model)
                for i, row in enumerate(values):
                    fresh = ShapesModel(shapes, fill=float("nan"), transpose=transpose)
                    got = flat_params(store.load_into(fresh, i))
                    expected = torch.from_numpy(row).to(getattr(torch, dtype)).float().numpy()
                    # bit for bit what torch's round-to-nearest-even conversion gives (float32: the input)
                    np.testing.assert_array_equal(_bits(got), _bits(expected))
                    np.testing.assert_array_equal(_bits(store.snapshot(i)), _bits(expected))
                    err = np.abs(got.astype(np.float64) - row)
                    assert np.all(err <= _UNIT[dtype] * np.abs(row) + _SUBNORMAL_HALF_SPACING[dtype])
        finally:
            drop_memory(url)


@pytest.mark.parametrize("dtype, values, expected", [
    # bfloat16 keeps 7 fraction bits: 1 + 2**-8 is a tie between 1 and 1 + 2**-7 and goes to the even 1
    ("bfloat16", [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-9), -0.0], [1.0, 1 + 2**-6, -1.0, -0.0]),
    # float16 keeps 10 fraction bits; 2**-25 is half the smallest subnormal (a tie, to even 0)
    ("float16", [1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 2**-25, 3 * 2**-25], [1.0, 1 + 2**-9, 65504.0, 0.0, 2**-23]),
])
def test_reduced_precision_rounds_to_nearest_even(dtype: str, values: list[float], expected: list[float]) -> None:
    url = memory_url()
    try:
        model = ShapesModel([(len(values),)])
        with TrajectoryStore.create(url, model, storage_dtype=dtype) as store:
            assign_flat(model, np.array(values, dtype=np.float32))
            store.append(model)
            # hand-computed references, independent of torch's conversion
            np.testing.assert_array_equal(_bits(store.snapshot(0)), _bits(np.array(expected)))
    finally:
        drop_memory(url)


# ---------------------------------------------------------------- bad inputs


@dataclass
class Ctx:
    """What a bad-input case may use: a folder, a memory:// URL, and checks to run after the refusal."""

    tmp: Path
    mem: str
    stores: list[TrajectoryStore] = field(default_factory=list)
    checks: list[Callable[[], None]] = field(default_factory=list)
    collect: bool = False  # run the garbage collector at teardown

    def track(self, store: TrajectoryStore) -> TrajectoryStore:
        self.stores.append(store)
        return store


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Ctx]:
    c = Ctx(tmp_path, memory_url())
    yield c
    for store in c.stores:
        store.close()
    if c.collect:
        # A refused writer is a half-built store (kept alive by the traceback's cycle) whose
        # __del__ does store I/O: collect it now, while zarr's event loop runs, not at exit.
        gc.collect()
    drop_memory(c.mem)


Act = Callable[[], Any]


def _poison(model: nn.Module, name: str, index: int, value: float) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[index] = value


def _nonfinite(value: float, dtype: str = "float32") -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        path = ctx.tmp / "s"
        model = ShapesModel([(5, 4), (3, 3)])
        store = ctx.track(TrajectoryStore.create(path, model, storage_dtype=dtype, chunk_bytes=16))
        store.append(model)
        stored = lambda: torch.from_numpy(flat_params(model)).to(getattr(torch, dtype)).float().numpy()
        good = stored()
        _poison(model, "params.1", 2, value)  # after 20 + 2 values: several chunks are written first

        def check() -> None:
            assert len(store) == 1  # nothing was committed
            with TrajectoryStore.open(path) as reader:
                assert len(reader) == 1
                with pytest.raises(SnapshotIndexError):
                    reader.snapshot(1)  # the partly written row is not visible
            _poison(model, "params.1", 2, 0.5)
            assert store.append(model) == 1  # the next good append takes the row
            np.testing.assert_array_equal(store.snapshot(0), good)
            np.testing.assert_array_equal(store.snapshot(1), stored())
        ctx.checks.append(check)
        return lambda: store.append(model)
    return setup


def _layout(model: nn.Module) -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        store = ctx.track(TrajectoryStore.create(ctx.tmp / "s", ShapesModel([(2, 3), (4,)])))
        ctx.checks.append(lambda: _assert_len(store, 0))
        return lambda: store.append(model)
    return setup


def _assert_len(store: TrajectoryStore, n: int) -> None:
    assert len(store) == n
    with TrajectoryStore.open(store.url, trajectory=store.name) as reader:
        assert len(reader) == n


def _buffer_dtype(ctx: Ctx) -> Act:
    store = ctx.track(TrajectoryStore.create(ctx.tmp / "s", mlp()))
    other = mlp()
    other[1].num_batches_tracked = other[1].num_batches_tracked.to(torch.int32)
    return lambda: store.append(other)


def _empty_dir(ctx: Ctx) -> Act:
    (ctx.tmp / "empty").mkdir()
    return lambda: TrajectoryStore.open(ctx.tmp / "empty")


def _random_file(ctx: Ctx) -> Act:
    (ctx.tmp / "junk").mkdir()
    (ctx.tmp / "junk" / "notes.bin").write_bytes(os.urandom(64))
    return lambda: TrajectoryStore.open(ctx.tmp / "junk", "a")


def _foreign_zarr(ctx: Ctx) -> Act:
    zarr.open_group(ctx.tmp / "z", mode="w", attributes={"other": 1})
    return lambda: TrajectoryStore.open(ctx.tmp / "z")


def _format_999(group_path: str) -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        TrajectoryStore.create(ctx.tmp / "s", mlp()).close()
        group = zarr.open_group(ctx.tmp / "s" / group_path, mode="r+")
        group.update_attributes({"trajstore": {**group.attrs["trajstore"], "format_version": 999}})
        return lambda: TrajectoryStore.open(ctx.tmp / "s")
    return setup


def _create_over_foreign(ctx: Ctx) -> Act:
    (ctx.tmp / "data").mkdir()
    (ctx.tmp / "data" / "results.csv").write_text("a,b\n1,2\n")

    def check() -> None:
        assert os.listdir(ctx.tmp / "data") == ["results.csv"]  # nothing written beside foreign data
    ctx.checks.append(check)
    return lambda: ctx.track(TrajectoryStore.create(ctx.tmp / "data", mlp()))


def _create_twice(ctx: Ctx) -> Act:
    TrajectoryStore.create(ctx.tmp / "s", mlp()).close()
    return lambda: ctx.track(TrajectoryStore.create(ctx.tmp / "s", mlp()))


def _append_read_only(ctx: Ctx) -> Act:
    model = mlp()
    TrajectoryStore.create(ctx.tmp / "s", model).close()
    reader = ctx.track(TrajectoryStore.open(ctx.tmp / "s", "r"))
    ctx.checks.append(lambda: _assert_len(reader, 0))
    return lambda: reader.append(model)


def _append_after_close(ctx: Ctx) -> Act:
    model = mlp()
    store = TrajectoryStore.create(ctx.tmp / "s", model)
    store.close()
    return lambda: store.append(model)


def _index(i: int, load: bool = False) -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        w = _write(ctx.tmp / "s", k=2)
        w.store.close()
        return (lambda: w.store.load_into(mlp(), i)) if load else (lambda: w.store.snapshot(i))
    return setup


def _second_writer(where: str) -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        url = str(ctx.tmp / "s") if where == "local" else ctx.mem
        model = mlp()
        first = ctx.track(TrajectoryStore.create(url, model))
        ctx.collect = True

        def check() -> None:
            first.append(model)  # the refused writer did not disturb the holder
            first.close()
            with TrajectoryStore.open(url, "a") as second:  # free once the first writer closed
                assert second.append(model) == 1
        ctx.checks.append(check)
        return lambda: ctx.track(TrajectoryStore.open(url, "a"))
    return setup


def _create(**kw: Any) -> Callable[[Ctx], Act]:
    def setup(ctx: Ctx) -> Act:
        path = ctx.tmp / "s"

        def check() -> None:
            assert not path.exists()  # validated at the boundary, before anything is written
        ctx.checks.append(check)
        return lambda: ctx.track(TrajectoryStore.create(path, mlp(), **kw))
    return setup


def _open_mode(ctx: Ctx) -> Act:
    TrajectoryStore.create(ctx.tmp / "s", mlp()).close()
    return lambda: TrajectoryStore.open(ctx.tmp / "s", "w")  # type: ignore[arg-type]


def _missing_trajectory(ctx: Ctx) -> Act:
    TrajectoryStore.create(ctx.tmp / "s", mlp(), trajectory="seed0").close()
    return lambda: TrajectoryStore.open(ctx.tmp / "s", trajectory="seed1")


def _bad_metric(ctx: Ctx) -> Act:
    model = mlp()
    store = ctx.track(TrajectoryStore.create(ctx.tmp / "s", model))
    ctx.checks.append(lambda: _assert_len(store, 0))  # records are checked before any chunk is written
    return lambda: store.append(model, metrics={"loss": float("nan")})


_PID = f"pid {os.getpid()}"
BAD_INPUTS = [
    ("layout-shape", _layout(ShapesModel([(2, 3), (5,)])), LayoutMismatchError, ValueError,
     r"parameter 1 differs: store has 'params.1' of shape \(4,\), model has 'params.1' of shape \(5,\)"),
    ("layout-missing", _layout(ShapesModel([(2, 3)])), LayoutMismatchError, ValueError,
     r"model lacks parameter 'params.1' of shape \(4,\)"),
    ("layout-extra", _layout(ShapesModel([(2, 3), (4,), (1,)])), LayoutMismatchError, ValueError,
     r"model has an extra parameter 'params.2' of shape \(1,\)"),
    ("layout-buffer-dtype", _buffer_dtype, LayoutMismatchError, ValueError,
     "buffer '1.num_batches_tracked' has dtype int32 in the model, int64 in the store"),
    ("nan", _nonfinite(float("nan")), NonFiniteError, ValueError,
     r"parameter 'params.1' holds a non-finite value at flat index 2 \(value nan\)"),
    ("inf", _nonfinite(-float("inf")), NonFiniteError, ValueError, r"'params.1' .* flat index 2 \(value -inf\)"),
    # finite in float32, infinite once rounded to the storage dtype
    ("float16-overflow", _nonfinite(1e6, "float16"), NonFiniteError, ValueError,
     r"'params.1' .* flat index 2 \(value 1000000.0\) as float16"),
    ("bfloat16-overflow", _nonfinite(3.4e38, "bfloat16"), NonFiniteError, ValueError, r"'params.1' .* as bfloat16"),
    ("not-a-store-empty-dir", _empty_dir, NotAStoreError, FileNotFoundError, "empty is not a trajstore store"),
    ("not-a-store-random-file", _random_file, NotAStoreError, FileNotFoundError, "junk is not a trajstore store"),
    ("not-a-store-foreign-zarr", _foreign_zarr, NotAStoreError, FileNotFoundError, "a Zarr group but not a trajstore store"),
    ("store-format-999", _format_999(""), FormatVersionError, ValueError,
     "format version 999; this trajstore reads versions 1, 2"),
    ("trajectory-format-999", _format_999("trajectories/default"), FormatVersionError, ValueError, "format version 999"),
    ("create-over-foreign-files", _create_over_foreign, StoreExistsError, FileExistsError,
     "holds data that is not a trajstore store"),
    ("create-trajectory-twice", _create_twice, StoreExistsError, FileExistsError,
     "already holds a trajectory named 'default'"),
    ("append-read-only", _append_read_only, ReadOnlyError, PermissionError, "'default' is open read-only"),
    ("append-after-close", _append_after_close, ReadOnlyError, PermissionError, "open read-only"),
    ("snapshot-past-end", _index(2), SnapshotIndexError, IndexError, "snapshot index 2 out of range .* 2 committed"),
    ("snapshot-before-start", _index(-3), SnapshotIndexError, IndexError, "snapshot index -3 out of range"),
    ("load-into-past-end", _index(2, load=True), SnapshotIndexError, IndexError, "snapshot index 2 out of range"),
    ("second-writer-local", _second_writer("local"), WriterConflictError, BlockingIOError,
     f"already has a live writer: {_PID} "),
    ("second-writer-memory", _second_writer("memory"), WriterConflictError, BlockingIOError,
     f"already has a live writer: {_PID} .* lease expires"),
    ("storage-dtype", _create(storage_dtype="float64"), ValueError, ValueError,
     "storage_dtype must be one of .* got 'float64'"),
    ("chunk-bytes-zero", _create(chunk_bytes=0), ValueError, ValueError, "chunk_bytes must be an integer >= 4, got 0"),
    ("chunk-bytes-below-item", _create(chunk_bytes=2), ValueError, ValueError, ">= 4, got 2"),
    ("chunk-bytes-half-item", _create(storage_dtype="float16", chunk_bytes=1), ValueError, ValueError, ">= 2, got 1"),
    ("chunk-bytes-bool", _create(chunk_bytes=True), ValueError, ValueError, "got True"),
    ("chunk-bytes-float", _create(chunk_bytes=4096.0), ValueError, ValueError, "got 4096.0"),
    ("name-slash", _create(trajectory="a/b"), ValueError, ValueError, "got 'a/b'"),
    ("name-empty", _create(trajectory=""), ValueError, ValueError, r"trajectory name must match .*, got ''"),
    ("name-dot", _create(trajectory=".hidden"), ValueError, ValueError, "got '.hidden'"),
    ("name-not-str", _create(trajectory=3), ValueError, ValueError, "got 3"),
    ("open-mode", _open_mode, ValueError, ValueError, "mode must be 'r' or 'a', got 'w'"),
    ("missing-trajectory", _missing_trajectory, TrajectoryNotFoundError, LookupError,
     r"holds no trajectory 'seed1' \(it has \['seed0'\]\)"),
    ("metric-nan", _bad_metric, ValueError, ValueError, "metric 'loss' must be finite, got nan"),
]


@pytest.mark.parametrize("setup, error, builtin, match", [pytest.param(*row[1:], id=row[0]) for row in BAD_INPUTS])
def test_bad_input_is_refused(ctx: Ctx, setup: Callable[[Ctx], Act], error: type[Exception],
                              builtin: type[Exception], match: str) -> None:
    act = setup(ctx)
    with pytest.raises(builtin, match=match) as info:  # catchable as the builtin users already catch ...
        act()
    assert isinstance(info.value, error)  # ... and as trajstore's own class
    for check in ctx.checks:
        check()


# ---------------------------------------------------------------- corruption of a local store


def _chunk(root: Path, row: int, col: int = 0, array: str = "params") -> Path:
    return root / "trajectories" / "default" / array / "c" / str(row) / str(col)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"flipped-byte": _flip, "truncated": _truncate, "deleted": Path.unlink}


@pytest.fixture
def local_written(tmp_path: Path) -> Iterator[Written]:
    w = _write(tmp_path / "s", k=3, chunk_bytes=64)  # n = 80: 16 values per chunk, 5 chunks per snapshot
    w.store.close()
    yield w


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
@pytest.mark.parametrize("col", [0, 4], ids=["first-chunk", "last-chunk"])
def test_damaged_chunk_is_reported_for_its_snapshot(local_written: Written, tmp_path: Path,
                                                    damage: Callable[[Path], Any], col: int) -> None:
    root = tmp_path / "s"
    assert _chunk(root, 1, col).is_file() and (col == 0 or not _chunk(root, 1, col + 1).exists())
    damage(_chunk(root, 1, col))
    with TrajectoryStore.open(root) as store:
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 of trajectory 'default'") as info:
            store.snapshot(1)
        assert isinstance(info.value, OSError)
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 "):
            store.load_into(mlp(), 1)
        # damage stays local to its snapshot
        for i in (0, 2):
            np.testing.assert_array_equal(store.snapshot(i), local_written.flats[i])


@pytest.mark.parametrize("damage", list(DAMAGE.values()), ids=list(DAMAGE))
def test_damaged_chunk_is_reported_through_to_dask(local_written: Written, tmp_path: Path,
                                                   damage: Callable[[Path], Any]) -> None:
    damage(_chunk(tmp_path / "s", 1, 2))
    with TrajectoryStore.open(tmp_path / "s") as store:
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 of trajectory 'default'"):
            store.to_dask(block_bytes=1).compute()
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 "):  # store numbering, not the window's
            store.to_dask(1, 3).compute()
        np.testing.assert_array_equal(store.to_dask(0, 1).compute()[0], local_written.flats[0])


def test_damaged_buffer_chunk_is_reported(local_written: Written, tmp_path: Path) -> None:
    _flip(_chunk(tmp_path / "s", 1, array="buffers"))
    with TrajectoryStore.open(tmp_path / "s") as store:
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 .* buffers chunk failed its crc32c checksum"):
            store.load_into(mlp(), 1)
        store.load_into(mlp(), 0)


def test_deleted_buffer_chunk_is_reported(local_written: Written, tmp_path: Path) -> None:
    # Regression: the buffers' fill value is 0, so a missing chunk once restored zeroed statistics.
    _chunk(tmp_path / "s", 1, array="buffers").unlink()
    with TrajectoryStore.open(tmp_path / "s") as store:
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 "):
            store.load_into(mlp(), 1)


# ---------------------------------------------------------------- appends leave older snapshots alone


class _KeyLog(WrapperStore[LocalStore]):
    """A LocalStore that records every key read or written."""

    def __init__(self, store: LocalStore, log: list[tuple[str, str]] | None = None) -> None:
        super().__init__(store)
        self.log = [] if log is None else log

    def _with_store(self, store: LocalStore) -> _KeyLog:
        return type(self)(store, self.log)

    async def get(self, key: str, *args: Any, **kw: Any) -> Any:
        self.log.append(("get", key))
        return await super().get(key, *args, **kw)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        self.log.extend(("get", key) for key, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)

    async def set(self, key: str, value: Any) -> None:
        self.log.append(("set", key))
        await super().set(key, value)

    async def delete(self, key: str) -> None:
        self.log.append(("delete", key))
        await super().delete(key)


def test_append_never_touches_older_snapshots(tmp_path: Path) -> None:
    root = tmp_path / "s"
    w = _write(root, k=3, chunk_bytes=64)
    w.store.close()
    old = sorted(p for row in (0, 1) for array in ("params", "buffers")
                 for p in (root / "trajectories" / "default" / array / "c" / str(row)).iterdir())
    assert len(old) == 2 * (5 + 1)  # n = 80 in chunks of 16, one buffer chunk, per row
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in old}

    keys = _KeyLog(LocalStore(root))
    model = w.model
    with TrajectoryStore.open(keys, "a") as store:
        keys.log.clear()  # opening reads metadata only; count from the appends on
        for i in range(2):
            train_steps(model, MLP_INPUT, seed=10 + i)
            store.append(model)
        assert len(store) == 5
    touched = {key for _, key in keys.log if "/c/" in key}
    rows = {int(key.split("/c/")[1].split("/")[0]) for key in touched}
    assert rows == {3, 4}  # chunk keys of the new rows only: no read, write or delete of rows 0..2
    # same bytes, same mtime, same inode: not rewritten, not replaced by a rename
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in old}
    assert after == before
    with TrajectoryStore.open(root) as reader:
        np.testing.assert_array_equal(reader.snapshot(1), w.flats[1])
        np.testing.assert_array_equal(reader.snapshot(4), flat_params(model))


# ---------------------------------------------------------------- command line


def test_cli_info_text_and_json(local_written: Written, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "s")
    assert cli_main(["info", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"store {path}\n")
    assert f"trajectory 'default': n = {local_written.store.n:,} parameters in 6 tensors" in out
    assert "t = 3 snapshots, float32" in out and local_written.store.layout.fingerprint in out
    header, *rows = [line.split() for line in out.splitlines()[2:]]
    assert header == ["#", "step", "epoch", "lr", "acc", "loss"]  # metric columns sorted by name
    assert rows[2] == ["2", "20", "1", "0.03333", "2", "0.3333"]

    assert cli_main(["info", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (tr,) = doc["trajectories"]
    assert tr["t"] == 3 and tr["n"] == local_written.store.n and tr["storage_dtype"] == "float32"
    assert [s["metrics"]["loss"] for s in tr["snapshots"]] == [1.0, 0.5, 1 / 3]


def test_cli_info_on_a_non_store_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("trajstore: error: ") and f"{tmp_path} is not a trajstore store" in captured.err
