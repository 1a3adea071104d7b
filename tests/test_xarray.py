"""xarray reads a store: the dimension names of every array (trajstore/_dims.py) and the views of
trajstore/xarray.py; Zarr's listings of a store do not trip over the write lease.

Every value comparison is bit for bit (float32 as uint32 patterns, so -0.0 and NaN payloads count):
xarray and trajstore read the same chunks through the same codecs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from _old_trajstore import OldWriter, extract
from conftest import flat_params, mlp, train_steps
from trajstore import TrajectoryStore, dldr, gram_matrix, open_basis
from trajstore._checkpoint import BlockCheckpoint
from trajstore.errors import WriterConflictError
from trajstore._dims import BUFFERS_DIMS, GRAM_DIMS, MEAN_DIMS, PARAMS_DIMS, U_DIMS, partial_dims
from trajstore.verify import verify
from trajstore.xarray import open_basis as basis_dataset
from trajstore.xarray import open_trajectory

xr = pytest.importorskip("xarray")

T = 10            # past the arrays' first capacity of 8 rows: a growth of the arrays keeps the names
CHUNK_BYTES = 128  # mlp() has n = 80 float32 parameters: 3 chunks (32, 32, 16) per snapshot
D = 3
TRAJ = "trajectories/default"
# What Zarr's listings cannot place in a trajectory's group: the commit log (JSON documents, not
# Zarr nodes) and, while a writer holds the lease, the lease document naming it.
NOT_ZARR_AFTER_CLOSE = {"log"}
NOT_ZARR_WHILE_WRITING = {"log", "writer.json"}


def _bits(a: object) -> np.ndarray:
    """float32 values as their bit patterns."""
    return np.ascontiguousarray(np.asarray(a), dtype=np.float32).view(np.uint32)


def _models(t: int) -> Iterator[object]:
    model = mlp()
    for k in range(t):
        if k:
            train_steps(model, (8, 5), steps=1, seed=k)
        yield model


def _write(path: Path | str, t: int = T, **create: object) -> None:
    """``t`` snapshots of mlp() training, with records: step 10 k, epoch k / 2 (none for snapshot 1), lr."""
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES, **create) as store:
        for k, model in enumerate(_models(t)):
            store.append(model, step=10 * k, epoch=None if k == 1 else k / 2, lr=0.1 / (k + 1))


def _unrecognised(path: Path) -> set[str]:
    """The names Zarr warns it cannot place, over a full listing and a tree of the store."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(path, mode="r")
        list(group.members(max_depth=None))
        group.tree()
    names = set()
    for w in caught:
        text = str(w.message)
        assert isinstance(w.message, zarr.errors.ZarrUserWarning), text  # no other kind of warning
        assert text.startswith("Object at ") and text.endswith(" is not recognized as a component of a Zarr "
                                                               "hierarchy."), text
        names.add(text.removeprefix("Object at ").split(" ")[0])
    return names


def _open_zarr(path: Path, group: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Object at (log|writer.json) is not recognized", zarr.errors.ZarrUserWarning)
        return xr.open_zarr(path, group=group, consolidated=False)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A closed store of T snapshots with its Gram matrix cached and a basis of window [2, T)."""
    path = tmp_path_factory.mktemp("xarray") / "store.zarr"
    _write(path)
    basis = dldr(TrajectoryStore.open(path), D, start=2)
    assert basis.name is not None
    return path, basis.name


def _array_docs(path: Path) -> dict[str, dict]:
    """Every array document under ``path``, by its folder relative to ``path``."""
    docs = {}
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") == "array":
            docs[meta.parent.relative_to(path).as_posix()] = doc
    return docs


# ------------------------------------------------------------------ the names on disk

def test_every_array_names_its_dimensions_distinctly(written: tuple[Path, str]) -> None:
    path, name = written
    docs = _array_docs(path)
    version = open_basis(path, name).path
    expected = {f"{TRAJ}/params": PARAMS_DIMS, f"{TRAJ}/buffers": BUFFERS_DIMS, f"{TRAJ}/gram/g{T}": GRAM_DIMS,
                f"{version}/U": U_DIMS, f"{version}/mean": MEAN_DIMS, f"{version}/gram": GRAM_DIMS}
    assert {k: tuple(d["dimension_names"]) for k, d in docs.items()} == expected  # every array, nothing else
    for key, doc in docs.items():
        names = doc["dimension_names"]
        assert len(names) == len(doc["shape"]), key  # one name per axis (Zarr refuses any other count)
        assert len(set(names)) == len(names), key  # distinct: xarray refuses a repeated dimension
    assert docs[f"{TRAJ}/params"]["shape"][0] > T  # grown past its first capacity, names kept


def test_a_block_checkpoint_partial_names_its_dimensions(tmp_path: Path) -> None:
    zstore = zarr.storage.LocalStore(tmp_path)
    checkpoint = BlockCheckpoint(zstore, "pass", {"kind": "test"})
    assert checkpoint.prepare() == 0
    for k, shape in enumerate([(4,), (3, 3)]):
        checkpoint.save(k, np.ones(shape))
        doc = json.loads((tmp_path / "pass" / f"b{k}" / "zarr.json").read_text())
        assert tuple(doc["dimension_names"]) == partial_dims(len(shape)) == ("partial_0", "partial_1")[:len(shape)]
        assert checkpoint.load(k, shape) is not None  # and it still loads


# ------------------------------------------------------------------ xr.open_zarr on the store as it is

def test_xr_open_zarr_reads_a_trajectory_as_trajstore_does(written: tuple[Path, str]) -> None:
    path, _ = written
    store = TrajectoryStore.open(path)
    assert [c.row for c in store.log.commits] == list(range(T))  # one writer: snapshot i is row i
    ds = _open_zarr(path, TRAJ)
    assert ds.params.dims == PARAMS_DIMS and ds.buffers.dims == BUFFERS_DIMS
    assert ds.params.dtype == np.float32 and ds.buffers.dtype == np.uint8  # no fill-value masking or casting
    params = ds.params.values
    assert params.shape[0] > T  # capacity rows past the committed ones: what [:len(store)] slices off
    np.testing.assert_array_equal(_bits(params[:T]), _bits(store.read_rows(slice(None), slice(None))))
    assert np.isnan(params[T:]).all()  # capacity rows read as the fill value
    for i in range(T):
        np.testing.assert_array_equal(ds.buffers.values[i], store.buffer_bytes(i))  # the buffers' bytes


def test_xr_open_zarr_reads_a_basis_and_the_gram_cache(written: tuple[Path, str]) -> None:
    path, name = written
    basis = open_basis(path, name)
    assert basis.path is not None
    ds = _open_zarr(path, basis.path)
    assert ds.U.dims == U_DIMS and ds["mean"].dims == MEAN_DIMS and ds.gram.dims == GRAM_DIMS
    np.testing.assert_array_equal(_bits(ds.U.values), _bits(basis.to_numpy()))  # U, every column
    np.testing.assert_array_equal(_bits(ds["mean"].values), _bits(basis.mean))
    np.testing.assert_array_equal(ds.gram.values.view(np.uint64), basis.centred_gram.view(np.uint64))
    cache = _open_zarr(path, f"{TRAJ}/gram")
    gram = gram_matrix(TrajectoryStore.open(path))  # read from that very cache
    assert cache[f"g{T}"].dims == GRAM_DIMS
    np.testing.assert_array_equal(cache[f"g{T}"].values.view(np.uint64), gram.view(np.uint64))


# ------------------------------------------------------------------ trajstore.xarray

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_open_trajectory_gives_the_committed_snapshots_with_their_records(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "store.zarr"
    _write(path, storage_dtype=dtype)
    store = TrajectoryStore.open(path)
    ds = open_trajectory(path)
    assert ds.params.dims == ("snapshot", "parameter") and ds.params.shape == (T, store.n)  # committed rows only
    assert ds.params.dtype == np.float32  # widened, as every trajstore read is
    np.testing.assert_array_equal(_bits(ds.params.values), _bits(store.read_rows(slice(None), slice(None))))
    for i in range(T):
        np.testing.assert_array_equal(ds.buffers.values[i], store.buffer_bytes(i))
    np.testing.assert_array_equal(ds.snapshot.values, np.arange(T))
    np.testing.assert_array_equal(ds.row.values, np.arange(T))
    assert ds.step.dtype == np.int64 and ds.step.values.tolist() == [10 * k for k in range(T)]
    epoch = ds.epoch.values
    assert np.isnan(epoch[1]) and np.delete(epoch, 1).tolist() == [k / 2 for k in range(T) if k != 1]  # NaN: none
    assert ds.lr.values.tolist() == [r["lr"] for r in store.records]
    assert ds.attrs["storage_dtype"] == dtype and ds.attrs["trajectory"] == "default" and ds.attrs["n"] == store.n


def test_open_trajectory_follows_the_commit_log_where_rows_are_not_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "store.zarr"
    _write(path, t=2, writers=2)  # a session of several writers: the next session's rows are offset
    with TrajectoryStore.open(path, "a") as store:
        store.append(mlp(seed=5), step=99)
    store = TrajectoryStore.open(path)
    rows = [c.row for c in store.log.commits]
    assert rows == [0, 1, 3]  # snapshot 2 is in row 3; row 2 holds nothing
    ds = open_trajectory(path)
    assert ds.row.values.tolist() == rows and ds.step.values.tolist() == [0, 10, 99]
    np.testing.assert_array_equal(_bits(ds.params.values), _bits(store.read_rows(slice(None), slice(None))))
    raw = _open_zarr(path, TRAJ).params.values
    assert np.isnan(raw[2]).all()  # why the raw rows must not be taken for snapshots


def test_open_trajectory_of_a_live_writer_sees_all_its_commits(tmp_path: Path) -> None:
    path = tmp_path / "store.zarr"
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES) as store:
        for k, model in enumerate(_models(3)):
            store.append(model, step=k)
        ds = open_trajectory(store)  # the writer's handle itself
        assert ds.step.values.tolist() == [0, 1, 2]
        np.testing.assert_array_equal(_bits(ds.params.values), _bits(store.read_rows(slice(None), slice(None))))
        with pytest.raises(ValueError, match="trajectory='other' given with an open TrajectoryStore of 'default'"):
            open_trajectory(store, "other")
        store.append(mlp(seed=7), step=3)  # the handle still writes: it was not touched
    assert len(TrajectoryStore.open(path)) == 4


def test_open_basis_gives_the_basis_with_its_spectrum_and_window(written: tuple[Path, str]) -> None:
    path, name = written
    basis = open_basis(path, name)
    ds = basis_dataset(path, name)
    assert ds.U.dims == U_DIMS and ds.U.shape == (basis.n, D)
    np.testing.assert_array_equal(_bits(ds.U.values), _bits(basis.to_numpy()))
    np.testing.assert_array_equal(_bits(ds["mean"].values), _bits(basis.mean))
    np.testing.assert_array_equal(ds.gram.values, basis.centred_gram)
    np.testing.assert_array_equal(ds.singular_values.values, basis.singular_values)
    np.testing.assert_array_equal(ds.explained_variance_ratio.values, basis.explained_variance_ratio)
    np.testing.assert_array_equal(ds.snapshot.values, np.arange(2, T))  # the window's snapshot indices
    assert ds.attrs["start"] == 2 and ds.attrs["stop"] == T and ds.attrs["path"] == basis.path


# ------------------------------------------------------------------ the lease and Zarr's listings

def test_zarr_listings_do_not_trip_over_the_write_lease(tmp_path: Path) -> None:
    path = tmp_path / "store.zarr"
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES) as store:
        store.append(mlp(), step=0)
        assert _unrecognised(path) == NOT_ZARR_WHILE_WRITING  # no lock file among them
        assert not (path / TRAJ / "writer.lock").exists()  # the flock is on the folder: no file
        _open_zarr(path, TRAJ)  # xarray opens it while the writer holds it
    assert _unrecognised(path) == NOT_ZARR_AFTER_CLOSE
    with TrajectoryStore.open(path, "a"):  # and the lease still excludes a second writer
        with pytest.raises(WriterConflictError, match="already has a live writer"):
            TrajectoryStore.open(path, "a")


# ------------------------------------------------------------------ stores without dimension names

def _strip_names(path: Path) -> int:
    """Remove dimension_names from every array document, as trajstore wrote them before; returns how many."""
    stripped = 0
    for key in _array_docs(path):
        meta = path / key / "zarr.json"
        doc = json.loads(meta.read_text())
        doc.pop("dimension_names")
        meta.write_text(json.dumps(doc))
        stripped += 1
    return stripped


def test_a_store_without_dimension_names_reads_and_verifies_as_before(written: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    src, name = written
    path = tmp_path / "old.zarr"
    shutil.copytree(src, path)
    assert _strip_names(path) == 6
    before, after = TrajectoryStore.open(src), TrajectoryStore.open(path)
    np.testing.assert_array_equal(_bits(after.read_rows(slice(None), slice(None))),
                                  _bits(before.read_rows(slice(None), slice(None))))
    assert after.records == before.records
    np.testing.assert_array_equal(_bits(open_basis(path, name).to_numpy()), _bits(open_basis(src, name).to_numpy()))
    report = verify(path)
    assert report.ok and not report.findings, report.findings  # nothing to report, not even a warning
    np.testing.assert_array_equal(_bits(open_trajectory(path).params.values), _bits(before.read_rows(slice(None),
                                                                                                      slice(None))))
    np.testing.assert_array_equal(_bits(basis_dataset(path, name).U.values), _bits(open_basis(src, name).to_numpy()))
    with TrajectoryStore.open(path, "a") as store:  # appends go on, the arrays' documents left as they were
        for k, model in enumerate(_models(T + 7)):
            if k >= T:
                store.append(model, step=k)  # grows the arrays past 16 rows
    assert len(TrajectoryStore.open(path)) == T + 7
    assert "dimension_names" not in json.loads((path / TRAJ / "params" / "zarr.json").read_text())
    assert verify(path).ok


@pytest.mark.slow
def test_a_store_written_by_the_previous_trajstore_reads_and_verifies(tmp_path: Path) -> None:
    old = OldWriter(extract(tmp_path))
    path = tmp_path / "old.zarr"
    try:
        assert old(f"create {path}") == "ok"
        for k in range(3):
            assert old(f"append {k}") == "ok"
        assert old("close -") == "ok"
    finally:
        old.stop()
    assert all("dimension_names" not in doc for doc in _array_docs(path).values())  # the old format indeed
    assert (path / TRAJ / "writer.lock").exists()  # and its lock file
    store = TrajectoryStore.open(path)
    expected = np.stack([flat_params(mlp(seed=k)) for k in range(3)])  # what the old process appended
    np.testing.assert_array_equal(_bits(store.read_rows(slice(None), slice(None))), _bits(expected))
    np.testing.assert_array_equal(_bits(open_trajectory(path).params.values), _bits(expected))
    report = verify(path)
    assert report.ok and not report.findings, report.findings
