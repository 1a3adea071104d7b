"""The ``trajstore`` command line. Argument parsing and printing only; the work is in the library
and, for whole experiments, in ``pipelines/`` (imported lazily)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import TrajstoreError

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2) if args.json else format_info(info, max_rows=args.rows))
    return 0


def _client(args: argparse.Namespace) -> object:
    if args.scheduler:
        from distributed import Client

        return Client(args.scheduler)
    if args.workers:
        from distributed import Client, LocalCluster

        return Client(LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None))
    return None


def _cmd_basis(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .dldr import dldr
    from .plots import plot_basis

    client = _client(args)
    try:
        basis = dldr(args.store, args.dim, start=args.start, stop=args.stop, trajectory=args.trajectory,
                     client=client, name=args.name, block_bytes=int(args.block_mb * 2**20),
                     overwrite=args.overwrite, progress=True)
    finally:
        if client is not None:
            client.close()
    print(basis)
    evr = basis.explained_variance_ratio
    print(f"explained variance: top 1 {evr[0]:.4f}, top 5 {evr[:5].sum():.4f}, top {basis.d} {evr.sum():.4f}; "
          f"max residual {basis.residuals().max():.4f}; max|UᵀU - I| = {basis.orthonormality:.2e}")
    if "://" not in str(args.store):
        store = Path(os.fspath(args.store)).resolve()
        png = plot_basis(basis, store.parent / f"{store.name.removesuffix('.zarr')}.{basis.name}.png")
        print(f"wrote {png}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines import run_experiment

    run_experiment(args.experiment, out=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="trajstore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trajstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list the trajectories of a store")
    info.add_argument("store", help="store folder or fsspec URL")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--rows", type=int, default=12, help="snapshots shown per trajectory (default 12)")
    info.set_defaults(func=_cmd_info)

    basis = sub.add_parser("basis", help="compute the DLDR basis of a window of a trajectory")
    basis.add_argument("store", help="store folder or fsspec URL")
    basis.add_argument("--dim", type=int, default=40, help="number of directions d (default 40)")
    basis.add_argument("--start", type=int, default=0, help="first snapshot of the window (default 0)")
    basis.add_argument("--stop", type=int, default=None, help="end of the window, exclusive (default: all)")
    basis.add_argument("--trajectory", default=None, help="trajectory name (when the store holds several)")
    basis.add_argument("--name", default=None, help="basis name (default TRAJECTORY-START-STOP-dD)")
    basis.add_argument("--block-mb", type=float, default=256, help="float32 MiB per block of all snapshots")
    basis.add_argument("--overwrite", action="store_true", help="recompute even if the basis exists")
    where = basis.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="start a local dask.distributed cluster of N processes")
    where.add_argument("--scheduler", default=None, help="address of a running dask.distributed scheduler")
    basis.set_defaults(func=_cmd_basis)

    run = sub.add_parser("run", help="run a whole experiment end to end")
    run.add_argument("experiment", help="experiment name (e.g. 'demo')")
    run.add_argument("--out", default=None, help="run folder (default runs/EXPERIMENT)")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TrajstoreError as e:
        print(f"trajstore: error: {e}", file=sys.stderr)
        return 2
