"""``trajstore run ablation`` at a tiny size: its table, figure and record hold what they claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import ablation
from trajstore.cli import main


@pytest.mark.slow  # seconds of real processes: the full suite runs it, the everyday subset does not
def test_tiny_ablation_writes_table_figure_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ab"
    assert main(["run", "ablation", "--out", str(out), "--seeds", "1", "--set", "short=1", "--set", "long=2",
                 "--set", "dims=2,5,10", "--set", "epochs=1"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "ablation.json").read_text())
    rows = record["rows"]
    assert len(rows) == 2 * 2 * 3  # samplers x windows x dims, one seed
    # 4 snapshots per epoch: 5 in the 1-epoch window, 9 in the 2-epoch one; d must be <= t - 1
    for row in rows:
        assert row["snapshots"] == {1: 5, 2: 9}[row["window_epochs"]]
        assert (row["test_acc"] is None) == (row["d"] > row["snapshots"] - 1)
        assert row["test_acc"] is None or 0 <= row["test_acc"] <= 100
    assert "| SGD | 1 epoch (5) | " in printed and "| Adam | 2 epochs (9) | " in printed and "—" in printed
    png = out / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command again reads everything back (each run resumes as a finished stage)
    assert main(["run", "ablation", "--out", str(out), "--seeds", "1", "--set", "short=1", "--set", "long=2",
                 "--set", "dims=2,5,10", "--set", "epochs=1"]) == 0
    again = json.loads((out / "ablation.json").read_text())
    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in rows]


def test_summary_and_figure_over_seeds() -> None:
    cfg = ablation.AblationConfig(seeds=2, short=1, long=2, dims=(2, 5), samplers=("sgd",))
    rows = [{"sampler": "sgd", "seed": s, "window_epochs": w, "snapshots": {1: 5, 2: 9}[w], "d": d,
             "sampler_test_acc": 60.0 + s, "test_acc": None if d > {1: 5, 2: 9}[w] - 1 else 50.0 + 10 * s + d}
            for s in (0, 1) for w in (1, 2) for d in (2, 5)]
    summary = ablation._summary(cfg, rows)
    cell = next(r for r in summary if (r["window_epochs"], r["d"]) == (2, 5))
    assert cell["test_acc_mean"] == 60.0 and cell["test_acc_std"] == pytest.approx(7.0710678)  # 55 and 65
    assert next(r for r in summary if (r["window_epochs"], r["d"]) == (1, 5))["test_acc_mean"] is None
    fig = ablation._figure(cfg, summary)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # one line and one ± std band per window
    assert "mean ± std over 2 seeds" in ax.get_title()


def test_ablation_refuses_bad_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "ablation", "--out", str(tmp_path / "x"), "--set", "short=5", "--set", "long=3"]) == 2
    assert "short < long" in capsys.readouterr().err
    assert main(["run", "ablation", "--out", str(tmp_path / "x"), "--set", "dim=3"]) == 2
    assert "takes short, long, dims, epochs and samplers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
