"""Recording from several ranks (trajstore.sharded.ShardedRecorder, gloo on CPU), and the Recorder
under torch.distributed.

The ranks write the pattern snapshots of ``_writer_process`` (snapshot k is ``pattern(k)``), so
every committed snapshot can be checked bit for bit; reads check each chunk's crc32c against its
commit as well.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from _writer_process import Flat, pattern
from trajstore import TrajectoryStore
from trajstore.errors import InvalidStoreError
from trajstore.launch import spawn, start
from trajstore.verify import verify

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("_dist_worker.py"))
N, CHUNK_BYTES = 10_000, 4096  # 1,024 values per chunk: 10 chunks, ranks of whole chunks


def record(store: Path, world: int, count: int, *extra: str, n: int = N, chunk_bytes: int = CHUNK_BYTES) -> int:
    logs = store.parent / "logs"
    logs.mkdir(exist_ok=True)
    return spawn([WORKER, "record", str(store.parent), "--store", str(store), "--count", str(count), "--n", str(n),
                  "--chunk-bytes", str(chunk_bytes), *extra], world, timeout_s=240, logs=logs)


def one_writer(path: Path, count: int, n: int = N, chunk_bytes: int = CHUNK_BYTES) -> None:
    model = Flat(n)
    with TrajectoryStore.create(path, model, chunk_bytes=chunk_bytes) as store:
        for k in range(count):
            model.set_snapshot(k)
            store.append(model, step=k)


def chunk_bytes_of(path: Path, store: TrajectoryStore, index: int) -> list[bytes]:
    """The stored bytes of snapshot ``index``: its params chunks, then its buffers chunk."""
    row = store._commits[index].row
    base = path / "trajectories" / "default"
    files = sorted((base / "params" / "c" / str(row)).iterdir(), key=lambda p: int(p.name))
    return [f.read_bytes() for f in files] + [(base / "buffers" / "c" / str(row) / "0").read_bytes()]


def check_whole(path: Path, n: int = N) -> int:
    """Every committed snapshot is the pattern, bit for bit; verify finds no error. Its count (0
    when a kill came before the store was created: on a loaded machine the imports take longer)."""
    if not (path / "zarr.json").exists():
        return 0
    try:
        store = TrajectoryStore.open(path)
    except InvalidStoreError:  # killed while creating it: nothing committed, and the next run creates it anew
        return 0  # (damage after a commit would show as a count going down: the caller checks they never do)
    with store:
        for k in range(len(store)):
            assert np.array_equal(store.snapshot(k), pattern(k, n)), k
            assert store.records[k]["step"] == k
        count = len(store)
    report = verify(path)
    assert not report.errors, report.errors
    return count


@pytest.mark.parametrize("world,mode", [(2, "model"), (2, "slice"), (3, "slice")])
def test_ranks_write_one_writers_bytes(tmp_path: Path, world: int, mode: str) -> None:
    path = tmp_path / "s.zarr"
    assert record(path, world, 6, *(["--slice"] if mode == "slice" else [])) == 0
    one_writer(tmp_path / "one.zarr", 6)
    with TrajectoryStore.open(path) as sharded, TrajectoryStore.open(tmp_path / "one.zarr") as single:
        assert len(sharded) == len(single) == 6
        assert [c.row for c in sharded._commits] == list(range(6))  # a fresh store: row == index
        for k in range(6):
            # byte-identical chunk files (values, padding, checksums) to one writer's
            assert chunk_bytes_of(path, sharded, k) == chunk_bytes_of(tmp_path / "one.zarr", single, k), k
            assert sharded._commits[k].crc == single._commits[k].crc
        assert [g.writers for g in sharded.log.generations] == [world]  # recorded as a sharded session
    assert check_whole(path) == 6


def test_resumed_session_offsets_rows(tmp_path: Path) -> None:
    """After a session of several writers the next one writes one row further on: a late chunk
    write of a rank that outlived its job lands in a row no commit names."""
    path = tmp_path / "s.zarr"
    assert record(path, 2, 3) == 0
    assert record(path, 2, 5) == 0
    with TrajectoryStore.open(path) as store:
        assert [c.row for c in store._commits] == [0, 1, 2, 4, 5]
    assert check_whole(path) == 5


def test_killed_rank_leaves_whole_snapshots(tmp_path: Path) -> None:
    """SIGKILL of one rank (at random) at random moments, 10 times: only whole committed
    snapshots remain each time, and the next run resumes and completes the trajectory."""
    path = tmp_path / "s.zarr"
    n, count = 200_000, 100_000  # 49 chunks of 16 KiB per snapshot: kills land inside snapshots
    rng = random.Random(13)
    logs = tmp_path / "logs"
    logs.mkdir()
    counts, codes, waits = [], [], []
    for attempt in range(10):
        children = start([WORKER, "record", str(tmp_path), "--store", str(path), "--count", str(count), "--n", str(n),
                          "--chunk-bytes", str(2**14)], 2, logs=logs)
        try:
            time.sleep(rng.uniform(2.5, 5.0))  # torch's import takes ~2 s; then snapshots every few ms
            victim = children[rng.randrange(2)]
            if victim.poll() is None:
                os.kill(victim.pid, signal.SIGKILL)
            killed = time.monotonic()
            for c in children:
                try:
                    c.wait(20)  # the survivor fails on its next collective (else, as the launcher does, stop it)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
            waits.append(time.monotonic() - killed)
            codes.append([c.returncode for c in children])
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        counts.append(check_whole(path, n))
    print(f"committed after each kill: {counts}; exit codes {codes}; survivors ended {max(waits):.1f} s after")
    assert counts == sorted(counts) and counts[-1] > 0  # no run lost what an earlier one committed
    assert all(-signal.SIGKILL in c for c in codes)
    assert record(path, 2, counts[-1] + 5, n=n, chunk_bytes=2**14) == 0  # the next run resumes
    assert check_whole(path, n) == counts[-1] + 5


def test_recorder_writes_from_rank_zero_only(tmp_path: Path) -> None:
    """The plain Recorder on a DDP model in a job of 2: rank 0 writes every snapshot once, rank 1
    opens nothing and counts the same snapshots."""
    code = spawn(["-c", _RECORDER_CHILD, str(tmp_path)], 2, timeout_s=120, logs=tmp_path)
    assert code == 0, (tmp_path / "rank-0.log").read_text()[-2000:] + (tmp_path / "rank-1.log").read_text()[-2000:]
    with TrajectoryStore.open(tmp_path / "r.zarr") as store:
        assert len(store) == 4  # the initialization and three snapshots, written once
        assert [r["step"] for r in store.records] == [0, 1, 2, 3]
    assert (tmp_path / "rank-1.count").read_text() == "4"  # rank 1 counted the same snapshots


_RECORDER_CHILD = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from trajstore import Recorder
from trajstore.launch import init_from_env, shutdown
init_from_env("cpu")
out = Path(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
recorder = Recorder(out / "r.zarr", model, background=dist.get_rank() == 0)
assert recorder.writes == (dist.get_rank() == 0)
for step in range(1, 4):
    recorder.snapshot(step=step)
recorder.close()
if dist.get_rank() == 1:
    assert recorder.store is None
    (out / "rank-1.count").write_text(str(len(recorder)))
shutdown()
"""
