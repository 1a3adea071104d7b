"""Durable append throughput of two checkouts of trajstore, side by side (A/B, interleaved).

    python benchmarks/append_ab.py OLD_TREE NEW_TREE [--model wrn-40-10] [--rounds 3]

Each round runs one fresh process per tree (old first, then new): build the model, create a
durable store in this folder, append 4 snapshots and report the median MB/s of appends 2-4 (the
first pays for the staging buffer and the writer threads). Rounds alternate, so both trees see
the same machine load; the medians over rounds and their ratio are written to
benchmarks/results/append_ab.json. Used to check that a change of the write path or the commit
format does not slow the append of a large model (git worktree add /tmp/old HEAD~1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time, tempfile, shutil, json
import torch
sys.path.insert(0, sys.argv[1])
from trajstore import TrajectoryStore
from pipelines.models import build_model
torch.manual_seed(0)
m = build_model(sys.argv[2], 100)
nbytes = sum(p.numel() for p in m.parameters()) * 4
d = tempfile.mkdtemp(dir=".")
try:
    s = TrajectoryStore.create(d + "/s.zarr", m, durable=True)
    times = []
    for k in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.001)
        t = time.perf_counter(); s.append(m, step=k); times.append(time.perf_counter() - t)
    s.close()
    print(json.dumps({"MBps": nbytes / sorted(times[1:])[1] / 1e6}))
finally:
    shutil.rmtree(d)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--model", default="wrn-40-10")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/append_ab.json")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for which in ("old", "new"):
            out = subprocess.run([sys.executable, "-c", CHILD, getattr(args, which), args.model],
                                 check=True, capture_output=True, text=True).stdout
            runs[which].append(json.loads(out.strip().splitlines()[-1])["MBps"])
            print(f"round {r + 1}/{args.rounds} {which}: {runs[which][-1]:.0f} MB/s", flush=True)
    result = {"model": args.model, "old": args.old, "new": args.new, "runs_MBps": runs,
              "median_old_MBps": statistics.median(runs["old"]), "median_new_MBps": statistics.median(runs["new"])}
    result["new_vs_old"] = result["median_new_MBps"] / result["median_old_MBps"]
    print(f"median durable append: old {result['median_old_MBps']:.0f} MB/s, new {result['median_new_MBps']:.0f} MB/s, "
          f"new/old {result['new_vs_old']:.2f}")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.harness.measure import write_result

    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
