"""A child process for the fencing tests: a writer that can be paused at a chosen store call.

    python tests/_fenced_writer.py URL --tag A --count C --ttl T [--stop OP KEY AT] [--stop-call NAME AT]

Opens the trajectory of URL for appending (through a FaultyStore over Zarr's FsspecStore for a
``local://`` URL, so every store call can be paused; directly for a plain folder), prints
"ready <len>", then appends C snapshots, snapshot k holding ``pattern(k) + 100 * tag`` and
recording ``step = k`` and ``metrics = {"tag": tag}``; prints "committed <k>" after each. With
``--stop``, the process sends itself SIGSTOP before the AT-th store call OP on keys matching KEY;
with ``--stop-call``, before the AT-th call of one of the local folder's direct writers
(``write_chunk_file``, ``fsync_path``, ``write_json_atomic``), which a store wrapper cannot see.
Exits 0 when done, 3 with "conflict: ..." on a WriterConflictError.
"""

from __future__ import annotations

import argparse
import sys

import torch

from _writer_process import Flat, pattern
from trajstore import TrajectoryStore
from trajstore.errors import WriterConflictError
from trajstore.testing import Fault, FaultyStore

TAGS = {"X": 0, "A": 1, "B": 2}


def tagged(model: Flat, k: int, tag: str) -> None:
    values = torch.from_numpy(pattern(k, sum(p.numel() for p in model.ps)) + 100 * TAGS[tag])
    with torch.no_grad():
        offset = 0
        for p in model.ps:
            p.copy_(values[offset:offset + p.numel()])
            offset += p.numel()
        model.counter.fill_(k + 1000 * TAGS[tag])


def open_store(url: str, ttl: float, plan: list[Fault]) -> TrajectoryStore:
    if url.startswith("local://"):
        from trajstore._backend import open_zarr_store

        inner = open_zarr_store(url, read_only=False, storage_options={"auto_mkdir": True})
        faulty = FaultyStore(inner, plan)
        faulty.enabled = False
        store = TrajectoryStore.open(faulty, "a", lease_ttl=ttl)  # type: ignore[arg-type]
        faulty.enabled = True  # calls count from the first one after opening
        return store
    return TrajectoryStore.open(url, "a", lease_ttl=ttl)


def _stop_at_call(name: str, at: int) -> None:
    """SIGSTOP this process before the at-th call of a direct local writer (counted from now)."""
    import os
    import signal

    from trajstore import _backend, _io

    module = _backend if name == "write_chunk_file" else _io
    real = getattr(module, name)
    calls = [0]

    def paused(*args: object, **kw: object) -> object:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(*args, **kw)

    setattr(module, name, paused)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--tag", default="A")
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--stop", nargs=3, default=None)
    parser.add_argument("--stop-call", nargs=2, default=None)
    args = parser.parse_args()
    plan = [Fault(args.stop[0], args.stop[1], "stop", at=int(args.stop[2]))] if args.stop else []
    store = open_store(args.url, args.ttl, plan)
    n = store.n
    model = Flat(n)
    if args.stop_call:
        _stop_at_call(args.stop_call[0], int(args.stop_call[1]))
    print(f"ready {len(store)}", flush=True)
    try:
        for _ in range(args.count):
            k = len(store)
            tagged(model, k, args.tag)
            store.append(model, step=k, metrics={"tag": float(TAGS[args.tag])})
            print(f"committed {k}", flush=True)
    except WriterConflictError as e:
        print(f"conflict: {e}", flush=True)
        return 3
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
