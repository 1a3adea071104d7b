"""``trajstore verify``: each kind of damage is found and named; a sound store is reported sound."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import trajstore
from trajstore import TrajectoryStore, _backend
from trajstore.cli import main as cli
from trajstore.verify import VerifyReport, verify

CHUNK = 512
D = 3
T = 8
BASIS = f"default-0-{T}-d{D}"


class Net(nn.Module):
    """2,000 parameters (4 chunks, the last one short) and a BatchNorm's buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(99, 20)
        self.norm = nn.BatchNorm1d(20)


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "sound.zarr"
    torch.manual_seed(0)
    model = Net()
    with TrajectoryStore.create(path, model, chunk_bytes=CHUNK * 4) as store:
        for k in range(T):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * (1 + k % 3))
                model.norm.running_mean.add_(1.0)
            store.append(model, step=k, rng_state=True)
    trajstore.dldr(str(path), D)
    return path


@pytest.fixture
def store(sound: Path, tmp_path: Path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(sound, path)
    return path


def _params_chunk(path: Path, row: int, j: int) -> Path:
    return path / "trajectories" / "default" / "params" / "c" / str(row) / str(j)


def _errors(report: VerifyReport) -> str:
    return "\n".join(f.message for f in report.errors)


def test_a_sound_store_is_reported_sound(sound: Path) -> None:
    report = verify(sound)
    assert report.ok and not report.findings, report.findings  # nothing to report on a fresh store
    n = TrajectoryStore.open(sound).n
    # every chunk of every snapshot was read, and the basis' U and mean
    assert report.checked == {"trajectories": 1, "snapshots": T, "chunks": T * -(-n // CHUNK), "bases": 1,
                              "basis_chunks": 2 * -(-n // TrajectoryStore.open(sound).piece)}


def test_a_flipped_byte_is_found(store: Path) -> None:
    chunk = _params_chunk(store, 5, 2)
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x01
    chunk.write_bytes(bytes(raw))
    report = verify(store)
    assert not report.ok  # one flipped bit is damage
    assert "snapshot 5" in _errors(report) and "chunk 2" in _errors(report)  # named where it is
    assert "checksum" in _errors(report)


def test_a_truncated_chunk_is_found(store: Path) -> None:
    chunk = _params_chunk(store, 3, 1)
    chunk.write_bytes(chunk.read_bytes()[:-10])
    report = verify(store)
    assert "snapshot 3" in _errors(report) and "truncated" in _errors(report)  # the size gives it away


def test_a_missing_chunk_is_found(store: Path) -> None:
    _params_chunk(store, 0, 3).unlink()
    report = verify(store)
    assert "snapshot 0" in _errors(report) and "missing" in _errors(report)


def test_a_missing_or_damaged_buffers_chunk_is_found(store: Path) -> None:
    buffers = store / "trajectories" / "default" / "buffers" / "c"
    (buffers / "4" / "0").unlink()
    raw = bytearray((buffers / "6" / "0").read_bytes())
    raw[3] ^= 0x10
    (buffers / "6" / "0").write_bytes(bytes(raw))
    errors = _errors(verify(store))
    assert "snapshot 4" in errors and "buffers chunk is missing" in errors
    assert "snapshot 6" in errors and "buffers chunk failed its crc32c checksum" in errors


def _rewrite_snapshot(path: Path, row: int, change: callable, recommit: bool = True) -> None:
    """Give snapshot ``row`` new values with valid checksums (as a buggy or hostile writer would);
    with ``recommit``, its commit document's chunk checksums are rewritten to match too, so that
    only a check against something else (a basis' fingerprints, its spectrum) can tell."""
    store = TrajectoryStore.open(path)
    values = change(store.snapshot(row).copy())
    crcs = [_backend.write_chunk_file(_params_chunk(path, row, j), values[a:a + CHUNK], (CHUNK,), np.nan)
            for j, a in enumerate(range(0, store.n, CHUNK))]
    if recommit:
        [doc_path] = (path / "trajectories" / "default" / "log" / "commit").glob(f"*/{row:010d}-*.json")
        doc = json.loads(doc_path.read_text())
        doc_path.write_text(json.dumps({**doc, "crc": crcs}))


def test_snapshot_values_changed_under_valid_chunk_checksums_are_caught_by_the_commit(store: Path) -> None:
    _rewrite_snapshot(store, 6, lambda w: w * 1.5, recommit=False)
    with pytest.raises(trajstore.CorruptSnapshotError, match="snapshot 6 .* not the one its commit recorded"):
        TrajectoryStore.open(store).snapshot(6)  # every read compares the chunk with its commit
    assert "snapshot 6" in _errors(verify(store, sources=False))  # and verify, without the basis check


def test_a_basis_whose_source_snapshots_changed_is_found(store: Path) -> None:
    def one_ulp(w: np.ndarray) -> np.ndarray:
        w[1234] = np.nextafter(w[1234], np.float32(np.inf))
        return w

    _rewrite_snapshot(store, 6, one_ulp)  # the smallest change a float32 snapshot can take
    report = verify(store)
    assert not verify(store, sources=False).errors  # every checksum holds: only the source check can tell
    assert "snapshots 6 of trajectory 'default' changed" in _errors(report)


def test_a_basis_of_an_older_format_is_checked_by_its_spectrum(store: Path) -> None:
    group = zarr.open_group(str(store), path=f"bases/{BASIS}", mode="r+")
    meta = dict(group.attrs["trajstore"])
    del meta["source_fingerprints"]
    group.update_attributes({"trajstore": meta})
    assert verify(store).ok  # without fingerprints a sound basis still passes (with a warning)
    _rewrite_snapshot(store, 2, lambda w: w * 1.5)
    errors = _errors(verify(store))
    assert "mean" in errors and "principal directions" in errors  # a real change shows in the spectrum


def test_damage_to_the_basis_itself_is_found(store: Path) -> None:
    arrays = store / trajstore.open_basis(store, BASIS).path  # the basis' current version folder
    u = arrays / "U" / "c" / "0" / "0"
    raw = bytearray(u.read_bytes())
    raw[40] ^= 0x80
    u.write_bytes(bytes(raw))
    (arrays / "mean" / "c" / "0").unlink()
    errors = _errors(verify(store))
    assert "U rows [0," in errors and "failed to decode" in errors  # the flipped bit in U
    assert "mean rows [0," in errors and "missing" in errors  # the deleted chunk of the mean


def test_a_basis_with_its_columns_swapped_is_found(store: Path) -> None:
    group = zarr.open_group(str(store), path=trajstore.open_basis(store, BASIS).path, mode="r+")
    u = group["U"][...]
    group["U"][...] = u[:, [1, 0, 2]]  # still orthonormal, valid checksums, wrong directions
    errors = _errors(verify(store))
    assert "principal directions" in errors


def test_left_overs_of_interrupted_work_are_warnings(store: Path) -> None:
    writer = TrajectoryStore.open(store, "a")
    writer._writer.write_params(T, [p.detach() for p in Net().parameters()])  # an append killed before its commit
    writer.close()
    (store / "trajectories" / "default" / "params" / "c" / ".0.1234.99.partial").write_bytes(b"x" * 10)
    group = zarr.open_group(str(store), path=f"bases/{BASIS}", mode="r+")
    group.update_attributes({"trajstore": {**group.attrs["trajstore"], "complete": False}})
    report = verify(store)
    assert report.ok  # none of these is damage: the library recovers from each by itself
    text = "\n".join(f.message for f in report.warnings)
    assert f"rows {T} of params hold no committed snapshot" in text and "temporary files" in text and "incomplete" in text


def test_cli_exit_status_and_json(sound: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(sound)]) == 0  # sound: exit 0
    assert "OK, 0 warnings" in capsys.readouterr().out
    _params_chunk(store, 1, 0).unlink()
    assert cli(["verify", str(store), "--json"]) == 1  # damaged: exit 1, like fsck
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and any("snapshot 1" in f["message"] for f in doc["findings"])


def test_a_memory_store_is_verified_through_zarr(sound: Path) -> None:
    url = "memory://verify-" + sound.parent.name
    src = zarr.storage.LocalStore(str(sound), read_only=True)
    dst = _backend.open_zarr_store(url, read_only=False)
    for key in _backend.sync(_list(src)):
        value = _backend.sync(src.get(key, prototype=zarr.core.buffer.default_buffer_prototype()))
        _backend.sync(dst.set(key, value))
    assert verify(url).ok  # the generic (non-local) read path checks the same way
    arr = zarr.open_array(dst, path="trajectories/default/params", mode="r+")
    arr[2, 7] = arr[2, 7] + 1  # a valid chunk checksum, but not the chunk snapshot 2's commit recorded
    errors = _errors(verify(url))
    assert "snapshot 2 of trajectory 'default'" in errors and "not the one its commit recorded" in errors


async def _list(store: zarr.abc.store.Store) -> list[str]:
    return [k async for k in store.list()]
