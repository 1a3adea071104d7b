"""The Recorder: background writes that equal synchronous appends, at most one pending, errors
raised where the training loop sees them, and a reopened trajectory that goes on."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cnn, flat_params, train_steps
from trajstore import LayoutMismatchError, NonFiniteError, Recorder, StoreExistsError, TrajectoryNotFoundError, TrajectoryStore
from trajstore.errors import InvalidStoreError


def test_background_snapshots_equal_synchronous_appends(tmp_path: Path) -> None:
    model, reference = cnn(0), []
    with Recorder(tmp_path / "bg.zarr", model) as rec, TrajectoryStore.create(tmp_path / "sync.zarr", model) as sync:
        sync.append(model, step=0, epoch=0)
        reference.append(flat_params(model))
        for step in range(1, 6):
            train_steps(model, (4, 1, 6, 6), steps=1, seed=step)  # also moves BatchNorm statistics
            assert rec.snapshot(step=step, epoch=step / 2, metrics={"loss": 1.0 / step}) == step
            sync.append(model, step=step, epoch=step / 2, metrics={"loss": 1.0 / step})
            reference.append(flat_params(model))
        assert len(rec) == 6
    bg, sy = TrajectoryStore.open(tmp_path / "bg.zarr"), TrajectoryStore.open(tmp_path / "sync.zarr")
    assert len(bg) == 6
    for i in range(6):
        np.testing.assert_array_equal(bg.snapshot(i), reference[i])  # the state when snapshot() was called
        np.testing.assert_array_equal(bg.snapshot(i), sy.snapshot(i))
        assert {k: bg.records[i][k] for k in ("step", "epoch", "metrics")} == \
               {k: sy.records[i][k] for k in ("step", "epoch", "metrics")}
    a, b = cnn(1), cnn(2)
    bg.load_into(a, 5)
    sy.load_into(b, 5)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)  # buffers too


def test_at_most_one_snapshot_is_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = cnn(0)
    rec = Recorder(tmp_path / "t.zarr", model, initial=False)
    started, release = threading.Semaphore(0), threading.Event()
    in_flight, most = [0], [0]
    original = rec.store.append_tensors

    def slow_append(*args, **kwargs):  # type: ignore[no-untyped-def]
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        started.release()
        assert release.wait(30)
        try:
            return original(*args, **kwargs)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(rec.store, "append_tensors", slow_append)
    rec.snapshot(step=1)                  # returns while its write is blocked
    assert started.acquire(timeout=30)    # the write is in progress in the writer thread
    second_done = threading.Event()
    waiter = threading.Thread(target=lambda: (rec.snapshot(step=2), second_done.set()))
    waiter.start()
    assert not second_done.wait(0.3)      # the next snapshot waits for the pending write
    release.set()
    waiter.join(30)
    assert second_done.is_set()
    rec.close()
    assert most[0] == 1                   # never two writes at once
    assert [r["step"] for r in TrajectoryStore.open(tmp_path / "t.zarr").records] == [1, 2]
    assert rec.stats["wait"] > 0 and rec.stats["snapshots"] == 2


def test_a_failed_write_is_raised_by_the_next_call_and_not_committed(tmp_path: Path) -> None:
    model = cnn(0)
    rec = Recorder(tmp_path / "t.zarr", model)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    rec.snapshot(step=1)  # the writer finds the NaN
    with pytest.raises(NonFiniteError, match="non-finite"):
        rec.snapshot(step=2)
    assert len(rec) == 1
    with torch.no_grad():
        next(model.parameters())[0].fill_(0.5)
    assert rec.snapshot(step=3) == 1  # the failed one took no index
    rec.close()
    assert [r["step"] for r in TrajectoryStore.open(tmp_path / "t.zarr").records] == [0, 3]


def test_resume_goes_on_and_a_new_recorder_does_not_overwrite(tmp_path: Path) -> None:
    model = cnn(0)
    with Recorder(tmp_path / "t.zarr", model, background=False) as rec:
        rec.snapshot(step=1)
    with pytest.raises(StoreExistsError):
        Recorder(tmp_path / "t.zarr", model)
    with Recorder(tmp_path / "t.zarr", model, resume=True) as rec:
        assert len(rec) == 2  # snapshot 0 is not recorded again
        rec.snapshot(step=2)
    assert [r["step"] for r in TrajectoryStore.open(tmp_path / "t.zarr").records] == [0, 1, 2]
    with pytest.raises(LayoutMismatchError):
        Recorder(tmp_path / "t.zarr", torch.nn.Linear(3, 3), resume=True)


def _drop_commit(path: Path) -> None:
    """Make the trajectory look as a creation killed before its group document (written last)
    leaves it: arrays and lease files, no group document, no commit log yet."""
    (path / "trajectories" / "default" / "zarr.json").unlink()
    shutil.rmtree(path / "trajectories" / "default" / "log")


def test_resume_after_a_creation_killed_before_its_first_commit(tmp_path: Path) -> None:
    # Regression (issue #7, kill anywhere): a 'trajstore sample' killed inside
    # TrajectoryStore.create could never be resumed; every restart raised InvalidStoreError.
    model = cnn(0)
    TrajectoryStore.create(tmp_path / "t.zarr", model).close()
    _drop_commit(tmp_path / "t.zarr")
    with pytest.raises(TrajectoryNotFoundError, match="holds no trajectory"):
        TrajectoryStore.open(tmp_path / "t.zarr", trajectory="default")  # the half-created trajectory is not there
    with Recorder(tmp_path / "t.zarr", model, resume=True, background=False) as rec:
        assert len(rec) == 1  # created anew, with snapshot 0
        rec.snapshot(step=1)
    assert [r["step"] for r in TrajectoryStore.open(tmp_path / "t.zarr").records] == [0, 1]


def test_resume_does_not_replace_a_damaged_committed_trajectory(tmp_path: Path) -> None:
    model = cnn(0)
    with Recorder(tmp_path / "t.zarr", model, background=False) as rec:
        rec.snapshot(step=1)
    shutil.rmtree(tmp_path / "t.zarr" / "trajectories" / "default" / "params")
    with pytest.raises(InvalidStoreError, match="arrays are missing"):
        Recorder(tmp_path / "t.zarr", model, resume=True)  # raised as found, not created anew
    # the commit log still names both snapshots: nothing was overwritten
    log = tmp_path / "t.zarr" / "trajectories" / "default" / "log" / "commit"
    assert sorted(p.name[:10] for p in log.glob("*/*.json")) == ["0000000000", "0000000001"]


def test_rng_state_is_the_one_at_the_snapshot_call(tmp_path: Path) -> None:
    model = cnn(0)
    torch.manual_seed(7)
    expected = torch.get_rng_state()
    with Recorder(tmp_path / "t.zarr", model, initial=False) as rec:
        rec.snapshot(step=1, rng_state=True)
        torch.rand(1000)  # the training loop goes on drawing while the writer works
    assert torch.equal(TrajectoryStore.open(tmp_path / "t.zarr").rng_state(0), expected)


def test_append_tensors_checks_count_shape_and_dtype(tmp_path: Path) -> None:
    model = cnn(0)
    params, buffers = [p.detach() for p in model.parameters()], list(model.buffers())
    with TrajectoryStore.create(tmp_path / "t.zarr", model) as store:
        with pytest.raises(LayoutMismatchError, match="model lacks parameter '5.bias'"):
            store.append_tensors(params[:-1], buffers)
        with pytest.raises(LayoutMismatchError, match=r"extra parameter '#6' of shape \(2,\)"):
            store.append_tensors(params + [params[-1]], buffers)
        with pytest.raises(LayoutMismatchError, match=r"'0.weight' of shape \(3, 1, 3, 3\).*shape \(27,\)"):
            store.append_tensors([params[0].reshape(-1)] + params[1:], buffers)
        with pytest.raises(LayoutMismatchError, match="buffer '1.num_batches_tracked' has dtype float32"):
            store.append_tensors(params, buffers[:2] + [buffers[2].float()])
        assert len(store) == 0
        assert store.append_tensors(params, buffers, step=4) == 0
    np.testing.assert_array_equal(TrajectoryStore.open(tmp_path / "t.zarr").snapshot(0), flat_params(model))
