"""The local-folder lease against writers of the previous trajstore, and where folders cannot be locked.

The lease is an flock on the trajectory's folder (trajstore/_lease.py); the previous trajstore
(commit b33529c, run in a child process, see _old_trajstore.py) locked a ``writer.lock`` file in it.
One writer of either version at a time: where that file exists a current writer locks it too, and
where an old writer creates it under a current one, the current one stops before its next commit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from _old_trajstore import OldWriter, extract
from conftest import flat_params, mlp
from trajstore import TrajectoryStore
from trajstore.errors import WriterConflictError
from trajstore.verify import verify

CHUNK_BYTES = 128
LOCK = Path("trajectories") / "default" / "writer.lock"

# It runs the previous version's code in other processes (seconds): the full suite runs it, the
# everyday subset (-m 'not slow') does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract(tmp_path_factory.mktemp("old-trajstore"))


@pytest.fixture
def old(package: Path) -> Iterator[OldWriter]:
    writer = OldWriter(package)
    yield writer
    writer.stop()


def _snapshots(path: Path) -> np.ndarray:
    return TrajectoryStore.open(path).read_rows(slice(None), slice(None))


def test_an_old_writer_holding_a_trajectory_refuses_a_new_one(tmp_path: Path, old: OldWriter) -> None:
    path = tmp_path / "store.zarr"
    assert old(f"create {path}") == "ok"
    with pytest.raises(WriterConflictError, match="already has a live writer: pid"):
        TrajectoryStore.open(path, "a")  # refused on writer.lock, which the old writer holds
    assert old("append 0") == "ok"
    assert old("close -") == "ok"
    with TrajectoryStore.open(path, "a") as store:  # free once the old writer is gone
        store.append(mlp(seed=1), step=1)
    np.testing.assert_array_equal(_snapshots(path), np.stack([flat_params(mlp(seed=k)) for k in range(2)]))


def test_a_new_writer_refuses_an_old_one_where_the_lock_file_exists(tmp_path: Path, old: OldWriter) -> None:
    path = tmp_path / "store.zarr"
    assert old(f"create {path}") == "ok" and old("close -") == "ok"
    assert (path / LOCK).exists()  # every trajectory an old writer opened has it
    with TrajectoryStore.open(path, "a") as store:
        answer = old(f"open {path}")
        assert answer.startswith("error WriterConflictError: trajectory 'default' already has a live writer"), answer
        store.append(mlp(seed=0), step=0)
    assert old(f"open {path}") == "ok"  # free once the new writer closed
    assert old("close -") == "ok"


def test_an_old_writer_taking_a_new_trajectory_stops_the_new_writer_before_its_next_commit(
        tmp_path: Path, old: OldWriter) -> None:
    path = tmp_path / "store.zarr"
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES) as store:
        for k in range(2):
            store.append(mlp(seed=k), step=k)
        assert not (path / LOCK).exists()
        # The old writer cannot see the folder's flock: it creates writer.lock and takes it (the
        # gap the module docstring of trajstore/_lease.py describes), fencing off this writer.
        assert old(f"open {path}") == "ok"
        with pytest.raises(WriterConflictError, match="to a writer of an earlier trajstore version .*nothing was "
                                                      "committed"):
            store.append(mlp(seed=9), step=9)
        assert len(TrajectoryStore.open(path)) == 2  # the refused append left nothing
        assert old("append 2") == "ok"  # the old writer goes on
        assert old("close -") == "ok"
    np.testing.assert_array_equal(_snapshots(path), np.stack([flat_params(mlp(seed=k)) for k in range(3)]))
    report = verify(path)
    assert report.ok, report.findings


def test_a_lock_file_left_unlocked_is_taken_before_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "store.zarr"
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES) as store:
        store.append(mlp(seed=0))
        (path / LOCK).touch()  # as an old writer that died, or was refused, leaves it
        store.append(mlp(seed=1))  # nobody holds it: taken, and the commit goes on
        fd = os.open(path / LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # held by the writer now, as an old writer would find it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        store.append(mlp(seed=2))
    fd = os.open(path / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
    finally:
        os.close(fd)
    assert len(TrajectoryStore.open(path)) == 3


def test_where_folders_cannot_be_locked_the_lease_is_a_lock_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = fcntl.flock

    def file_locks_only(fd: int, operation: int) -> None:  # as flock over NFS, emulated by byte-range locks
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", file_locks_only)
    path = tmp_path / "store.zarr"
    with TrajectoryStore.create(path, mlp(), chunk_bytes=CHUNK_BYTES) as store:
        assert (path / LOCK).exists()
        with pytest.raises(WriterConflictError, match="already has a live writer"):
            TrajectoryStore.open(path, "a")
        store.append(mlp(seed=0))
    with TrajectoryStore.open(path, "a") as store:  # released on close
        store.append(mlp(seed=1))
    assert len(TrajectoryStore.open(path)) == 2
