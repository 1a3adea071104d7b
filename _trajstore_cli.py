"""The ``trajstore`` command's entry point, outside the package so that a Ctrl-C while the
package and its dependencies are still being imported (a second or two) also ends in one line
and exit 130, not a traceback. Everything else is :func:`trajstore.cli.main`.

Once the command has finished, the process leaves without the interpreter's teardown: freeing
the objects of torch, matplotlib and dask and unloading their libraries took 2.0 s after
``trajstore run demo`` on 2 cores (0.7 s after ``import torch`` alone), time in which a Ctrl-C
killed the finished command without a word. What a normal exit does that matters runs first
(threads joined, ``atexit`` handlers, output flushed); a Ctrl-C during it ends the exit at once
with the command's own code."""

import atexit
import os
import signal
import sys
import threading


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
