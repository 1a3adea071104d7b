"""trajstore as it was before array dimension names and the folder lock (commit b33529c), in a child process.

The package is taken from this repository's history with ``git archive`` (as test_format1.py does
for format 1) and run under ``python -c`` with only it on PYTHONPATH. :class:`OldWriter` is one
such process taking commands on stdin, one line each, and answering ``ok`` or ``error <type>:
<message>``:

    create PATH   TrajectoryStore.create(PATH, mlp(0), chunk_bytes=128)
    open PATH     TrajectoryStore.open(PATH, "a")
    append K      store.append(mlp(K), step=K): snapshot K is ``mlp(seed=K)``'s parameters
    close         store.close()
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

OLD_COMMIT = "b33529cf3a70861bbd907cf133e7821aeffdc55c"  # the last commit without dimension names
REPO = Path(__file__).resolve().parent.parent
CHUNK_BYTES = 128  # mlp() has n = 80 float32 parameters: 3 chunks per snapshot

SCRIPT = """
import sys, torch
from torch import nn
from trajstore import TrajectoryStore

def mlp(seed):  # conftest.mlp
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))

store = None
for line in sys.stdin:
    cmd, arg = line.split()
    try:
        if cmd == "create":
            store = TrajectoryStore.create(arg, mlp(0), chunk_bytes=%d)
        elif cmd == "open":
            store = TrajectoryStore.open(arg, "a")
        elif cmd == "append":
            store.append(mlp(int(arg)), step=int(arg))
        elif cmd == "close":
            store.close()
        print("ok", flush=True)
    except Exception as e:
        print(f"error {type(e).__name__}: {e}".replace(chr(10), " "), flush=True)
""" % CHUNK_BYTES


def extract(work: Path) -> Path:
    """The old package under ``work/old`` (skips the test without the repository's history)."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "trajstore"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs this repository's git history to get the old trajstore ({e})")
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(work / "old", filter="data")
    return work / "old"


class OldWriter:
    """One child process running the old trajstore; see the module docstring."""

    def __init__(self, package: Path) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=package.parent,
                                      env={"PYTHONPATH": str(package), "PATH": "/usr/bin:/bin"})

    def __call__(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        assert answer, f"the old trajstore process died on {command!r} (exit code {self._proc.poll()})"
        return answer

    def stop(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
