"""A new user's first mistakes with the command line, as a table: each is refused with exit 2 and
one line, ``trajstore: error: ...``, naming what the user typed; no traceback; nothing written.
Then the corrected command succeeds in the same folder (slow: it runs the tiny experiment)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from trajstore.cli import main

# The digits experiment at a tiny size: 2 SGD epochs (3 snapshots a window), a 2-D basis, one
# epoch of P-SGD, two projected snapshots. A few seconds on 2 cores.
TINY = ["--set", "epochs=2", "--set", "sample_epochs=2", "--set", "snapshot_every=0", "--set", "dim=2",
        "--set", "subspace_epochs=1", "--set", "methods=psgd", "--set", "projection_snapshots=2",
        "--set", "projection_k=2"]


def run_argv(out: Path, *extra: str, experiment: str = "digits") -> list[str]:
    return ["run", experiment, "--out", str(out), *TINY, *extra]


# (id, the mistake's extra arguments, what the one line must name)
RUN_MISTAKES = [
    ("int-not-a-number", ["--set", "epochs=abc"], ["--set epochs=abc", "takes an integer"]),
    ("negative-epochs", ["--set", "epochs=-1"], ["--set epochs=-1", "epochs must be in"]),
    ("set-without-equals", ["--set", "epochs"], ["--set takes KEY=VALUE", "'epochs'"]),
    ("unknown-field", ["--set", "dimm=2"], ["--set dimm=2", "did you mean dim?"]),
    ("dim-over-window", ["--set", "dim=500"], ["--set dim=500", "3 snapshots", "--set dim=2"]),
    ("dim-zero", ["--set", "dim=0"], ["--set dim=0", "dim must be in"]),
    ("epochs-below-sample-epochs", ["--set", "epochs=1"], ["--set epochs=1 and --set sample_epochs=2", "sample_epochs (2) must be <= epochs (1)"]),
    ("sample-epochs-over-epochs", ["--set", "sample_epochs=5"], ["--set epochs=2 and --set sample_epochs=5", "must be <= epochs (2)"]),
    ("model-typo", ["--set", "model=mpl"], ["--set model=mpl", "unknown model 'mpl'"]),
    ("model-that-does-not-build", ["--set", "model=resnet21"], ["--set model=resnet21", "6k + 2"]),
    ("unknown-method", ["--set", "methods=pbfgs,lbfgs"], ["--set methods=pbfgs,lbfgs", "among pbfgs, pbfgs+, psgd"]),
    ("unknown-optimizer", ["--set", "optimizer=adagrad"], ["--set optimizer=adagrad", "'sgd' or 'adam'"]),
    ("zero-lr", ["--set", "lr=0"], ["--set lr=0", "lr must be in (0, 1000]"]),
    ("lr-not-a-number", ["--set", "lr=fast"], ["--set lr=fast", "takes a number"]),
    ("nan-lr", ["--set", "lr=nan"], ["--set lr=nan", "takes a number"]),
    ("momentum-over-1", ["--set", "momentum=1.5"], ["--set momentum=1.5", "in [0, 1)"]),
    ("unknown-device", ["--set", "device=tpu"], ["--set device=tpu", "auto, cpu, mps, cuda or cuda:N"]),
    ("unknown-storage-dtype", ["--set", "storage_dtype=int8"], ["--set storage_dtype=int8", "float32, bfloat16"]),
    ("bool-typo", ["--set", "augment=maybe"], ["--set augment=maybe", "true or false"]),
    ("unknown-data", ["--set", "data=cifar11"], ["--set data=cifar11", "mnist1d, digits, cifar10"]),
    ("cifar-without-data-root", ["--set", "data=cifar10", "--set", "model=resnet20"], ["--data-root DIR", "cifar-10-batches-py"]),
    ("cifar-data-root-missing", ["--set", "data=cifar10", "--set", "model=resnet20", "--set", "data_root=/nonexistent/cifar"],
     ["--set data_root=/nonexistent/cifar", "does not exist"]),
    ("milestones-not-integers", ["--set", "milestones=ten,twenty"], ["--set milestones=ten,twenty", "list of integers"]),
    ("zero-seeds", ["--seeds", "0"], ["--seeds 0", "seeds must be in"]),
    ("unknown-basis-mode", ["--set", "basis_mode=gpu"], ["--set basis_mode=gpu", "resident, mmap or stream"]),
    ("zero-projection-k", ["--set", "projection_k=0"], ["--set projection_k=0", "projection_k must be in"]),
    ("zero-batch", ["--set", "batch_size=0"], ["--set batch_size=0", "batch_size must be in"]),
    ("label-noise-over-1", ["--set", "label_noise=2"], ["--set label_noise=2", "in [0, 1]"]),
    ("negative-snapshot-every", ["--set", "snapshot_every=-1"], ["--set snapshot_every=-1", "snapshot_every must be"]),
    ("zero-nproc", ["--nproc", "0"], ["--nproc must be >= 1"]),
    ("unknown-flag", ["--data-roots", "x"], ["unrecognized arguments: --data-roots x"]),
]
if not torch.cuda.is_available():
    RUN_MISTAKES.append(("cuda-without-gpu", ["--set", "device=cuda"], ["--set device=cuda", "no CUDA device"]))


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], names: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("trajstore"), err
    assert "error:" in lines[0] and "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("extra, names", [m[1:] for m in RUN_MISTAKES], ids=[m[0] for m in RUN_MISTAKES])
def test_run_mistake_is_one_line_and_writes_nothing(in_tmp: Path, capsys: pytest.CaptureFixture[str],
                                                    extra: list[str], names: list[str]) -> None:
    refused(capsys, run_argv(in_tmp / "out", *extra), names)
    assert files_under(in_tmp) == []  # not the run folder, not runs/


OTHER_MISTAKES = [
    ("unknown-experiment", ["run", "digitz"], ["unknown experiment 'digitz'", "did you mean digits?"]),
    ("demo-with-set", ["run", "demo", "--set", "epochs=3"], ["the demo takes no --set"]),
    ("info-missing-path", ["info", "nope.zarr"], ["nope.zarr does not exist"]),
    ("verify-missing-path", ["verify", "nope.zarr"], ["nope.zarr does not exist"]),
    ("basis-missing-path", ["basis", "nope.zarr", "--dim", "2"], ["nope.zarr does not exist"]),
    ("train-missing-path", ["train", "nope.zarr"], ["nope.zarr does not exist"]),
    ("sample-model-typo", ["sample", "s1", "--experiment", "digits", "--model", "mpl"], ["--set model=mpl"]),
    ("storage-option-syntax", ["info", ".", "--storage-option", "anon"], ["takes KEY=VALUE"]),
]


@pytest.mark.parametrize("command", ["run", "info", "basis", "plan"])
def test_an_unknown_option_is_reported_by_its_command(in_tmp: Path, capsys: pytest.CaptureFixture[str],
                                                      command: str) -> None:
    """The line names the command whose options were mistyped, and that command's --help (which
    lists them), not the top-level parser's."""
    first = {"run": "digits", "info": "s.zarr", "basis": "s.zarr", "plan": "resnet20"}[command]
    line = refused(capsys, [command, first, "--colour", "blue"], ["unrecognized arguments: --colour blue"])
    assert line.startswith(f"trajstore {command}: error:") and line.endswith(f"(see 'trajstore {command} --help')"), line
    assert files_under(in_tmp) == []


@pytest.mark.parametrize("argv, names", [m[1:] for m in OTHER_MISTAKES], ids=[m[0] for m in OTHER_MISTAKES])
def test_other_mistakes(in_tmp: Path, capsys: pytest.CaptureFixture[str], argv: list[str], names: list[str]) -> None:
    refused(capsys, argv, names)
    assert files_under(in_tmp) == []


def test_dim_over_the_window_is_refused_before_any_training(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The MNIST-1D experiment's own settings (41 snapshots), refused from the config alone."""
    started = time.perf_counter()
    line = refused(capsys, ["run", "mnist1d", "--out", str(in_tmp / "m"), "--set", "dim=500"], ["--set dim=500"])
    assert "41 snapshots" in line and "--set dim=40" in line
    assert time.perf_counter() - started < 60  # generous: what is asserted is that no SGD epoch ran
    assert files_under(in_tmp) == []


def test_a_folder_whose_first_try_finished_nothing_is_reused(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that died before finishing an epoch left config.json and a seed folder behind: a
    corrected command with another config takes the folder over; one with finished work is refused."""
    import json

    out = in_tmp / "out"
    (out / "seed-0" / "trajectory.zarr").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"class": "Config", "name": "digits", "dim": 7}))
    from pipelines.validate import configure
    from pipelines.experiment import _check_folder

    cfg = configure("digits", {"epochs": "2", "sample_epochs": "2", "snapshot_every": "0", "dim": "2"}, out=str(out))
    _check_folder(cfg)
    assert not (out / "seed-0").exists() and json.loads((out / "config.json").read_text())["dim"] == 2
    assert "finished nothing; starting over" in capsys.readouterr().out
    (out / "seed-0").mkdir()
    (out / "seed-0" / "sgd.json").write_text("{}")
    other = configure("digits", {"epochs": "2", "sample_epochs": "2", "snapshot_every": "0", "dim": "1"}, out=str(out))
    from pipelines.validate import ConfigError

    with pytest.raises(ConfigError, match=r"dim=2 there, 1 now.*seed-0/sgd.json"):
        _check_folder(other)


@pytest.mark.slow
def test_corrected_commands_succeed_in_the_same_folder(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every run mistake of the table, then the corrected command, in one folder: the tiny run
    completes (its results written) after each mistake, and the next mistake is still refused."""
    out = in_tmp / "out"
    for i, (_, extra, names) in enumerate(RUN_MISTAKES):
        refused(capsys, run_argv(out, *extra), names)
        if i % 8 == 0:  # the corrected command: the first time it runs everything, then it resumes
            code, printed = main(run_argv(out)), capsys.readouterr()
            assert code == 0, printed.err
            assert (out / "results.json").exists()
    assert main(run_argv(out)) == 0
    assert (out / "seed-0" / "psgd.json").exists()
    os.remove(out / "results.json")
    assert main(run_argv(out)) == 0 and (out / "results.json").exists()
