"""Kill anywhere, resume exactly (issue #7): ``trajstore sample``, ``trajstore train`` and
``trajstore run`` are each killed with SIGKILL at 28 seeded random moments and restarted with the
same command; the finished result equals an uninterrupted run bit for bit (on the CPU), and at
every kill point each result file that exists is complete.

Each job runs in a process forked from a ``forkserver`` that has imported torch, scikit-learn,
matplotlib and the pipelines once: a fresh interpreter spends ~6 s on imports alone (torch's
optimizer pulls in dynamo, the digits loader scikit-learn), which would leave the kill points
little but imports to land in. The child is still a process of its own, killed by a real SIGKILL.

The uninterrupted reference run is timed in two parts: its start-up (to its first output, a
progress bar) and its work (from there to the end). 21 moments t_1 < ... < t_21 are uniform
draws over the work; attempt i resumes what the earlier ones left and is killed t_i - t_{i-1}
after its own first output, so the kills walk through the job the way the moments spread over
the reference run. Before every third of them one more attempt is killed at a uniform moment of
its start-up. Then the same command runs to the end.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trajstore import TrajectoryStore, dldr, open_basis
from trajstore.errors import InvalidStoreError, NotAStoreError, TrajectoryNotFoundError

WALK = 21  # kills that walk through the job's work ...
KILLS = WALK + WALK // 3  # ... and those in a start-up
LANDED = 10  # the acceptance: at least 10 kill points per job land while the job runs
FINISH_S = 300.0  # a generous bound on a run to the end; never a timing assert

CTX = multiprocessing.get_context("forkserver")
CTX.set_forkserver_preload(["torch", "torch._dynamo", "sklearn.datasets", "matplotlib.pyplot", "trajstore.cli",
                            "pipelines.experiment", "pipelines.report", "pipelines.digits", "test_kill"])

# Fields that hold wall-clock time, memory peaks, the run folder or the command line: the only
# ones a resumed run may differ in.
CLOCK = {"time", "append_seconds", "seconds", "train_seconds", "train_seconds_mean", "wall_seconds", "sampling",
         "peak_rss_gib", "peak_gpu_gib", "provenance", "out", "time_to_sgd_accuracy"}
SAMPLE = ["--experiment", "digits", "--epochs", "40", "--sample-epochs", "20", "--snapshot-every", "2",
          "--device", "cpu", "--set", "threads=1"]
TRAIN = ["--optimizer", "pbfgs+", "--basis", "k6", "--epochs", "80", "--batch-size", "128", "--device", "cpu"]
RUN = ["--set", "epochs=16", "--set", "sample_epochs=6", "--set", "snapshot_every=2", "--set", "dim=6",
       "--set", "subspace_epochs=6", "--set", "projection_snapshots=6", "--set", "threads=1", "--set", "device=cpu"]
METHODS = ("pbfgs", "pbfgs+", "psgd")
PNG_END = b"IEND\xaeB`\x82"


def _cli(argv: list[str], log: str) -> None:
    """The child: ``trajstore ARGV``, its output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from tqdm import tqdm

    from trajstore.cli import main

    # tqdm's default lock is a named semaphore that a killed process leaves to the resource tracker
    tqdm.set_lock(threading.RLock())

    sys.exit(main(argv))


@dataclass(frozen=True)
class Timing:
    """An uninterrupted run's wall time, in two parts."""

    startup: float  # from the start to its first output: a progress bar, so the job's loop has begun
    work: float     # from then to the end


def _size(log: Path) -> int:
    return log.stat().st_size if log.exists() else 0


def _start(argv: list[str], log: Path) -> tuple[multiprocessing.process.BaseProcess, int]:
    size = _size(log)
    child = CTX.Process(target=_cli, args=(argv, str(log)))
    child.start()
    return child, size


def _wait_for_output(child: multiprocessing.process.BaseProcess, log: Path, size: int) -> None:
    deadline = time.monotonic() + FINISH_S
    while child.is_alive() and _size(log) == size and time.monotonic() < deadline:
        time.sleep(0.005)


def _attempt(argv: list[str], log: Path, kill_after: float | None, *, after_output: bool = False) -> bool:
    """Run ``trajstore ARGV``; SIGKILL it ``kill_after`` seconds after its start, or after its
    first output with ``after_output`` (None: let it finish). True when the kill landed while
    the job was still running."""
    child, size = _start(argv, log)
    if after_output:
        _wait_for_output(child, log, size)
    child.join(FINISH_S if kill_after is None else kill_after)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode in (0, -signal.SIGKILL), log.read_text()[-3000:]  # a restart never fails
    return child.exitcode == -signal.SIGKILL


def _reference(argv: list[str], log: Path) -> Timing:
    """Run ``trajstore ARGV`` uninterrupted and time it."""
    warm = CTX.Process(target=int)  # the forkserver starts (and imports) before the clock does
    warm.start()
    warm.join()
    started = time.monotonic()
    child, size = _start(argv, log)
    _wait_for_output(child, log, size)
    startup = time.monotonic() - started
    child.join(FINISH_S)
    assert child.exitcode == 0, log.read_text()[-3000:]
    return Timing(startup, time.monotonic() - started - startup)


def _kill_and_resume(argv: list[str], log: Path, timing: Timing, seed: int, check: Callable[[], None]) -> int:
    """Kill ``trajstore ARGV`` KILLS times at seeded moments, run ``check`` after each kill, then
    let it finish. Returns the number of kills that landed mid-job.

    WALK moments are uniform over the reference's work; each resumed attempt is killed the gap
    to the previous moment after its own first output, so the kills walk through the job. Before
    every third of them one more attempt is killed at a uniform moment of its start-up (data,
    opening or creating the store, reading back finished stages)."""
    rng = random.Random(seed)
    walk = sorted(rng.uniform(0.0, timing.work) for _ in range(WALK))
    landed, previous = 0, 0.0
    for i, moment in enumerate(walk):
        if i % 3 == 0:
            landed += _attempt(argv, log, rng.uniform(0.0, timing.startup))
            check()
        landed += _attempt(argv, log, moment - previous, after_output=True)
        previous = moment
        check()
    assert not _attempt(argv, log, None), "the last run did not finish"
    return landed


# ------------------------------------------------------------------------------- what is compared


def _content(doc: Any) -> Any:
    """A result document without its wall-clock, memory and path fields."""
    if isinstance(doc, dict):
        return {k: _content(v) for k, v in doc.items() if k not in CLOCK}
    if isinstance(doc, list):
        return [_content(v) for v in doc]
    return doc


def _json(path: Path) -> Any:
    return _content(json.loads(path.read_text()))


def _model_sha(path: Path) -> str:
    """SHA-256 of a saved state_dict: its names and the bytes of every tensor."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # nothing read back may execute code
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _trajectory(store_path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """SHA-256 of every committed snapshot (parameters, then buffers) and its record."""
    store = TrajectoryStore.open(store_path)
    shas = [hashlib.sha256(store.snapshot(i).tobytes() + store.buffer_bytes(i).tobytes()).hexdigest()
            for i in range(len(store))]
    return shas, [_content(r) for r in store.records]


def _basis_sha(store_path: Path, name: str) -> str:
    basis = open_basis(store_path, name)
    return hashlib.sha256(basis.to_numpy().tobytes() + basis.mean.tobytes()
                          + np.asarray(basis.singular_values).tobytes()).hexdigest()


def _check_store(store_path: Path, reference: tuple[list[str], list[dict[str, Any]]]) -> int:
    """A store left by a kill: either not yet a complete trajectory, or a prefix of the
    reference. Returns the number of committed snapshots."""
    if not (store_path / "zarr.json").exists():
        return 0
    try:
        shas, records = _trajectory(store_path)
    except (NotAStoreError, TrajectoryNotFoundError, InvalidStoreError):
        return 0  # killed while the store or its trajectory was being created: refused, not misread
    # every committed snapshot reads back and is the reference's, record and all
    assert shas == reference[0][:len(shas)] and records == reference[1][:len(records)]
    return len(shas)


def _check_json(path: Path, reference: Path) -> None:
    """A done-JSON left by a kill: absent, or complete and equal to the reference's."""
    if path.exists():
        assert _json(path) == _json(reference), f"{path.name} differs"  # never half a file


def _check_model(path: Path, reference: Path) -> None:
    if path.exists():
        assert _model_sha(path) == _model_sha(reference), f"{path.name} differs"  # never half a model


def _check_checkpoints(folder: Path) -> dict[str, int]:
    """Every checkpoint left by a kill reads back whole. Returns the epoch each has reached."""
    epochs = {}
    for ckpt in folder.glob("*.ckpt.pt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # a checkpoint reads back whole
        assert state["state"]["epoch"] >= 1  # written only after an epoch is finished
        epochs[ckpt.name.removesuffix(".ckpt.pt")] = state["state"]["epoch"]
    return epochs


def _summary(job: str, landed: int, timing: Timing, progress: list[Any]) -> str:
    return (f"\n{job}: {landed} of {KILLS} kills landed mid-job (reference: start-up {timing.startup:.1f} s, "
            f"work {timing.work:.1f} s); at each kill: {progress}")


# ------------------------------------------------------------------------------- the three jobs


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Timing]:
    """The uninterrupted ``trajstore sample`` run and its wall time."""
    out = tmp_path_factory.mktemp("sample") / "reference"
    return out, _reference(["sample", str(out), *SAMPLE], out.parent / "log")


@pytest.mark.slow
def test_sample_killed_anywhere_resumes_bit_for_bit(sampled: tuple[Path, Timing], tmp_path: Path) -> None:
    reference, timing = sampled
    ref_store = _trajectory(reference / "trajectory.zarr")
    out = tmp_path / "killed"
    progress: list[int] = []  # snapshots committed at each kill

    def check() -> None:
        progress.append(_check_store(out / "trajectory.zarr", ref_store))
        _check_json(out / "sgd.json", reference / "sgd.json")
        _check_model(out / "sgd.pt", reference / "sgd.pt")
        _check_checkpoints(out)

    landed = _kill_and_resume(["sample", str(out), *SAMPLE], tmp_path / "log", timing, seed=7, check=check)
    print(_summary("sample", landed, timing, progress))
    assert landed >= LANDED  # the acceptance: at least 10 kills inside the job
    assert len(ref_store[0]) == 1 + 20 * 12 // 2  # 12 steps per epoch, a snapshot every 2 in 20 epochs
    # every snapshot (parameters and buffers) and record, bit for bit
    assert _trajectory(out / "trajectory.zarr") == ref_store
    assert _json(out / "sgd.json") == _json(reference / "sgd.json")  # losses, accuracies, lr, count
    assert _model_sha(out / "sgd.pt") == _model_sha(reference / "sgd.pt")  # the final SGD model
    assert not list(out.glob("*.ckpt.pt"))  # a finished stage leaves no checkpoint behind


@pytest.mark.slow
def test_train_killed_anywhere_resumes_bit_for_bit(sampled: tuple[Path, Timing], tmp_path: Path) -> None:
    source, _ = sampled
    stores = []
    for name in ("reference", "killed"):
        (tmp_path / name).mkdir()
        shutil.copytree(source / "trajectory.zarr", tmp_path / name / "trajectory.zarr")
        dldr(tmp_path / name / "trajectory.zarr", 6, name="k6")
        stores.append(tmp_path / name / "trajectory.zarr")
    tag = "train-pbfgs+-k6-e80-b128"
    reference, out = stores[0].parent, stores[1].parent
    timing = _reference(["train", str(stores[0]), *TRAIN], tmp_path / "reference.log")

    progress: list[int] = []  # epochs checkpointed at each kill

    def check() -> None:
        _check_json(out / f"{tag}.json", reference / f"{tag}.json")
        _check_model(out / f"{tag}.pt", reference / f"{tag}.pt")
        progress.append(_check_checkpoints(out).get(tag, 0))

    landed = _kill_and_resume(["train", str(stores[1]), *TRAIN], tmp_path / "log", timing, seed=8, check=check)
    print(_summary("train", landed, timing, progress))
    assert landed >= LANDED  # the acceptance: at least 10 kills inside the job
    result = _json(out / f"{tag}.json")
    assert len(result["history"]) == 80 and result["line_search"]["steps"] == 80 * 12  # it trained to the end
    assert result == _json(reference / f"{tag}.json")  # per-epoch metrics and line-search counts
    assert _model_sha(out / f"{tag}.pt") == _model_sha(reference / f"{tag}.pt")  # the trained model, bit for bit
    assert not list(out.glob("*.ckpt.pt"))  # a finished run leaves no checkpoint behind


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Timing]:
    """The uninterrupted ``trajstore run digits`` and its wall time."""
    out = tmp_path_factory.mktemp("run") / "reference"
    return out, _reference(["run", "digits", "--out", str(out), *RUN], out.parent / "log")


@pytest.mark.slow
def test_run_killed_anywhere_resumes_bit_for_bit(ran: tuple[Path, Timing], tmp_path: Path) -> None:
    reference, timing = ran
    out = tmp_path / "killed"
    ref_seed, seed = reference / "seed-0", out / "seed-0"
    ref_store = _trajectory(ref_seed / "trajectory.zarr")
    basis = "window-d6"
    ref_basis = _basis_sha(ref_seed / "trajectory.zarr", basis)
    figures = json.loads((reference / "results.json").read_text())["figures"]
    stages: list[str] = []  # the stage each kill interrupted, first of those not done

    def check() -> None:
        _check_store(seed / "trajectory.zarr", ref_store)
        try:
            found = _basis_sha(seed / "trajectory.zarr", basis)
        except (NotAStoreError, TrajectoryNotFoundError, InvalidStoreError):
            found = None  # not there yet, or interrupted: refused rather than read as complete
        assert found in (None, ref_basis)  # a basis that opens is the whole basis
        done = {"sample": (seed / "sgd.json").exists(), "basis": found is not None,
                **{m: (seed / f"{m}.json").exists() for m in METHODS},
                "projection": (seed / "projection.json").exists(), "report": (out / "results.json").exists()}
        stages.append(next((stage for stage, finished in done.items() if not finished), "after the end"))
        for name in ("sgd", *METHODS, "projection"):
            _check_json(seed / f"{name}.json", ref_seed / f"{name}.json")
        for name in ("sgd", *METHODS):
            _check_model(seed / f"{name}.pt", ref_seed / f"{name}.pt")
        _check_checkpoints(seed)
        _check_json(out / "results.json", reference / "results.json")
        for name in figures:
            if (out / name).exists():
                assert (out / name).read_bytes().endswith(PNG_END), name  # a figure is whole or absent

    landed = _kill_and_resume(["run", "digits", "--out", str(out), *RUN], tmp_path / "log", timing, seed=9,
                              check=check)
    print(_summary("run", landed, timing, stages), dict(Counter(stages)))
    assert landed >= LANDED  # the acceptance: at least 10 kills inside the job
    assert _json(out / "results.json") == _json(reference / "results.json")  # every metric of the report
    assert _trajectory(seed / "trajectory.zarr") == ref_store  # every snapshot, bit for bit
    assert _basis_sha(seed / "trajectory.zarr", basis) == ref_basis  # the same basis
    for name in ("sgd", *METHODS):
        assert _model_sha(seed / f"{name}.pt") == _model_sha(ref_seed / f"{name}.pt")  # every trained model
    assert not list(seed.glob("*.ckpt.pt"))  # finished stages leave no checkpoint behind


@pytest.mark.slow
def test_report_files_appear_only_by_rename(ran: tuple[Path, Timing], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (issue #7): results.json and the figures were written in place, so a run killed
    # inside the report left a half-written results.json or PNG under its final name.
    from pipelines.digits import Config
    from pipelines.experiment import load_config
    from pipelines.report import write_report

    reference, _ = ran
    doc = json.loads((reference / "results.json").read_text())
    cfg = Config(**{**asdict(load_config(doc["config"])), "out": str(tmp_path / "report")})
    cfg.folder.mkdir()

    def killed(src: object, dst: object) -> None:
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_report(cfg, doc["seeds"], 0.0)
    assert not list(cfg.folder.iterdir())  # nothing under a final name, no temporary left behind
    monkeypatch.undo()
    write_report(cfg, doc["seeds"], 0.0)
    # the same report as the run's, written whole
    assert _json(cfg.folder / "results.json") == _json(reference / "results.json")
    assert sorted(p.name for p in cfg.folder.iterdir()) == sorted(["results.json", *doc["figures"]])


@pytest.mark.slow  # seconds of real processes: the full suite runs it, the everyday subset does not
def test_a_checkpoint_left_beside_a_finished_stage_is_removed(sampled: tuple[Path, Timing], tmp_path: Path) -> None:
    # Regression (issue #7): a kill between writing sgd.json and unlinking sgd.ckpt.pt left the
    # final checkpoint behind for good; a stage re-run after its .json was removed resumed from it.
    from pipelines.experiment import load_config, sample

    source, _ = sampled
    folder = tmp_path / "seed"
    shutil.copytree(source, folder)
    torch.save({"state": {"epoch": 40}}, folder / "sgd.ckpt.pt")
    cfg = load_config(TrajectoryStore.open(folder / "trajectory.zarr").attrs["experiment"])
    assert _content(sample(cfg, folder, 0)) == _json(source / "sgd.json")  # the finished stage, read back
    assert not (folder / "sgd.ckpt.pt").exists()  # and the stale checkpoint is gone
