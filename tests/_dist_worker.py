"""One rank of the torch.distributed tests, started by :func:`trajstore.launch.spawn`.

    python tests/_dist_worker.py SCENARIO OUT [options]

Scenarios (each rank writes its results under OUT as .npy / .json; nothing pickled):

- ``optim``: the README's closure on a DDP-wrapped model, each rank on its own slice of one
  global batch; P-BFGS, P+-BFGS, P-SGD (and P+-BFGS on a sharded basis) for STEPS steps; every
  step's flat parameters and the trial counts. ``--no-ddp`` leaves the model unwrapped (each rank
  steps on its own gradient); ``--local-loss`` makes the optimizer decide on each rank's own loss
  (the per-rank failure of issue 13), with the rank check off.
- ``products``: a stored basis sharded in each mode: ``project`` / ``lift`` of fixed vectors,
  resident bytes, and the shard-only products.
- ``record``: a :class:`ShardedRecorder` writing the pattern snapshots of ``_writer_process``
  (snapshot k is ``pattern(k)``, buffer ``k``) until COUNT are committed, resuming what is there;
  ``--slice`` passes each rank's slice of the flat vector (FSDP-style) instead of the model.
  Prints "committed k" after each snapshot (rank 0), so a test can kill a rank mid-run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import trajstore
from trajstore.distributed import RankMismatchError
from trajstore.launch import init_from_env, shutdown

GLOBAL_BATCH = 96          # rows of the global batch; each rank takes GLOBAL_BATCH / world of them
N_IN, N_HIDDEN, N_OUT = 6, 9, 3


DTYPE = torch.float32


def model() -> nn.Module:
    """No BatchNorm and no dropout: the forward pass of a slice does not depend on the others."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT)).to(DTYPE)


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (different every step; classes depend on the inputs), sorted by
    class, so that the ranks' slices, and their losses, differ."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = 3 * torch.randn(GLOBAL_BATCH, N_IN, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    order = torch.argsort(y, stable=True)
    return x[order].to(DTYPE), y[order]


def basis(d: int = 5) -> trajstore.Basis:
    """An in-memory DLDR basis of a random walk from the model's initialization (deterministic)."""
    w0 = torch.nn.utils.parameters_to_vector(model().parameters()).detach().float().numpy()
    rng = np.random.default_rng(7)
    walk = w0 + np.cumsum(0.05 * rng.standard_normal((12, w0.size)), axis=0)
    return trajstore.dldr(np.vstack([w0, walk]).astype(np.float32), d)


def optimizer(method: str, params: list[torch.Tensor], placed: object, **kw: object) -> torch.optim.Optimizer:
    if method == "psgd":
        return trajstore.PSGD(params, placed, lr=0.5, **kw)
    return trajstore.PBFGS(params, placed, plus=method.startswith("pbfgs+"), **kw)


def train(method: str, net: nn.Module, steps: int, rank: int, world: int, **kw: object) -> dict[str, object]:
    """The README's closure, ``steps`` steps on this rank's slice; every step's parameters."""
    per = GLOBAL_BATCH // world
    sharded = method.endswith("-sharded")
    placed = basis().on("cpu", mode="resident", shard=sharded, dtype=DTYPE)
    inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    opt = optimizer(method, list(inner.parameters()), placed, **kw)
    criterion = nn.CrossEntropyLoss()
    history, losses = [], []
    for step in range(steps):
        x, y = data(step)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = criterion(net(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        loss = opt.step(closure)
        losses.append(float(loss.detach() if isinstance(loss, torch.Tensor) else loss))
        history.append(torch.nn.utils.parameters_to_vector(inner.parameters()).detach().numpy().copy())
    trials = opt.stats["trials"] if isinstance(opt, trajstore.PBFGS) else []
    return {"params": np.stack(history), "trials": trials, "losses": losses, "nbytes": placed.nbytes}


def scenario_optim(args: argparse.Namespace, rank: int, world: int) -> None:
    out = Path(args.out)
    kw: dict[str, object] = {}
    if args.local_loss:  # the optimizer as it was before issue 13: every rank decides on its own loss
        import trajstore.pbfgs as pbfgs

        pbfgs.sum_over_ranks = lambda t, group: t * torch.tensor([float(dist.get_world_size()), 1.0],
                                                                 dtype=torch.float64)
        kw["check_ranks"] = args.check
    for method in args.methods.split(","):
        net = model()
        if not args.no_ddp:
            net = nn.parallel.DistributedDataParallel(net)
        try:
            result = train(method, net, args.steps, rank, world, **kw)
        except RankMismatchError as e:
            (out / f"{method}-rank{rank}.error").write_text(str(e))
            continue
        np.save(out / f"{method}-rank{rank}.npy", result["params"])
        (out / f"{method}-rank{rank}.json").write_text(json.dumps(
            {"trials": result["trials"], "losses": result["losses"], "nbytes": result["nbytes"]}))


def scenario_products(args: argparse.Namespace, rank: int, world: int) -> None:
    out = Path(args.out)
    stored = trajstore.open_basis(args.store, args.basis)
    n, d = stored.n, stored.d
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(n, generator=gen)
    z = torch.randn(d, generator=gen)
    report: dict[str, object] = {}
    for mode in ("resident", "mmap", "stream"):
        placed = stored.on("cpu", mode=mode, shard=True)
        placed.step_rows = min(placed.step_rows, 37)  # products and exchanges in many pieces
        lifted = placed.lift(z)
        moved = torch.zeros(n)
        placed.lift(z, out=[moved], alpha=-0.5)
        own = [torch.zeros(placed.hi - placed.lo)]
        placed.lift(z, out=own)
        np.save(out / f"{mode}-rank{rank}.npy", np.stack([lifted.numpy(), moved.numpy()]))
        np.save(out / f"{mode}-own-rank{rank}.npy", own[0].numpy())
        np.save(out / f"{mode}-project-rank{rank}.npy",
                np.stack([placed.project(g).numpy(), placed.project(g[placed.lo:placed.hi].clone()).numpy()]))
        report[mode] = {"lo": placed.lo, "hi": placed.hi, "nbytes": placed.nbytes}
    (out / f"report-rank{rank}.json").write_text(json.dumps(report))


def scenario_record(args: argparse.Namespace, rank: int, world: int) -> None:
    import time

    from _writer_process import Flat, pattern
    from trajstore.sharded import ShardedRecorder

    net = Flat(args.n)
    net.set_snapshot(0)
    recorder = ShardedRecorder(args.store, net, resume=True, create_options={"chunk_bytes": args.chunk_bytes})
    lo, hi = recorder.bounds
    while len(recorder) < args.count:
        k = len(recorder)
        net.set_snapshot(k)
        flat = torch.from_numpy(pattern(k, args.n)[lo:hi].copy())
        recorder.snapshot(flat if args.slice else None, step=k)
        if rank == 0:
            print(f"committed {k}", flush=True)
        time.sleep(args.pause)
    recorder.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("optim", "products", "record"))
    parser.add_argument("out")
    parser.add_argument("--methods", default="pbfgs,pbfgs+,psgd,pbfgs+-sharded")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--local-loss", action="store_true")
    parser.add_argument("--check", action="store_true", help="with --local-loss: keep the rank check on")
    parser.add_argument("--double", action="store_true", help="model, data and basis in float64")
    parser.add_argument("--store", default=None)
    parser.add_argument("--basis", default=None)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--chunk-bytes", type=int, default=4096)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--slice", action="store_true")
    args = parser.parse_args(argv)
    global DTYPE
    DTYPE = torch.float64 if args.double else torch.float32
    torch.set_num_threads(1)
    init_from_env("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    {"optim": scenario_optim, "products": scenario_products, "record": scenario_record}[args.scenario](args, rank, world)
    shutdown()  # only after success: a failed rank exits, and the launcher stops the others
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
