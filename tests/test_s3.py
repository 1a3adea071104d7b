"""Stores on S3, against a real S3-compatible server (moto's, started on 127.0.0.1 by the tests).

Credentials and the endpoint reach s3fs only through ``storage_options`` (the library) and
``--storage-option`` (the command line): every ``AWS_*`` variable is removed and the shared
credentials and config files point nowhere, so a test that passes proves the options got there.
A store that cannot be reached raises StoreUnreachableError and is never reported as damage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 tests need s3fs (pip install s3fs)")
pytest.importorskip("moto.server", reason="the s3 tests need moto's server (pip install 'moto[server]')")

import fsspec  # noqa: E402

from conftest import mlp, train_steps  # noqa: E402
from trajstore import TrajectoryStore, dldr, open_basis  # noqa: E402
from trajstore.cli import main  # noqa: E402
from trajstore.errors import StoreUnreachableError  # noqa: E402
from trajstore.verify import verify  # noqa: E402

CHUNK_BYTES = 16 * 4  # several chunks per snapshot of the 110-parameter MLP
T, D = 6, 3
# One attempt and a 1 s connect timeout: an unreachable endpoint fails at once instead of after
# botocore's default 5 attempts with 60 s timeouts.
FAST_FAIL = {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 60}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server in a process of its own, on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # Its log (a line per request) goes to a file: into a pipe no one reads, it would fill the
        # pipe and stall the server mid-test.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=self.log, env=env)

    def wait(self, timeout: float = 60.0) -> bool:
        """Whether the server answers HTTP within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except OSError:
                time.sleep(0.2)
        return False

    def stop(self) -> str:
        """Stop the server (its own pid only); what it wrote to stderr, the last 500 characters."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.seek(0)
        err = self.log.read().decode(errors="replace")
        self.log.close()
        return err[-500:]


def _start() -> MotoServer:
    server = MotoServer()
    if not server.wait():
        err = server.stop()
        pytest.skip(f"moto's S3 server (python -m moto.server) did not answer on {server.endpoint}: {err}")
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[MotoServer]:
    s = _start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, endpoint or region from the environment or from ~/.aws."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup either


def _options(endpoint: str, *, credentials: bool = True) -> dict[str, Any]:
    # A fresh cache token per call (an option s3fs ignores) is not needed: fsspec caches one file
    # system per distinct options, and listings stay current because every write in a test goes
    # through that same file system.
    opts: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
                            "config_kwargs": FAST_FAIL}
    if credentials:
        opts.update(key="testing", secret="testing")
    return opts


def _cli_options(endpoint: str) -> list[str]:
    """The same options as ``--storage-option`` flags, in both spellings (dotted and JSON)."""
    return ["--storage-option", f"client_kwargs.endpoint_url={endpoint}",
            "--storage-option", "client_kwargs.region_name=eu-west-1",
            "--storage-option", f"config_kwargs={json.dumps(FAST_FAIL)}",
            "--storage-option", "key=testing", "--storage-option", "secret=testing"]


@pytest.fixture
def bucket(server: MotoServer) -> str:
    name = f"trajstore-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", **_options(server.endpoint)).mkdir(name)
    return name


def _record(url: str | Path, **kw: Any) -> None:
    """T snapshots of the MLP, the same ones wherever ``url`` is."""
    model = mlp()
    with TrajectoryStore.create(url, model, chunk_bytes=CHUNK_BYTES, **kw) as store:
        for k in range(T):
            train_steps(model, (8, 5), steps=1, seed=k)
            store.append(model, step=k)


@pytest.mark.slow
def test_dldr_on_s3_is_the_local_basis(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    opts = _options(server.endpoint)
    url = f"s3://{bucket}/t.zarr"
    _record(url, storage_options=opts)
    _record(tmp_path / "t.zarr")
    remote = dldr(url, D, storage_options=opts)
    local = dldr(str(tmp_path / "t.zarr"), D)
    # The same float32 snapshots, the same blocks, the same order of sums: the same bytes (the
    # read paths differ, a local folder's reads chunk files directly, the numerics do not).
    assert np.array_equal(remote.to_numpy(), local.to_numpy())
    assert np.array_equal(remote.mean, local.mean)
    assert remote.singular_values.tolist() == local.singular_values.tolist()
    # Stored on S3 and read back through the same options: the basis that was returned.
    again = open_basis(url, remote.name, storage_options=opts)
    assert np.array_equal(again.to_numpy(), remote.to_numpy())
    assert TrajectoryStore.list_trajectories(url, storage_options=opts) == ["default"]


def test_a_reader_sees_what_another_writer_commits(server: MotoServer, bucket: str) -> None:
    """Regression: s3fs caches listings for the life of its file system, and answers ``exists``
    from them: a reader's refresh() stayed at its first count while a writer committed more."""
    url = f"s3://{bucket}/t.zarr"
    writer_options, reader_options = _options(server.endpoint), {**_options(server.endpoint), "key": "reader"}
    model = mlp()
    with TrajectoryStore.create(url, model, chunk_bytes=CHUNK_BYTES, storage_options=writer_options) as writer:
        writer.append(model, step=0)
        reader = TrajectoryStore.open(url, storage_options=reader_options)  # another file system, as in a process
        assert len(reader) == 1
        for k in (1, 2):
            train_steps(model, (8, 5), steps=1, seed=k)
            writer.append(model, step=k)
        reader.refresh()
        assert len(reader) == 3  # every commit the writer made
        assert np.array_equal(reader.snapshot(2), writer.snapshot(2))
        assert len(TrajectoryStore.open(url, storage_options=reader_options)) == 3  # and a new open of it


@pytest.mark.slow
def test_cli_info_verify_basis_on_s3(server: MotoServer, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    opts = _options(server.endpoint)
    url = f"s3://{bucket}/t.zarr"
    _record(url, storage_options=opts)
    flags = _cli_options(server.endpoint)

    assert main(["info", url, "--json", *flags]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["t"]) for t in info["trajectories"]] == [("default", T)]

    assert main(["basis", url, "--dim", str(D), "--name", "cli", *flags]) == 0
    assert "explained variance" in capsys.readouterr().out
    stored = open_basis(url, "cli", storage_options=opts)
    assert np.array_equal(stored.to_numpy(), dldr(url, D, storage_options=opts).to_numpy())  # the one dldr makes

    assert main(["verify", url, "--json", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checked"]["snapshots"] == T and report["checked"]["bases"] == 2
    assert not [f for f in report["findings"] if f["level"] == "error"]


@pytest.mark.slow
def test_cli_in_a_child_process_gets_its_options_from_the_flags(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/t.zarr"
    _record(url, storage_options=_options(server.endpoint))
    done = subprocess.run([sys.executable, "-m", "trajstore", "verify", url, "--no-sources",
                           *_cli_options(server.endpoint)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))  # the fixture's environment: no AWS_* credentials
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stdout


@pytest.mark.slow
def test_cli_train_from_a_store_on_s3(server: MotoServer, bucket: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert main(["sample", str(out), "--experiment", "digits", "--epochs", "1", "--sample-epochs", "1",
                 "--snapshot-every", "4", "--set", "threads=1"]) == 0
    fs = fsspec.filesystem("s3", **_options(server.endpoint))
    fs.put(str(out / "trajectory.zarr"), f"{bucket}/digits.zarr", recursive=True)
    url = f"s3://{bucket}/digits.zarr"
    capsys.readouterr()
    flags = _cli_options(server.endpoint)

    # Results are local files: a store at a URL has no folder to put them next to.
    assert main(["train", url, "--optimizer", "psgd", "--dim", "2", "--epochs", "1", *flags]) == 2
    assert "--out" in capsys.readouterr().err

    assert main(["train", url, "--optimizer", "psgd", "--dim", "2", "--epochs", "1", "--out", str(tmp_path / "res"),
                 *flags]) == 0
    result = json.loads((tmp_path / "res" / "train-psgd-default-0-4-d2-e1-b1024.json").read_text())
    assert result["basis"] == "default-0-4-d2" and len(result["history"]) == 1
    assert open_basis(url, "default-0-4-d2", storage_options=_options(server.endpoint)).d == 2  # computed on S3


@pytest.mark.slow  # seconds of real processes: the full suite runs it, the everyday subset does not
def test_a_closed_port_is_unreachable_not_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    url = "s3://bucket/t.zarr"
    with pytest.raises(StoreUnreachableError, match=r"s3://bucket/t.zarr .*127\.0\.0\.1.* is unreachable"):
        dldr(url, D, storage_options=_options(endpoint))
    with pytest.raises(ConnectionError):  # the builtin users catch
        verify(url, storage_options=_options(endpoint))
    assert main(["verify", url, *_cli_options(endpoint)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "unreachable" in err and url in err and "EndpointConnectionError" in err
    assert "ERROR" not in captured.out and "damage" not in err  # no report of damage
    for command in (["info", url], ["basis", url, "--dim", "2"], ["train", url, "--out", str(tmp_path)]):
        assert main([*command, *_cli_options(endpoint)]) == 2, command
        assert "is unreachable" in capsys.readouterr().err


def test_no_credentials_is_unreachable(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/t.zarr"
    _record(url, storage_options=_options(server.endpoint))
    with pytest.raises(StoreUnreachableError, match="NoCredentialsError"):
        TrajectoryStore.open(url, storage_options=_options(server.endpoint, credentials=False))


@pytest.mark.slow
def test_a_server_that_goes_down_is_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A store that was there and healthy: after its server stops, verify says unreachable (exit 2),
    never that the snapshots are damaged."""
    own = _start()
    try:
        opts = _options(own.endpoint)
        fsspec.filesystem("s3", **opts).mkdir("down")
        url = "s3://down/t.zarr"
        _record(url, storage_options=opts)
        assert verify(url, storage_options=opts).ok
        store = TrajectoryStore.open(url, storage_options=opts)
    finally:
        own.stop()
    with pytest.raises(StoreUnreachableError):
        store.snapshot(0)  # a chunk not read is not a damaged chunk
    assert main(["verify", url, *_cli_options(own.endpoint)]) == 2
    captured = capsys.readouterr()
    assert "unreachable" in captured.err and "ERROR" not in captured.out
