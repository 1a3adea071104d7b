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

# Long enough for interrupts to land in every stage (about 3 s of work after 5-10 s of imports
# and data here), short enough for a test.
SETTINGS = ["--set", "epochs=10", "--set", "sample_epochs=10", "--set", "snapshot_every=0", "--set", "dim=5",
            "--set", "subspace_epochs=5", "--set", "methods=pbfgs,psgd", "--set", "projection_snapshots=4",
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


def finished_work(out: Path) -> bool:
    """Whether a resumed run has something to read back (what makes it say ``resuming``)."""
    return any(out.glob("seed-*/*.json")) or any(out.glob("seed-*/*.ckpt.pt"))


def test_interrupted_run_says_so_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "trajstore").exists():
        pytest.skip("the trajstore command is not installed next to this Python")
    launched = time.perf_counter()
    proc = start(tmp_path / "whole")
    proc.stderr.readline()  # the first progress line: start-up (imports, data) is over
    startup = time.perf_counter() - launched
    code, _, err = finish(proc)
    work = time.perf_counter() - launched - startup
    assert code == 0, err

    # Five moments: one during start-up (after the interpreter is up: a Ctrl-C before Python has
    # installed its handler is the interpreter's, not ours), four at random points of the work that
    # remains, counted from the attempt's first progress line.
    rng = random.Random(20261201)
    out, lines, attempts = tmp_path / "cut", [], 0
    during_startup, done = rng.randrange(5), 0.0
    while len(lines) < 5 and attempts < 20:
        attempts += 1
        had_work = finished_work(out)
        proc = start(out)
        progressed = False
        if len(lines) == during_startup:
            time.sleep(rng.uniform(1.0, max(1.2, 0.8 * startup)))
        elif proc.stderr.readline():
            progressed = True
            moment = rng.uniform(0.0, 0.8 * max(0.2, work - done))
            time.sleep(moment)
            done += moment
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: to the whole foreground group
        code, stdout, err = finish(proc)
        if progressed and had_work:
            assert "resuming" in stdout, stdout  # a resumed run says so
        if code == 0:  # it finished before the moment came: start over, for 5 interrupts of one run
            shutil.rmtree(out)
            lines, done = [], 0.0
            continue
        said = [line for line in err.splitlines() if line.startswith("trajstore:")]
        assert code == 130, err
        assert len(said) == 1 and said[0].startswith("trajstore: interrupted"), err
        assert "run the same command to resume" in said[0] and "Traceback" not in err, err
        lines.append(said[0])
    assert len(lines) == 5, f"the run finished before 5 interrupts: {lines}"
    assert all("while starting" in line or "during" in line for line in lines), lines  # where it was

    had_work = finished_work(out)
    code, stdout, err = finish(start(out))
    assert code == 0, err
    assert had_work == ("resuming" in stdout), stdout
    mine, theirs = outcome(out), outcome(tmp_path / "whole")
    assert mine["docs"] == theirs["docs"]
    assert same_models(mine["models"], theirs["models"])


def test_an_interrupted_job_of_two_processes_says_it_once(tmp_path: Path) -> None:
    """Ctrl-C reaches every rank of ``--nproc 2``; one line is printed (rank 0's), exit 130."""
    if not (Path(sys.executable).parent / "trajstore").exists():
        pytest.skip("the trajstore command is not installed next to this Python")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*command(tmp_path / "job"), "--nproc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stderr.readline()  # the work has started on both ranks
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = finish(proc)
    said = [line for line in (first + err).splitlines() if line.startswith("trajstore:")]
    assert code == 130, err
    assert len(said) == 1 and said[0].startswith("trajstore: interrupted during"), err
