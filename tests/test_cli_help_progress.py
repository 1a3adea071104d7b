"""Help written for users (every option's default stated) and progress that reads in a log file
(whole short lines, no carriage-return redraws); the bench's warning on noisy figures. Issue #15,
items 5 and 6."""

from __future__ import annotations

import argparse
import importlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import mlp
from pipelines import bench as bench_module
from pipelines.harness import suite_parser
from pipelines.harness.measure import spread_warning
from trajstore import TrajectoryStore, dldr
from trajstore._progress import LineProgress, progress_bar
from trajstore.cli import build_parser, main

HARNESS = ("append", "basis", "commit", "distributed", "goals", "step", "workers")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser a user reaches: each subcommand's and each bench suite's (and benchmark script's)."""
    out = list(_subparsers(build_parser()).items())
    for name in HARNESS:
        module = importlib.import_module(f"pipelines.harness.{name}")
        parser = suite_parser(module.__doc__, f"trajstore bench --suite {name}")
        module.add_arguments(parser)
        out.append((f"--suite {name}", parser))
    return out


@pytest.mark.parametrize("name, parser", _parsers(), ids=[n for n, _ in _parsers()])
def test_every_option_states_its_default(name: str, parser: argparse.ArgumentParser) -> None:
    formatter = parser._get_formatter()
    for action in parser._actions:
        # A flag's default is its absence; None is said in words where it means something
        # ("default: all snapshots"), so neither need print a value.
        if action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0:
            continue
        text = formatter._expand_help(action)  # the help as printed, after % formatting
        assert str(action.default) in text or "default" in text, (name, action.option_strings, text)


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_each_command_help_prints_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0  # --help is not an error
    out = capsys.readouterr().out
    for action in _subparsers(build_parser())[command]._actions:
        for option in action.option_strings:
            assert option in out, (command, option)
        if action.help:  # every option and argument is described
            assert action.help is not argparse.SUPPRESS


def test_top_level_help_is_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Argument parsing" not in out  # the module's docstring is for developers
    assert "trajstore records the weights of a training run" in out
    for step in ("trajstore run mnist1d", "trajstore sample OUT", "trajstore basis OUT/trajectory.zarr",
                 "trajstore train OUT/trajectory.zarr", "trajstore plan MODEL"):
        assert step in out  # the typical sequence of commands, in the epilog


def test_suite_help_is_the_suite_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "goals", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: trajstore bench --suite goals") and "(default: 3)" in out


def test_run_takes_data_root() -> None:
    args = build_parser().parse_args(["run", "cifar10-resnet20", "--data-root", "/data"])
    assert args.data_root == "/data"


# ----------------------------------------------------------------------------- progress


def _assert_log_lines(text: str) -> list[str]:
    assert "\r" not in text  # no redraws: each update is a line of its own
    assert text.endswith("\n")
    lines = text.splitlines()
    assert all(0 < len(line) < 200 for line in lines), max(lines, key=len)
    return lines


def test_lines_on_a_non_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAJSTORE_PROGRESS_INTERVAL", "0")
    stream = io.StringIO()  # isatty() is False, as for a file or a pipe
    bar = progress_bar(range(40), desc="Gram pass (101 snapshots, 40 blocks)", unit="block", file=stream)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(test_acc="91.20", note="x" * 300)  # a long postfix is cut, not wrapped
    lines = _assert_log_lines(stream.getvalue())
    assert len(lines) == 41  # the starting line, 39 updates and the closing line (which is the 40th's)
    assert lines[0].startswith("Gram pass (101 snapshots, 40 blocks): 0/40 blocks (0%), ")
    assert lines[12].startswith("Gram pass (101 snapshots, 40 blocks): 12/40 blocks (30%), ")
    assert "left" in lines[12]
    assert "40/40 blocks (100%), done in" in lines[-1]


def test_lines_at_most_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAJSTORE_PROGRESS_INTERVAL", "3600")
    stream = io.StringIO()
    for _ in progress_bar(range(1000), desc="verify default", unit="chunk", file=stream):
        pass
    lines = _assert_log_lines(stream.getvalue())
    assert len(lines) == 2 and "0/1000 chunks" in lines[0] and "1000/1000" in lines[1]  # start and close only


def test_a_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm.auto import tqdm

    bar = progress_bar(total=3, desc="basis pass", unit="task", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_dldr_progress_piped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRAJSTORE_PROGRESS_INTERVAL", "0")
    model = mlp()
    with TrajectoryStore.create(tmp_path / "s.zarr", model) as store:
        for _ in range(6):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            store.append(model)
    dldr(tmp_path / "s.zarr", 3, progress=True)  # through the dask callback, on the real path
    lines = _assert_log_lines(capsys.readouterr().err)  # capsys's stderr is not a terminal
    assert any(line.startswith("Gram pass") for line in lines) and any(line.startswith("basis pass") for line in lines)


# ----------------------------------------------------------------------------- bench


def test_spread_warning_fires_on_a_wide_spread_only() -> None:
    wide = spread_warning("train (mmap) x SGD", [7.7, 1.05, 3.1])
    assert wide is not None and "spread 1.05-7.70 between runs" in wide and "rerun or add --rounds" in wide
    assert spread_warning("train (mmap) x SGD", [2.0, 2.1, 2.3]) is None  # 1.15x: within the limit
    assert spread_warning("train (mmap) x SGD", [7.7]) is None  # one run has no spread


def test_bench_prints_a_header_stage_lines_and_the_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bench.zarr" / "bases" / "bench").mkdir(parents=True)  # as the sample and basis stages leave

    def child(stage: str, args: dict[str, Any]) -> dict[str, Any]:  # no processes: synthetic figures
        rounds = [7.7, 1.05, 3.1] if args["mode"] == "mmap" else [2.0, 2.1, 2.3]
        return {"peak_rss_bytes": 2**29, "peak_anon_bytes": 2**28, "baseline_rss_bytes": 2**27,
                "baseline_anon_bytes": 2**26, "step_seconds": 0.2, "sgd_step_seconds": 0.1,
                "step_vs_sgd": sorted(rounds)[1], "step_vs_sgd_rounds": rounds, "cold_cache": False}

    monkeypatch.setattr(bench_module, "run_child", child)
    result = bench_module.bench("mlp", t=12, d=4, batch=16, stages=("train",), folder=tmp_path, rounds=3)
    captured = capsys.readouterr()
    assert captured.out.startswith("trajstore bench mlp: T = 12 snapshots, d = 4, batch 16; 3 runs")
    assert "\n  measuring train (resident/mmap/stream: 3 rounds of 3 P+-BFGS and 3 SGD steps)\n" in captured.out
    assert "train (resident): measuring (1/3" in captured.out  # a line before each run, not silence
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("train (mmap) x SGD")
    assert "warning: train (mmap) x SGD: figures spread 1.05-7.70" in captured.err
    assert "1.05-7.70 over 3 rounds" in bench_module.format_table(result)
