"""The console entry point (``_trajstore_cli``): a Ctrl-C during an import is held until the import
is over, so it cannot break a module half-way through its initialization (a compiled extension
then raised ``ImportError: initialization failed`` or aborted the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Sends itself SIGINT in the middle of its own import, then finishes it.
MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.3)
DONE = True
"""

PROGRAM = """
import sys, time
import _trajstore_cli
if sys.argv[2] == "held":
    _trajstore_cli.hold_interrupts_during_imports()
sys.path.insert(0, sys.argv[1])
try:
    import self_interrupting
    time.sleep(5)
    print("not interrupted")
except KeyboardInterrupt:
    module = sys.modules.get("self_interrupting")
    print("imported" if module is not None and getattr(module, "DONE", False) else "broken")
"""


def run(tmp_path: Path, mode: str) -> str:
    (tmp_path / "self_interrupting.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path), mode], capture_output=True, text=True,
                          timeout=60, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_during_an_import_is_raised_after_it(tmp_path: Path) -> None:
    # Python's own handler breaks the import half-way (the module is left out of sys.modules) ...
    assert run(tmp_path, "default") == "broken"
    # ... the entry point's lets it finish and raises the KeyboardInterrupt right after.
    assert run(tmp_path, "held") == "imported"


def test_an_ignored_sigint_stays_ignored() -> None:
    import _trajstore_cli

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _trajstore_cli.hold_interrupts_during_imports()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_an_import_it_raises_at_once() -> None:
    import _trajstore_cli

    with pytest.raises(KeyboardInterrupt):
        _trajstore_cli._interrupt(signal.SIGINT, sys._getframe())
