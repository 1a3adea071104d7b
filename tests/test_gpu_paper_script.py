"""``benchmarks/gpu_paper.py``, the prepared GPU script of the paper's two largest models, at toy
size on the CPU: it runs end to end, and its rows hold what its table prints (so that the one
run on a lent GPU, minutes long, does not fail on a typo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_script_runs_at_toy_size_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_paper.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_paper.py", "--models", "resnet20", "--device", "cpu",
                           "--steps", "8", "--every", "2", "--dim", "3", "--batch", "8", "--pbfgs-steps", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert (row["model"], row["snapshots"], row["d"]) == ("resnet20", 5, 3)
    assert row["floor_ms"] == pytest.approx(row["sgd_step_ms"] + row["forward_ms"])
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        cell = row[dtype]
        assert cell["basis_bytes"] == row["n"] * 3 * itemsize
        assert len(cell["trials"]) == 3 and cell["step_ms"] > 0
        assert cell["vs_sgd"] == pytest.approx(cell["step_ms"] / row["sgd_step_ms"])
    assert "| resnet20 |" in proc.stdout and "bfloat16" in proc.stdout
    assert doc["device"] == "cpu" and "provenance" in doc
