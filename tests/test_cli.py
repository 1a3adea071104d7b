"""The command line over the pipelines: sample, train and run, on digits, shrunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trajstore import TrajectoryStore, open_basis
from trajstore.cli import main


def test_sample_then_train_from_the_recorded_initialization(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert main(["sample", str(out), "--experiment", "digits", "--epochs", "3", "--sample-epochs", "2",
                 "--snapshot-every", "4", "--set", "threads=1"]) == 0
    printed = capsys.readouterr().out
    store = TrajectoryStore.open(out / "trajectory.zarr")
    assert len(store) == 1 + 2 * 12 // 4  # 1,437 training digits in batches of 128: 12 steps per epoch
    assert f"{len(store)} snapshots" in printed and "sampling cost the training loop" in printed
    sgd = json.loads((out / "sgd.json").read_text())
    assert len(sgd["history"]) == 3 and sgd["sampling"]["overhead_fraction"] >= 0

    assert main(["train", str(out / "trajectory.zarr"), "--optimizer", "pbfgs", "--dim", "5", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    basis = open_basis(out / "trajectory.zarr", "default-0-7-d5")
    result = json.loads((out / "train-pbfgs-default-0-7-d5-e2-b1024.json").read_text())
    assert result["basis"] == basis.name and len(result["history"]) == 2
    assert f"test accuracy {result['history'][-1]['test_acc']:.2f}%" in printed
    assert result["line_search"]["steps"] == 2 * 2  # 1,437 digits in batches of 1,024: 2 steps per epoch

    # A store of another name, results elsewhere: the store given is the one trained from.
    (out / "trajectory.zarr").rename(out / "renamed.zarr")
    assert main(["train", str(out / "renamed.zarr"), "--optimizer", "psgd", "--basis", "default-0-7-d5",
                 "--epochs", "1", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "train-psgd-default-0-7-d5-e1-b1024.json").exists()


def test_errors_are_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits"
    assert main(["sample", str(out), "--experiment", "digits", "--epochs", "1"]) == 2
    assert "sample_epochs (10) must be <= epochs (1)" in capsys.readouterr().err
    main(["sample", str(out), "--experiment", "digits", "--epochs", "1", "--sample-epochs", "1", "--snapshot-every", "6",
          "--set", "threads=1"])
    assert main(["train", str(out / "trajectory.zarr"), "--dim", "9"]) == 2
    assert "d = 9 exceeds the rank 2" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "c"), "--experiment", "cifar10-resnet20"]) == 2
    assert "give --data-root DIR" in capsys.readouterr().err
    assert main(["run", "digits", "--set", "epochs"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_run_with_overrides_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "digits", "--out", str(out), "--seeds", "2", "--set", "epochs=2", "--set", "sample_epochs=1",
                 "--set", "snapshot_every=2", "--set", "dim=3", "--set", "subspace_epochs=1",
                 "--set", "methods=pbfgs+", "--set", "threads=1"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"sgd", "pbfgs+"}
    assert result["config"]["epochs"] == 2 and [s["seed"] for s in result["seeds"]] == [0, 1]
    accs = result["summary"]["sgd"]["test_acc"]
    assert result["summary"]["sgd"]["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert (out / "seed-1" / "trajectory.zarr").is_dir()
    # The README's table is written from results.json, between its markers, and nowhere else.
    from pipelines.readme import BEGIN, END, update

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    update(readme, [out], "python -m pipelines.readme run")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("after\n")
    sgd = result["summary"]["sgd"]
    assert f"| SGD | 2 | {sgd['test_acc_mean']:.2f} ± {sgd['test_acc_std']:.2f} | 2 |" in text
    assert "| P+-BFGS, d = 3 | 1 (+1 sampled) |" in text


@pytest.mark.parametrize("flags, expected", [
    (["anon=false"], {"anon": False}),  # JSON when it parses
    (["anon=True", "token=None"], {"anon": True, "token": None}),  # Python's spelling too
    (["profile=my-profile", "retries=3"], {"profile": "my-profile", "retries": 3}),  # else text
    (["client_kwargs.endpoint_url=http://127.0.0.1:5000"], {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}),
    (['client_kwargs={"endpoint_url": "http://127.0.0.1:5000"}', "client_kwargs.region_name=eu-west-1"],
     {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000", "region_name": "eu-west-1"}}),  # merged
    (["config_kwargs.retries.max_attempts=1", "config_kwargs.connect_timeout=1"],
     {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}),
    (["url=http://h/?a=b"], {"url": "http://h/?a=b"}),  # the first '=' splits
])
@pytest.mark.parametrize("command", ["info", "verify", "basis", "train"])
def test_storage_options_parse_into_one_dict(command: str, flags: list[str], expected: dict[str, object]) -> None:
    from trajstore.cli import build_parser

    args = build_parser().parse_args([command, "s3://b/t.zarr", *(x for f in flags for x in ("--storage-option", f))])
    assert args.storage_options == expected
    assert build_parser().parse_args([command, "t.zarr"]).storage_options is None  # none given: none passed


@pytest.mark.parametrize("flag, message", [
    ("anon", "takes KEY=VALUE"), ("=1", "takes KEY=VALUE"), ("a..b=1", "takes KEY=VALUE"),
    ("client_kwargs=3 client_kwargs.endpoint_url=x", "client_kwargs is 3, not a dict"),
    ("anon=true anon=false", "anon is given twice"),
])
def test_bad_storage_options_are_usage_errors(flag: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["verify", "s3://b/t.zarr", *(x for f in flag.split(" ") for x in ("--storage-option", f))]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2  # argparse's usage error
    assert message in capsys.readouterr().err


def test_nproc_children_get_the_storage_options() -> None:
    from trajstore.cli import _without_nproc, build_parser

    argv = ["train", "s3://b/t.zarr", "--nproc", "2", "--storage-option", "client_kwargs.endpoint_url=http://h:1",
            "--nproc=2", "--storage-option", 'config_kwargs={"connect_timeout": 1}']
    child = _without_nproc(argv)  # what each rank is started with
    assert "--nproc" not in " ".join(child)
    parsed = build_parser().parse_args(child)
    assert parsed.storage_options == {"client_kwargs": {"endpoint_url": "http://h:1"},
                                      "config_kwargs": {"connect_timeout": 1}}
