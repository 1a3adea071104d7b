"""The ``trajstore`` command line. Argument parsing and printing only; the work is in the library
and, for whole experiments, in ``pipelines/`` (imported lazily)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import TrajstoreError

__all__ = ["main"]


def _find_store(arg: str) -> str:
    """The store a command was given: a URL as it is; a local path that does not exist is an
    error (missing is not damaged); the folder of ``trajstore sample`` (OUT/trajectory.zarr) or of
    a one-seed ``trajstore run`` (OUT/seed-S/trajectory.zarr) stands for its store, said on stderr."""
    from ._backend import local_path

    path = local_path(arg)
    if path is None:  # another backend's URL: as it is
        return arg
    if not path.exists():
        raise FileNotFoundError(f"{arg} does not exist")
    if not path.is_dir() or (path / "zarr.json").exists():
        return arg
    found = [path / "trajectory.zarr"] if (path / "trajectory.zarr").is_dir() else sorted(
        path.glob("seed-*/trajectory.zarr"))
    if len(found) == 1:
        print(f"trajstore: using {found[0]}", file=sys.stderr)
        return str(found[0])
    if found:
        raise FileNotFoundError(f"{arg} is a run folder of {len(found)} seeds; give one store: "
                                + ", ".join(str(p) for p in found[:4]) + (" ..." if len(found) > 4 else ""))
    return arg


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, store_info

    args.store = _find_store(args.store)
    info = store_info(args.store, storage_options=args.storage_options)
    print(json.dumps(info, indent=2) if args.json else format_info(info, max_rows=args.rows))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import format_report, verify

    args.store = _find_store(args.store)
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
    from pathlib import Path

    from .dldr import dldr
    from .plots import plot_basis

    args.store = _find_store(args.store)
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
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r} (e.g. --set epochs=50)")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines import run_experiment

    run_experiment(args.experiment, out=args.out, seed=args.seed, seeds=args.seeds, overrides=_overrides(args.set),
                   data_root=getattr(args, "data_root", None))
    return 0


_SAMPLE_FLAGS = ("data", "data_root", "model", "optimizer", "lr", "epochs", "sample_epochs", "snapshot_every",
                 "batch_size", "storage_dtype", "device", "label_noise")


def _cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.experiment import sample
    from pipelines.validate import configure

    flags = {k: str(v) for k, v in vars(args).items() if k in _SAMPLE_FLAGS and v is not None}
    if args.optimizer == "adam" and args.lr is None:
        flags["lr"] = "0.001"  # the paper's Adam learning rate
    cfg = configure(args.experiment, {**flags, **_overrides(args.set)}, basis=False, seed=args.seed, out=args.out)
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
    from pathlib import Path

    from pipelines.experiment import check_store_model, config_from_store, train_subspace

    from .basis import open_basis
    from .dldr import dldr
    from .errors import InvalidStoreError
    from .store import TrajectoryStore

    options = args.storage_options
    args.store = _find_store(args.store)
    if "://" in str(args.store) and not args.out:  # results are local files, next to a local store
        raise ValueError(f"the store {args.store} is at a URL: say where the results go with --out FOLDER")
    with TrajectoryStore.open(args.store, trajectory=args.trajectory, storage_options=options) as store:
        attrs, trajectory, layout = store.attrs, store.name, store.layout
    recorded = attrs.get("experiment")
    flags = {k: str(v) for k, v in vars(args).items()
             if k in ("data", "data_root", "model", "device", "basis_dtype") and v is not None}
    if recorded is None and not {"data", "model"} <= set(flags):
        raise ValueError(f"{args.store} was not recorded by 'trajstore sample': say which --data and --model it holds")
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
    tag += "" if args.basis_dtype == "float32" else f"-{args.basis_dtype}"
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
                  device=args.device, workers=args.workers, activations=acts, basis_dtype=args.basis_dtype)
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
                        help="an option of the URL's fsspec file system, repeatable (default: none); VALUE is JSON "
                             "when it parses, a dotted KEY sets a nested one: anon=true, "
                             "client_kwargs.endpoint_url=http://127.0.0.1:9000")


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="run on N local processes sharing each global batch (torch.distributed: gloo on "
                             "CPU, nccl on GPU), as torchrun --standalone --nproc-per-node N -m trajstore ... does "
                             "(default: 1)")


def _in_job(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Start the N processes of ``--nproc N`` (the exit code), or join the job this process is a
    rank of (None: go on and run the command)."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if "WORLD_SIZE" not in os.environ:
        if nproc == 1:
            return None
        if getattr(args, "experiment", None) == "demo":
            raise ValueError("the demo runs on one process; leave out --nproc")
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (line breaks kept), and every option's help ending with
    its default, unless the help says it already (the word "default" in it) or there is none to
    print: a flag (its default is its absence), an empty list, or None (whose help says in words
    what leaving the option out means: "default: all snapshots")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or default == []
                or action.nargs == 0 or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return text + " (default: %(default)s)"


_DESCRIPTION = """\
trajstore records the weights of a training run (its trajectory) into a Zarr store, finds the
few directions the run moved in (DLDR: a PCA of the snapshots, streamed from disk, never all in
memory), and retrains the network from its initialization in that d-dimensional subspace with
P-BFGS, P+-BFGS or P-SGD (Li et al., "Train Deep Neural Networks in 40-D Subspaces")."""

_EPILOG = """\
typical use:
  trajstore run mnist1d                   the paper's experiment end to end, into runs/mnist1d/
  trajstore sample OUT                    train with SGD, recording OUT/trajectory.zarr
  trajstore basis OUT/trajectory.zarr     its DLDR basis (40 directions) and a plot of it
  trajstore train OUT/trajectory.zarr     retrain from the initialization in that subspace
  trajstore info STORE                    what a store holds
  trajstore verify STORE                  check every chunk, commit and basis of a store
  trajstore plan MODEL                    predict disk, memory and I/O before any work
  trajstore bench MODEL                   measure the same stages for real, beside the plan

STORE is a folder or an fsspec URL (s3://bucket/run.zarr; options with --storage-option).
'trajstore COMMAND --help' describes a command and its options, with their defaults."""

_MODELS = "mlp | cnn1d | resnet20 | wrn-40-10 | inception-v4 | torchvision:NAME"


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a message may quote a multi-line snippet)."""
    return " ".join(str(error).split()) or type(error).__name__


def _where(args: argparse.Namespace | None) -> str:
    """`` during STAGE (seed S, epoch E of N)`` when an experiment stage was running; `` while
    starting`` when an experiment command had not reached its first stage (imports, checks)."""
    status = sys.modules.get("pipelines.status")
    text = status.describe() if status is not None else ""
    if text:
        return f" during {text}"
    if args is None or getattr(args, "func", None) in (_cmd_run, _cmd_sample, _cmd_train):
        return " while starting (nothing was done)"
    return ""


def _first_rank() -> bool:
    """Rank 0 of a job (or no job), from the launcher's environment; True if that is unreadable."""
    from .launch import world_from_env

    try:
        return world_from_env()[0] == 0
    except ValueError:
        return True


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as the commands' own: ``trajstore run: error: ...``
    and where to look, instead of the usage block first (exit 2, as argparse's)."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> Any:
        print(f"{self.prog}: error: {' '.join(message.split())} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: Any = None) -> argparse.Namespace:
        """As argparse's, but an unknown option is reported by the command it was given to
        (``trajstore run: error: unrecognized arguments: ...``, and that command's ``--help``), not
        by ``trajstore``, whose help does not list the command's options."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="trajstore", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"trajstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}

    def command(name: str, summary: str, description: str = "", epilog: str | None = None) -> argparse.ArgumentParser:
        text = summary[0].upper() + summary[1:] + "." + (f"\n\n{description}" if description else "")
        parser.commands[name] = sub.add_parser(name, help=summary, description=text, epilog=epilog,
                                               formatter_class=HelpFormatter)
        return parser.commands[name]

    info = command("info", "list the trajectories, snapshots and bases of a store")
    info.add_argument("store", help="store folder or fsspec URL")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--rows", type=int, default=12, metavar="N",
                      help="snapshots listed per trajectory, the first and last N/2 of a longer one")
    _add_storage_option(info)
    info.set_defaults(func=_cmd_info)

    verify_ = command("verify", "check every chunk, commit and basis of a store",
                      "Checks every chunk of every committed snapshot and basis against its crc32c checksum, the\n"
                      "metadata and commits, and each basis against the snapshots of its window (one pass each).",
                      epilog="exit status: 0 intact, 1 damaged (the findings say where), 2 unreachable or not a store")
    verify_.add_argument("store", help="store folder or fsspec URL")
    verify_.add_argument("--json", action="store_true", help="print the report as JSON (and no progress)")
    verify_.add_argument("--no-sources", action="store_true",
                         help="skip checking each basis against its window's snapshots (saves one pass per basis)")
    _add_storage_option(verify_)
    verify_.set_defaults(func=_cmd_verify)

    basis = command("basis", "compute the DLDR basis of a window of a trajectory",
                    "Two streaming passes over the window's snapshots (their Gram matrix, then the basis),\n"
                    "written into the store under bases/NAME, and a plot of its explained variance next to\n"
                    "the store. A killed run resumes from its last finished block.")
    basis.add_argument("store", help="store folder or fsspec URL")
    basis.add_argument("--dim", type=int, default=40, metavar="D", help="number of directions d of the basis")
    basis.add_argument("--start", type=int, default=0, help="first snapshot of the window")
    basis.add_argument("--stop", type=int, default=None,
                       help="end of the window, exclusive (default: after the last snapshot)")
    basis.add_argument("--trajectory", default=None, metavar="NAME",
                       help="trajectory of the store (default: its only one, or the one named 'default')")
    basis.add_argument("--name", default=None, help="name of the basis in the store (default: TRAJECTORY-START-STOP-dD)")
    basis.add_argument("--block-mb", type=float, default=256, metavar="MIB",
                       help="float32 MiB of one block of the snapshots, read and multiplied at a time")
    basis.add_argument("--overwrite", action="store_true", help="recompute even if the basis exists")
    _add_storage_option(basis)
    where = basis.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run on a local dask.distributed cluster of N processes (default: threads of this "
                            "process, one per core)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on this running dask.distributed scheduler, e.g. tcp://10.0.0.1:8786 (default: "
                            "threads of this process)")
    basis.set_defaults(func=_cmd_basis)

    same = "default: the --experiment's"
    sample = command("sample", "train with SGD or Adam, recording the trajectory into a store",
                     "Starts from an experiment's config (see 'trajstore run'); each option below changes one\n"
                     "field of it. Snapshot 0 is the initialization; a killed run resumes.")
    sample.add_argument("out", help="folder for the store (OUT/trajectory.zarr) and the run's record")
    sample.add_argument("--experiment", default="mnist1d", help="start from this experiment's config")
    sample.add_argument("--data", default=None, help=f"mnist1d | digits | cifar10 | cifar100 | imagefolder:PATH ({same})")
    sample.add_argument("--data-root", default=None, metavar="DIR",
                        help=f"folder holding the CIFAR data; nothing is downloaded ({same})")
    sample.add_argument("--model", default=None, help=f"{_MODELS} ({same})")
    sample.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                        help=f"SGD (momentum 0.9, weight decay 5e-4) or Adam ({same}: sgd)")
    sample.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: 0.001 with --optimizer adam, else the --experiment's: 0.1)")
    sample.add_argument("--epochs", type=int, default=None, help=f"epochs of the whole run ({same})")
    sample.add_argument("--sample-epochs", type=int, default=None, metavar="N",
                        help=f"snapshots are taken in the first N epochs ({same})")
    sample.add_argument("--snapshot-every", type=int, default=None, metavar="STEPS",
                        help=f"steps between snapshots, 0 for one per epoch ({same})")
    sample.add_argument("--batch-size", type=int, default=None, help=f"training batch ({same}: 128)")
    sample.add_argument("--storage-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help=f"dtype of the stored snapshots ({same}: float32)")
    sample.add_argument("--label-noise", type=float, default=None, metavar="FRACTION",
                        help=f"fraction of training labels changed to another class ({same}: 0)")
    sample.add_argument("--device", default=None,
                        help=f"auto | cpu | cuda[:N]; auto is cuda when there is one ({same}: auto)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    sample.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config field, e.g. --set momentum=0.8; repeatable (default: none)")
    _add_nproc(sample)
    sample.set_defaults(func=_cmd_sample)

    recorded = "default: as recorded by 'trajstore sample'"
    train = command("train", "train from the trajectory's initialization in its DLDR subspace",
                    "Uses the basis given by --basis, or computes one (--dim, --start, --stop) as 'trajstore\n"
                    "basis' does, reusing it when it exists. Writes the per-epoch history to\n"
                    "train-OPTIMIZER-BASIS-eEPOCHS-bBATCH.json next to the store (or in --out).")
    train.add_argument("store", help="a store recorded by 'trajstore sample' (or any store, with --data and --model)")
    train.add_argument("--optimizer", choices=("pbfgs", "pbfgs+", "psgd"), default="pbfgs+",
                       help="P-BFGS, P+-BFGS (P-BFGS plus SGD on the residual gradient) or P-SGD")
    train.add_argument("--epochs", type=int, default=10, help="training epochs in the subspace")
    train.add_argument("--batch-size", type=int, default=1024, help="training batch")
    train.add_argument("--basis", default=None, metavar="NAME",
                       help="an existing basis of the store, see 'trajstore info' (default: compute one, below)")
    train.add_argument("--dim", type=int, default=40, metavar="D", help="without --basis: directions d of the basis")
    train.add_argument("--start", type=int, default=0, help="without --basis: first snapshot of its window")
    train.add_argument("--stop", type=int, default=None,
                       help="without --basis: end of its window, exclusive (default: after the last snapshot)")
    train.add_argument("--trajectory", default=None, metavar="NAME",
                       help="trajectory of the store (default: its only one, or the one named 'default')")
    train.add_argument("--data", default=None, help=f"data set of the run ({recorded}; needed for other stores)")
    train.add_argument("--data-root", default=None, metavar="DIR", help=f"folder holding the CIFAR data ({recorded})")
    train.add_argument("--model", default=None, help=f"model of the run, {_MODELS} ({recorded}; needed for other stores)")
    train.add_argument("--device", default=None, help=f"auto | cpu | cuda[:N] ({recorded}, else auto)")
    train.add_argument("--basis-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="U on the device: bfloat16 halves its memory and the bytes each product reads, "
                            "rounding U by 2**-9 (products accumulate in float32; see DeviceBasis)")
    train.add_argument("--out", default=None, metavar="DIR",
                       help="folder for the result (default: the store's folder; needed for a store at a URL)")
    _add_storage_option(train)
    _add_nproc(train)
    train.set_defaults(func=_cmd_train)

    plan_ = command("plan", "predict disk, memory and I/O of each stage before any work",
                    "Builds MODEL on torch's meta device (shapes only: nothing is allocated) and predicts, for\n"
                    "sample, gram, basis, train and the official approach: disk bytes, peak host (and GPU)\n"
                    "memory, bytes read and written. 'trajstore bench MODEL' measures the same stages.")
    plan_.add_argument("model", help="wrn-40-10 | resnet20 | inception-v4 | torchvision:NAME | package.module:factory")
    plan_.add_argument("--snapshots", type=int, default=101, metavar="T", help="snapshots of the trajectory, T")
    plan_.add_argument("--dim", type=int, default=40, metavar="D", help="directions of the basis, d")
    plan_.add_argument("--storage-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype of the stored snapshots")
    plan_.add_argument("--basis-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype of U during training (bfloat16: half the memory and per-step reads)")
    plan_.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where training runs")
    plan_.add_argument("--batch", type=int, default=128, help="training batch, for activation memory; 0 leaves it out")
    plan_.add_argument("--input-shape", default=None, metavar="C,H,W",
                       help="e.g. 3,224,224 (default: the model's own; needed for package.module:factory)")
    plan_.add_argument("--workers", type=int, default=None, metavar="N",
                       help="threads of the DLDR passes (default: one per CPU)")
    plan_.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan_.set_defaults(func=_cmd_plan)

    from pipelines import bench as bench_module

    bench_ = command("bench", "measure each stage for real, beside the plan, the floor and the official approach",
                     bench_module.DESCRIPTION, epilog=bench_module.EPILOG)
    bench_module.add_arguments(bench_)
    bench_.set_defaults(func=_cmd_bench)

    run = command("run", "run a whole experiment end to end (resumes a killed run)",
                  "Samples the SGD trajectory, computes its DLDR basis, retrains with each subspace method\n"
                  "from the same initialization, and writes results.json and the plots into the run folder.",
                  epilog="experiments: mnist1d (under a minute on 2 cores), digits, cifar10-resnet20, cifar10-resnet32,\n"
                         "cifar100-wrn-40-10, cifar100-inception-v4, cifar10-MODEL, cifar100-MODEL, demo\n"
                         "(the CIFAR ones need --data-root: nothing is downloaded)")
    run.add_argument("experiment", help="mnist1d | digits | cifar10-resnet20 | cifar100-wrn-40-10 | ... | demo")
    run.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/EXPERIMENT)")
    run.add_argument("--seed", type=int, default=0, help="first seed; the seeds are SEED, SEED + 1, ...")
    run.add_argument("--seeds", type=int, default=None,
                     help="number of seeds; results give mean ± std over them (default: 1; 3 for the ablation)")
    run.add_argument("--data-root", default=None, metavar="DIR",
                     help="folder holding the CIFAR data (cifar-10-batches-py/ or cifar-100-python/), the same as "
                          "--set data_root=DIR; the CIFAR experiments need it (default: none)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change a config field, e.g. --set epochs=50; repeatable (default: none)")
    _add_nproc(run)
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"] and "--suite" in argv[1:-1]:  # a suite parses its own options
        from pipelines import bench

        return bench.main(argv[1:])
    args = None
    try:
        args = build_parser().parse_args(argv)
        code = _in_job(args, argv)
        if code is not None:
            return code
        code = int(args.func(args))
    except (TrajstoreError, ValueError, FileNotFoundError, PermissionError) as e:
        print(f"trajstore: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The work is abandoned: what it leaves half-built (an event loop interrupted in its
        # constructor, a coroutine never awaited) reports itself when freed, a traceback after the
        # one line (seen in 1 of 16 interrupts of SGD here). Those reports say nothing to act on.
        import warnings

        sys.unraisablehook = lambda _report: None
        warnings.simplefilter("ignore")
        if _first_rank():  # one line for a job of several processes: rank 0's
            print(f"trajstore: interrupted{_where(args)}; run the same command to resume", file=sys.stderr)
        return 130
    from .launch import shutdown

    shutdown()  # a rank of a job leaves it (a no-op on one process)
    return code
