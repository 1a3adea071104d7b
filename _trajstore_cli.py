"""The ``trajstore`` command's entry point, outside the package so that a Ctrl-C while the
package and its dependencies are still being imported (a second or two) also ends in one line
and exit 130, not a traceback. Everything else is :func:`trajstore.cli.main`.

Once the command has finished, the process leaves without the interpreter's teardown: freeing
the objects of torch, matplotlib and dask and unloading their libraries took 2.0 s after
``trajstore run demo`` on 2 cores (0.7 s after ``import torch`` alone), time in which a Ctrl-C
killed the finished command without a word. What a normal exit does that matters runs first
(threads joined, ``atexit`` handlers, output flushed); a Ctrl-C during it ends the exit at once
with the command's own code.

A Ctrl-C while a module is being imported is held until the import is over (retried every
50 ms): raised inside a compiled extension's initialization, the KeyboardInterrupt broke that
import instead (an ``ImportError: initialization failed`` traceback and exit 1 from scipy's, seen
in 1 of 40 interrupts during the set-up here; ``std::terminate`` and exit -6 from a pybind11
module's, seen in CI)."""

import atexit
import os
import signal
import sys
import threading

_RETRY_S = 0.05
_held = False  # a held SIGINT is waiting to be sent again


def _send_again() -> None:
    global _held
    _held = False  # before the signal: its handler may hold it once more
    os.kill(os.getpid(), signal.SIGINT)


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT's handler: KeyboardInterrupt where Python's own would raise it, except inside an
    import, where the signal is sent again a moment later (until no import is under way). Several
    Ctrl-Cs during one import are one interrupt, as one KeyboardInterrupt after it."""
    global _held
    f = frame
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            if not _held:
                _held = True
                retry = threading.Timer(_RETRY_S, _send_again)
                retry.daemon = True
                retry.start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def hold_interrupts_during_imports() -> None:
    """Install :func:`_interrupt` where SIGINT has Python's default handler (a job whose SIGINT
    is ignored, a shell's background job, keeps ignoring it)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def _leave(code: int) -> None:
    signal.signal(signal.SIGINT, lambda *_: os._exit(code))  # the work is done: nothing to stop
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads, as exit does first
    if shutdown is None:
        return  # another interpreter: the normal exit
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``trajstore info | head``)
            pass
    os._exit(code)


def main() -> int:
    hold_interrupts_during_imports()
    try:
        from trajstore.cli import main as cli_main
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line for a job of several processes
            print("trajstore: interrupted while starting (nothing was done); run the same command to resume",
                  file=sys.stderr)
        return 130
    try:
        code = cli_main()
    except SystemExit as e:  # argparse's --help and its errors
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    _leave(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
