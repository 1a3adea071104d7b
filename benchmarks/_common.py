"""Measurement helpers shared by the benchmarks: peak memory, the disk's raw speed, medians."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _status(field: str) -> int:
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
    return _status("VmHWM")


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


def write_result(path: Path, result: dict[str, Any]) -> None:
    from pipelines.provenance import provenance

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, "provenance": provenance()}, indent=2))
