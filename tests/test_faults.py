"""Fault injection (issue #7): failed, short and corrupted reads and writes, and a full disk.

Every job (create, append, read, the Gram and basis passes, the Recorder) runs over a
:class:`trajstore.testing.FaultyStore` (Zarr's path, over an in-memory and a local store) or, for
the local direct chunk-file writer and reader, with faults patched into their I/O. Each case must
end in a clear error (a TrajstoreError or an OSError naming what failed) or, after a transient
fault, in the correct result; never in a wrong committed result. After a failed append the store
holds exactly the keys and bytes it held when the writer had opened (lease files aside; opening for
appending writes the writer's generation marker of the commit log, store format 2), except that an
array's grown capacity is never shrunk back.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

import trajstore
from trajstore import TrajectoryStore, _backend, _localread, open_basis
from trajstore.errors import CorruptSnapshotError, StoreExistsError, TrajstoreError, WriterConflictError
from trajstore.recorder import Recorder
from trajstore.testing import Fault, FaultyStore

from conftest import flat_params, mlp, train_steps

CHUNK_BYTES = 128   # mlp() has n = 80 float32 parameters: 3 chunks (32, 32, 16) per snapshot
T = 4               # snapshots committed before each fault
D = 2
BLOCK_BYTES = 32 * T * 4  # one chunk of every snapshot per block: 3 blocks per pass
LEASE = ("writer.json", "writer.lock")
IO_ERRORS = ("eio", "enospc", "transient", "short_write")  # write faults that raise
# A pass whose checkpoint could not be written warns and goes on; here that is expected.
pytestmark = pytest.mark.filterwarnings("ignore:no resume checkpoint:RuntimeWarning")


# ------------------------------------------------------------------ helpers

def models(t: int) -> Iterator[nn.Module]:
    """One model trained a little further for each snapshot (deterministic: the same for every case)."""
    model = mlp()
    for k in range(t):
        if k:
            train_steps(model, (8, 5), steps=1, seed=k)
        yield model


_BASE: dict[tuple[str, int], tuple[Any, list[np.ndarray], list[dict[str, Any]]]] = {}
FULL = 8  # the arrays' capacity after the first append: a store of FULL snapshots grows on the next


def committed_store(where: str, tmp_path: Path, t: int = T) -> tuple[Store, list[np.ndarray], list[dict[str, Any]]]:
    """A store (in memory or in ``tmp_path``) holding ``t`` committed snapshots, with their values
    and records. Built once per backend and ``t``, and copied for each case."""
    if (where, t) not in _BASE:
        inner: Store = MemoryStore() if where == "memory" else LocalStore(tmp_path.parent / f"base-{where}-{t}.zarr")
        model = mlp()
        with TrajectoryStore.create(inner, model, chunk_bytes=CHUNK_BYTES) as traj:
            for k, m in enumerate(models(t)):
                traj.append(m, step=k)
            snaps, records = [traj.snapshot(k) for k in range(t)], traj.records
        _BASE[where, t] = (inner._store_dict if where == "memory" else inner.root, snaps, records)  # type: ignore[attr-defined]
    source, snaps, records = _BASE[where, t]
    if where == "memory":
        return MemoryStore(store_dict=dict(source)), snaps, records
    shutil.copytree(source, tmp_path / "s.zarr", ignore=shutil.ignore_patterns(*LEASE))
    return LocalStore(tmp_path / "s.zarr"), snaps, records


def open_faulty(inner: Store, plan: list[Fault], mode: str = "a") -> tuple[FaultyStore, TrajectoryStore]:
    """The trajectory opened through a FaultyStore; faults count from the first call after opening.
    Opening with mode="a" writes a generation marker (``log/gen/...``): take a ``contents`` snapshot
    to compare with after this, not before."""
    faulty = FaultyStore(inner, plan)
    faulty.enabled = False
    traj = TrajectoryStore.open(faulty, mode)  # type: ignore[arg-type]
    faulty.enabled = True
    return faulty, traj


def contents(store: Store) -> dict[str, bytes]:
    """Every key of the store with its bytes, lease files left out."""
    async def dump() -> dict[str, bytes]:
        out = {}
        async for key in store.list():
            if not key.endswith(LEASE):
                buf = await store.get(key, default_buffer_prototype())
                out[key] = b"" if buf is None else buf.to_bytes()
        return out
    return sync(dump())


def partial_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.partial")]


def assert_as_before(inner: Store, before: dict[str, bytes], snaps: list[np.ndarray],
                     records: list[dict[str, Any]]) -> None:
    assert contents(inner) == before  # every key and byte as before the failed call: nothing left over
    assert_committed(inner, snaps, records)


def assert_committed(inner: Store, snaps: list[np.ndarray], records: list[dict[str, Any]]) -> None:
    with TrajectoryStore.open(inner.with_read_only(True)) as traj:
        assert len(traj) == len(snaps)  # the same committed count
        assert traj.records == records  # and the same records
        for k, values in enumerate(snaps):
            np.testing.assert_array_equal(traj.snapshot(k), values)  # committed snapshots bit for bit


def assert_only_capacity_grew(inner: Store, before: dict[str, bytes], snaps: list[np.ndarray],
                              records: list[dict[str, Any]]) -> set[str]:
    """The store as before the failed call except that an array's capacity (its recorded row
    count) may have grown: a failed append never shrinks an array (store format 2, by design: a
    deposed writer shrinking could delete a newer writer's rows). Returns the grown documents."""
    after = contents(inner)
    assert after.keys() == before.keys()  # the partial row's chunks are gone, and nothing else is new
    changed = {k for k in after if after[k] != before[k]}
    assert changed <= {PARAMS_META, BUFFERS_META}  # only the arrays' metadata documents
    for key in changed:
        assert _is_json(after[key]), f"{key} is no longer a JSON document: the trajectory does not open"
        old, new = json.loads(before[key]), json.loads(after[key])
        assert new["shape"][0] > old["shape"][0]  # grown, never shrunk
        assert {**new, "shape": new["shape"][1:]} == {**old, "shape": old["shape"][1:]}  # and nothing but the rows
    assert_committed(inner, snaps, records)
    return changed


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def assert_clear(error: BaseException) -> None:
    """A TrajstoreError, or an OSError whose message (or notes) names what failed."""
    assert isinstance(error, (TrajstoreError, OSError)), repr(error)  # not a bare KeyError/ValueError
    text = " ".join([str(error), *getattr(error, "__notes__", [])])
    assert "snapshot" in text or "trajectories/" in text or "bases/" in text or "basis" in text, text


def assert_appends_again(traj: TrajectoryStore, inner: Store, snaps: list[np.ndarray]) -> None:
    """The next append succeeds and every snapshot, old and new, reads back."""
    model = mlp(seed=7)
    index = traj.append(model, step=99)
    assert index == len(snaps)  # the failed append took no index
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        np.testing.assert_array_equal(check.snapshot(index), flat_params(model))  # the new one is right
        for k, values in enumerate(snaps):
            np.testing.assert_array_equal(check.snapshot(k), values)  # the old ones untouched
        loaded = check.load_into(mlp(seed=3), index)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)  # buffers too


# ------------------------------------------------------------------ the wrapper itself

def test_plan_hits_the_chosen_calls_and_logs_them() -> None:
    store = FaultyStore(MemoryStore(), [Fault("set", "a/*", "eio", at=2, count=2)])
    buf = default_buffer_prototype().buffer.from_bytes(b"xyz")
    outcomes = []
    for key in ("a/1", "b/1", "a/2", "a/3", "a/4"):
        try:
            sync(store.set(key, buf))
            outcomes.append("ok")
        except OSError as e:
            outcomes.append(errno.errorcode[e.errno])
    assert outcomes == ["ok", "ok", "EIO", "EIO", "ok"]  # the 2nd and 3rd *matching* calls only
    assert [c.key for c in store.faults()] == ["a/2", "a/3"]  # the log says where faults landed
    assert not sync(store.exists("a/2"))  # a raising write stores nothing


def test_read_faults_shorten_or_flip_and_views_share_the_plan() -> None:
    inner = MemoryStore()
    sync(inner.set("k", default_buffer_prototype().buffer.from_bytes(b"abcdef")))
    store = FaultyStore(inner, [Fault("get", "k", "short"), Fault("get", "k", "corrupt", at=2)])
    view = store.with_read_only(True)
    got = [sync(s.get("k", default_buffer_prototype())).to_bytes() for s in (store, view, view)]
    # Call 1 short, call 2 (through the read-only view: one count) with its middle byte flipped, call 3 intact.
    assert got == [b"abc", b"abc" + bytes([ord("d") ^ 0xFF]) + b"ef", b"abcdef"]


def test_transient_fails_once_and_lost_reply_stores_the_value() -> None:
    store = FaultyStore(MemoryStore(), [Fault("set", "t", "transient", count=None), Fault("set", "r", "lost_reply")])
    buf = default_buffer_prototype().buffer.from_bytes(b"v")
    with pytest.raises(TimeoutError):
        sync(store.set("t", buf))
    sync(store.set("t", buf))  # a transient fault fires once, whatever its count
    with pytest.raises(TimeoutError):
        sync(store.set("r", buf))
    assert sync(store.exists("r"))  # the write landed although the caller saw an error


@pytest.mark.parametrize("bad", [dict(op="put"), dict(op="get", kind="drop"), dict(op="set", kind="short"),
                                 dict(op="get", at=0), dict(op="get", count=0)])
def test_bad_plans_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="op|kind|at and count"):
        Fault(**bad)


# ------------------------------------------------------------------ append through Zarr (FaultyStore)

# The commit of a snapshot is one new document of the log (store format 2).
COMMIT = "*/log/commit/*"
PARAMS_META, BUFFERS_META = "trajectories/default/params/zarr.json", "trajectories/default/buffers/zarr.json"
# An append below the arrays' capacity writes 3 params chunks, 1 buffers chunk and the commit, in
# that order. (The arrays are no longer resized per append, so the ``*/params/zarr.json`` and
# ``*/buffers/zarr.json`` sites of format 1 are hit only by an append that grows the capacity:
# see test_capacity_growth_write_fault.)
APPEND_SITES = [("*/params/c/*", 1), ("*/params/c/*", 2), ("*/params/c/*", 3), ("*/buffers/c/*", 1), (COMMIT, 1)]


@pytest.mark.parametrize("kind", [*IO_ERRORS, "lost_reply"])
@pytest.mark.parametrize("key,at", APPEND_SITES)
@pytest.mark.parametrize("where", ["memory", "local"])
def test_append_write_fault_leaves_the_store_as_it_was(where: str, key: str, at: int, kind: str,
                                                       tmp_path: Path) -> None:
    inner, snaps, records = committed_store(where, tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", key, kind, at=at)])  # type: ignore[arg-type]
    before = contents(inner)  # after opening: the writer's generation marker is part of the store
    model = mlp(seed=5)
    if kind == "lost_reply" and key == COMMIT:
        # The commit landed although its write raised: the append reads it back and succeeds.
        assert traj.append(model, step=50) == T
        hit = [c.key for c in faulty.faults()]
        assert len(hit) == 1 and fnmatchcase(hit[0], COMMIT)  # the fault did hit the commit
        with TrajectoryStore.open(inner.with_read_only(True)) as check:
            assert len(check) == T + 1 and check.records[T]["step"] == 50  # committed once, with its record
            np.testing.assert_array_equal(check.snapshot(T), flat_params(model))  # with the right values
        return
    with pytest.raises(OSError) as info:
        traj.append(model, step=50)
    assert_clear(info.value)
    assert len(faulty.faults()) == 1  # the planned fault is what failed the append
    assert len(traj) == T  # the handle did not count it
    if kind == "enospc":
        assert info.value.errno == errno.ENOSPC and "nothing was committed" in str(info.value)  # says what happened
    assert_as_before(inner, before, snaps, records)
    if where == "local":
        assert not partial_files(tmp_path)  # no temporary files either
    assert_appends_again(traj, inner, snaps)  # faults of count 1 are spent: the retry works
    traj.close()


@pytest.mark.parametrize("kind", [*IO_ERRORS, "lost_reply"])
@pytest.mark.parametrize("key", [PARAMS_META, BUFFERS_META])
@pytest.mark.parametrize("where", ["memory", "local"])
def test_capacity_growth_write_fault(where: str, key: str, kind: str, tmp_path: Path) -> None:
    """The append of snapshot FULL first grows the arrays' capacity (params, then buffers metadata
    rewritten with a doubled row count): a fault there fails the append, and the store is as it
    was but for the capacity that grew (never shrunk back, by design). Regression: a growth write
    cut short (short_write) was left half-written, and the trajectory no longer opened; the
    document it was replacing is now put back."""
    inner, snaps, records = committed_store(where, tmp_path, FULL)
    faulty, traj = open_faulty(inner, [Fault("set", key, kind)])  # type: ignore[arg-type]
    before = contents(inner)
    with pytest.raises(OSError) as info:
        traj.append(mlp(seed=5), step=50)
    assert_clear(info.value)
    assert [c.key for c in faulty.faults()] == [key]  # the planned fault is what failed the append
    assert len(traj) == FULL  # the handle did not count it
    if kind == "enospc":
        assert info.value.errno == errno.ENOSPC and "nothing was committed" in str(info.value)  # says what happened
    grown = assert_only_capacity_grew(inner, before, snaps, records)
    # Grown: what was written before the fault (params before buffers); the faulted document itself is
    # put back as it was, a lost reply's write included (the write raised, so it is undone).
    assert grown == ({PARAMS_META} if key == BUFFERS_META else set())
    if where == "local":
        assert not partial_files(tmp_path)  # no temporary files either
    assert_appends_again(traj, inner, snaps)  # the retry grows what is left to grow, and commits
    traj.close()


@pytest.mark.parametrize("where", ["memory", "local"])
def test_partly_written_commit_does_not_count(where: str, tmp_path: Path) -> None:
    """A commit document cut short (a non-atomic backend interrupted mid-write) that cannot be
    removed either: it stays on the store, does not parse, and so commits nothing."""
    inner, snaps, records = committed_store(where, tmp_path)
    plan = [Fault("set", COMMIT, "short_write"), Fault("delete", COMMIT, "eio", count=None)]
    faulty, traj = open_faulty(inner, plan)
    before = contents(inner)
    with pytest.raises(OSError) as info:
        traj.append(mlp(seed=5), step=50)
    assert_clear(info.value)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert f"whether snapshot {T}" in notes and "is unknown" in notes  # it does not claim what it cannot know
    assert any(c.op == "delete" and c.fault for c in faulty.calls)  # the removal was tried and failed
    faulty.enabled = False
    after = contents(inner)
    assert all(after[k] == before[k] for k in before)  # nothing that was there changed
    left = sorted(set(after) - set(before))
    half = [k for k in left if fnmatchcase(k, COMMIT)]
    assert len(half) == 1 and all(f"/c/{T}/" in k for k in left if k not in half)  # the half commit and row T
    with pytest.raises(ValueError):
        json.loads(after[half[0]])  # the commit is indeed cut short
    assert_committed(inner, snaps, records)  # readers ignore it: nothing committed, the rest intact
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        assert any(half[0] in p for p in check.log.problems)  # and say which document they ignored
    with pytest.raises(WriterConflictError, match="can append no more"):
        traj.append(mlp(seed=5))  # this handle cannot tell what it committed: it appends no more
    traj.close()
    _, again = open_faulty(inner, [])  # a new writer (generation) ...
    assert_appends_again(again, inner, snaps)  # ... appends snapshot T over the leftover row
    again.close()


@pytest.mark.parametrize("kind", ["corrupt_write", "drop"])
@pytest.mark.parametrize("where", ["memory", "local"])
def test_silently_damaged_commit_does_not_count(where: str, kind: str, tmp_path: Path) -> None:
    inner, snaps, records = committed_store(where, tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", COMMIT, kind)])  # type: ignore[arg-type]
    assert traj.append(mlp(seed=5)) == T  # the backend said yes: nothing to notice at write time
    assert [c.key for c in faulty.faults()] and fnmatchcase(faulty.faults()[0].key, COMMIT)
    traj.close()
    # A commit that never landed, or does not parse (a flipped byte of its ASCII JSON is not UTF-8),
    # commits nothing: readers see the T snapshots, bit for bit, and never a snapshot T.
    assert_committed(inner, snaps, records)
    _, again = open_faulty(inner, [])
    assert_appends_again(again, inner, snaps)  # the next writer appends snapshot T
    again.close()


@pytest.mark.parametrize("kind", ["corrupt_write", "drop"])
@pytest.mark.parametrize("key", ["*/params/c/*", "*/buffers/c/*"])
@pytest.mark.parametrize("where", ["memory", "local"])
def test_silently_damaged_write_is_caught_on_read(where: str, key: str, kind: str, tmp_path: Path) -> None:
    inner, snaps, records = committed_store(where, tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", key, kind)])  # type: ignore[arg-type]
    assert traj.append(mlp(seed=5)) == T  # the backend said yes: nothing to notice at write time
    traj.close()
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        with pytest.raises(CorruptSnapshotError, match=f"snapshot {T}"):
            if "params" in key:
                check.snapshot(T)  # damaged parameters never read as numbers
            else:
                check.load_into(mlp(), T)  # nor damaged (or missing) buffers
        for k, values in enumerate(snaps):
            np.testing.assert_array_equal(check.snapshot(k), values)  # older snapshots untouched


# An append's writes: 3 params chunks, 1 buffers chunk, the commit; one that grows the arrays'
# capacity (the append of snapshot FULL) first rewrites params and buffers metadata (2 more).
DISK_FULL = ([(T, "*/c/*", k) for k in range(1, 5)] + [(T, "*", k) for k in range(1, 6)]
             + [(FULL, "*/c/*", k) for k in range(1, 5)] + [(FULL, "*", k) for k in range(1, 8)])


@pytest.mark.parametrize("t,pattern,at", DISK_FULL)
@pytest.mark.parametrize("where", ["memory", "local"])
def test_disk_full_from_the_kth_write_on(where: str, t: int, pattern: str, at: int, tmp_path: Path) -> None:
    """Every write from the at-th on fails with ENOSPC. Below the capacity the store ends byte for
    byte as it was (the commit is the last write: a failed one stores nothing). An append that
    grows the capacity may leave the arrays' metadata saying more rows (only with ``*`` from the
    first two writes on can the growth itself fail); never anything else."""
    inner, snaps, records = committed_store(where, tmp_path, t)
    faulty, traj = open_faulty(inner, [Fault("set", pattern, "enospc", at=at, count=None)])
    before = contents(inner)  # after opening: the writer's generation marker is part of the store
    with pytest.raises(OSError) as info:
        traj.append(mlp(seed=5))
    assert info.value.errno == errno.ENOSPC and "nothing was committed" in str(info.value)  # a clear disk-full error
    faulty.enabled = False
    if t < FULL:
        assert_as_before(inner, before, snaps, records)
    else:
        grown = assert_only_capacity_grew(inner, before, snaps, records)
        # What grew is exactly what the disk had room for: params first, then buffers.
        assert grown == ({PARAMS_META, BUFFERS_META} if pattern == "*/c/*" or at > 2 else
                         {PARAMS_META} if at == 2 else set())
    if where == "local":
        assert not partial_files(tmp_path)  # no temporary files either
    assert_appends_again(traj, inner, snaps)  # with space again, the next append works
    traj.close()


@pytest.mark.parametrize("where", ["memory", "local"])
def test_a_failing_clean_up_does_not_mask_the_error(where: str, tmp_path: Path) -> None:
    inner, snaps, records = committed_store(where, tmp_path)
    plan = [Fault("set", "*/params/c/*", "enospc", at=2), Fault("delete", "*", "eio", count=None)]
    faulty, traj = open_faulty(inner, plan)
    with pytest.raises(OSError) as info:
        traj.append(mlp(seed=5))
    assert info.value.errno == errno.ENOSPC  # the write's error, not the clean-up's
    assert "could not all be removed" in str(info.value)  # and it does not claim the store is unchanged
    assert any(c.op == "delete" and c.fault for c in faulty.calls)  # the clean-up was tried and failed
    faulty.enabled = False
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        assert len(check) == T and check.records == records  # still nothing committed
    assert_appends_again(traj, inner, snaps)  # the next append overwrites the leftover row
    traj.close()


@pytest.mark.parametrize("at", [1, 2])
def test_lease_read_fault_during_append(at: int, tmp_path: Path) -> None:
    inner, snaps, records = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, [Fault("get", "*/writer.json", "eio", at=at)])
    before = contents(inner)  # after opening: the writer's generation marker is part of the store
    with pytest.raises(OSError, match="writer.json"):
        traj.append(mlp(seed=5))  # the lease could not be checked: no commit
    assert_as_before(inner, before, snaps, records)
    assert_appends_again(traj, inner, snaps)
    traj.close()


# ------------------------------------------------------------------ the Gram and basis passes

_REFERENCE: dict[str, trajstore.Basis] = {}


def reference_basis(tmp_path: Path) -> trajstore.Basis:
    """The basis of the committed snapshots computed without faults."""
    if "memory" not in _REFERENCE:
        inner, _, _ = committed_store("memory", tmp_path)
        with TrajectoryStore.open(inner, "r") as traj:
            _REFERENCE["memory"] = trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
    return _REFERENCE["memory"]


def assert_basis_equal(basis: trajstore.Basis, ref: trajstore.Basis) -> None:
    np.testing.assert_array_equal(basis.to_numpy(), ref.to_numpy())  # U bit for bit
    np.testing.assert_array_equal(basis.mean, ref.mean)  # the mean too
    np.testing.assert_array_equal(basis.singular_values, ref.singular_values)  # and sigma
    np.testing.assert_array_equal(basis.centred_gram, ref.centred_gram)


def assert_no_wrong_basis(inner: Store, ref: trajstore.Basis) -> None:
    """No basis is visible as complete unless it is the right one."""
    try:
        basis = open_basis(inner, ref.name)  # type: ignore[arg-type]
    except TrajstoreError:
        return  # absent or refused as incomplete or damaged
    try:
        assert_basis_equal(basis, ref)
    except CorruptSnapshotError:
        pass  # complete but damaged: its reads raise, they never return numbers


def run_dldr_with(plan: list[Fault], tmp_path: Path, *, succeeds: bool = False) -> None:
    ref = reference_basis(tmp_path)
    inner, snaps, records = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, plan, mode="r")
    try:
        basis = trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
    except Exception as e:
        assert not succeeds, repr(e)
        assert_clear(e)
        assert faulty.faults(), "failed without an injected fault"  # the planned fault is what failed it
        faulty.enabled = False
        assert_no_wrong_basis(inner, ref)
        faulty.enabled = True
        basis = trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)  # the retry: faults of count 1 are spent
    faulty.enabled = False
    assert_basis_equal(open_basis(inner, ref.name), ref)  # type: ignore[arg-type]  # the stored basis is right
    assert_basis_equal(basis, ref)  # and so is the one returned
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        assert check.records == records  # the passes never touch the snapshots
        for k, values in enumerate(snaps):
            np.testing.assert_array_equal(check.snapshot(k), values)


_CLEAN_WRITES: list[str] = []


def clean_writes(tmp_path: Path) -> list[str]:
    """The keys a fault-free dldr writes, in order (32 writes)."""
    if not _CLEAN_WRITES:
        inner, _, _ = committed_store("memory", tmp_path)
        faulty, traj = open_faulty(inner, [], mode="r")
        trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
        _CLEAN_WRITES.extend(c.key for c in faulty.calls if c.op == "set")
    return _CLEAN_WRITES


# A clean run makes 32 writes (the basis in a version folder of its own: one group document more
# than before versions) and reads 24 snapshot chunks (12 per pass); every write is hit.
@pytest.mark.parametrize("at", range(1, 33))
def test_dldr_partial_write(at: int, tmp_path: Path) -> None:
    # every write of a clean run is hit by one case (a change to the passes' writes must show here)
    assert len(clean_writes(tmp_path)) == 32
    run_dldr_with([Fault("set", "*", "short_write", at=at)], tmp_path)


@pytest.mark.parametrize("at", range(2, 33, 3))
def test_dldr_lost_reply(at: int, tmp_path: Path) -> None:
    run_dldr_with([Fault("set", "*", "lost_reply", at=at)], tmp_path)


@pytest.mark.parametrize("at", range(1, 33, 3))
def test_dldr_disk_full_from_the_kth_write_on(at: int, tmp_path: Path) -> None:
    plan = [Fault("set", "*", "enospc", at=at, count=None)]
    ref = reference_basis(tmp_path)
    inner, _, _ = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, plan, mode="r")
    with pytest.raises(OSError) as info:
        trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
    assert info.value.errno == errno.ENOSPC  # the disk-full error itself, not a later symptom
    faulty.enabled = False
    assert_no_wrong_basis(inner, ref)
    assert_basis_equal(trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES), ref)  # with space again: right


@pytest.mark.parametrize("kind,at", [("corrupt", k) for k in range(1, 25, 2)] + [("short", k) for k in range(1, 25, 4)]
                         + [("eio", k) for k in range(3, 25, 5)] + [("transient", k) for k in range(1, 25, 6)])
def test_dldr_read_fault(kind: str, at: int, tmp_path: Path) -> None:
    run_dldr_with([Fault("get", "*/params/c/*", kind, at=at)], tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["corrupt_write", "drop"])
@pytest.mark.parametrize("key", ["bases/*/U/c/*", "bases/*/mean/c/*"])
def test_dldr_silently_damaged_basis_write(kind: str, key: str, tmp_path: Path) -> None:
    ref = reference_basis(tmp_path)
    inner, _, _ = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", key, kind)], mode="r")  # type: ignore[arg-type]
    basis = trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)  # the backend said yes: nothing to notice
    assert faulty.faults()  # the write was damaged
    for opened in (basis, open_basis(inner, ref.name)):  # type: ignore[arg-type]
        with pytest.raises(CorruptSnapshotError):
            assert_basis_equal(opened, ref)  # damaged rows raise when read, never read as numbers


@pytest.mark.parametrize("kind", ["corrupt_write", "drop"])
def test_dldr_silently_damaged_gram_cache_is_recomputed(kind: str, tmp_path: Path) -> None:
    ref = reference_basis(tmp_path)
    inner, _, _ = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", "*/gram/g*/c/*", kind)], mode="r")  # type: ignore[arg-type]
    assert_basis_equal(trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES), ref)  # computed in memory: right
    assert faulty.faults()  # and the cache write was damaged
    faulty.enabled = False
    with TrajectoryStore.open(committed_store("memory", tmp_path)[0], "r") as clean:
        expected = trajstore.gram_matrix(clean, block_bytes=BLOCK_BYTES, cache=False)
    # The damaged cache is not trusted: the Gram matrix is recomputed, bit for bit.
    np.testing.assert_array_equal(trajstore.gram_matrix(traj, block_bytes=BLOCK_BYTES), expected)
    assert_basis_equal(trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES, overwrite=True), ref)  # and so is the basis


# ------------------------------------------------------------------ reading

_STATES: list[dict[str, torch.Tensor]] = []


def states() -> list[dict[str, torch.Tensor]]:
    """The state_dict (parameters and buffers) of each committed snapshot's model."""
    if not _STATES:
        _STATES.extend({k: v.clone() for k, v in m.state_dict().items()} for m in models(T))
    return _STATES


def assert_loaded(model: nn.Module, k: int) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, states()[k][name]), name  # parameters and buffers bit for bit


@pytest.mark.parametrize("kind", ["eio", "short", "corrupt", "transient"])
@pytest.mark.parametrize("at", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("where", ["memory", "local"])
def test_read_fault_through_zarr(where: str, at: int, kind: str, tmp_path: Path) -> None:
    """Reads of all snapshots (12 chunks); ``at`` picks the chunk read that fails."""
    inner, snaps, _ = committed_store(where, tmp_path)
    faulty, traj = open_faulty(inner, [Fault("get", "*/params/c/*", kind, at=at)], mode="r")  # type: ignore[arg-type]
    expected = np.stack(snaps)
    with pytest.raises(CorruptSnapshotError if kind in ("short", "corrupt") else OSError) as info:
        traj.read_rows(slice(None), slice(None))  # never a wrong number
    assert_clear(info.value)
    np.testing.assert_array_equal(traj.read_rows(slice(None), slice(None)), expected)  # the retry reads it right
    np.testing.assert_array_equal(traj.snapshot(-1), snaps[-1])


# (The buffers chunk is read by key, one get: no exists call is made any more, so the former
# ("exists", "eio") case hit nothing and is gone.)
@pytest.mark.parametrize("op,kind", [("get", "eio"), ("get", "short"), ("get", "corrupt"), ("get", "transient")])
@pytest.mark.parametrize("where", ["memory", "local"])
def test_load_into_buffer_fault(where: str, op: str, kind: str, tmp_path: Path) -> None:
    inner, _, _ = committed_store(where, tmp_path)
    faulty, traj = open_faulty(inner, [Fault(op, "*/buffers/c/*", kind)], mode="r")  # type: ignore[arg-type]
    with pytest.raises(OSError) as info:
        traj.load_into(mlp(seed=9), 2)  # the buffers of snapshot 2 cannot be read right
    assert_clear(info.value)
    assert_loaded(traj.load_into(mlp(seed=9), 2), 2)  # the retry loads every tensor right


@pytest.mark.parametrize("kind", ["eio", "short", "corrupt", "transient"])
@pytest.mark.parametrize("at", range(1, 9))
def test_open_with_metadata_read_fault(at: int, kind: str, tmp_path: Path) -> None:
    inner, snaps, records = committed_store("memory", tmp_path)
    faulty = FaultyStore(inner, [Fault("get", "*zarr.json", kind, at=at)])  # type: ignore[arg-type]
    try:
        traj = TrajectoryStore.open(faulty.with_read_only(True))
    except Exception as e:
        assert_clear_or_named(e)
        assert faulty.faults()  # failed because of the fault
        traj = TrajectoryStore.open(faulty.with_read_only(True))  # and opens on the retry
    assert len(traj) == T and traj.records == records  # whatever the fault hit, what opens is right
    np.testing.assert_array_equal(traj.snapshot(T - 1), snaps[-1])


def assert_clear_or_named(error: BaseException) -> None:
    """Opening: a TrajstoreError (or an OSError naming the key) rather than Zarr's own exceptions."""
    assert isinstance(error, (TrajstoreError, OSError)), repr(error)
    if not isinstance(error, TrajstoreError):
        assert "zarr.json" in str(error), error  # the injected error names its key


def inject_local_io(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, kind: str, at: int) -> list[int]:
    """Make the at-th call of ``module.name`` (a read or write helper taking (fd, view, ...)) fail."""
    real: Callable[..., bool] = getattr(module, name)
    lock, count = threading.Lock(), [0]

    def faulty(fd: int, view: memoryview, *args: Any) -> bool:
        with lock:
            count[0] += 1
            hit = count[0] == at
        if not hit:
            return real(fd, view, *args)
        if kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if kind == "short":
            real(fd, view[:len(view) // 2], *args)
            return False  # the file ended early
        done = real(fd, view, *args)
        view[len(view) // 2] ^= 0xFF  # a bit flip between the disk and us
        return done

    monkeypatch.setattr(module, name, faulty)
    return count


@pytest.mark.parametrize("kind", ["eio", "short", "corrupt"])
@pytest.mark.parametrize("at", [1, 2, 5, 6])
def test_local_direct_read_fault(at: int, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local chunk-file reader (two reads per chunk: values, checksum; 3 chunks per snapshot)."""
    inner, snaps, _ = committed_store("local", tmp_path)
    traj = TrajectoryStore.open(inner.with_read_only(True))
    assert traj._fast is not None  # the direct reader is the one under test
    count = inject_local_io(monkeypatch, _localread, "_read_exact", kind, at)
    with pytest.raises(CorruptSnapshotError, match="snapshot 1 .*chunk"):
        traj.snapshot(1)  # names the snapshot and chunk, never returns wrong numbers
    assert count[0] >= at  # the fault was reached
    np.testing.assert_array_equal(traj.snapshot(1), snaps[1])  # the retry reads it right


@pytest.mark.parametrize("kind", ["eio", "short", "corrupt"])
@pytest.mark.parametrize("at", [1, 4, 9, 13, 20, 26])
def test_local_direct_pass_read_fault(at: int, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streaming reader under the Gram and basis passes (a piece, then a trailer per chunk file)."""
    ref = reference_basis(tmp_path)
    inner, _, _ = committed_store("local", tmp_path)
    traj = TrajectoryStore.open(inner.with_read_only(True))
    count = inject_local_io(monkeypatch, _localread, "_pread_exact", kind, at)
    with pytest.raises(CorruptSnapshotError, match="snapshot .*chunk"):
        trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
    assert count[0] >= at  # the fault was reached
    assert_no_wrong_basis(inner, ref)
    assert_basis_equal(trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES), ref)  # the retry is right, bit for bit


# ------------------------------------------------------------------ the local direct writers

def fail_fsync_of_partial_files(monkeypatch: pytest.MonkeyPatch, at: int) -> list[str]:
    """The at-th fsync of a chunk file's temporary (write_chunk_file, durable) fails: ENOSPC, as a
    delayed allocation on a full disk reports it. Returns the paths hit."""
    real, lock, seen, hit = os.fsync, threading.Lock(), [0], []

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".partial"):
            with lock:
                seen[0] += 1
                if seen[0] == at:
                    hit.append(path)
                    raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return hit


@pytest.mark.parametrize("via", ["fsync", "write_chunk_file"])
@pytest.mark.parametrize("at", [1, 2, 3])
def test_local_direct_append_disk_full(via: str, at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inner, snaps, records = committed_store("local", tmp_path)
    traj = TrajectoryStore.open(inner, "a")
    before = contents(inner)  # after opening: the writer's generation marker is part of the store
    if via == "fsync":
        hit = fail_fsync_of_partial_files(monkeypatch, at)
    else:
        real, calls, hit = _backend.write_chunk_file, [0], []

        def write_chunk_file(path: Path, *args: Any, **kw: Any) -> None:
            calls[0] += 1
            if calls[0] == at:
                hit.append(str(path))
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real(path, *args, **kw)

        monkeypatch.setattr(_backend, "write_chunk_file", write_chunk_file)
    with pytest.raises(OSError) as info:
        traj.append(mlp(seed=5))
    assert info.value.errno == errno.ENOSPC and "nothing was committed and the store is unchanged" in str(info.value)
    assert hit  # the planned chunk write failed (threads may write the chunks in any order)
    monkeypatch.undo()
    assert_as_before(inner, before, snaps, records)
    assert not partial_files(tmp_path)  # write_chunk_file removed its temporary file
    assert not (tmp_path / "s.zarr/trajectories/default/params/c" / str(T)).exists()  # nor a folder for the row
    assert_appends_again(traj, inner, snaps)
    traj.close()


@pytest.mark.parametrize("at", [1, 2, 3])
def test_local_direct_basis_write_disk_full(at: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = reference_basis(tmp_path)
    inner, _, _ = committed_store("local", tmp_path)
    traj = TrajectoryStore.open(inner.with_read_only(True))
    real, calls = _backend.write_chunk_file, []

    def write_chunk_file(path: Path, *args: Any, **kw: Any) -> None:
        calls.append(path)
        if len(calls) == at:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, *args, **kw)

    monkeypatch.setattr(_backend, "write_chunk_file", write_chunk_file)
    with pytest.raises(OSError, match="bases/") as info:
        trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES)
    assert info.value.errno == errno.ENOSPC  # the disk-full error, naming the basis file
    monkeypatch.undo()
    assert_no_wrong_basis(inner, ref)
    assert_basis_equal(trajstore.dldr(traj, d=D, block_bytes=BLOCK_BYTES), ref)  # with space again: right
    assert not partial_files(tmp_path)


# ------------------------------------------------------------------ the Recorder

@pytest.mark.parametrize("kind", [*IO_ERRORS, "lost_reply"])
@pytest.mark.parametrize("at", [1, 3, 4])
def test_recorder_background_write_fault(at: int, kind: str, tmp_path: Path) -> None:
    """The at-th params chunk of snapshot T fails: raised by the next call, nothing committed."""
    inner, snaps, records = committed_store("memory", tmp_path)
    faulty, traj = open_faulty(inner, [Fault("set", f"*/params/c/{T}/*", kind, at=at)])  # type: ignore[arg-type]
    before = contents(inner)  # after opening: the writer's generation marker is part of the store
    model = mlp(seed=5)
    recorder = Recorder(traj, model)
    recorder.snapshot(step=50)
    if at > 3:  # a control: snapshot T has 3 params chunks, so a fault planned for a 4th never fires
        recorder.close()
        assert not faulty.faults() and len(traj) == T + 1  # committed as usual
        return
    with pytest.raises(OSError) as info:
        recorder.snapshot(step=51)  # the background failure is raised by the next call
    assert_clear(info.value)
    assert len(recorder) == T  # the failed snapshot is not counted
    assert_as_before(inner, before, snaps, records)  # nothing of it committed or left behind
    recorder.snapshot(step=52)  # recording goes on
    recorder.close()
    with TrajectoryStore.open(inner.with_read_only(True)) as check:
        assert len(check) == T + 1 and check.records[T]["step"] == 52  # the next snapshot took index T
        np.testing.assert_array_equal(check.snapshot(T), flat_params(model))


# ------------------------------------------------------------------ create

@pytest.mark.parametrize("kind", ["eio", "enospc", "transient", "lost_reply"])
@pytest.mark.parametrize("at", range(1, 8))
def test_create_write_fault(at: int, kind: str) -> None:
    faulty = FaultyStore(MemoryStore(), [Fault("set", "*", kind, at=at)])  # type: ignore[arg-type]
    model = mlp()
    try:
        traj = TrajectoryStore.create(faulty, model, chunk_bytes=CHUNK_BYTES)
    except Exception as e:
        assert isinstance(e, OSError), repr(e)  # the store's error, naming the key
        assert "zarr.json" in str(e) or "writer.json" in str(e), e
        faulty.enabled = False
        try:
            half = TrajectoryStore.open(faulty.with_read_only(True))
        except TrajstoreError:
            half = None  # not there, or refused as never committed
        else:
            assert len(half) == 0 and half.layout == trajstore.Layout.from_model(model)  # or empty and right
        faulty.enabled = True
        try:
            traj = TrajectoryStore.create(faulty, model, chunk_bytes=CHUNK_BYTES)  # the retry creates it ...
        except StoreExistsError:
            assert half is not None  # ... unless its (empty, right) commit record was written before the fault
            try:
                traj = TrajectoryStore.open(faulty, "a")
            except WriterConflictError:
                # A lease document whose write "failed" but landed names this live process: a clear
                # refusal until its TTL lapses (the trajectory itself was checked above).
                assert kind == "lost_reply"
                return
    assert len(traj) == 0  # a new trajectory holds no snapshot
    traj.append(model)
    np.testing.assert_array_equal(traj.snapshot(0), flat_params(model))  # and records right
    traj.close()
