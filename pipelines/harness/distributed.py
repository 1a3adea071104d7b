"""Subspace training on 1 and 2 ranks: step time and per-rank memory.

    python benchmarks/distributed.py [--width 1024] [--depth 3] [--d 40] [--batch 256] [--steps 12] [--rounds 3]

An MLP (``depth`` hidden layers of ``width``; 2.1M parameters by default) is trained on one
fixed synthetic global batch, split over the ranks, with DDP (gloo on CPU, nccl on a GPU):

- ``sgd``: an SGD step (forward, backward, DDP's all-reduce, update);
- ``pbfgs+``: a P+-BFGS step with the basis resident and whole on every rank;
- ``pbfgs+ sharded``: the same with U split by rows (``shard=True``): each rank holds
  ``ceil(n / world) * d * 4`` bytes of U.

Per configuration and round: the median step time of ``steps`` steps after two warm-up steps,
and of those steps whose line search accepted its first trial, rank 0's (ranks step in lockstep), and each rank's U bytes and peak RSS. The figures are medians
over ``rounds`` runs, configurations interleaved round by round; the ratio of each P+-BFGS step
to the SGD step of the same world size is the figure to compare (this machine is shared). On a
2-core CPU two ranks share the cores with one thread each, so their steps are not expected to be
faster: what the two-rank figures show is the cost of the collectives, and the memory per rank.
The basis comes from a store the parent records (``d + 1`` snapshots of a random walk).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import suite_parser
from .measure import median, write_result

CONFIGS = (("sgd", 1), ("pbfgs+", 1), ("sgd", 2), ("pbfgs+", 2), ("pbfgs+ sharded", 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=1024, help="width of the MLP's hidden layers")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP")
    parser.add_argument("--d", type=int, default=40, help="directions of the basis")
    parser.add_argument("--batch", type=int, default=256, help="global batch (split over the ranks)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per configuration and round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, configurations interleaved (median)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--out", default="benchmarks/results/distributed.json", metavar="FILE", help="JSON result file")


def model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    parser.add_argument("--worker", nargs=4, metavar=("STORE", "BASIS", "METHOD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args, *args.worker)
        return {}
    return run(args)


def _record(path: Path, args: argparse.Namespace) -> str:
    from trajstore import TrajectoryStore, dldr

    net = model(args.width, args.depth)
    w = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    with TrajectoryStore.create(path, net) as store:
        for _ in range(args.d + 1):
            store.append(net)
            w += 0.01 * torch.randn(w.shape, generator=gen)
            torch.nn.utils.vector_to_parameters(w, net.parameters())
    return dldr(path, args.d).name


def run(args: argparse.Namespace) -> dict[str, Any]:
    from trajstore.launch import spawn

    scratch = Path(tempfile.mkdtemp(prefix="trajstore-dist-", dir="."))
    try:
        store = scratch / "s.zarr"
        print(f"recording {args.d + 1} snapshots of a {args.depth}x{args.width} MLP and its {args.d}-D basis ...",
              flush=True)
        basis = _record(store, args)
        raw: dict[str, list[dict[str, Any]]] = {f"{m} x{w}": [] for m, w in CONFIGS}
        for r in range(args.rounds):
            for method, world in CONFIGS:
                out = scratch / f"{method.replace(' ', '-')}-{world}-{r}"
                out.mkdir()
                argv = [str(Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"),
                        "--width", str(args.width), "--depth", str(args.depth), "--d", str(args.d),
                        "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                        "--worker", str(store), basis, method, str(out)]
                code = spawn(argv, world, timeout_s=600, logs=out)
                if code != 0:
                    raise RuntimeError(f"{method} on {world} ranks exited {code}: "
                                       + (out / "rank-0.log").read_text()[-2000:])
                ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in range(world)]
                raw[f"{method} x{world}"].append({"step_s": ranks[0]["step_s"],
                                                  "first_trial_step_s": ranks[0]["first_trial_step_s"],
                                                  "trials": ranks[0]["trials"],
                                                  "u_bytes": [x["u_bytes"] for x in ranks],
                                                  "peak_rss_gib": [x["peak_rss_gib"] for x in ranks]})
                print(f"round {r + 1}/{args.rounds}: {method} on {world} rank(s): "
                      f"{ranks[0]['step_s'] * 1e3:.1f} ms/step", flush=True)
        summary = {}
        for key, runs in raw.items():
            summary[key] = {"step_ms": median([x["step_s"] for x in runs]) * 1e3,
                            "first_trial_step_ms": median([x["first_trial_step_s"] for x in runs]) * 1e3,
                            "u_mib_per_rank": [b / 2**20 for b in runs[0]["u_bytes"]],
                            "peak_rss_gib_per_rank": [median([x["peak_rss_gib"][k] for x in runs])
                                                      for k in range(len(runs[0]["u_bytes"]))]}
        for key in summary:
            world = key.rsplit("x", 1)[1]
            summary[key]["x_sgd"] = summary[key]["step_ms"] / summary[f"sgd x{world}"]["step_ms"]
            summary[key]["first_trial_x_sgd"] = summary[key]["first_trial_step_ms"] / summary[f"sgd x{world}"]["step_ms"]
        n = sum(p.numel() for p in model(args.width, args.depth).parameters())
        result = {"config": vars(args) | {"n": n}, "summary": summary, "raw": raw}
        _print(summary, n, args)
        write_result(Path(args.out), result)
        print(f"wrote {args.out}")
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _print(summary: dict[str, Any], n: int, args: argparse.Namespace) -> None:
    print(f"\nn = {n:,} parameters, d = {args.d}, global batch {args.batch}, medians of {args.rounds} rounds")
    print(f"{'configuration':<20} {'step ms':>8} {'x SGD':>6} {'1-trial ms':>11} {'x SGD':>6} {'U MiB per rank':>16} "
          f"{'peak RSS GiB per rank':>22}")
    for key, s in summary.items():
        u = " / ".join(f"{v:.1f}" for v in s["u_mib_per_rank"])
        rss = " / ".join(f"{v:.2f}" for v in s["peak_rss_gib_per_rank"])
        print(f"{key:<20} {s['step_ms']:>8.1f} {s['x_sgd']:>6.2f} {s['first_trial_step_ms']:>11.1f} "
              f"{s['first_trial_x_sgd']:>6.2f} {u:>16} {rss:>22}")


def worker(args: argparse.Namespace, store: str, basis: str, method: str, out: str) -> None:
    import trajstore
    from trajstore.launch import init_from_env, shutdown, world_from_env

    rank, _, world = world_from_env()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    init_from_env(args.device)
    device = torch.device(args.device)
    net = model(args.width, args.depth).to(device)
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, args.width, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    part = torch.tensor_split(torch.arange(args.batch), world)[rank]
    x, y = x[part].to(device), y[part].to(device)
    criterion = nn.CrossEntropyLoss()
    u_bytes = 0
    if method == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        placed = trajstore.open_basis(store, basis).on(device, mode="resident", shard=method.endswith("sharded"))
        u_bytes = placed.nbytes
        opt = trajstore.PBFGS(net.parameters(), placed, plus=True)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = criterion(ddp(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    times = []
    for k in range(args.steps + 2):
        started = time.perf_counter()
        if method == "sgd":
            closure()
            opt.step()
        else:
            opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            times.append(time.perf_counter() - started)
    trials = opt.stats["trials"][2:] if isinstance(opt, trajstore.PBFGS) else [1] * len(times)
    first = [t for t, k in zip(times, trials) if k == 1] or times
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "step_s": float(np.median(times)), "first_trial_step_s": float(np.median(first)), "trials": trials,
        "u_bytes": u_bytes,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    shutdown()

