"""The README's main job (``trajstore run demo``), shrunk: a store, a basis and a result file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines import demo
from trajstore import TrajectoryStore, open_basis


def test_demo_records_trajectory_basis_and_provenance(tmp_path: Path) -> None:
    cfg = demo.DemoConfig(out=str(tmp_path / "run"), epochs=3, samples=512, hidden=32, dim=2)
    result = demo.main(cfg)
    store = TrajectoryStore.open(tmp_path / "run" / "trajectory.zarr")
    assert len(store) == cfg.epochs + 1  # snapshot 0 is the initialization
    assert store.records[0]["step"] == 0 and store.records[-1]["epoch"] == cfg.epochs
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"] == result["config"] and saved["config"]["seed"] == 0
    assert saved["provenance"]["versions"]["torch"] and "commit" in saved["provenance"]
    basis = open_basis(tmp_path / "run" / "trajectory.zarr", saved["basis"]["name"])
    np.testing.assert_allclose(basis.explained_variance_ratio, saved["basis"]["explained_variance_ratio"])
    assert 0 < sum(saved["basis"]["explained_variance_ratio"]) <= 1 + 1e-12
    assert (tmp_path / "run" / "basis.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_is_reproducible(tmp_path: Path) -> None:
    runs = [demo.main(demo.DemoConfig(out=str(tmp_path / f"r{k}"), epochs=2, samples=256, hidden=16, dim=1))
            for k in range(2)]
    a, b = (TrajectoryStore.open(tmp_path / f"r{k}" / "trajectory.zarr") for k in range(2))
    for i in range(len(a)):
        np.testing.assert_array_equal(a.snapshot(i), b.snapshot(i))  # same seed, same bytes
    assert runs[0]["basis"]["singular_values"] == runs[1]["basis"]["singular_values"]
