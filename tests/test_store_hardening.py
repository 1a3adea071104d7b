"""Regression tests for the store cases of the reliability red-team pass (issue 12), one per case:
the outcome asserted is the error class and message, or verify's verdict naming the snapshot."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import mlp, train_steps
from trajstore import TrajectoryStore
from trajstore.errors import CorruptSnapshotError, ReadOnlyError, StoreExistsError, TrajstoreError
from trajstore.verify import verify

CHUNK_BYTES = 16 * 4


def _written(path: Path, t: int = 3) -> list[np.ndarray]:
    model = mlp()
    snaps = []
    with TrajectoryStore.create(path, model, chunk_bytes=CHUNK_BYTES) as store:
        for k in range(t):
            train_steps(model, (8, 5), steps=1, seed=k)
            store.append(model, step=k)
            snaps.append(store.snapshot(k))
    return snaps


def test_a_valid_chunk_copied_into_another_row_is_caught_by_reads_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _written(path)
    rows = path / "trajectories" / "default" / "params" / "c"
    shutil.copyfile(rows / "1" / "0", rows / "2" / "0")  # a whole chunk file, valid crc32c, wrong place
    store = TrajectoryStore.open(path)
    with pytest.raises(CorruptSnapshotError, match="snapshot 2 .* chunk 0 .* not the one its commit recorded"):
        store.snapshot(2)
    report = verify(path)
    assert not report.ok and any("snapshot 2" in str(f) and "commit recorded" in str(f) for f in report.errors)


def test_a_chunk_copied_into_another_row_is_caught_through_a_non_local_store(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _written(path)
    rows = path / "trajectories" / "default" / "params" / "c"
    shutil.copyfile(rows / "0" / "1", rows / "1" / "1")
    url = f"local://{path}"  # fsspec: chunks read by key, not as files
    store = TrajectoryStore.open(url)
    with pytest.raises(CorruptSnapshotError, match="snapshot 1 .* chunk 1 .* not the one its commit recorded"):
        store.read_rows(slice(0, 3), slice(0, store.n))


@pytest.mark.parametrize("name", ["a\\b", "a/b", ".hid", "x" * 129, "", "a b", "ü"])
def test_a_bad_trajectory_name_is_refused_before_anything_is_written(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"trajectory name must match \[A-Za-z0-9\]"):
        TrajectoryStore.create(tmp_path / "s.zarr", mlp(), trajectory=name)
    assert not (tmp_path / "s.zarr").exists()  # nothing written, not even the store's root


def test_a_float64_model_is_refused_under_the_default_and_stored_rounded_only_when_asked(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight[0, 0] = 1.0000000000009095
    with pytest.raises(ValueError, match="float64, which the store keeps as float32 at most"):
        TrajectoryStore.create(tmp_path / "s.zarr", model)
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was written
    with TrajectoryStore.create(tmp_path / "s.zarr", model, storage_dtype="float32") as store:  # asked for
        store.append(model)
        assert store.snapshot(0)[0] == np.float32(1.0)  # rounded, as requested


def test_create_never_deletes_a_file_it_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "s.zarr"
    folder.mkdir()
    (folder / "thesis.partial").write_bytes(b"three years of work")
    with pytest.raises(StoreExistsError, match="holds data that is not a trajstore store"):
        TrajectoryStore.create(folder, mlp())
    assert (folder / "thesis.partial").read_bytes() == b"three years of work"  # untouched
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.partial"]  # and nothing added


def test_create_over_a_foreign_file_in_a_trajectory_folder_is_refused(tmp_path: Path) -> None:
    _written(tmp_path / "s.zarr", t=1)
    other = tmp_path / "s.zarr" / "trajectories" / "seed1"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="holds data trajstore did not write .*notes.txt"):
        TrajectoryStore.create(tmp_path / "s.zarr", mlp(), trajectory="seed1")
    assert (other / "notes.txt").read_text() == "mine"


CREATE = """
import sys, torch
from trajstore import TrajectoryStore
from trajstore.errors import StoreExistsError, WriterConflictError
torch.manual_seed(int(sys.argv[2]))
model = torch.nn.Linear(3, 2)
try:
    kw = {"storage_options": {"auto_mkdir": True}} if sys.argv[1].startswith("local://") else {}
    with TrajectoryStore.create(sys.argv[1], model, **kw) as store:
        store.append(model, step=int(sys.argv[2]))
    print("created")
except (StoreExistsError, WriterConflictError) as e:
    print("refused", type(e).__name__, e)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "fsspec"])
def test_concurrent_creates_end_in_one_trajectory_and_clean_refusals(where: str, tmp_path: Path) -> None:
    for trial in range(3):
        path = tmp_path / f"s{trial}.zarr"
        url = str(path) if where == "local" else f"local://{path}"
        procs = [subprocess.Popen([sys.executable, "-c", CREATE, url, str(k)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for k in range(3)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for out in outs:  # each either created it or was refused with a documented error, no traceback
            assert out.startswith(("created", "refused StoreExistsError", "refused WriterConflictError")), out
        assert sum(out.startswith("created") for out in outs) >= 1
        kw = {"storage_options": {"auto_mkdir": True}} if where == "fsspec" else {}
        store = TrajectoryStore.open(url, **kw)  # type: ignore[arg-type]
        assert TrajectoryStore.list_trajectories(url, **kw) == ["default"]
        assert len(store) == sum(out.startswith("created") for out in outs)  # each creator's append counted
        assert verify(url if where == "local" else store.zarr_store).ok


def test_a_read_only_folder_gives_read_only_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount: every write fails with EROFS (simulated: root ignores permission bits)."""
    _written(tmp_path / "s.zarr", t=1)
    import os

    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ReadOnlyError, match="read-only folder or mount; open it with mode='r'"):
        TrajectoryStore.open(tmp_path / "s.zarr", "a")
    assert len(TrajectoryStore.open(tmp_path / "s.zarr")) == 1  # reading still works


def test_errors_from_bad_input_are_documented(tmp_path: Path) -> None:
    """Every refusal above is a TrajstoreError or the builtin the docs name (ValueError, TypeError)."""
    cases = [lambda: TrajectoryStore.create(tmp_path / "a.zarr", mlp(), trajectory="../x"),
             lambda: TrajectoryStore.create(tmp_path / "b.zarr", torch.nn.Linear(2, 2).double()),
             lambda: TrajectoryStore.open(tmp_path / "missing.zarr")]
    for case in cases:
        with pytest.raises((TrajstoreError, ValueError, TypeError)) as info:
            case()
        assert type(info.value).__module__ in ("trajstore.errors", "builtins")  # no raw library error


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_a_store_claiming_thousands_of_snapshots_it_does_not_hold_fails_fast(tmp_path: Path) -> None:
    """A ~300 KB format-1 store whose commit and Gram cache claim 8,000 snapshots: dldr ran to 4.5 GB
    and past 300 s. Now the pass checks the chunks are there before allocating t x t partials."""
    import json
    import time

    import zarr

    import trajstore
    from trajstore.dldr import _records_digest

    path = tmp_path / "s.zarr"
    _written(path, t=2)
    traj = path / "trajectories" / "default"
    group_doc = json.loads((traj / "zarr.json").read_text())
    records = [{"step": 0, "epoch": None, "lr": None, "metrics": {}, "time": 0.0}] * 8000
    group_doc["attributes"]["trajstore"]["format_version"] = 1
    group_doc["attributes"]["trajstore_commit"] = {"count": 8000, "records": records}
    (traj / "zarr.json").write_text(json.dumps(group_doc))
    shutil.rmtree(traj / "log")
    for name in ("params", "buffers"):
        meta = json.loads((traj / name / "zarr.json").read_text())
        meta["shape"][0] = 8000
        (traj / name / "zarr.json").write_text(json.dumps(meta))
    store = TrajectoryStore.open(path)
    assert len(store) == 8000  # the claim opens (the records are well-formed)
    gram = zarr.open_group(str(path), path="trajectories/default/gram", mode="w")
    gram.create_array("g8000", shape=(8000, 8000), chunks=(8000, 8000), dtype="float64", fill_value=float("nan"))
    gram.update_attributes({"trajstore": {"count": 8000, "array": "g8000", "digest": _records_digest(store, 8000),
                                          "sha256": "0" * 32, "reference": 0}})
    before, started = _resident_mib(), time.monotonic()
    with pytest.raises(CorruptSnapshotError, match=r"snapshot 2 .* chunks are missing \(7998 snapshots"):
        trajstore.dldr(store, 3, stop=8000)
    assert time.monotonic() - started < 10  # milliseconds, not minutes
    assert _resident_mib() - before < 64  # no 512 MB Gram matrix or partials allocated


def test_a_log_whose_writer_offsets_are_exhausted_refuses_writers(tmp_path: Path) -> None:
    """Regression: a marker offset of 2**40 made the next writer commit rows no reader accepts
    (append returned an index that never counted)."""
    import json

    path = tmp_path / "s.zarr"
    _written(path, t=1)
    [gen] = (path / "trajectories" / "default" / "log" / "gen").glob("*.json")
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "offset": 2**40}))
    from trajstore.errors import InvalidStoreError

    with pytest.raises(InvalidStoreError, match="writer offsets reach 1099511627776 rows"):
        TrajectoryStore.open(path, "a")
    assert len(TrajectoryStore.open(path)) == 1  # readers still read what is committed


def test_a_format2_trajectory_holding_a_format1_commit_record_is_refused(tmp_path: Path) -> None:
    import json

    from trajstore.errors import InvalidStoreError

    path = tmp_path / "s.zarr"
    _written(path, t=2)
    doc_path = path / "trajectories" / "default" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["trajstore_commit"] = {"count": 0, "records": []}
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(InvalidStoreError, match="format-2 trajectory that still holds a format-1 commit record"):
        TrajectoryStore.open(path)


def test_a_trajectory_folder_with_a_name_breaking_the_rule_is_reported(tmp_path: Path) -> None:
    """A trajectory named ``a\\b`` appended, then could not be reopened; such a folder (made by an
    older trajstore or by hand) is now named by verify, with how to recover it."""
    path = tmp_path / "s.zarr"
    _written(path, t=1)
    shutil.copytree(path / "trajectories" / "default", path / "trajectories" / "a\\b")
    assert TrajectoryStore.list_trajectories(path) == ["default"]  # never opened by a name off the rule
    report = verify(path)
    assert not report.ok and any("'a\\\\b'" in f.where and "does not match" in f.message for f in report.errors)


@pytest.mark.parametrize("writers", [0, 10**9, "2", None])
def test_a_generation_marker_with_a_bad_writer_count_is_reported(tmp_path: Path, writers: object) -> None:
    """A marker's ``writers`` (the processes of a sharded session) is bounded input like its
    offset: out of range, the marker is unusable and said so, never trusted."""
    import json

    path = tmp_path / "s.zarr"
    _written(path, t=2)
    [gen] = (path / "trajectories" / "default" / "log" / "gen").glob("*.json")
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "writers": writers}))
    store = TrajectoryStore.open(path)
    assert len(store) == 0  # its commits have no valid generation
    assert any("writers" in p and "out of range" in p for p in store.log.problems)
