"""The Gram pass on dask.distributed workers started with and without a nanny, beside the local
threaded scheduler.

    python benchmarks/dask_workers.py [--size 4M] [--t 41] [--threads 2] [--rounds 3]

A nanny starts its worker with ``OPENBLAS_NUM_THREADS=1`` (and the like); ``dask worker
--no-nanny`` does not, so BLAS starts its own threads under every task thread. Each Gram and
basis task now holds BLAS to one thread itself (:mod:`trajstore._blas`). Per round and kind
(kinds interleaved round by round): a scheduler and one worker of ``threads`` threads started as
real processes on 127.0.0.1 (the parent's ``*_NUM_THREADS`` removed from their environment),
``gram_matrix(store, client=..., cache=False)`` timed, the worker's BLAS threads read before and
after, the processes stopped by pid. The figure to compare is the median no-nanny / nanny ratio
(this machine is shared).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import suite_parser
from .basis import SIZES, build_store
from .measure import median, write_result

KINDS = ("nanny", "no-nanny", "threaded")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _blas_threads() -> list[int]:
    import threadpoolctl

    return [int(x["num_threads"]) for x in threadpoolctl.threadpool_info() if x["user_api"] == "blas"]


def _start(nanny: bool, threads: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], **quiet)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                               "--nthreads", str(threads), "--host", "127.0.0.1", "--no-dashboard",
                               "--nanny" if nanny else "--no-nanny"], **quiet)
    return f"tcp://127.0.0.1:{port}", [worker, scheduler]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(kind: str, store: Any, threads: int) -> dict[str, Any]:
    from trajstore import gram_matrix

    if kind == "threaded":
        started = time.perf_counter()
        gram_matrix(store, cache=False)
        return {"seconds": time.perf_counter() - started}
    from distributed import Client

    address, procs = _start(kind == "nanny", threads)
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            before = next(iter(client.run(_blas_threads).values()))
            started = time.perf_counter()
            gram_matrix(store, client=client, cache=False)
            seconds = time.perf_counter() - started
            after = next(iter(client.run(_blas_threads).values()))
    finally:
        _stop(procs)
    return {"seconds": seconds, "blas_threads_before": before, "blas_threads_after": after}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="4M", choices=sorted(SIZES), help="parameters")
    parser.add_argument("--t", type=int, default=41, help="snapshots")
    parser.add_argument("--threads", type=int, default=2, help="threads of the worker")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, kinds interleaved (median)")
    parser.add_argument("--folder", default=None, help="where the store is built (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "benchmarks" / "results"
                                             / "dask_workers.json"), metavar="FILE", help="JSON result file")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trajstore import TrajectoryStore

    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "gram.zarr"
        build_store(args.size, args.t, path)
        rows: list[dict[str, Any]] = []
        with TrajectoryStore.open(path) as store:
            for r in range(args.rounds):
                for kind in KINDS:
                    row = {"round": r, "kind": kind, **measure(kind, store, args.threads)}
                    rows.append(row)
                    print(f"  round {r + 1}/{args.rounds} {kind:9s} {row['seconds']:6.2f} s"
                          + (f"  BLAS threads on the worker: {row['blas_threads_before']} before, "
                             f"{row['blas_threads_after']} after" if kind != "threaded" else ""), flush=True)
    medians = {k: median([r["seconds"] for r in rows if r["kind"] == k]) for k in KINDS}
    result = {"config": vars(args), "rows": rows, "median_seconds": medians,
              "ratio_no_nanny_to_nanny": medians["no-nanny"] / medians["nanny"]}
    print(f"median seconds: {medians}; no-nanny / nanny = {result['ratio_no_nanny_to_nanny']:.2f}")
    write_result(Path(args.out), result)
    return result
