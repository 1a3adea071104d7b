"""Hostile stores stay bounded (issue: FIFOs, sockets, sparse files, missing group documents).

A FIFO, socket, device or link where a chunk or a metadata document should be is refused without
blocking; a sparse 512 MiB ``zarr.json`` is refused by its size before it is read; a chunk shape
of 2**28 or 2**36 values over sparse chunk files is refused without allocating from it; and a
trajectory or basis whose group document is gone while its chunks remain is reported by verify.
Each case runs under test_hostile's bounds (10 s, 64 MiB of resident memory growth) in a thread of
its own: a reader blocked on a FIFO fails its case (and is then given a writer, so it ends) instead
of hanging the suite. (SIGALRM does not do: the reader pool's shutdown waits for a blocked worker.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from torch import nn
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

import trajstore
from conftest import mlp, train_steps
from test_hostile import LIMIT_S, PEAK_BYTES, _resident_kib
from trajstore import TrajectoryStore, _backend, verify as verify_module
from trajstore.cli import main as cli
from trajstore.errors import CorruptSnapshotError, InvalidStoreError, NotAStoreError, TrajectoryNotFoundError
from trajstore.verify import verify

TRAJ = "trajectories/default"
T = 3
PROTO = default_buffer_prototype()
_CLEAR_REFS = Path("/proc/self/clear_refs")
_R = TypeVar("_R")
TIMES: dict[str, tuple[float, int]] = {}  # case -> (seconds, bytes of resident growth), for the record


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 snapshots of an MLP with BatchNorm (n = 80, 5 chunks of 16 values each), no basis."""
    path = tmp_path_factory.mktemp("bounded") / "sound.zarr"
    model = mlp()
    with TrajectoryStore.create(path, model, chunk_bytes=64) as store:
        for i in range(T):
            train_steps(model, (8, 5), steps=1, seed=i)
            store.append(model, step=i)
    return path


@pytest.fixture
def store(sound: Path, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.zarr"
    shutil.copytree(sound, path)
    yield path
    _unblock(path)  # a regression left a reader blocked on a planted FIFO: give it its EOF


def _unblock(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISFIFO(os.lstat(path).st_mode):
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # ENXIO: no reader is blocked on it
                    pass


def bounded(case: str, fn: Callable[[], _R], root: Path | None = None) -> _R:
    """``fn()`` (its result, or its exception re-raised) run in a daemon thread under LIMIT_S
    seconds and PEAK_BYTES of resident growth (VmHWM, reset first: it sees every touched page). On a
    hang the FIFOs under ``root`` are given a writer until the blocked reader ends."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident size
    resident = _resident_kib("VmRSS")
    start = time.perf_counter()
    thread = threading.Thread(target=target, name=f"bounded {case}", daemon=True)
    thread.start()
    thread.join(LIMIT_S)
    elapsed = time.perf_counter() - start
    for _ in range(100):
        if not thread.is_alive() or root is None:
            break
        _unblock(root)
        thread.join(0.1)
    grown = (_resident_kib("VmHWM") - resident) * 1024
    assert elapsed < LIMIT_S, f"{case}: still running after {LIMIT_S} s (a hang)"
    assert grown < PEAK_BYTES, f"{case}: resident memory grew {grown / 2**20:.0f} MiB"  # nothing sized from metadata
    TIMES[case] = (elapsed, grown)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _plant(path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the file at ``path`` by a FIFO, a socket, a character device or a symbolic link."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        monkeypatch.chdir(path.parent)  # an AF_UNIX address is at most 107 bytes: bind by a short name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path.name)
        sock.close()  # the socket file stays
    elif kind == "device":
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless zeros
    else:
        assert kind == "symlink"
        os.symlink(path.parent / "0", path)  # a valid chunk file of the same row, by a link


KINDS = ["fifo", "socket", "symlink",
         pytest.param("device", marks=pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root"))]
KIND_TEXT = {"fifo": "a FIFO", "socket": "a socket", "device": "a character device", "symlink": "a symbolic link"}


def _errors(report: trajstore.verify.VerifyReport) -> str:
    return "\n".join(str(f) for f in report.errors)


# ---------------------------------------------------------------- non-regular files


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_regular_chunk_file_is_damage_not_a_hang(store: Path, kind: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    _plant(store / TRAJ / "params" / "c" / "1" / "2", kind, monkeypatch)
    reader = TrajectoryStore.open(store)
    assert np.isfinite(bounded(f"snapshot 0 beside a {kind}", lambda: reader.snapshot(0), store)).all()  # others read
    with pytest.raises(CorruptSnapshotError, match=rf"snapshot 1 of trajectory 'default' .*chunk 2 .*"
                                                   rf"chunk file is {KIND_TEXT[kind]}, not a regular file"):
        bounded(f"snapshot over a {kind}", lambda: reader.snapshot(1), store)
    report = bounded(f"verify over a {kind}", lambda: verify(store), store)
    assert not report.ok and "snapshot 1" in _errors(report) and "chunk 2" in _errors(report)  # named
    assert f"{KIND_TEXT[kind]}, not a regular file" in _errors(report)  # and said what is there
    assert bounded(f"cli verify over a {kind}", lambda: cli(["verify", str(store)]), store) == 1  # damaged: exit 1
    assert "snapshot 1" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_non_regular_buffers_chunk_is_damage(store: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _plant(store / TRAJ / "buffers" / "c" / "2" / "0", kind, monkeypatch)
    reader = TrajectoryStore.open(store)
    with pytest.raises(CorruptSnapshotError, match="snapshot 2 .*buffers"):
        # Zarr's exists() sees no file there, and a read of it would be refused: never opened
        bounded(f"load_into over a {kind}", lambda: reader.load_into(mlp(seed=1), 2), store)
    report = bounded(f"verify over a {kind} buffers chunk", lambda: verify(store), store)
    assert "snapshot 2" in _errors(report) and "buffers chunk is" in _errors(report)  # missing, or not a file


# Where a planted FIFO sits, and what opening and reading the store raises then.
DOCUMENTS = [
    ("zarr.json", NotAStoreError, "is not a trajstore store"),
    (f"{TRAJ}/zarr.json", TrajectoryNotFoundError, r"holds trajectories \[\]"),
    (f"{TRAJ}/params/zarr.json", InvalidStoreError, "params/zarr.json in .* is a FIFO, not a regular file"),
]


@pytest.mark.parametrize(("key", "error", "match"), DOCUMENTS)
def test_a_fifo_metadata_document_is_refused_without_blocking(store: Path, key: str, error: type[Exception],
                                                             match: str) -> None:
    os.unlink(store / key)
    os.mkfifo(store / key)
    with pytest.raises(error, match=match):
        bounded(f"open over a FIFO {key}", lambda: TrajectoryStore.open(store).snapshot(0), store)
    report = bounded(f"verify over a FIFO {key}", lambda: verify(store), store)
    assert not report.ok  # what open refuses, verify names
    if key == f"{TRAJ}/zarr.json":  # not listed at all: named as a folder without its document
        assert f"{TRAJ}/zarr.json is missing (or not a regular file)" in _errors(report)


@pytest.mark.parametrize(("key", "error", "match"), [
    ("zarr.json", NotAStoreError, "is not a trajstore store"),
    (f"{TRAJ}/zarr.json", InvalidStoreError, "trajectories/default/zarr.json"),
    (f"{TRAJ}/params/zarr.json", InvalidStoreError, "params/zarr.json"),
])
def test_a_huge_metadata_document_is_refused_by_its_size(store: Path, key: str, error: type[Exception],
                                                         match: str) -> None:
    with open(store / key, "r+b") as f:
        f.truncate(512 << 20)  # sparse: 512 MiB that cost no disk (the valid JSON, then NUL bytes)
    with pytest.raises(error, match=match) as caught:  # refused before the read: no 512 MiB, no parse
        bounded(f"open over a 512 MiB {key}", lambda: TrajectoryStore.open(store).snapshot(0))
    report = bounded(f"verify over a 512 MiB {key}", lambda: verify(store))
    assert f"{512 << 20} bytes" in str(caught.value)  # the size is named
    assert f"{_backend.MAX_JSON_BYTES}" in str(caught.value)  # and the limit
    assert not report.ok and f"{512 << 20} bytes" in _errors(report)


def test_read_json_checks_an_fsspec_document_by_size_first(monkeypatch: pytest.MonkeyPatch) -> None:
    zstore = _backend.open_zarr_store("memory://bounded-read-json", read_only=False)
    _backend.write_json(zstore, "doc.json", {"x": "y" * 200})
    monkeypatch.setattr(_backend, "MAX_JSON_BYTES", 100)
    reads: list[str] = []
    original = type(zstore).get

    async def get(self: object, key: str, *args: object, **kw: object) -> object:
        reads.append(key)
        return await original(self, key, *args, **kw)

    monkeypatch.setattr(type(zstore), "get", get)
    with pytest.raises(InvalidStoreError, match=r"doc.json: a metadata document of 2\d\d bytes, more than the 100"):
        _backend.read_json(zstore, "doc.json")
    assert reads == []  # refused by getsize, before a byte was read
    assert _backend.read_json(zstore, "absent.json") is None  # an absent key is still None


def test_the_hardened_local_store_reads_as_zarrs_does(store: Path) -> None:
    plain, hardened = LocalStore(store, read_only=True), _backend.open_zarr_store(store, read_only=True)
    assert isinstance(hardened, LocalStore) and _backend.local_root(hardened) == store  # still local
    assert type(hardened.with_read_only(False)) is _backend.RegularFileStore  # a mode change keeps it
    assert type(_backend.open_zarr_store(plain, read_only=True)) is _backend.RegularFileStore  # a given one too
    key = f"{TRAJ}/params/c/0/1"
    data = (store / key).read_bytes()
    ranges = {None: data, RangeByteRequest(3, 20): data[3:20], RangeByteRequest(100, 200): b"",
              OffsetByteRequest(10): data[10:], SuffixByteRequest(4): data[-4:], SuffixByteRequest(10**6): data}
    for byte_range, want in ranges.items():
        assert _backend.sync(plain.get(key, PROTO, byte_range)).to_bytes() == want  # Zarr's reading
        assert _backend.sync(hardened.get(key, PROTO, byte_range)).to_bytes() == want, byte_range  # the same
        assert hardened.get_sync(key, prototype=PROTO, byte_range=byte_range).to_bytes() == want
    # A range end far past the file: Zarr's own reader sizes its buffer from it (MemoryError here).
    assert _backend.sync(hardened.get(key, PROTO, RangeByteRequest(60, 2**62))).to_bytes() == data[60:]
    assert _backend.sync(hardened.get(f"{TRAJ}/params/c/0/99", PROTO)) is None  # absent: None, as in Zarr
    assert _backend.sync(hardened.get(f"{TRAJ}/params/c/0", PROTO)) is None  # a folder: absent, as in Zarr
    os.unlink(store / key)
    os.mkfifo(store / key)
    pairs = [(f"{TRAJ}/params/c/0/0", None), (key, None)]
    with pytest.raises(CorruptSnapshotError, match="is a FIFO"):
        bounded("get_partial_values over a FIFO", lambda: _backend.sync(hardened.get_partial_values(PROTO, pairs)),
                store)


def test_open_regular_refuses_before_opening(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"abc")
    fd = _backend.open_regular(tmp_path / "file")
    assert os.read(fd, 10) == b"abc"  # a regular file opens
    os.close(fd)
    with pytest.raises(CorruptSnapshotError, match="fifo is a FIFO"):  # the default error: damage, naming the path
        bounded("open_regular over a FIFO", lambda: _backend.open_regular(tmp_path / "fifo"), tmp_path)
    with pytest.raises(KeyError, match="a FIFO"):
        _backend.open_regular(tmp_path / "fifo", KeyError)  # the caller's error
    with pytest.raises(IsADirectoryError):
        _backend.open_regular(tmp_path)  # a folder, as open() says
    with pytest.raises(FileNotFoundError):
        _backend.open_regular(tmp_path / "absent")


# ---------------------------------------------------------------- allocations from metadata


def _claim_chunk(path: Path, chunk: int) -> None:
    """Give the params array chunks of ``chunk`` values (group attribute and Zarr metadata agree),
    each committed row one sparse chunk file of the size that shape gives it."""
    doc_path = path / TRAJ / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["trajstore"]["chunk_elems"] = chunk
    doc_path.write_text(json.dumps(doc))
    meta_path = path / TRAJ / "params" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [1, chunk]
    meta_path.write_text(json.dumps(meta))
    for row in range(T):
        folder = path / TRAJ / "params" / "c" / str(row)
        shutil.rmtree(folder)
        folder.mkdir()
        with open(folder / "0", "wb") as f:
            f.truncate(chunk * 4 + 4)  # float32 values and a crc32c trailer: the size the claim gives


@pytest.mark.parametrize("chunk", [2**28, 2**36])
def test_a_huge_chunk_shape_is_refused_without_allocating(store: Path, chunk: int) -> None:
    _claim_chunk(store, chunk)
    case = f"chunk shape 2**{chunk.bit_length() - 1}"
    try:
        reader = bounded(f"open, {case}", lambda: TrajectoryStore.open(store))
    except InvalidStoreError as e:  # refused by the metadata checks (a cap on chunk_elems)
        assert str(chunk) in str(e)
    else:
        with pytest.raises(CorruptSnapshotError, match=rf"snapshot 0 .*claims {chunk} values, more than "
                                                       r"a snapshot's n = 80"):
            bounded(f"snapshot, {case}", lambda: reader.snapshot(0))
    report = bounded(f"verify, {case}", lambda: verify(store))
    assert not report.ok and "trajectory 'default'" in _errors(report)  # reported, not read
    assert str(chunk) in _errors(report)  # with the claim it refused


def _big_store(path: Path) -> TrajectoryStore:
    """n = 600,600 in chunks of 131,072 values (2 pieces of 65,536; the last chunk short)."""
    model = nn.Linear(1000, 600)
    store = TrajectoryStore.create(path, model, chunk_bytes=131072 * 4)
    for i in range(2):
        with torch.no_grad():
            model.weight.add_(0.01 * (i + 1))
        store.append(model, step=i)
    store.close()
    return TrajectoryStore.open(path)


def test_chunks_larger_than_the_scan_bound_are_streamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "SCAN_VALUES", 65536)  # 131,072-value chunks: the streamed path
    reader = _big_store(tmp_path / "big.zarr")
    assert reader.chunk_elems == 131072 and reader.piece == 65536  # what the case is about
    report = verify(tmp_path / "big.zarr")
    assert report.ok and report.checked["chunks"] == 2 * 5, report.findings  # every chunk read, all sound
    chunk = tmp_path / "big.zarr" / TRAJ / "params" / "c" / "1" / "4"  # the edge chunk: padding included
    raw = bytearray(chunk.read_bytes())
    raw[-10] ^= 0x01  # a flipped bit in the padding, past n: only a whole-chunk checksum sees it
    chunk.write_bytes(bytes(raw))
    errors = _errors(verify(tmp_path / "big.zarr"))
    assert "snapshot 1" in errors and "chunk 4" in errors and "checksum" in errors  # found, named


# ---------------------------------------------------------------- missing group documents


def _chunk_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and "c" in p.relative_to(folder).parts)


def test_a_trajectory_without_its_group_document_is_an_error(store: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (store / TRAJ / "zarr.json").unlink()  # every chunk stays
    chunks = _chunk_files(store / TRAJ)
    assert chunks == T * 5 + T  # params (5 chunks per snapshot) and buffers (one per snapshot)
    report = verify(store)
    assert not report.ok  # no longer "OK, 0 trajectories"
    assert (f"trajectory 'default': its group document {TRAJ}/zarr.json is missing (or not a regular file), "
            f"but {chunks} chunk files remain") in _errors(report)  # named, with what remains
    assert "may be recoverable" in _errors(report)
    assert cli(["verify", str(store)]) == 1
    assert "trajectory 'default'" in capsys.readouterr().out


def test_a_basis_without_its_group_document_is_an_error(store: Path) -> None:
    basis = trajstore.dldr(str(store), 2)
    assert verify(store).ok  # sound with its basis
    folder = store / "bases" / basis.name
    (folder / "zarr.json").unlink()
    errors = _errors(verify(store))
    assert (f"basis '{basis.name}': its group document bases/{basis.name}/zarr.json is missing "
            f"(or not a regular file), but {_chunk_files(folder)} chunk files remain") in errors


def test_an_empty_trajectory_folder_is_not_reported(store: Path) -> None:
    (store / "trajectories" / "leftover").mkdir()  # nothing in it: nothing lost
    assert verify(store).ok


# ---------------------------------------------------------------- verify never raises


CHECKS = ["_check_records", "_uncommitted_rows", "_check_gram_cache", "_scan_snapshots", "_stray_files", "_orphans"]


@pytest.mark.parametrize("check", CHECKS)
def test_a_check_that_raises_becomes_a_finding(store: Path, check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise RuntimeError("planted failure")

    monkeypatch.setattr(verify_module, check, broken)
    report = verify(store)  # does not raise
    assert not report.ok and "failed (RuntimeError: planted failure)" in _errors(report)
