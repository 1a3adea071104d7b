"""``trajstore.launch``: the children of a job end when their parent is killed outright.

A SIGKILL of the process that ran ``spawn`` (``trajstore run --nproc 2``'s parent) cannot be
passed on; the test starts such a parent with two real children, kills it, and checks that each
child received SIGTERM and is gone within seconds. Every process it starts is stopped by its own
pid at the end, whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trajstore import launch

ROOT = Path(__file__).resolve().parents[1]

# A rank: follows its parent as init_from_env makes it do, says it is up, and sleeps; SIGTERM is
# recorded before it leaves, so the test can tell that the signal, not something else, ended it.
CHILD = """
import os, signal, sys, time
from pathlib import Path
from trajstore.launch import follow_parent
out = Path(sys.argv[1]); rank = os.environ["RANK"]
def stop(signum, frame):
    (out / f"rank-{rank}.terminated").write_text(str(os.getpid()))
    os._exit(143)
signal.signal(signal.SIGTERM, stop)
follow_parent()
(out / f"rank-{rank}.env").write_text(os.environ.get("TRAJSTORE_PARENT_PID", "removed"))
(out / f"rank-{rank}.pid").write_text(str(os.getpid()))
time.sleep(120)
"""

PARENT = """
import sys
from trajstore.launch import spawn
raise SystemExit(spawn(["-c", sys.argv[1], sys.argv[2]], 2))
"""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_children_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path)], env=env, cwd=ROOT)
    pids: list[int] = []
    try:
        files = [tmp_path / f"rank-{r}.pid" for r in range(2)]
        assert wait_for(lambda: all(f.exists() and f.read_text() for f in files), 60), "the ranks did not start"
        pids = [int(f.read_text()) for f in files]
        assert all(alive(p) for p in pids)
        # The rank took the variable out of its environment: what it starts follows no one.
        assert [(tmp_path / f"rank-{r}.env").read_text() for r in range(2)] == ["removed", "removed"]
        time.sleep(1.0)  # both watching
        assert all(alive(p) for p in pids) and parent.poll() is None  # following is not ending
        parent.kill()
        parent.wait(10)
        started = time.monotonic()
        assert wait_for(lambda: not any(alive(p) for p in pids), 10), "a child outlived its killed parent"
        took = time.monotonic() - started
        for r in range(2):
            assert (tmp_path / f"rank-{r}.terminated").read_text() == str(pids[r])  # by SIGTERM, as documented
        assert took < 5, took
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_follow_parent_is_a_no_op_outside_a_launched_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the variable (torchrun's ranks, a plain process), no thread and no signal; a value
    that is not a pid is ignored (and removed)."""
    monkeypatch.setattr(launch, "_following", False)
    monkeypatch.delenv(launch._PARENT, raising=False)
    before = {t.name for t in __import__("threading").enumerate()}
    launch.follow_parent()
    monkeypatch.setenv(launch._PARENT, "not-a-pid")
    launch.follow_parent()
    assert launch._PARENT not in os.environ
    assert not launch._following
    assert {t.name for t in __import__("threading").enumerate()} == before


def test_start_names_the_parent_for_its_children(tmp_path: Path) -> None:
    children = launch.start(["-c", "import os, sys; open(sys.argv[1] + '/' + os.environ['RANK'], 'w')"
                                   ".write(os.environ['TRAJSTORE_PARENT_PID'])", str(tmp_path)], 2)
    try:
        assert [c.wait(60) for c in children] == [0, 0]
    finally:
        launch._stop(children)
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == [str(os.getpid())] * 2
