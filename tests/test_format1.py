"""Stores of format 1 (one commit attribute rewritten per commit) still open, and migrate on append.

The format-1 store is written by trajstore's own code from before format 2 (commit abc3275,
taken from this repository's history with ``git archive`` and run in a child process): a
Linear(3, 4) + BatchNorm1d(4) model, four snapshots, the second with an RNG state.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trajstore import TrajectoryStore
from trajstore.verify import verify

FORMAT1_COMMIT = "abc3275e9cac8489428212ed2a8c385dc8a90cb1"  # the last commit writing format 1
REPO = Path(__file__).resolve().parent.parent
WRITE = """
import sys, torch
from trajstore import TrajectoryStore
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
with TrajectoryStore.create(sys.argv[1], m, chunk_bytes=32) as s:
    for k in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.25 * (k + 1))
            m[1].running_mean.add_(k)
        s.append(m, step=10 * k, epoch=k, lr=0.1, metrics={"loss": 1.0 / (k + 1)}, rng_state=(k == 1))
"""

# It runs the previous version's code in other processes (seconds): the full suite runs it, the
# everyday subset (-m 'not slow') does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A format-1 store written by the old code itself."""
    work = tmp_path_factory.mktemp("format1")
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", FORMAT1_COMMIT, "trajstore"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs this repository's git history to get the format-1 writer ({e})")
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(work / "old", filter="data")
    path = work / "format1.zarr"
    subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True, cwd=work,
                   env={"PYTHONPATH": str(work / "old"), "PATH": "/usr/bin:/bin"})
    (path / "trajectories" / "default" / "writer.lock").unlink(missing_ok=True)
    assert TrajectoryStore.open(path).format_version == 1  # it is the old format indeed
    return path


def _expected() -> tuple[list[np.ndarray], list[dict]]:
    """The snapshots and records as the writing script made them (recomputed here)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    snaps, records = [], []
    for k in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.25 * (k + 1))
            m[1].running_mean.add_(k)
        snaps.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]).numpy().copy())
        records.append({"step": 10 * k, "epoch": k, "lr": 0.1, "metrics": {"loss": 1.0 / (k + 1)}})
    return snaps, records


@pytest.fixture
def old(fixture_store: Path, tmp_path: Path) -> Path:
    path = tmp_path / "format1.zarr"
    shutil.copytree(fixture_store, path)
    return path


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_a_format1_store_reads_as_written_and_reading_writes_nothing(old: Path) -> None:
    before = _files(old)
    snaps, records = _expected()
    store = TrajectoryStore.open(old)
    assert store.format_version == 1 and len(store) == 4
    for k in range(4):
        np.testing.assert_array_equal(store.snapshot(k), snaps[k])  # bit for bit
        assert {key: store.records[k][key] for key in records[k]} == records[k]  # records as written
    assert store.rng_state(1) is not None and store.rng_state(0) is None  # the RNG state decodes
    # BatchNorm's running_mean comes first in the buffer record: 0 + 1 + 2 + 3 added by snapshot 3
    assert np.frombuffer(store.buffer_bytes(3)[:16].tobytes(), np.float32).tolist() == [6.0] * 4
    assert verify(old).ok
    assert _files(old) == before  # opening for reading and verifying wrote nothing


def test_opening_for_append_migrates_to_format2_and_keeps_every_snapshot(old: Path) -> None:
    snaps, records = _expected()
    with TrajectoryStore.open(old, "a") as store:
        assert store.format_version == 2  # migrated
        assert len(store) == 4
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        assert store.append(model, step=40) == 4
    store = TrajectoryStore.open(old)
    assert store.format_version == 2 and len(store) == 5
    for k in range(4):
        np.testing.assert_array_equal(store.snapshot(k), snaps[k])  # the old snapshots, bit for bit
        assert {key: store.records[k][key] for key in records[k]} == records[k]
    assert store.rng_state(1) is not None  # records kept whole, RNG state included
    np.testing.assert_array_equal(store.snapshot(4), torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())
    assert [c.row for c in store.log.commits] == [0, 1, 2, 3, 4]  # one writer at a time: rows = indices
    report = verify(old)
    assert report.ok, [str(f) for f in report.errors]


def test_a_migration_killed_before_its_switch_leaves_a_readable_format1_store(old: Path) -> None:
    snaps, _ = _expected()
    store = TrajectoryStore.open(old)
    from trajstore import _log

    gen0, commits = _log.commits_from_format1(len(store), store.records)
    _log.write_generation(store.zarr_store.with_read_only(False), store.prefix, gen0, durable=False)
    for c in commits[:2]:  # a kill after part of the log was written, before the group document flip
        _log.write_commit(store.zarr_store.with_read_only(False), store.prefix, c, durable=False)
    again = TrajectoryStore.open(old)
    assert again.format_version == 1 and len(again) == 4  # still format 1, all four snapshots
    with TrajectoryStore.open(old, "a") as writer:  # the migration runs again and completes
        assert writer.format_version == 2 and len(writer) == 4
    for k in range(4):
        np.testing.assert_array_equal(TrajectoryStore.open(old).snapshot(k), snaps[k])
