"""The whole experiment on CIFAR-10 with ResNet-20, shrunk: a tiny CIFAR-format folder written
here, the real loaders and the real model, every stage, and a run killed twice that, resumed,
equals an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar10
from pipelines import cifar, experiment_config
from pipelines.experiment import STORE, ExperimentConfig, load_config, run
from pipelines.models import build_model
from trajstore import TrajectoryStore, open_basis

ROOT = Path(__file__).resolve().parents[1]


def tiny(root: Path, out: Path) -> ExperimentConfig:
    # 100 training images in batches of 16: 7 steps per epoch, a snapshot every 2 steps.
    return cifar.config_for("cifar10-resnet20").with_overrides(
        data_root=str(root), out=str(out), epochs=3, milestones=(2,), sample_epochs=2, snapshot_every=2,
        batch_size=16, dim=4, subspace_epochs=2, subspace_batch_size=50, projection_snapshots=3, num_workers=0,
        eval_batch_size=64, device="cpu", threads=1, psgd_lr=0.05)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train=100, n_test=40)
    return root


@pytest.fixture(scope="module")
def finished(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict]:
    cfg = tiny(cifar_root, tmp_path_factory.mktemp("run") / "straight")
    return cfg, run(cfg)


def test_every_stage_leaves_its_record(finished: tuple[ExperimentConfig, dict]) -> None:
    cfg, result = finished
    folder = cfg.folder / "seed-0"
    store = TrajectoryStore.open(folder / STORE)
    # 2 sampling epochs x 7 steps, a snapshot every 2 steps, plus the initialization
    assert len(store) == 1 + (2 * 7) // 2
    assert store.records[0]["step"] == 0 and store.records[-1]["step"] == 14
    assert store.attrs["experiment"] == json.loads(json.dumps(cfg.to_json()))  # the config travels with the store
    assert load_config(store.attrs["experiment"]).to_json() | {"class": "Config"} == cfg.to_json()  # and reads back
    summary = result["summary"]
    assert set(summary) == {"sgd", "pbfgs", "pbfgs+", "psgd"}
    for method, row in summary.items():
        assert 0 <= row["test_acc_mean"] <= 100 and row["test_acc_std"] == 0.0  # one seed
        assert row["epochs"] == (cfg.epochs if method == "sgd" else cfg.subspace_epochs)
    sgd = result["seeds"][0]["sgd"]
    assert [h["epoch"] for h in sgd["history"]] == [1, 2, 3]
    assert sgd["history"][-1]["lr"] == pytest.approx(0.01)  # step decay at epoch 2
    assert sgd["sampling"]["overhead_seconds"] >= 0 and sgd["snapshots"] == len(store)
    basis = open_basis(folder / STORE, result["seeds"][0]["basis"]["name"])
    assert (basis.start, basis.stop, basis.d) == (0, len(store), 4)
    assert result["seeds"][0]["subspace"]["pbfgs"]["line_search"]["steps"] == 2 * 2  # 2 batches x 2 epochs
    for method in ("pbfgs", "pbfgs+", "psgd"):
        rows = result["seeds"][0]["subspace"][method]["history"]
        assert [set(r) for r in rows] == [{"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}] * 2
        assert 0 <= rows[0]["seconds"] <= rows[1]["seconds"]  # cumulative training time
        assert all(0 <= r["train_acc"] <= 100 for r in rows)
    assert len(result["seeds"][0]["projection"]["snapshots"]) == 3
    saved = json.loads((cfg.folder / "results.json").read_text())
    assert saved["summary"] == summary and saved["provenance"]["versions"]["torch"]
    for name in saved["figures"]:
        assert (cfg.folder / name).read_bytes()[:4] == b"\x89PNG"


def test_pbfgs_starts_at_snapshot_zero_and_moves_only_in_the_subspace(finished: tuple[ExperimentConfig, dict]) -> None:
    cfg, result = finished
    folder = cfg.folder / "seed-0"
    store = TrajectoryStore.open(folder / STORE)
    basis = open_basis(folder / STORE, result["seeds"][0]["basis"]["name"])
    model = build_model("resnet20", 10)
    model.load_state_dict(torch.load(folder / "pbfgs.pt", weights_only=True))
    moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy() - store.snapshot(0)
    u = basis.to_numpy().astype(np.float64)
    outside = moved - u @ (u.T @ moved)
    assert np.linalg.norm(moved) > 1e-3  # it trained
    # P-BFGS steps are U z: what is left outside span(U) is float32 rounding of the updates
    assert np.linalg.norm(outside) < 1e-4 * np.linalg.norm(moved)
    # P+-BFGS also moves the residual: its displacement is not in the subspace
    model.load_state_dict(torch.load(folder / "pbfgs+.pt", weights_only=True))
    plus = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy() - store.snapshot(0)
    assert np.linalg.norm(plus - u @ (u.T @ plus)) > 1e-3 * np.linalg.norm(plus)


def _digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every snapshot and trained model of a run folder."""
    out = {}
    store = TrajectoryStore.open(folder / "seed-0" / STORE)
    for i in range(len(store)):
        out[f"snapshot {i}"] = hashlib.sha256(store.snapshot(i).tobytes()).hexdigest()
    for method in ("pbfgs", "pbfgs+", "psgd"):
        state = torch.load(folder / "seed-0" / f"{method}.pt", weights_only=True)
        out[method] = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    return out


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_run_resumed_equals_an_uninterrupted_one(finished: tuple[ExperimentConfig, dict],
                                                          cifar_root: Path, tmp_path: Path) -> None:
    cfg, straight = finished
    resumed_cfg = cfg.with_overrides(out=str(tmp_path / "resumed"))
    code = ("import sys; from pipelines.experiment import run, load_config, ExperimentConfig; import json; "
            "run(load_config(json.loads(sys.argv[1])))")
    seed_dir = resumed_cfg.folder / "seed-0"
    # Killed mid-sampling (after the first epoch's checkpoint), then mid-P-BFGS.
    for marker in (seed_dir / "sgd.ckpt.pt", seed_dir / "pbfgs.ckpt.pt"):
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(resumed_cfg.to_json())], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, marker)
    assert not (seed_dir / "pbfgs.json").exists()  # the kill landed before P-BFGS finished
    resumed = run(resumed_cfg)
    assert _digest(resumed_cfg.folder) == _digest(cfg.folder)  # bit for bit on the CPU
    for key in ("sgd", "pbfgs", "pbfgs+", "psgd"):
        assert resumed["summary"][key]["test_acc"] == straight["summary"][key]["test_acc"]
    def untimed(history: list[dict]) -> list[dict]:  # per-epoch wall times differ, of course
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert untimed(resumed["seeds"][0]["sgd"]["history"]) == untimed(straight["seeds"][0]["sgd"]["history"])
    assert untimed(resumed["seeds"][0]["subspace"]["pbfgs"]["history"]) == \
        untimed(straight["seeds"][0]["subspace"]["pbfgs"]["history"])


def test_a_folder_of_another_config_is_refused(finished: tuple[ExperimentConfig, dict]) -> None:
    cfg, _ = finished
    from pipelines.validate import ConfigError

    with pytest.raises(ConfigError, match=rf"holds work of another config \(dim={cfg.dim} there, 3 now"):
        run(cfg.with_overrides(dim=3))


def test_config_overrides_are_parsed_and_checked() -> None:
    cfg = experiment_config("mnist1d").with_overrides(epochs="12", milestones="6,9", augment="false", data_root="none")
    assert (cfg.epochs, cfg.milestones, cfg.augment, cfg.data_root) == (12, (6, 9), False, None)
    with pytest.raises(ValueError, match="no field 'epoch'"):
        cfg.with_overrides(epoch="3")
    with pytest.raises(ValueError, match="unknown methods"):
        cfg.with_overrides(methods="pbfgs,lbfgs")
    with pytest.raises(ValueError, match="sample_epochs"):
        cfg.with_overrides(sample_epochs="50")
