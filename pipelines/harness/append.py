"""Append throughput of a large model beside the raw write speed of the same disk.

    python benchmarks/append.py [--model wrn-40-10] [--appends 5] [--dir DIR] [--storage-dtype float32]
    (or: trajstore bench --suite append ...)

Each round, on the same folder and alternating so both see the same machine load:

- a durable append (``durable=True``: every chunk fsynced before the commit) vs a raw sequential
  write of one snapshot's bytes in 4 MiB pieces followed by ``fsync``: the disk's floor;
- a page-cache append (``durable=False``) vs the same raw write without fsync, after
  ``os.sync()`` so neither inherits the other's dirty pages;
- the peak RSS above the RSS before the durable append (VmHWM, reset before it); the maximum
  over rounds is reported (the first round, before the staging buffer exists).

The model's weights are perturbed between rounds. Medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from typing import Any

import torch

from trajstore import TrajectoryStore

from ..models import build_model
from . import suite_parser
from .measure import measure_peak, median, raw_write_speed, report_spread, write_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="wrn-40-10", help="model whose snapshots are appended (pipelines.models)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the model's last layer")
    parser.add_argument("--appends", type=int, default=5, help="rounds; medians over them are reported")
    parser.add_argument("--storage-dtype", default="float32", help="dtype of the store: float32, bfloat16 or float16")
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder in cwd)")
    parser.add_argument("--out", default="benchmarks/results/append.json", metavar="FILE", help="JSON result file")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:

    torch.manual_seed(0)
    model = build_model(args.model, args.classes)
    n = sum(p.numel() for p in model.parameters())
    nbytes = n * torch.tensor([], dtype=getattr(torch, args.storage_dtype)).element_size()
    work = Path(tempfile.mkdtemp(prefix="trajstore-append-", dir=args.dir or "."))
    print(f"{args.model}: n = {n:,} parameters, {nbytes / 2**20:.1f} MiB per {args.storage_dtype} snapshot, in {work}")
    try:
        durable = TrajectoryStore.create(work / "durable.zarr", model, storage_dtype=args.storage_dtype, durable=True)
        cached = TrajectoryStore.create(work / "cached.zarr", model, storage_dtype=args.storage_dtype, durable=False)
        rows = []
        for i in range(args.appends):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)
            os.sync()
            _, durable_s, extra = measure_peak(lambda: durable.append(model, step=i))
            raw_fsync = raw_write_speed(work, nbytes, fsync=True)
            os.sync()
            _, cached_s, _ = measure_peak(lambda: cached.append(model, step=i))
            os.sync()
            raw_cache = raw_write_speed(work, nbytes, fsync=False)
            row = {"durable_Bps": nbytes / durable_s, "raw_fsync_Bps": raw_fsync,
                   "cached_Bps": nbytes / cached_s, "raw_cache_Bps": raw_cache, "peak_extra_bytes": extra}
            rows.append(row)
            print(f"round {i + 1}/{args.appends}: durable append {row['durable_Bps'] / 1e6:6.0f} MB/s vs raw write+fsync "
                  f"{raw_fsync / 1e6:6.0f} MB/s | page-cache append {row['cached_Bps'] / 1e6:6.0f} MB/s vs raw write "
                  f"{raw_cache / 1e6:6.0f} MB/s | peak extra {extra / 2**20:5.0f} MiB", flush=True)
        durable.close()
        cached.close()
        med = {k: median([r[k] for r in rows]) for k in rows[0]}
        summary = {
            "model": args.model, "n": n, "storage_dtype": args.storage_dtype, "snapshot_MiB": nbytes / 2**20,
            "durable_append_MBps": med["durable_Bps"] / 1e6, "raw_write_fsync_MBps": med["raw_fsync_Bps"] / 1e6,
            "durable_vs_raw": med["durable_Bps"] / med["raw_fsync_Bps"],
            "cached_append_MBps": med["cached_Bps"] / 1e6, "raw_write_cache_MBps": med["raw_cache_Bps"] / 1e6,
            "cached_vs_raw": med["cached_Bps"] / med["raw_cache_Bps"],
            # The largest round, which is the first: later rounds reuse the staging buffer and
            # the allocator's free pages, so their VmHWM barely moves.
            "peak_extra_MiB": max(r["peak_extra_bytes"] for r in rows) / 2**20,
            "peak_extra_vs_snapshot": max(r["peak_extra_bytes"] for r in rows) / nbytes,
        }
        warning = report_spread("durable append / raw write+fsync", [r["durable_Bps"] / r["raw_fsync_Bps"] for r in rows],
                                advice="rerun or add --appends")
        print(f"\nmedians over {args.appends} rounds:")
        for key, value in summary.items():
            print(f"  {key:24s} {value:,.3f}" if isinstance(value, float) else f"  {key:24s} {value}")
        write_result(Path(args.out), {"summary": summary, "rounds": rows, "args": vars(args),
                                      **({"warning": warning} if warning else {})})
        print(f"wrote {args.out}")
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
