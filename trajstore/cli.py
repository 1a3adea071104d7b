"""The ``trajstore`` command line. Argument parsing and printing only; the work is in the library
and, for whole experiments, in ``pipelines/`` (imported lazily)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import TrajstoreError

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, store_info

    info = store_info(args.store, storage_options=args.storage_options)
    print(json.dumps(info, indent=2) if args.json else format_info(info, max_rows=args.rows))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import format_report, verify

    report = verify(args.store, storage_options=args.storage_options, sources=not args.no_sources,
                    progress=not args.json)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


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
                     overwrite=args.overwrite, progress=True, storage_options=args.storage_options)
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


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"trajstore: --set takes KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines import run_experiment

    run_experiment(args.experiment, out=args.out, seed=args.seed, seeds=args.seeds, overrides=_overrides(args.set))
    return 0


_SAMPLE_FLAGS = ("data", "data_root", "model", "optimizer", "lr", "epochs", "sample_epochs", "snapshot_every",
                 "batch_size", "storage_dtype", "device", "label_noise")


def _cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines import experiment_config
    from pipelines.experiment import sample

    flags = {k: str(v) for k, v in vars(args).items() if k in _SAMPLE_FLAGS and v is not None}
    if args.optimizer == "adam" and args.lr is None:
        flags["lr"] = "0.001"  # the paper's Adam learning rate
    cfg = experiment_config(args.experiment).with_overrides(**flags, **_overrides(args.set), seed=args.seed, out=args.out)
    result = sample(cfg, Path(args.out), args.seed)
    from pipelines import ranks

    if not ranks.is_main():
        return 0
    last = result["history"][-1]
    over = result["sampling"]
    print(f"{result['snapshots']} snapshots in {Path(args.out) / 'trajectory.zarr'}; {cfg.optimizer.upper()} "
          f"{cfg.epochs} epochs: test accuracy {last['test_acc']:.2f}%; sampling cost the training loop "
          f"{over['overhead_seconds']:.2f} s ({over['overhead_fraction']:.2%} of {result['train_seconds']:.1f} s), "
          f"the writer {over['write_seconds']:.2f} s in the background")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from pipelines.experiment import check_store_model, config_from_store, train_subspace

    from .basis import open_basis
    from .dldr import dldr
    from .errors import InvalidStoreError
    from .store import TrajectoryStore

    options = args.storage_options
    if "://" in str(args.store) and not args.out:  # results are local files, next to a local store
        raise ValueError(f"the store {args.store} is at a URL: say where the results go with --out FOLDER")
    with TrajectoryStore.open(args.store, trajectory=args.trajectory, storage_options=options) as store:
        attrs, trajectory, layout = store.attrs, store.name, store.layout
    recorded = attrs.get("experiment")
    flags = {k: str(v) for k, v in vars(args).items() if k in ("data", "data_root", "model", "device") and v is not None}
    if recorded is None and not {"data", "model"} <= set(flags):
        raise SystemExit(f"trajstore train: {args.store} was not recorded by 'trajstore sample'; "
                         "say which --data and --model it holds")
    # A store's attrs are input like any file's: checked (types, ranges, a known model of the
    # store's size, built on the meta device) before a model, a basis or a data set is made from them.
    cfg = config_from_store({} if recorded is None else recorded).with_overrides(**flags)
    seed = attrs.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise InvalidStoreError(f"the store's attribute seed = {seed!r:.100} is not an integer in [0, 2**63)")
    check_store_model(cfg, layout)
    from pipelines import ranks

    if args.basis:
        basis = open_basis(args.store, args.basis, storage_options=options)
    else:
        if ranks.is_main():  # rank 0 computes; the others find it complete
            dldr(args.store, args.dim, start=args.start, stop=args.stop, trajectory=trajectory, progress=True,
                 storage_options=options)
        ranks.barrier()
        basis = dldr(args.store, args.dim, start=args.start, stop=args.stop, trajectory=trajectory,
                     progress=ranks.is_main(), storage_options=options)
    folder = Path(args.out) if args.out else Path(os.fspath(args.store)).resolve().parent
    tag = f"train-{args.optimizer}-{basis.name}-e{args.epochs}-b{args.batch_size}"
    result = train_subspace(cfg, folder, seed, args.optimizer, basis, epochs=args.epochs,
                            batch_size=args.batch_size, tag=tag, store=args.store, storage_options=options)
    last = result["history"][-1] if result["history"] else {"test_acc": float("nan")}
    if not ranks.is_main():
        return 0
    print(f"{args.optimizer} in {basis.name} ({basis.d}-D, window [{basis.start}, {basis.stop})): "
          f"{args.epochs} epochs, test accuracy {last['test_acc']:.2f}%; wrote {folder / (tag + '.json')}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from pipelines.models import resolve_model

    from .layout import Layout
    from .plan import activation_bytes, format_plan, plan

    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    with torch.device("meta"):  # shapes only: nothing is allocated, whatever the model's size
        model, shape = resolve_model(args.model, shape)
    acts = activation_bytes(model, shape, args.batch) if args.batch and shape else 0
    result = plan(Layout.from_model(model, allow_meta=True), args.snapshots, args.dim, storage_dtype=args.storage_dtype,
                  device=args.device, workers=args.workers, activations=acts)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pipelines import bench

    return bench.run(args)


_PYTHON_WORDS: dict[str, Any] = {"True": True, "False": False, "None": None}


def _set_option(options: dict[str, Any], pair: str) -> None:
    """Put ``KEY=VALUE`` into ``options``: VALUE parsed as JSON when it parses (``true``,
    ``1``, ``{"endpoint_url": "..."}``; Python's ``True``, ``False`` and ``None`` too), else kept as
    text; a dotted KEY (``client_kwargs.endpoint_url``) sets a key of a nested dict. ValueError
    on a pair without ``=``, an empty key, or a key given twice."""
    key, sep, text = pair.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise ValueError(f"takes KEY=VALUE (KEY may be dotted, as in client_kwargs.endpoint_url=URL), got {pair!r}")
    value: Any
    if text in _PYTHON_WORDS:
        value = _PYTHON_WORDS[text]
    else:
        try:
            value = json.loads(text)
        except ValueError:
            value = text
    where = options
    for i, part in enumerate(path[:-1]):
        where = where.setdefault(part, {})
        if not isinstance(where, dict):
            raise ValueError(f"{'.'.join(path[:i + 1])} is {where!r:.80}, not a dict: it cannot take {key.strip()}")
    _merge(where, path[-1], value, key.strip())


def _merge(into: dict[str, Any], key: str, value: Any, name: str) -> None:
    """``into[key] = value``; dicts are merged key by key (``client_kwargs={...}`` and
    ``client_kwargs.region_name=...``), and a value set twice is a ValueError."""
    if key not in into:
        into[key] = value
    elif isinstance(into[key], dict) and isinstance(value, dict):
        for k, v in value.items():
            _merge(into[key], k, v, f"{name}.{k}")
    else:
        raise ValueError(f"{name} is given twice")



class _StorageOption(argparse.Action):
    """``--storage-option KEY=VALUE``, repeatable, gathered into one dict (see :func:`_set_option`);
    bad syntax is an argparse error (exit 2)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        options = dict(getattr(namespace, self.dest) or {})
        try:
            _set_option(options, str(values))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, options)


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", dest="storage_options", action=_StorageOption, default=None,
                        metavar="KEY=VALUE",
                        help="an option of the URL's fsspec file system, repeatable; VALUE is JSON when it parses, "
                             "a dotted KEY sets a nested one: --storage-option anon=true, "
                             "--storage-option client_kwargs.endpoint_url=http://127.0.0.1:9000")


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run on N local processes sharing each global batch (torch.distributed: gloo on "
                             "CPU, nccl on GPU; default 1); the same as torchrun --standalone --nproc-per-node N -m trajstore ...")


def _in_job(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Start the N processes of ``--nproc N`` (the exit code), or join the job this process is a
    rank of (None: go on and run the command)."""
    import os

    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise SystemExit(f"trajstore: error: --nproc must be >= 1, got {nproc}")
    if "WORLD_SIZE" not in os.environ:
        if nproc == 1:
            return None
        if getattr(args, "experiment", None) == "demo":
            raise SystemExit("trajstore: error: the demo runs on one process; leave out --nproc")
        from .launch import spawn

        return spawn(["-m", "trajstore", *_without_nproc(argv)], nproc)
    import torch

    from .launch import init_from_env

    device = getattr(args, "device", None) or _overrides(getattr(args, "set", [])).get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    init_from_env(device)
    return None


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="trajstore", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trajstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list the trajectories of a store")
    info.add_argument("store", help="store folder or fsspec URL")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--rows", type=int, default=12, help="snapshots shown per trajectory (default 12)")
    _add_storage_option(info)
    info.set_defaults(func=_cmd_info)

    verify_ = sub.add_parser("verify", help="check every chunk, commit and basis of a store (exit 1 if damaged, 2 if unreachable)")
    verify_.add_argument("store", help="store folder or fsspec URL")
    verify_.add_argument("--json", action="store_true", help="print the report as JSON")
    verify_.add_argument("--no-sources", action="store_true",
                         help="skip checking each basis against its window's snapshots (one pass per basis)")
    _add_storage_option(verify_)
    verify_.set_defaults(func=_cmd_verify)

    basis = sub.add_parser("basis", help="compute the DLDR basis of a window of a trajectory")
    basis.add_argument("store", help="store folder or fsspec URL")
    basis.add_argument("--dim", type=int, default=40, help="number of directions d (default 40)")
    basis.add_argument("--start", type=int, default=0, help="first snapshot of the window (default 0)")
    basis.add_argument("--stop", type=int, default=None, help="end of the window, exclusive (default: all)")
    basis.add_argument("--trajectory", default=None, help="trajectory name (when the store holds several)")
    basis.add_argument("--name", default=None, help="basis name (default TRAJECTORY-START-STOP-dD)")
    basis.add_argument("--block-mb", type=float, default=256, help="float32 MiB per block of all snapshots")
    basis.add_argument("--overwrite", action="store_true", help="recompute even if the basis exists")
    _add_storage_option(basis)
    where = basis.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="start a local dask.distributed cluster of N processes")
    where.add_argument("--scheduler", default=None, help="address of a running dask.distributed scheduler")
    basis.set_defaults(func=_cmd_basis)

    sample = sub.add_parser("sample", help="train with SGD or Adam, recording the trajectory into a store")
    sample.add_argument("out", help="folder for the store (OUT/trajectory.zarr) and the run's record")
    sample.add_argument("--experiment", default="mnist1d", help="start from this experiment's defaults (default mnist1d)")
    sample.add_argument("--data", default=None, help="mnist1d | digits | cifar10 | cifar100 | imagefolder:PATH")
    sample.add_argument("--data-root", default=None, help="folder holding the CIFAR data (nothing is downloaded)")
    sample.add_argument("--model", default=None, help="mlp | cnn1d | resnet20 | wrn-40-10 | inception-v4 | torchvision:NAME")
    sample.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                        help="SGD (lr 0.1, momentum 0.9, wd 5e-4) or Adam (lr 1e-3)")
    sample.add_argument("--lr", type=float, default=None)
    sample.add_argument("--epochs", type=int, default=None, help="epochs of the whole run")
    sample.add_argument("--sample-epochs", type=int, default=None, help="snapshots are taken in the first N epochs")
    sample.add_argument("--snapshot-every", type=int, default=None, help="steps between snapshots (0: once per epoch)")
    sample.add_argument("--batch-size", type=int, default=None)
    sample.add_argument("--storage-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    sample.add_argument("--label-noise", type=float, default=None, help="fraction of training labels changed")
    sample.add_argument("--device", default=None, help="auto | cpu | cuda[:N]")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    _add_nproc(sample)
    sample.set_defaults(func=_cmd_sample)

    train = sub.add_parser("train", help="train from the trajectory's initialization in its DLDR subspace")
    train.add_argument("store", help="a store recorded by 'trajstore sample' (or give --data and --model)")
    train.add_argument("--optimizer", choices=("pbfgs", "pbfgs+", "psgd"), default="pbfgs+")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--basis", default=None, help="an existing basis of the store (see 'trajstore info')")
    train.add_argument("--dim", type=int, default=40, help="else compute one: d (default 40) ...")
    train.add_argument("--start", type=int, default=0, help="... from snapshot START (default 0) ...")
    train.add_argument("--stop", type=int, default=None, help="... to STOP, exclusive (default: all)")
    train.add_argument("--trajectory", default=None)
    train.add_argument("--data", default=None)
    train.add_argument("--data-root", default=None)
    train.add_argument("--model", default=None)
    train.add_argument("--device", default=None)
    train.add_argument("--out", default=None, help="folder for the result (default: the store's folder; "
                       "needed for a store at a URL)")
    _add_storage_option(train)
    _add_nproc(train)
    train.set_defaults(func=_cmd_train)

    plan_ = sub.add_parser("plan", help="predict disk, memory and I/O of each stage before any work")
    plan_.add_argument("model", help="wrn-40-10 | resnet20 | inception-v4 | torchvision:NAME | package.module:factory")
    plan_.add_argument("--snapshots", type=int, default=101, help="T (default 101)")
    plan_.add_argument("--dim", type=int, default=40, help="D (default 40)")
    plan_.add_argument("--storage-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    plan_.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where training runs")
    plan_.add_argument("--batch", type=int, default=128, help="training batch, for activation memory (0: leave out)")
    plan_.add_argument("--input-shape", default=None, help="e.g. 3,224,224 (needed for package.module:factory)")
    plan_.add_argument("--workers", type=int, default=None, help="threads of the DLDR passes (default: CPUs)")
    plan_.add_argument("--json", action="store_true")
    plan_.set_defaults(func=_cmd_plan)

    bench_ = sub.add_parser("bench", help="measure each stage for real, beside the plan, the floor and the official approach")
    from pipelines.bench import add_arguments

    add_arguments(bench_)
    bench_.set_defaults(func=_cmd_bench)

    run = sub.add_parser("run", help="run a whole experiment end to end (resumes a killed run)")
    run.add_argument("experiment", help="mnist1d | digits | cifar10-resnet20 | cifar100-wrn-40-10 | ... | demo")
    run.add_argument("--out", default=None, help="run folder (default runs/EXPERIMENT)")
    run.add_argument("--seed", type=int, default=0, help="first seed")
    run.add_argument("--seeds", type=int, default=1, help="number of seeds (mean +- std over them)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change a config field, e.g. --set data_root=~/data --set epochs=50")
    _add_nproc(run)
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and "--suite" in argv[1:-1]:  # a suite parses its own options
        from pipelines import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code = _in_job(args, argv)
        if code is not None:
            return code
        code = int(args.func(args))
    except (TrajstoreError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"trajstore: error: {e}", file=sys.stderr)
        return 2
    from .launch import shutdown

    shutdown()  # a rank of a job leaves it (a no-op on one process)
    return code
