"""Fenced commits: a writer paused while another takes the trajectory over never damages it.

A writer A (a child process, tests/_fenced_writer.py) is paused — SIGSTOP sent to itself just
before a chosen store call of its append (every step of the protocol), or by the test at a
random moment — long enough for its heartbeat lease to lapse. Writer B takes the trajectory
over and commits, A is resumed and runs on, B commits again. Every snapshot must then read back
bit for bit as the writer that committed it wrote it, with that writer's record: none torn
(values of two writers), relabelled (one writer's record over another's values) or lost (a
commit of B missing), and ``trajstore verify`` finds no damage. On a local folder the lease is an
flock, so a paused writer is never deposed: B is refused until A is killed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _fenced_writer import TAGS, tagged  # noqa: E402
from _writer_process import Flat, pattern  # noqa: E402

from trajstore import TrajectoryStore  # noqa: E402
from trajstore.errors import WriterConflictError  # noqa: E402
from trajstore.verify import verify  # noqa: E402

N, CHUNK_BYTES = 3 * 256, 256 * 4  # three params chunks per snapshot
TTL = 0.6
OPTIONS = {"auto_mkdir": True}
SCRIPT = str(Path(__file__).parent / "_fenced_writer.py")
pytestmark = pytest.mark.slow

# The store calls of A's appends (first and second), each a place to pause at: the lease check,
# each params chunk, the buffers chunk, the lease check before the commit, the commit document,
# the look for a newer writer after it. (The heartbeat thread also reads writer.json, so the
# k-th writer.json read is "some lease read", not always the same one: both are pauses.)
SITES = [("get", "*/writer.json", 1), ("set", "*/params/c/*", 1), ("set", "*/params/c/*", 2),
         ("set", "*/params/c/*", 3), ("set", "*/buffers/c/*", 1), ("get", "*/writer.json", 2),
         ("set", "*/log/commit/*", 1), ("list", "*/log/gen", 1), ("set", "*/params/c/*", 4),
         ("set", "*/buffers/c/*", 2), ("set", "*/log/commit/*", 2), ("list", "*/log/gen", 2)]


def _store(url: str, **kw: object) -> TrajectoryStore:
    options = {"storage_options": OPTIONS} if url.startswith("local://") else {}
    return TrajectoryStore.open(url, **options, **kw)  # type: ignore[arg-type]


def _seed_store(url: str) -> None:
    """Writer X: two committed snapshots."""
    options = {"storage_options": OPTIONS} if url.startswith("local://") else {}
    model = Flat(N)
    with TrajectoryStore.create(url, model, chunk_bytes=CHUNK_BYTES, **options) as store:  # type: ignore[arg-type]
        for k in range(2):
            tagged(model, k, "X")
            store.append(model, step=k, metrics={"tag": float(TAGS["X"])})


def _start(url: str, count: int, stop: tuple[str, str, int] | None = None,
           stop_call: tuple[str, int] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, SCRIPT, url, "--tag", "A", "--count", str(count), "--ttl", str(TTL)]
    if stop:
        cmd += ["--stop", stop[0], stop[1], str(stop[2])]
    if stop_call:
        cmd += ["--stop-call", stop_call[0], str(stop_call[1])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line + proc.stdout.read()
    return proc


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def _wait_stopped(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _stopped(proc.pid):
        assert proc.poll() is None, "the writer ended without reaching its pause: " + (proc.stdout.read() if proc.stdout else "")
        assert time.monotonic() < deadline, "the writer never paused"
        time.sleep(0.01)


def _b_appends(store: TrajectoryStore, count: int) -> list[int]:
    model = Flat(N)
    done = []
    for _ in range(count):
        k = len(store)
        tagged(model, k, "B")
        done.append(store.append(model, step=k, metrics={"tag": float(TAGS["B"])}))
    return done


def _check(url: str, b_indices: list[int]) -> None:
    """Every committed snapshot is whole, as its writer wrote it; B's are all there, in order."""
    reader = _store(url)
    assert b_indices == list(range(b_indices[0], b_indices[0] + len(b_indices)))  # B's indices run on
    assert len(reader) == b_indices[-1] + 1  # nothing of B lost, nothing after it
    for k in range(len(reader)):
        record = reader.records[k]
        tag = int(record["metrics"]["tag"])
        assert record["step"] == k  # the record is this snapshot's
        expected = pattern(k, N) + 100 * tag
        np.testing.assert_array_equal(reader.snapshot(k), expected)  # values of the writer that recorded it
        assert int(np.frombuffer(reader.buffer_bytes(k).tobytes(), dtype=np.int64)[0]) == k + 1000 * tag  # buffers too
        if k in b_indices:
            assert tag == TAGS["B"]  # B's commits are B's
        elif k < 2:
            assert tag == TAGS["X"]
    report = verify(url if not url.startswith("local://") else _fsspec(url))
    assert report.ok, [str(f) for f in report.errors]  # verify finds no damage


def _fsspec(url: str) -> object:
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, storage_options=OPTIONS, read_only=True)


def _takeover_case(url: str, proc: subprocess.Popen[str]) -> str:
    """A is paused: let its lease lapse, take over with B, resume A, let B commit again."""
    time.sleep(TTL * 1.5)
    store = _store(url, mode="a", lease_ttl=TTL)  # A's heartbeat is older than its ttl: taken over
    b = _b_appends(store, 2)
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=60)
    b += _b_appends(store, 1)  # B still holds the trajectory after A ran on
    store.close()
    _check(url, b)
    return out


@pytest.mark.parametrize("site", SITES, ids=[f"{op}-{key.strip('*/')}-{at}" for op, key, at in SITES])
def test_writer_paused_at_each_step_of_an_append(site: tuple[str, str, int], tmp_path: Path) -> None:
    url = f"local://{tmp_path / 's.zarr'}"
    _seed_store(url)
    proc = _start(url, count=3, stop=site)
    _wait_stopped(proc)
    out = _takeover_case(url, proc)
    assert proc.returncode == 3 and "conflict:" in out, out  # A learns it lost the trajectory


@pytest.mark.parametrize("seed", range(10))
def test_writer_stopped_at_a_random_moment(seed: int, tmp_path: Path) -> None:
    url = f"local://{tmp_path / 's.zarr'}"
    _seed_store(url)
    proc = _start(url, count=1000)
    time.sleep(random.Random(seed).uniform(0.05, 0.6))
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_stopped(proc)
    out = _takeover_case(url, proc)
    assert proc.returncode == 3 and "conflict:" in out, out


# The steps of an append on a local folder, where chunks and the commit are written as files
# directly: each params chunk, the buffers chunk, the row folders' fsync, the commit document.
LOCAL_SITES = [("write_chunk_file", 1), ("write_chunk_file", 2), ("write_chunk_file", 3), ("write_chunk_file", 4),
               ("fsync_path", 1), ("write_json_atomic", 1), ("write_chunk_file", 5), ("write_json_atomic", 2)]


@pytest.mark.parametrize("site", LOCAL_SITES, ids=[f"{name}-{at}" for name, at in LOCAL_SITES])
def test_a_writer_paused_at_each_step_on_a_local_folder_is_never_deposed(site: tuple[str, int],
                                                                          tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    _seed_store(url)
    proc = _start(url, count=3, stop_call=site)
    _wait_stopped(proc)
    _local_case(url, proc)


@pytest.mark.parametrize("seed", range(8))
def test_a_paused_writer_on_a_local_folder_is_never_deposed(seed: int, tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    _seed_store(url)
    proc = _start(url, count=1000)
    time.sleep(random.Random(seed).uniform(0.05, 0.6))
    os.kill(proc.pid, signal.SIGSTOP)
    _wait_stopped(proc)
    _local_case(url, proc)


def _local_case(url: str, proc: subprocess.Popen[str]) -> None:
    """A is paused on a local folder: B is refused however long it waits, until A is killed."""
    time.sleep(TTL * 1.5)
    with pytest.raises(WriterConflictError, match=f"pid {proc.pid}"):
        _store(url, mode="a", lease_ttl=TTL)  # the flock is held while A lives, paused or not
    proc.kill()  # a dead writer writes nothing late: its flock is gone at once
    proc.wait()
    store = _store(url, mode="a")
    b = _b_appends(store, 3)
    store.close()
    _check(url, b)


def test_a_late_commit_of_a_deposed_writer_is_fenced_off(tmp_path: Path) -> None:
    """The rule itself, in one process: a commit document written after a takeover, at an index
    the new writer's generation starts at, does not count for any reader."""
    from trajstore import _log

    url = f"local://{tmp_path / 's.zarr'}"
    _seed_store(url)
    a = _store(url, mode="a", lease_ttl=TTL)
    gen_a = a._gen
    assert gen_a is not None
    a._lease.release(quiet=True)  # A goes silent (its heartbeat stops) but its handle lives on
    time.sleep(TTL * 1.5)
    b = _store(url, mode="a", lease_ttl=TTL)
    assert b._gen is not None and b._gen.base == 2 and b._gen.offset == gen_a.offset + 1  # new rows for B
    late = _log.Commit(2, gen_a.seq, gen_a.token, 2 + gen_a.offset, {"step": 2, "epoch": None, "lr": None,
                                                                        "metrics": {"tag": 1.0}, "time": 0.0},
                       None, None)
    _log.write_commit(a.zarr_store, a.prefix, late, durable=False)  # A's commit lands after the takeover
    assert len(_store(url)) == 2  # fenced: it does not count
    b_done = _b_appends(b, 2)
    b.close()
    _check(url, b_done)
    assert any(c.generation == (gen_a.seq, gen_a.token) for c in _store(url).log.fenced)  # seen, not counted
