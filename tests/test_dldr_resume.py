"""Kill anywhere, resume exactly: the Gram pass and the basis pass (issue: faults and hostile input).

A child process (``_dldr_process.py``) runs one pass over a 50-block trajectory, each block slowed
down so a kill lands inside the pass; the parent SIGKILLs it at random moments and starts the same
command again, checking after every kill that nothing half-made is visible as complete. A chain
of restarts that finishes must give the bytes of an uninterrupted run; the finished blocks' saved
partials must have been used (the restarted pass reports them), not recomputed.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import trajstore
from trajstore import TrajectoryStore
from trajstore.basis import open_basis
from trajstore.dldr import BASIS_PASS, GRAM_PASS, _read_cached_gram
from trajstore.errors import InvalidStoreError, TrajectoryNotFoundError

CHILD = Path(__file__).with_name("_dldr_process.py")
CHUNK = 4096
N = 50 * CHUNK - 1000   # 50 chunks, the last one short
T = 12
BLOCK_BYTES = 1         # one chunk per block: 50 blocks per pass
DELAY = 0.03            # seconds per block: about 0.75 s of pass on two threads
D = 4
MID_PASS_KILLS = 12


class Vec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(N))


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-walk trajectory of T snapshots of N parameters."""
    path = tmp_path_factory.mktemp("resume") / "walk.zarr"
    rng = np.random.default_rng(7)
    model = Vec()
    with TrajectoryStore.create(path, model, chunk_bytes=CHUNK * 4) as store:
        for k in range(T):
            with torch.no_grad():
                model.w += torch.from_numpy(rng.standard_normal(N).astype(np.float32) * (1 + k % 3))
            store.append(model, step=k)
    return path


def _run(store: Path, job: str, kill_after: float | None) -> tuple[bool, str]:
    """Run the child; kill it ``kill_after`` seconds into the pass. Returns (finished, stderr)."""
    child = subprocess.Popen([sys.executable, str(CHILD), str(store), job, "--block-bytes", str(BLOCK_BYTES),
                              "--delay", str(DELAY)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stderr is not None
    line = child.stdout.readline()
    assert line.startswith("started"), child.stderr.read()
    if kill_after is not None:
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=120)
    finished = "done" in out
    assert finished or child.returncode == -signal.SIGKILL, err  # it either finished or was killed
    return finished, err


def _resumed_blocks(stderr: str) -> int:
    found = re.findall(r"(\d+) done before", stderr)
    return int(found[-1]) if found else 0


def _kill_chains(store: Path, job: str, check: callable, reset: callable, seed: int) -> tuple[int, int, int]:
    """Kill the job at random moments until MID_PASS_KILLS kills landed inside the pass; every
    chain that finishes is checked by ``check(finished=True)`` and then ``reset``. Returns
    (mid-pass kills, finished chains, restarts that resumed saved blocks)."""
    rng = random.Random(seed)
    mid, finished_chains, resumed = 0, 0, 0
    for _ in range(60):
        finished, err = _run(store, job, rng.uniform(0.0, 1.2))
        resumed += _resumed_blocks(err) > 0
        check(finished)
        if finished:
            finished_chains += 1
            reset()
        else:
            mid += 1
            if mid >= MID_PASS_KILLS:
                break
    finished, err = _run(store, job, None)  # the same command, left to finish
    resumed += _resumed_blocks(err) > 0
    assert finished
    check(True)
    return mid, finished_chains + 1, resumed


@pytest.mark.slow
def test_gram_pass_killed_anywhere_resumes_to_the_same_bytes(trajectory: Path, tmp_path: Path) -> None:
    reference = trajstore.gram_matrix(TrajectoryStore.open(trajectory), block_bytes=BLOCK_BYTES, cache=False)
    path = tmp_path / "gram.zarr"
    shutil.copytree(trajectory, path)

    def cache() -> np.ndarray | None:
        store = TrajectoryStore.open(path)
        return _read_cached_gram(store, store.zarr_store)

    def check(finished: bool) -> None:
        cached = cache()
        if finished:
            # a finished chain of killed and restarted passes gives the uninterrupted bytes
            assert cached is not None and cached.tobytes() == reference.tobytes()
            # and leaves no block checkpoints behind
            left = path / "trajectories" / "default" / GRAM_PASS
            assert not left.exists(), sorted(str(p.relative_to(left)) for p in left.rglob("*"))
        else:
            # a killed pass never leaves a cached Gram matrix that is not the right one
            assert cached is None or cached.tobytes() == reference.tobytes()

    def reset() -> None:
        shutil.rmtree(path / "trajectories" / "default" / "gram")

    mid, chains, resumed = _kill_chains(path, "gram", check, reset, seed=11)
    assert mid >= MID_PASS_KILLS  # the bar: at least 10 random kill points inside the pass
    assert resumed >= 3  # restarts loaded the blocks finished before the kill instead of recomputing
    print(f"Gram pass: {mid} kills inside the pass, {chains} finished chains, {resumed} resumed restarts")


@pytest.mark.slow
def test_basis_pass_killed_anywhere_resumes_to_the_same_bytes(trajectory: Path, tmp_path: Path) -> None:
    ref_path = tmp_path / "ref.zarr"
    shutil.copytree(trajectory, ref_path)
    ref = trajstore.dldr(str(ref_path), D, block_bytes=BLOCK_BYTES, num_workers=2)
    ref_u, ref_mean = ref.to_numpy(), ref.mean
    path = tmp_path / "basis.zarr"
    shutil.copytree(trajectory, path)
    trajstore.gram_matrix(TrajectoryStore.open(path), block_bytes=BLOCK_BYTES)  # only the basis pass is left
    name = f"default-0-{T}-d{D}"

    def check(finished: bool) -> None:
        try:
            basis = open_basis(str(path), name)
        except (InvalidStoreError, TrajectoryNotFoundError):
            assert not finished  # only an interrupted pass may leave no complete basis
            return
        # a basis visible as complete is the uninterrupted one, bit for bit
        assert basis.to_numpy().tobytes() == ref_u.tobytes()
        assert basis.mean.tobytes() == ref_mean.tobytes()
        assert basis.orthonormality == ref.orthonormality  # U^T U summed from the same partials
        # and holds no block checkpoints
        assert not list((path / "bases" / name).glob(f"v-*/{BASIS_PASS}"))
        if finished:
            # the restarts resumed the killed runs' version instead of leaving folders behind
            assert [p.name for p in (path / "bases" / name).glob("v-*")] == [basis.metadata["version"]]

    def reset() -> None:
        shutil.rmtree(path / "bases" / name)

    mid, chains, resumed = _kill_chains(path, "basis", check, reset, seed=12)
    assert mid >= MID_PASS_KILLS  # at least 10 random kill points inside the pass
    assert resumed >= 3  # restarts kept the rows of U written before the kill
    print(f"basis pass: {mid} kills inside the pass, {chains} finished chains, {resumed} resumed restarts")


def test_a_checkpoint_of_another_pass_is_discarded(trajectory: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.zarr"
    shutil.copytree(trajectory, path)
    store = TrajectoryStore.open(path)
    reference = trajstore.gram_matrix(store, block_bytes=BLOCK_BYTES, cache=False)
    # Plant a checkpoint group of a different pass (other block size) holding a wrong partial.
    group = zarr.open_group(str(path), path=f"trajectories/default/{GRAM_PASS}", mode="w", zarr_format=3,
                            attributes={"trajstore_pass": {"kind": "gram", "stop": T, "first": 0, "block": 1}})
    group.create_array("b0", shape=(T, T), dtype=np.float64, fill_value=0.0)[...] = np.ones((T, T))
    gram = trajstore.gram_matrix(store, block_bytes=BLOCK_BYTES)
    assert gram.tobytes() == reference.tobytes()  # the foreign partial was not summed in


def test_a_damaged_block_checkpoint_is_recomputed(trajectory: Path, tmp_path: Path) -> None:
    path = tmp_path / "damaged.zarr"
    shutil.copytree(trajectory, path)
    store = TrajectoryStore.open(path)
    reference = trajstore.gram_matrix(store, block_bytes=BLOCK_BYTES, cache=False)
    from trajstore._checkpoint import BlockCheckpoint
    from trajstore.dldr import _gram_pass, _pass_checkpoint, _records_digest, _writable
    from trajstore._dask import block_size

    identity = {"kind": "gram", "stop": T, "first": 0, "n": N, "reference": 0,
                "block": block_size(store, 0, T, BLOCK_BYTES), "digest": _records_digest(store, T)}
    checkpoint = _pass_checkpoint(_writable(store), f"{store.prefix}/{GRAM_PASS}", identity)
    assert isinstance(checkpoint, BlockCheckpoint)
    _gram_pass(store, T, 0, None, 1, BLOCK_BYTES, False, checkpoint)  # every block saved
    chunk = path / "trajectories" / "default" / GRAM_PASS / "b3" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x40
    chunk.write_bytes(bytes(raw))  # block 3's partial now fails its checksum
    (path / "trajectories" / "default" / GRAM_PASS / "b5" / "c" / "0" / "0").unlink()  # block 5's is gone
    again = _gram_pass(store, T, 0, None, 1, BLOCK_BYTES, False, checkpoint)
    assert again.tobytes() == reference.tobytes()  # damaged partials are recomputed, never summed


def test_an_overwrite_killed_before_its_commit_leaves_the_old_basis_whole(trajectory: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "overwrite.zarr"
    shutil.copytree(trajectory, path)
    old = trajstore.dldr(str(path), D, block_bytes=2**20)
    old_u = old.to_numpy().tobytes()
    name = f"default-0-{T}-d{D}"

    class Killed(BaseException):
        pass

    def die(*args: object) -> None:
        raise Killed

    monkeypatch.setattr(trajstore.basis, "commit", die)  # every row of the new version written, then killed
    with pytest.raises(Killed):
        trajstore.dldr(str(path), D, block_bytes=2**20, overwrite=True)
    monkeypatch.undo()
    again = open_basis(str(path), name)
    assert again.metadata["version"] == old.metadata["version"]  # the stored basis is still the old one
    assert again.to_numpy().tobytes() == old_u  # and whole: its rows were never touched
    assert len(list((path / "bases" / name).glob("v-*"))) == 2  # the killed computation's version is left ...
    basis = trajstore.dldr(str(path), D, block_bytes=2**20, overwrite=True)  # ... and resumed by the same call
    assert basis.to_numpy().tobytes() == old_u  # the same computation: the same bytes
    assert [p.name for p in (path / "bases" / name).glob("v-*")] == [basis.metadata["version"]]  # old one deleted


def test_an_overwrite_killed_while_deleting_the_old_version_leaves_the_new_basis(
        trajectory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "overwrite.zarr"
    shutil.copytree(trajectory, path)
    old = trajstore.dldr(str(path), D, block_bytes=2**20)
    name = f"default-0-{T}-d{D}"
    delete = trajstore.basis.delete_version

    class Killed(BaseException):
        pass

    def delete_some_then_die(zstore: object, name: str, version: str) -> None:
        group = zarr.open_group(str(path), path=f"bases/{name}/{version}", mode="r+")
        group.update_attributes({"trajstore_deleted": True})  # as delete_version marks it first
        shutil.rmtree(path / "bases" / name / version / "U")  # part of the old basis is gone when the process dies
        raise Killed

    monkeypatch.setattr(trajstore.basis, "delete_version", delete_some_then_die)
    with pytest.raises(Killed):
        trajstore.dldr(str(path), D, block_bytes=2**20, overwrite=True)
    monkeypatch.undo()
    assert delete is trajstore.basis.delete_version
    new = open_basis(str(path), name)  # committed before the deletion began: complete and whole
    assert new.metadata["version"] != old.metadata["version"]
    assert new.to_numpy().tobytes() == trajstore.dldr(str(path), D).to_numpy().tobytes()
    with pytest.raises(trajstore.CorruptSnapshotError, match="recomputed, replaced or deleted since it was opened"):
        old.to_numpy()  # the basis opened before says what happened, rather than reading a half-deleted version
    trajstore.dldr(str(path), D, block_bytes=2**20, overwrite=True)  # the next commit finishes the deletion
    assert len(list((path / "bases" / name).glob("v-*"))) == 1


def test_checkpoints_left_by_a_kill_after_the_commit_are_removed(trajectory: Path, tmp_path: Path) -> None:
    # Regression (found by the kill test on CI): a kill between the cache's commit and the removal
    # of the block checkpoints left them for good, since later calls found the cache and returned.
    path = tmp_path / "stale.zarr"
    shutil.copytree(trajectory, path)
    store = TrajectoryStore.open(path)
    gram = trajstore.gram_matrix(store, block_bytes=BLOCK_BYTES)
    zarr.open_group(str(path), path=f"trajectories/default/{GRAM_PASS}", mode="w", zarr_format=3,
                    attributes={"trajstore_pass": {"kind": "gram"}})
    again = trajstore.gram_matrix(store, block_bytes=BLOCK_BYTES)
    assert again.tobytes() == gram.tobytes()  # served from the cache
    assert not (path / "trajectories" / "default" / GRAM_PASS).exists()  # and the stale checkpoints went
