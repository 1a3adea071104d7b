"""The bench harness end to end on a small model: every stage measured in its own process beside
the plan. Memory and time are measured, not asserted (they depend on the machine); what is
asserted is the structure and the disk bytes, which the plan predicts to its metadata estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.bench import bench, format_table
from trajstore.cli import main


@pytest.mark.slow
def test_every_stage_is_measured_beside_the_plan(tmp_path: Path) -> None:
    result = bench("mlp", t=12, d=4, batch=16, stages=("sample", "gram", "basis", "train", "official"),
                   folder=tmp_path, steps=1)
    names = [r["stage"] for r in result["rows"]]
    assert names == ["sample", "gram", "basis", "train (resident)", "train (mmap)", "train (stream)", "official basis"]
    for row in result["rows"]:
        assert row["peak_anon_bytes"] >= row["baseline_anon_bytes"] > 0   # a peak, above where it started
        assert row["plan_host_peak_bytes"] > row["baseline_anon_bytes"]
        if "disk_bytes" in row:
            assert row["disk_ratio"] == pytest.approx(1.0, abs=0.02)     # metadata is the only estimate
        if row["stage"].startswith("train"):
            assert row["step_seconds"] > 0 and row["sgd_step_seconds"] > 0
    assert result["provenance"]["versions"]["torch"]
    assert "| train (mmap) |" in format_table(result)


def test_plan_command_prints_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "resnet20", "--snapshots", "51", "--dim", "40", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "n = 269,722 parameters, t = 51 snapshots (float32), d = 40" in out
    for stage in ("sample", "gram", "basis", "train (resident)", "train (mmap)", "train (stream)", "official basis"):
        assert f"\n{stage} " in out


def test_stages_out_of_order_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="include 'sample' first"):
        bench("mlp", t=12, d=4, batch=16, stages=("gram",), folder=tmp_path)
