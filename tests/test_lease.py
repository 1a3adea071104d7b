"""One writer per trajectory on backends without flock: the heartbeat lease (trajstore/_lease.py).

The local-folder lease (an flock) is tested in test_crash.py with real processes; here a store
reached through fsspec (``local://`` URL: fsspec's local filesystem, so Zarr's FsspecStore and the
JSON lease, as on an object store) is shared by two processes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr

from trajstore import TrajectoryStore
from trajstore._lease import WriterLease
from trajstore.errors import WriterConflictError

OPTIONS = {"auto_mkdir": True}

HOLDER = """
import sys, time, torch
from trajstore import TrajectoryStore
store = TrajectoryStore.open(sys.argv[1], "a", storage_options={"auto_mkdir": True})
print("holding", flush=True)
time.sleep(600)
"""


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"local://{tmp_path / 'lease.zarr'}"
    with TrajectoryStore.create(url, _model(0), storage_options=OPTIONS) as store:
        store.append(_model(1), step=0)
    return url


def _writer_doc(url: str) -> dict:
    path = Path(url.removeprefix("local://")) / "trajectories" / "default" / "writer.json"
    return json.loads(path.read_text())


def _plant(url: str, **fields: object) -> None:
    path = Path(url.removeprefix("local://")) / "trajectories" / "default" / "writer.json"
    now = time.time()
    doc = {"token": "someone-else", "host": "other-machine", "pid": 4242, "since": now, "heartbeat": now, "ttl": 60.0}
    path.write_text(json.dumps({**doc, **fields}))


@pytest.mark.slow  # seconds of real processes: the full suite runs it, the everyday subset does not
def test_second_process_is_refused_by_name_and_a_killed_holder_does_not_block(url: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("holding")
        with pytest.raises(WriterConflictError, match=f"pid {holder.pid} on host '{socket.gethostname()}'"):
            TrajectoryStore.open(url, "a", storage_options=OPTIONS)  # refused, naming the live writer
        reader = TrajectoryStore.open(url, "r", storage_options=OPTIONS)
        assert len(reader) == 1 and reader.snapshot(0).shape == (reader.n,)  # readers keep working
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The killed holder's lease names a dead process on this host: taken over at once, not after its ttl.
    started = time.monotonic()
    with TrajectoryStore.open(url, "a", storage_options=OPTIONS) as store:
        store.append(_model(2), step=1)
        assert len(store) == 2
    assert time.monotonic() - started < 30  # far below the 60 s ttl


def test_a_lease_from_another_machine_blocks_until_its_heartbeat_lapses(url: str) -> None:
    _plant(url)
    with pytest.raises(WriterConflictError, match="pid 4242 on host 'other-machine'"):
        TrajectoryStore.open(url, "a", storage_options=OPTIONS)  # a fresh heartbeat elsewhere is live
    _plant(url, heartbeat=time.time() - 61.0)
    with TrajectoryStore.open(url, "a", storage_options=OPTIONS) as store:  # lapsed: taken over
        assert _writer_doc(url)["pid"] == __import__("os").getpid()  # the lease now names us
        store.append(_model(3), step=1)


def test_a_writer_that_lost_its_lease_commits_nothing(url: str) -> None:
    store = TrajectoryStore.open(url, "a", storage_options=OPTIONS)
    before = TrajectoryStore.open(url, "r", storage_options=OPTIONS).snapshot(0)
    _plant(url, token="the-taker")  # another writer took over (say this one was paused past its ttl)
    with pytest.raises(WriterConflictError, match="lost the write lease .*other-machine"):
        store.append(_model(4), step=1)
    reader = TrajectoryStore.open(url, "r", storage_options=OPTIONS)
    assert len(reader) == 1  # nothing was committed by the writer that lost the lease
    assert reader.snapshot(0).tobytes() == before.tobytes()  # and the committed snapshot is untouched
    assert _writer_doc(url)["token"] == "the-taker"  # nor did it take the lease back


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(tmp_path: Path) -> None:
    store = zarr.storage.MemoryStore()
    first = WriterLease(store, "traj", ttl=0.4)
    first.acquire("traj")
    time.sleep(1.2)  # three ttls: without the heartbeat the lease would have lapsed
    doc = json.loads(bytes(zarr.core.sync.sync(
        store.get("traj/writer.json", prototype=zarr.core.buffer.default_buffer_prototype())).to_bytes()))
    assert time.time() - doc["heartbeat"] < 0.4  # refreshed within the last ttl
    second = WriterLease(store, "traj", ttl=0.4)
    # The same host and a live pid would make it live anyway; pretend the holder is elsewhere.
    doc["host"] = "other-machine"
    zarr.core.sync.sync(store.set("traj/writer.json", zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(
        json.dumps(doc).encode())))
    time.sleep(0.3)  # the holder's next beats (every ttl / 4) keep its token and refresh the time
    with pytest.raises(WriterConflictError):
        second.acquire("traj")
    first.release()
    second.acquire("traj")  # released: free at once
    second.release()


def test_lease_documents_on_a_local_fsspec_store_are_never_read_torn(tmp_path: Path) -> None:
    """Regression (CI): fsspec's local file system writes a file by truncating it first, so a lease
    check racing a heartbeat read an empty writer.json and the writer thought it had lost its
    lease. Writes to local:// stores are now renamed into place, and an unreadable lease document
    is read again before it counts as lost."""
    import threading

    from trajstore._backend import open_zarr_store, read_json, write_json

    store = open_zarr_store(f"local://{tmp_path / 'l.zarr'}", read_only=False, storage_options=OPTIONS)
    doc = {"token": "a" * 32, "pad": list(range(500))}
    write_json(store, "w.json", doc)
    stop = threading.Event()

    def rewrite() -> None:
        while not stop.is_set():
            write_json(store, "w.json", doc)

    writer = threading.Thread(target=rewrite)
    writer.start()
    torn, reads, started = 0, 0, time.monotonic()
    try:
        while time.monotonic() - started < 1.0:
            try:
                assert read_json(store, "w.json") == doc  # whole, never another document
            except ValueError:
                torn += 1
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 50 and torn == 0  # every read found the whole document


def test_a_fast_heartbeat_never_makes_its_own_writer_lose_the_lease(tmp_path: Path) -> None:
    from trajstore._backend import open_zarr_store

    store = open_zarr_store(f"local://{tmp_path / 'l.zarr'}", read_only=False, storage_options=OPTIONS)
    lease = WriterLease(store, "traj", ttl=0.02)  # a heartbeat every 5 ms
    lease.acquire("traj")
    try:
        for _ in range(300):
            lease.check("traj")  # never a spurious WriterConflictError
    finally:
        lease.release()
