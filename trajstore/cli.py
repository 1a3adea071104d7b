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
