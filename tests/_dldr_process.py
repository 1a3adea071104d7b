"""Child process for the kill tests of the Gram and basis passes.

    python tests/_dldr_process.py STORE gram|basis --block-bytes B [--delay SECONDS]

Runs one pass on its own (``gram``: the cached Gram matrix of every snapshot; ``basis``: the d = 4
basis, the Gram matrix being cached already) with each block slowed down by ``--delay`` seconds,
so that a kill lands inside the pass. The slowdown wraps the block function and changes no number.
Prints ``started`` before the pass and ``done SECONDS`` after it.
"""

from __future__ import annotations

import argparse
import importlib
import time

from trajstore import TrajectoryStore

# The module itself: the package's attribute ``trajstore.dldr`` is the function of that name.
dldr_module = importlib.import_module("trajstore.dldr")

D = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("job", choices=["gram", "basis"])
    parser.add_argument("--block-bytes", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()

    name = "_gram_task" if args.job == "gram" else "_basis_task"
    original = getattr(dldr_module, name)

    def slowed(*a, **kw):  # type: ignore[no-untyped-def]
        time.sleep(args.delay)
        return original(*a, **kw)

    setattr(dldr_module, name, slowed)
    store = TrajectoryStore.open(args.store)
    print("started", flush=True)
    began = time.perf_counter()
    if args.job == "gram":
        dldr_module.gram_matrix(store, block_bytes=args.block_bytes, num_workers=2, progress=True)
    else:
        dldr_module.dldr(store, D, block_bytes=args.block_bytes, num_workers=2, progress=True)
    print(f"done {time.perf_counter() - began:.3f}", flush=True)


if __name__ == "__main__":
    main()
