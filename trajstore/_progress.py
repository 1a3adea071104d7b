"""Progress for loops and dask computations: a tqdm bar on a terminal (or in a notebook), short
periodic lines anywhere else (a log file, a pipe, CI), so a log never fills with carriage-return
redraws. Every progress display in ``trajstore`` and ``pipelines`` goes through :func:`progress_bar`.

On a non-terminal stream a line such as ``Gram pass (101 snapshots, 4 blocks): 12/40 tasks (30%),
8 s, ~19 s left`` is printed at most every ``TRAJSTORE_PROGRESS_INTERVAL`` seconds (default 10;
0 prints every update), and one more when the bar closes.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any

from dask.callbacks import Callback

__all__ = ["LineProgress", "ProgressCallback", "compute", "progress_bar"]

INTERVAL_ENV = "TRAJSTORE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
MAX_LINE = 160  # characters: a line a log viewer shows whole, with room for a prefix


def _interval() -> float:
    text = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(0.0, float(text)) if text else DEFAULT_INTERVAL
    except ValueError:  # a typo in a progress setting is not worth stopping a run for
        warnings.warn(f"{INTERVAL_ENV}={text!r} is not a number of seconds; using {DEFAULT_INTERVAL:g}", stacklevel=2)
        return DEFAULT_INTERVAL


def _interactive(stream: Any) -> bool:
    """A terminal, or an IPython kernel (a notebook, where tqdm.auto draws a widget)."""
    isatty = getattr(stream, "isatty", None)
    try:
        if isatty is not None and isatty():
            return True
    except ValueError:  # a closed stream
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


def _duration(seconds: float) -> str:
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class LineProgress:
    """The part of tqdm's interface the call sites use (``update``, ``set_postfix``, ``close``,
    iteration, ``with``), printing whole lines: one when created, at most one every ``interval``
    seconds as updates arrive, and one at :meth:`close`. Nothing is printed when ``disable``."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: float = 0, disable: bool = False, file: IO[str] | None = None,
                 interval: float | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self._initial = initial
        self.disable, self._closed = disable, False
        self._file = file
        self._interval = _interval() if interval is None else interval
        self._started = self._printed = time.monotonic()
        self._postfix = ""
        if not disable:  # a line when the work starts, as tqdm draws its bar at once
            self._write(self._line(self._started))

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in (self.iterable if self.iterable is not None else ()):
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        last = self.total is not None and self.n >= self.total  # close() prints that line
        if not self.disable and not last and now - self._printed >= self._interval:
            self._printed = now
            self._write(self._line(now))

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            self._write(self._line(time.monotonic(), final=True))

    def _line(self, now: float, final: bool = False) -> str:
        elapsed = now - self._started
        done = _count(self.n)
        if self.total:
            done += f"/{_count(self.total)} {self.unit}s ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}s"
        if final:
            finished = self.total is None or self.n >= self.total
            text = f"{self.desc}: {done}, {'done in' if finished else 'stopped after'} {_duration(elapsed)}"
        else:
            text = f"{self.desc}: {done}, {_duration(elapsed)}"
            if self.total and self.n > self._initial:
                left = elapsed / (self.n - self._initial) * (self.total - self.n)
                text += f", ~{_duration(left)} left"
        if self._postfix:
            text += f"; {self._postfix}"
        return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."

    def _write(self, line: str) -> None:
        stream = self._file if self._file is not None else sys.stderr
        stream.write(line + "\n")
        stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, unit: str, total: float | None = None,
                 initial: float = 0, disable: bool = False, file: IO[str] | None = None) -> Any:
    """A tqdm bar when ``file`` (default: ``sys.stderr``, where tqdm writes) is a terminal or a
    notebook, else a :class:`LineProgress`; use either as a tqdm bar: iterate, ``update``,
    ``set_postfix``, ``close``."""
    stream = file if file is not None else sys.stderr
    if _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=file)
    return LineProgress(iterable, desc=desc, unit=unit, total=total, initial=initial, disable=disable, file=file)


class ProgressCallback(Callback):
    """A progress bar (:func:`progress_bar`) over the tasks of a local dask computation."""

    def __init__(self, desc: str) -> None:
        super().__init__()
        self._desc = desc
        self._bar: Any = None

    def _start_state(self, dsk: Any, state: Any) -> None:
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = progress_bar(total=total, desc=self._desc, unit="task")

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _cluster_progress(futures: list[Any], desc: str) -> None:
    """distributed's own bar on a terminal (it draws on stdout); elsewhere :func:`progress_bar`,
    updated as each collection's result arrives."""
    if _interactive(sys.stdout):
        from distributed import progress

        print(desc, flush=True)
        progress(futures)
        return
    from distributed import wait

    with progress_bar(total=len(futures), desc=desc, unit="result") as bar:
        pending = list(futures)
        while pending:
            done, not_done = wait(pending, return_when="FIRST_COMPLETED")
            bar.update(len(done))
            pending = list(not_done)


def compute(objs: list[Any], *, client: Any = None, num_workers: int | None = None, desc: str | None = None) -> list[Any]:
    """Compute dask collections or delayed objects locally (threads) or on ``client``, in order,
    with a progress display if ``desc``."""
    import dask

    if client is not None:
        futures = client.compute(list(objs))
        if desc:
            _cluster_progress(futures, desc)
        return list(client.gather(futures))
    # The threaded scheduler's function, not the name "threads": a name makes dask import
    # dask.distributed to look for a default client (0.35 s per process, measured).
    from dask.threaded import get as threaded_get

    if desc:
        with ProgressCallback(desc):
            return list(dask.compute(*objs, scheduler=threaded_get, num_workers=num_workers))
    return list(dask.compute(*objs, scheduler=threaded_get, num_workers=num_workers))
