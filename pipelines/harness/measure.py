"""Measurement helpers shared by the benchmark harness: memory peaks, disk speed, medians, results."""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.atomic import save_json

__all__ = ["SPREAD_LIMIT", "PeakMemory", "available_bytes", "drop_caches", "du", "measure_peak", "median",
           "peak_rss_bytes", "raw_write_speed", "report_spread", "reset_peak", "rss_bytes", "spread_warning",
           "write_result"]

# max / min of a figure's repeated measurements above which it is reported as noisy: beyond it
# the machine's load, not the code, decides the median (issue #15: the same x SGD figure read
# 7.7x in one run of trajstore bench and 1.05x in the next, on a shared 2-core machine).
SPREAD_LIMIT = 1.5


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status_field(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    return _status_field("VmHWM")


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """(result, seconds, peak RSS above the RSS at the start) of one call."""
    base = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, max(0, peak_rss_bytes() - base)


def raw_write_speed(directory: Path, nbytes: int, *, block: int = 4 * 2**20, fsync: bool = True) -> float:
    """Bytes per second of a sequential write of ``nbytes`` in ``block`` pieces (+ fsync)."""
    path = directory / f".rawwrite-{os.getpid()}"
    buf = np.random.default_rng(0).integers(0, 255, size=block, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            written += f.write(buf[: min(block, nbytes - written)])
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread_warning(figure: str, runs: list[float], *, limit: float = SPREAD_LIMIT,
                   advice: str = "rerun or add --rounds") -> str | None:
    """A warning when the repeated measurements ``runs`` of ``figure`` spread by more than
    ``limit`` (max / min), else None: the median of such runs says more about the machine's
    load than about the code."""
    if len(runs) < 2 or min(runs) <= 0 or max(runs) / min(runs) <= limit:
        return None
    return (f"{figure}: figures spread {min(runs):.2f}-{max(runs):.2f} between runs "
            f"({max(runs) / min(runs):.1f}x): the machine is noisy; {advice}")


def report_spread(figure: str, runs: list[float], *, advice: str = "rerun or add --rounds") -> str | None:
    """:func:`spread_warning`, also printed to stderr when there is one."""
    warning = spread_warning(figure, runs, advice=advice)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return warning


def gemm_rate(t: int) -> float:
    """The machine's best float64 rate, in flop/s, for a Gram-pass product (t x 65,536 by its
    transpose): the fastest of 5 timings of at least 0.2 s each (a floor is what the machine can do)."""
    x = np.random.default_rng(0).standard_normal((t, 1 << 16))
    x @ x.T
    best = 0.0
    for _ in range(5):
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < 0.2 or reps == 0:
            x @ x.T
            reps += 1
        best = max(best, 2 * t * t * x.shape[1] * reps / elapsed)
    return best


def write_result(path: Path, result: dict[str, Any]) -> None:
    from pipelines.provenance import provenance

    path.parent.mkdir(parents=True, exist_ok=True)
    save_json({**result, "provenance": provenance()}, path)


def _status() -> dict[str, int]:
    """VmRSS, VmHWM and, as ``RssAnon``, the memory no file backs: anonymous pages plus shared
    anonymous ones (``RssShmem``: the DLDR passes read into shared anonymous maps)."""
    out = {"RssAnon": 0}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
            elif key in ("RssAnon", "RssShmem"):
                out["RssAnon"] += int(value.split()[0]) * 1024
    return out


class PeakMemory:
    """Peak RSS (the kernel's VmHWM, reset at entry) and sampled peak RssAnon of this process."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = _status()
        self.peak_anon = self.start.get("RssAnon", 0)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_anon = max(self.peak_anon, _status().get("RssAnon", 0))

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = _status()
        self.peak_rss = now["VmHWM"]
        self.peak_anon = max(self.peak_anon, now.get("RssAnon", 0))

    def to_json(self) -> dict[str, int]:
        return {"baseline_rss_bytes": self.start["VmRSS"], "baseline_anon_bytes": self.start.get("RssAnon", 0),
                "peak_rss_bytes": self.peak_rss, "peak_anon_bytes": self.peak_anon}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
