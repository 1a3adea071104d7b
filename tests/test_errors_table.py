"""Documented errors only: one table over the red-team cases of issue 12 that used to escape as raw
Zarr, OS or torch errors. Each row builds its case, calls the public API (or the CLI) and names the
error class and message it must raise; every class is one the README documents (a
``trajstore.errors`` class, or the builtin ``ValueError`` / ``TypeError`` / ``OSError`` of a bad
argument or a full disk)."""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import trajstore
from conftest import mlp
from trajstore import TrajectoryStore
from trajstore.cli import main
from trajstore.errors import (CorruptSnapshotError, InvalidStoreError, LayoutMismatchError, NotAStoreError,
                              ReadOnlyError, StoreExistsError, StoreUnreachableError, TrajectoryNotFoundError)

CHUNK_BYTES = 16 * 4


def _store(tmp: Path, t: int = 3) -> Path:
    path = tmp / "s.zarr"
    model = mlp()
    with TrajectoryStore.create(path, model, chunk_bytes=CHUNK_BYTES) as store:
        for k in range(t):
            store.append(model, step=k)
    return path


def _traj(tmp: Path) -> Path:
    return tmp / "s.zarr" / "trajectories" / "default"


def _fifo_chunk(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    chunk = _traj(tmp) / "params" / "c" / "1" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    return lambda: TrajectoryStore.open(tmp / "s.zarr").snapshot(1)


def _socket_chunk(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    chunk = _traj(tmp) / "params" / "c" / "2" / "1"
    chunk.unlink()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(chunk))
    return lambda: TrajectoryStore.open(tmp / "s.zarr").snapshot(2)


def _huge_chunk_shape(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    doc_path = _traj(tmp) / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["trajstore"]["chunk_elems"] = 2**36
    doc_path.write_text(json.dumps(doc))
    return lambda: TrajectoryStore.open(tmp / "s.zarr").snapshot(0)


def _sparse_document(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    with open(_traj(tmp) / "zarr.json", "r+b") as f:
        f.truncate(512 << 20)
    return lambda: TrajectoryStore.open(tmp / "s.zarr", trajectory="default")


def _read_only(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    _store(tmp)
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    return lambda: TrajectoryStore.open(tmp / "s.zarr", "a")


def _meta_model(tmp: Path) -> Callable[[], Any]:
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    return lambda: TrajectoryStore.create(tmp / "s.zarr", model)


def _float8_model(tmp: Path) -> Callable[[], Any]:
    model = torch.nn.Linear(3, 2)
    model.weight = torch.nn.Parameter(model.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return lambda: TrajectoryStore.create(tmp / "s.zarr", model)


def _missing_group_document(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    (_traj(tmp) / "zarr.json").unlink()
    return lambda: TrajectoryStore.open(tmp / "s.zarr", trajectory="default")


def _foreign_folder(tmp: Path) -> Callable[[], Any]:
    (tmp / "s.zarr").mkdir()
    (tmp / "s.zarr" / "thesis.partial").write_text("mine")
    return lambda: TrajectoryStore.create(tmp / "s.zarr", mlp())


def _create_twice(tmp: Path) -> Callable[[], Any]:
    _store(tmp, t=1)
    return lambda: TrajectoryStore.create(tmp / "s.zarr", mlp())


def _not_a_store(tmp: Path) -> Callable[[], Any]:
    (tmp / "file").write_text("x")
    return lambda: TrajectoryStore.open(tmp / "file")


def _hostile_basis_name(tmp: Path) -> Callable[[], Any]:
    _store(tmp)
    return lambda: trajstore.dldr(str(tmp / "s.zarr"), 2, name="zarr/../../elsewhere/x")


def _closed_port_url() -> str:
    """An http:// store URL on a port of 127.0.0.1 where nothing listens (connection refused)."""
    pytest.importorskip("aiohttp", reason="fsspec's http:// file system needs aiohttp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/s.zarr"


def _unreachable(tmp: Path) -> Callable[[], Any]:
    url = _closed_port_url()
    return lambda: TrajectoryStore.open(url)


def _options_with_an_open_store(tmp: Path) -> Callable[[], Any]:
    store = TrajectoryStore.open(_store(tmp))
    return lambda: trajstore.dldr(store, 2, storage_options={"anon": True})


CASES: list[tuple[str, Callable[..., Callable[[], Any]], type[Exception], str]] = [
    ("fifo-chunk", _fifo_chunk, CorruptSnapshotError, r"snapshot 1 .* chunk 0 .*FIFO"),
    ("socket-chunk", _socket_chunk, CorruptSnapshotError, r"snapshot 2 .* chunk 1 .*socket"),
    ("chunk-shape-2^36", _huge_chunk_shape, InvalidStoreError, r"chunk_elems must be an integer in \[1, 67108864\]"),
    ("sparse-512MB-zarr.json", _sparse_document, InvalidStoreError, r"zarr.json.*(bytes|MiB)"),
    ("read-only-mount", _read_only, ReadOnlyError, r"read-only folder or mount"),
    ("meta-parameters", _meta_model, LayoutMismatchError, r"weight.*meta"),
    ("float8-parameters", _float8_model, TypeError, r"weight.*float8_e4m3fn"),
    ("name-a\\b", lambda tmp: (lambda: TrajectoryStore.create(tmp / "s.zarr", mlp(), trajectory="a\\b")), ValueError,
     r"trajectory name must match"),
    ("basis-name-escapes", _hostile_basis_name, ValueError, r"basis name must match"),
    ("float64-exact", lambda tmp: (lambda: TrajectoryStore.create(tmp / "s.zarr", torch.nn.Linear(2, 2).double())),
     ValueError, r"float64.*storage_dtype='float32'"),
    ("missing-group-document", _missing_group_document, TrajectoryNotFoundError, r"holds no trajectory 'default'"),
    ("create-over-foreign-file", _foreign_folder, StoreExistsError, r"not a trajstore store"),
    ("create-twice", _create_twice, StoreExistsError, r"already holds a trajectory named 'default'"),
    ("not-a-store", _not_a_store, NotAStoreError, r"not a trajstore store"),
    ("connection-refused", _unreachable, StoreUnreachableError,
     r"store http://127\.0\.0\.1:\d+/s\.zarr is unreachable: ClientConnectorError"),
    ("storage-options-with-an-open-store", _options_with_an_open_store, ValueError,
     r"storage_options apply to a store given by URL or path, not to a TrajectoryStore"),
]


@pytest.mark.parametrize("build, error, match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_each_case_raises_its_documented_error(build: Callable[..., Callable[[], Any]], error: type[Exception],
                                               match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    act = build(tmp_path, monkeypatch) if build is _read_only else build(tmp_path)
    with pytest.raises(error, match=match) as info:
        act()
    assert type(info.value).__module__ in ("trajstore.errors", "builtins")  # never a raw Zarr/OS/torch error
    if type(info.value).__module__ == "builtins":
        assert type(info.value) in (ValueError, TypeError)  # bad arguments, named in the message


@pytest.mark.parametrize("command", [["info"], ["verify"], ["verify", "--json"], ["basis", "--dim", "2"],
                                     ["train", "--out", "OUT"]])
def test_the_cli_exits_2_on_an_unreachable_store(command: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    url = _closed_port_url()
    argv = [command[0], url, *(str(tmp_path) if a == "OUT" else a for a in command[1:])]
    assert main(argv) == 2  # a usage-or-environment error, as every TrajstoreError; not verify's 1 (damage)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and err.startswith("trajstore: error: store ") and url in err  # one line, the URL
    assert "is unreachable: ClientConnectorError" in err  # and the cause
    assert "ERROR" not in captured.out  # no damage reported
