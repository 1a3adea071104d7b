"""``trajstore bench --suite growth``: the fitted exponents, and a tiny end-to-end run whose rows
hold what the table claims (the window each basis was computed on, the floor's parts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.harness.growth import exponent, summarize


def test_exponent_recovers_a_power_law() -> None:
    ts = [51, 101, 201, 401, 801]
    assert exponent(ts, [3.0 * t ** 2 for t in ts]) == pytest.approx(2.0, abs=1e-9)
    assert exponent(ts, [7.0 * t for t in ts]) == pytest.approx(1.0, abs=1e-9)
    assert exponent(ts, [5.0 for _ in ts]) == pytest.approx(0.0, abs=1e-9)


def test_summary_reports_each_t_and_the_exponents() -> None:
    rows = [{"t": t, "trajstore": {"seconds": 2.0 * t, "peak_rss_GiB": 0.1},
             "floor": {"seconds": t, "runs": [{"read_s": t / 2, "gram_blas_s": t, "two_reads_plus_gemm_s": 2.0 * t,
                                                "u_write_s": 1.0, "read_cpu_s": 4.0, "with_read_cpu_s": t + 2.0}]},
             "vs_floor": 2.0, "vs_floor_with_u_write": 2.0 * t / (t + 1), "vs_floor_with_read_cpu": 2.0 * t / (t + 2)}
            for t in (51, 101)]
    table = summarize(rows, {"trajstore_seconds": 1.0, "floor_seconds": 1.0, "trajstore_peak_rss": 0.0})
    assert table.count("\n| ") == 2 and "trajstore 1.00" in table
    assert "| 101 | 202.0 | 101.0 | 50.5 | 101.0 | 2.00x | 4.0 | 103.0 | 1.96x | 1.0 | 1.98x | 202.0 |" in table


@pytest.mark.slow
def test_a_small_growth_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "growth.json"
    proc = subprocess.run([sys.executable, "-m", "trajstore", "bench", "--suite", "growth", "--size", "1M",
                           "--ts", "42,46", "--d", "40", "--data", str(tmp_path / "data"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["t"] for r in doc["rows"]] == [42, 46]
    for r in doc["rows"]:
        run = r["trajstore"]["runs"][0]
        assert run["window"] == [0, r["t"]] and run["orthonormality"] < 1e-4
        floor = r["floor"]["runs"][0]
        chunks = tmp_path / "data" / "1M-t46.zarr" / "trajectories" / "default" / "params" / "c"
        window = sum(f.stat().st_size for row in range(r["t"]) for f in (chunks / str(row)).iterdir())
        assert floor["read_bytes"] == window >= 4_000_000 * r["t"]  # the window's chunk files, no more
        assert r["floor"]["seconds"] == max(floor["read_s"], floor["gram_blas_s"])
        assert np.isclose(r["vs_floor"], r["trajstore"]["seconds"] / r["floor"]["seconds"])
        assert floor["with_u_write_s"] == floor["seconds"] + floor["u_write_s"] and floor["u_write_s"] > 0
        assert floor["read_cpu_s"] > 0 and floor["cores"] >= 1
        assert floor["with_read_cpu_s"] == max(floor["read_s"], floor["gram_blas_s"] + floor["read_cpu_s"] / floor["cores"])
        assert np.isclose(r["vs_floor_with_read_cpu"], r["trajstore"]["seconds"] / floor["with_read_cpu_s"])
    assert set(doc["exponents"]) == {"trajstore_seconds", "floor_seconds", "trajstore_peak_rss"}
    assert "provenance" in doc
