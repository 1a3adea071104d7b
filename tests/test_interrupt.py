"""Ctrl-C during ``trajstore run digits``: one line saying where the run was and that the same
command resumes it, exit 130; and the run resumed after five interrupts at random moments ends
with the results of an uninterrupted run (the same histories and the same model tensors)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

# Long enough for interrupts to land in every stage, short enough for a test (~15 s a run here).
SETTINGS = ["--set", "epochs=6", "--set", "sample_epochs=6", "--set", "snapshot_every=0", "--set", "dim=5",
            "--set", "subspace_epochs=3", "--set", "methods=pbfgs,psgd", "--set", "projection_snapshots=4",
            "--set", "projection_k=2"]


def command(out: Path) -> list[str]:
    """The installed ``trajstore`` command (its entry point catches a Ctrl-C during imports too)."""
    script = Path(sys.executable).parent / "trajstore"
    return [str(script), "run", "digits", "--out", str(out), *SETTINGS]


def start(out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell's background job (CI runs the suite as one) has SIGINT ignored, and children inherit
    # that: give the command the default disposition, as a terminal's foreground job has.
    return subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


def without_times(value: Any) -> Any:
    """A result document without what depends on the clock or the machine's load."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items()
                if not any(w in k for w in ("seconds", "time", "peak", "rss", "provenance", "overhead"))}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def outcome(out: Path) -> dict[str, Any]:
    seed = out / "seed-0"
    docs = {p.name: without_times(json.loads(p.read_text())) for p in sorted(seed.glob("*.json"))}
    models = {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(seed.glob("*.pt"))
              if not p.name.endswith(".ckpt.pt")}
    return {"docs": docs, "models": models}


def same_models(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][t], b[k][t]) for t in a[k]) for k in a)


def test_interrupted_run_says_so_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    started = time.perf_counter()
    if not (Path(sys.executable).parent / "trajstore").exists():
        pytest.skip("the trajstore command is not installed next to this Python")
    code, _, err = finish(start(tmp_path / "whole"))
    whole_seconds = time.perf_counter() - started
    assert code == 0, err
    rng = random.Random(20261201)
    out, interrupts, lines, attempts = tmp_path / "cut", 0, [], 0
    while interrupts < 5 and attempts < 20:
        attempts += 1
        proc = start(out)
        time.sleep(rng.uniform(0.2, max(2.0, whole_seconds * 0.6)))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: to the whole foreground group
        code, _, err = finish(proc)
        if code == 0:  # it finished before the moment came: start over, for 5 interrupts of one run
            shutil.rmtree(out)
            interrupts, lines = 0, []
            continue
        interrupts += 1
        said = [line for line in err.splitlines() if line.startswith("trajstore:")]
        assert code == 130, err
        assert len(said) == 1 and said[0].startswith("trajstore: interrupted"), err
        assert "run the same command to resume" in said[0] and "Traceback" not in err, err
        lines.append(said[0])
    assert interrupts == 5, f"the run finished before 5 interrupts ({interrupts}): {lines}"
    code, stdout, err = finish(start(out))
    assert code == 0, err
    assert "resuming" in stdout  # a resumed run says so
    mine, theirs = outcome(out), outcome(tmp_path / "whole")
    assert mine["docs"] == theirs["docs"]
    assert same_models(mine["models"], theirs["models"])
    assert any("during" in line for line in lines)  # at least one said where it was
