"""What a commit costs as a trajectory grows, and for a model of many small tensors.

    python benchmarks/commit_cost.py [--snapshots 10000] [--window 50] [--tensors 50000] [--rounds 7]

1. **Commit cost vs t** (a 20-parameter model, durable appends on a local folder): the median
   time of ``window`` appends from snapshot 10 on, and of ``window`` appends from snapshot
   ``snapshots`` on, on the same store (filled in between with non-durable appends); the goal is
   a ratio <= 1.5 (format 1 rewrote every record per commit: 16x at 2,000). Also the time to open
   the store for reading at each size.
2. **Many small tensors** (``tensors`` scalar parameters, ``4 * tensors`` bytes): the median
   append time beside writing the model's bytes the plainest way, ``parameters_to_vector`` then
   one file write, interleaved round by round; durable (append with fsync vs write + fsync) and
   page-cache (append without fsync vs write without fsync). The goal: within 3x.

Medians over rounds; the machine is shared, so ratios are of runs made side by side.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trajstore import TrajectoryStore

from . import suite_parser
from .measure import median, write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshots", type=int, default=10_000, help="length at which the late commits are timed")
    parser.add_argument("--window", type=int, default=50, help="commits timed early and late (medians)")
    parser.add_argument("--tensors", type=int, default=50_000, help="scalar parameters of the many-tensors model")
    parser.add_argument("--rounds", type=int, default=7, help="appends of the many-tensors model timed (median)")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder in cwd)")
    parser.add_argument("--out", default="benchmarks/results/commit_cost.json", metavar="FILE", help="JSON result file")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


class _Scalars(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(())) for _ in range(count))


def _timed_appends(store: TrajectoryStore, model: torch.nn.Module, count: int) -> list[float]:
    times = []
    for _ in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        start = time.perf_counter()
        store.append(model, step=len(store))
        times.append(time.perf_counter() - start)
    return times


def commit_vs_t(work: Path, snapshots: int, window: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)  # 20 parameters
    path = work / "tiny.zarr"
    TrajectoryStore.create(path, model).close()
    with TrajectoryStore.open(path, "a", durable=False) as store:
        _timed_appends(store, model, 10)
    with TrajectoryStore.open(path, "a") as store:
        early = _timed_appends(store, model, window)
    started = time.perf_counter()
    with TrajectoryStore.open(path, "a", durable=False) as store:
        while len(store) < snapshots:
            _timed_appends(store, model, min(1000, snapshots - len(store)))
            print(f"  filled to {len(store):,} snapshots ({time.perf_counter() - started:.0f} s)", flush=True)
    with TrajectoryStore.open(path, "a") as store:
        late = _timed_appends(store, model, window)
    start = time.perf_counter()
    reader = TrajectoryStore.open(path)
    open_seconds = time.perf_counter() - start
    out = {"early_start": 10, "late_start": snapshots, "window": window,
           "early_median_ms": 1e3 * median(early), "late_median_ms": 1e3 * median(late),
           "ratio": median(late) / median(early), "open_seconds_at_end": open_seconds, "t_end": len(reader)}
    print(f"commit cost: {out['early_median_ms']:.2f} ms at snapshot 10, {out['late_median_ms']:.2f} ms at "
          f"{snapshots:,}: ratio {out['ratio']:.2f} (goal <= 1.5); open at t = {len(reader):,}: {open_seconds:.2f} s")
    return out


def _write_bytes(path: Path, model: torch.nn.Module, fsync: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        data = torch.nn.utils.parameters_to_vector(model.parameters()).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def many_tensors(work: Path, tensors: int, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Scalars(tensors)
    out: dict[str, Any] = {"tensors": tensors, "bytes": 4 * tensors}
    for durable in (True, False):
        path = work / f"many-{durable}.zarr"
        appends, raws = [], []
        with TrajectoryStore.create(path, model, durable=durable) as store:
            store.append(model)  # warm: staging buffer, writer threads
            for _ in range(rounds):
                appends += _timed_appends(store, model, 1)
                raws.append(_write_bytes(work / "raw.bin", model, fsync=durable))
        key = "durable" if durable else "page_cache"
        out[key] = {"append_ms": 1e3 * median(appends), "write_bytes_ms": 1e3 * median(raws),
                    "ratio": median(appends) / median(raws)}
        print(f"{tensors:,} tensors ({4 * tensors / 1e3:.0f} kB), {key}: append {out[key]['append_ms']:.1f} ms, "
              f"writing its bytes {out[key]['write_bytes_ms']:.1f} ms: ratio {out[key]['ratio']:.2f} (goal <= 3)")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="trajstore-commit-", dir=args.dir or "."))
    try:
        result = {"config": vars(args), "commit_vs_t": commit_vs_t(work, args.snapshots, args.window),
                  "many_tensors": many_tensors(work, args.tensors, args.rounds)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(Path(args.out), result)
    print(f"wrote {args.out}")
    return result
