"""A child process for the crash and concurrency tests: appends pattern snapshots to a store.

Snapshot k of the pattern holds ``k + (arange(n) % 1009) / 1024`` (exact in float32), so a
reader can check any snapshot bit for bit without knowing how it was written.

    python tests/_writer_process.py STORE --n N --chunk-bytes B [--count C] [--pause S]

Creates the store if needed, prints "ready <len>" once open, then appends snapshots
len, len+1, ... (forever unless --count), printing "committed <k>" after each.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from trajstore import TrajectoryStore
from trajstore.errors import NotAStoreError, TrajectoryNotFoundError


def pattern(k: int, n: int) -> np.ndarray:
    return (k + (np.arange(n) % 1009) / 1024).astype(np.float32)


class Flat(nn.Module):
    """Three parameters of n // 2, n // 4 and the rest, with a BatchNorm-like int buffer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        sizes = [n // 2, n // 4, n - n // 2 - n // 4]
        self.ps = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in sizes)
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def set_snapshot(self, k: int) -> None:
        values = torch.from_numpy(pattern(k, sum(p.numel() for p in self.ps)))
        with torch.no_grad():
            offset = 0
            for p in self.ps:
                p.copy_(values[offset:offset + p.numel()])
                offset += p.numel()
            self.counter.fill_(k)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, default=2**17)
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    model = Flat(args.n)
    try:
        store = TrajectoryStore.open(args.store, "a")
    except (NotAStoreError, TrajectoryNotFoundError):
        store = TrajectoryStore.create(args.store, model, chunk_bytes=args.chunk_bytes)
    print(f"ready {len(store)}", flush=True)
    k = len(store)
    while args.count is None or k < args.count:
        model.set_snapshot(k)
        store.append(model, step=k, epoch=k, metrics={"k": float(k)})
        print(f"committed {k}", flush=True)
        k += 1
        if args.pause:
            time.sleep(args.pause)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
