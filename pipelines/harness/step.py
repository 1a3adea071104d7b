"""Time of one training step: SGD vs trajstore's P+-BFGS vs the official P+-BFGS step, and the
private memory of a P+-BFGS step on a 55.9M-parameter model with a memory-mapped basis.

    python benchmarks/step.py [--batches 128,1024] [--steps 6] [--mmap-store benchmarks/data/wrn-40-10-t101.zarr]
    (or: trajstore bench --suite step ...)

Part 1, CIFAR ResNet-20 on random CIFAR-shaped data, on this CPU, the three steps interleaved
(so they see the same machine load), medians over ``--steps``:
- ``sgd``: forward, backward, ``torch.optim.SGD`` (momentum 0.9) step;
- ``trajstore``: ``PBFGS(plus=True)`` with a d = 40 basis in ``mmap`` mode (median over the steps
  whose line search accepted at the first trial, and over all steps);
- ``official``: the official script's step re-created: dense (d x n) basis, a full flat gradient,
  ``torch.save(state_dict)`` to disk before the line search and ``load_state_dict(torch.load(...))``
  after every trial, trial forwards with autograd on.
The basis is DLDR of synthetic snapshots around the initialization (a random 40-D subspace).

Part 2, WRN-40-10 (55.9M): one P+-BFGS step (batch 8) with the 40-D basis of ``--mmap-store``
(from ``benchmarks/dldr.py``) memory-mapped, sampling RssAnon (private memory; the page cache
of the mapped basis does not count) every 5 ms; the goal is below model + one basis chunk + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trajstore import PBFGS, TrajectoryStore, dldr, open_basis

from ..models import build_model
from . import suite_parser
from .measure import report_spread, write_result

ROOT = Path(__file__).resolve().parents[2]


def official_step(model: nn.Module, p_dense: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  momentum: list[torch.Tensor], tmp: str) -> int:
    """The official P+-BFGS step (nblt/DLDR train_pbfgs.py), re-created without its bugs' effects:
    paper beta = 0.55, residual SGD with momentum active."""
    loss_fn = nn.CrossEntropyLoss()
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # full flat gradient
    gk = p_dense @ grad
    dk = -(b @ gk)
    torch.save(model.state_dict(), tmp)  # before every line search, to disk
    alpha, trials = 1.0, 0
    for trials in range(1, 21):
        step = alpha * (p_dense.T @ dk)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(model.parameters()) + step,
                                                model.parameters())
        trial = loss_fn(model(x), y)  # autograd on, as in the official code
        model.load_state_dict(torch.load(tmp, weights_only=True))
        if float(trial.detach()) <= float(loss.detach()) + 0.4 * alpha * float(gk @ dk):
            break
        alpha *= 0.55
    with torch.no_grad():
        vec = torch.nn.utils.parameters_to_vector(model.parameters()) + alpha * (p_dense.T @ dk)
        residual = grad - p_dense.T @ gk
        offset = 0
        for p, m in zip(model.parameters(), momentum):
            m.mul_(0.9).add_(residual[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        torch.nn.utils.vector_to_parameters(vec, model.parameters())
        for p, m in zip(model.parameters(), momentum):
            p.add_(m, alpha=-0.01)
    return trials


def synthetic_basis(model: nn.Module, d: int, folder: Path) -> Any:
    url = folder / f"basis-{uuid.uuid4().hex}.zarr"
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    rng = torch.Generator().manual_seed(0)
    with TrajectoryStore.create(url, model) as store:
        for k in range(d + 2):
            noise = torch.randn(flat.shape, generator=rng) * 0.01 * (k > 0)
            torch.nn.utils.vector_to_parameters(flat + noise, model.parameters())
            store.append(model)
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    return dldr(url, d)


def part1(batches: list[int], steps: int, d: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            torch.manual_seed(0)
            models = {k: build_model("resnet20") for k in ("sgd", "trajstore", "official")}
            for m in models.values():
                m.load_state_dict(models["sgd"].state_dict())
            basis = synthetic_basis(models["sgd"], d, Path(tmp))
            x = torch.randn(batch, 3, 32, 32)
            y = torch.randint(0, 10, (batch,))
            loss_fn = nn.CrossEntropyLoss()
            sgd = torch.optim.SGD(models["sgd"].parameters(), lr=0.1, momentum=0.9)
            ours = PBFGS(models["trajstore"].parameters(), basis.on("cpu", mode="mmap"), plus=True)
            p_dense = torch.from_numpy(basis.to_numpy().T.copy())  # the official code's (d, n) basis
            b = torch.eye(d)
            momentum = [torch.zeros_like(p) for p in models["official"].parameters()]
            times: dict[str, list[float]] = {"sgd": [], "trajstore": [], "official": []}
            trials: dict[str, list[int]] = {"trajstore": [], "official": []}

            def closure() -> torch.Tensor:
                ours.zero_grad()
                loss = loss_fn(models["trajstore"](x), y)
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            for k in range(steps + 1):  # the first round warms up and is dropped
                t0 = time.perf_counter()
                sgd.zero_grad()
                loss_fn(models["sgd"](x), y).backward()
                sgd.step()
                t1 = time.perf_counter()
                ours.step(closure)
                t2 = time.perf_counter()
                n_official = official_step(models["official"], p_dense, b, x, y, momentum, os.path.join(tmp, "state.pt"))
                t3 = time.perf_counter()
                if k:
                    times["sgd"].append(t1 - t0)
                    times["trajstore"].append(t2 - t1)
                    times["official"].append(t3 - t2)
                    trials["trajstore"].append(ours.stats["trials"][-1])
                    trials["official"].append(n_official)
                print(f"  batch {batch} step {k}: sgd {t1 - t0:.3f} s, trajstore {t2 - t1:.3f} s "
                      f"({ours.stats['trials'][-1]} trials), official {t3 - t2:.3f} s ({n_official} trials)", flush=True)
            first = [t for t, n in zip(times["trajstore"], trials["trajstore"]) if n == 1]
            first_off = [t for t, n in zip(times["official"], trials["official"]) if n == 1]
            sgd_med = statistics.median(times["sgd"])
            row = {
                "sgd_s": sgd_med,
                "trajstore_s": statistics.median(times["trajstore"]),
                "trajstore_first_trial_s": statistics.median(first) if first else None,
                "official_s": statistics.median(times["official"]),
                "official_first_trial_s": statistics.median(first_off) if first_off else None,
                "trials": trials, "times": times,
            }
            row["trajstore_vs_sgd_first_trial"] = row["trajstore_first_trial_s"] / sgd_med if first else None
            row["official_vs_sgd_first_trial"] = row["official_first_trial_s"] / sgd_med if first_off else None
            pairs = [p / q for p, q, n in zip(times["trajstore"], times["sgd"], trials["trajstore"]) if n == 1]
            warning = report_spread(f"batch {batch} first-trial P+-BFGS step / SGD step", pairs,
                                    advice="rerun or add --steps")
            if warning:
                row["warning"] = warning
            out[f"batch{batch}"] = row
            print(f"batch {batch}: SGD {sgd_med:.3f} s; trajstore P+-BFGS {row['trajstore_s']:.3f} s "
                  f"(first-trial steps: {row['trajstore_vs_sgd_first_trial']}x SGD); official "
                  f"{row['official_s']:.3f} s (first-trial steps: {row['official_vs_sgd_first_trial']}x SGD)", flush=True)
    return out


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def part2(store_path: Path) -> dict[str, Any]:
    store = TrajectoryStore.open(store_path)
    names = [b for b in __import__("trajstore.basis", fromlist=["list_bases"]).list_bases(store.zarr_store)]
    if not names:
        return {"skipped": f"no basis in {store_path}; run benchmarks/dldr.py first"}
    basis = open_basis(store_path, names[0])
    torch.manual_seed(0)
    model = build_model("wrn-40-10", 100)
    store.load_into(model, 0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 100, (8,))
    loss_fn = nn.CrossEntropyLoss()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    chunk_bytes = int(basis.metadata.get("u_chunk_rows", 65536)) * basis.d * 4
    # restore="offset": no flat copy of the 55.9M parameters between line-search trials.
    opt = PBFGS(model.parameters(), basis.on("cpu", mode="mmap"), plus=True, restore="offset")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss

    base = _rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    opt.step(closure)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    goal = model_bytes + chunk_bytes + 2**30
    result = {"n": basis.n, "d": basis.d, "step_s": seconds, "trials": opt.stats["trials"][-1],
              "rss_anon_before_GiB": base / 2**30, "rss_anon_peak_GiB": peak[0] / 2**30,
              "model_GiB": model_bytes / 2**30, "basis_chunk_MiB": chunk_bytes / 2**20,
              "goal_GiB": goal / 2**30, "basis_GiB": basis.n * basis.d * 4 / 2**30}
    print(f"WRN-40-10 P+-BFGS step, basis mmap ({result['basis_GiB']:.1f} GiB on disk): {seconds:.1f} s, "
          f"peak RssAnon {result['rss_anon_peak_GiB']:.2f} GiB (goal: model {result['model_GiB']:.2f} + chunk "
          f"{result['basis_chunk_MiB']:.0f} MiB + 1 GiB = {result['goal_GiB']:.2f} GiB)", flush=True)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="128,1024", help="comma-separated batch sizes of part 1")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batch size, after one warm-up (median)")
    parser.add_argument("--d", type=int, default=40, help="directions of part 1's synthetic basis")
    parser.add_argument("--mmap-store", default="benchmarks/data/wrn-40-10-t101.zarr", metavar="STORE",
                        help="store with a 40-D WRN-40-10 basis for part 2, made by --suite basis; part 2 is "
                             "skipped without it")
    parser.add_argument("--out", default="benchmarks/results/step.json", metavar="FILE", help="JSON result file")
    parser.add_argument("--part2-only", action="store_true", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.part2_only:  # a fresh process, so part 1's allocations do not inflate the baseline
        result = part2(Path(args.mmap_store))
        print(json.dumps(result))
        return result
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {"resnet20": part1([int(b) for b in args.batches.split(",")], args.steps, args.d)}
    if Path(args.mmap_store).exists():
        proc = subprocess.run([sys.executable, "-m", "pipelines.harness.step", "--part2-only", "--mmap-store",
                               args.mmap_store], capture_output=True, text=True, cwd=ROOT)
        print(proc.stdout.strip().splitlines()[0] if proc.returncode == 0 else proc.stderr[-2000:], flush=True)
        result["wrn_mmap"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    write_result(Path(args.out), {**result, "args": vars(args)})
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
