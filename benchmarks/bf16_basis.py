"""A bfloat16 basis on the device against float32: subspace tilt, step time, final accuracy.

    python benchmarks/bf16_basis.py [--seeds 3] [--rounds 5] [--n 4194304]

1. MNIST-1D (``trajstore run mnist1d``'s config: 1-D CNN, 41 snapshots, d = 40), per seed: the
   SGD trajectory and its basis once, then P-BFGS from the initialization twice with that same
   basis, held in float32 and in bfloat16 (``basis_dtype``). Reported: the largest principal
   angle between span(U) and span(U rounded to bfloat16), the final test accuracies and their
   difference, and the training time ratio bfloat16 / float32.
2. The products alone at large n (a random orthonormal U of ``n`` x 40, resident on the CPU):
   one ``project`` + one ``lift`` per round, medians of ``rounds`` rounds measured side by side,
   and the bytes U takes.

Written to benchmarks/results/bf16_basis.json with the config, versions and commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = ("float32", "bfloat16")


def max_angle_degrees(u: np.ndarray) -> float:
    """Largest principal angle between span(u) and span(u rounded to bfloat16), in degrees."""
    rounded = torch.from_numpy(u.astype(np.float32)).to(torch.bfloat16).double().numpy()
    q_u, _ = np.linalg.qr(u.astype(np.float64))
    q_b, _ = np.linalg.qr(rounded)
    cosines = np.linalg.svd(q_u.T @ q_b, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def mnist1d(seeds: int, tmp: Path) -> list[dict]:
    from pipelines.experiment import _Setup, compute_basis, sample, train_subspace
    from pipelines.validate import configure

    rows = []
    for seed in range(seeds):
        cfg = configure("mnist1d", {"methods": "pbfgs"}, seed=seed, out=str(tmp / f"s{seed}"))
        folder = Path(cfg.out) / f"seed-{seed}"
        setup = _Setup(cfg, seed)
        sampled = sample(cfg, folder, seed, setup)
        basis, _ = compute_basis(cfg, folder, sampled)
        row = {"seed": seed, "n": basis.n, "d": basis.d, "max_angle_deg": max_angle_degrees(basis.to_numpy())}
        for dtype in DTYPES:
            result = train_subspace(cfg.with_overrides(basis_dtype=dtype), folder, seed, "pbfgs", basis, setup,
                                    tag=f"pbfgs-{dtype}")
            row[dtype] = {"test_acc": result["history"][-1]["test_acc"], "train_seconds": result["train_seconds"],
                          "mean_trials": result["line_search"]["mean_trials"]}
        row["acc_change"] = row["bfloat16"]["test_acc"] - row["float32"]["test_acc"]
        row["time_ratio"] = row["bfloat16"]["train_seconds"] / row["float32"]["train_seconds"]
        rows.append(row)
        print(f"seed {seed}: max angle {row['max_angle_deg']:.4f} deg; test acc float32 {row['float32']['test_acc']:.2f}, "
              f"bfloat16 {row['bfloat16']['test_acc']:.2f} ({row['acc_change']:+.2f}); time ratio {row['time_ratio']:.2f}",
              flush=True)
    return rows


def products(n: int, d: int, rounds: int, tmp: Path) -> dict:
    from trajstore import TrajectoryStore, dldr

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(n))

    torch.set_num_threads(os.cpu_count() or 1)  # the MNIST-1D runs set one thread for their small model
    model, gen = Flat(), torch.Generator().manual_seed(0)
    path = tmp / "products.zarr"
    print(f"products: writing {d + 1} snapshots of n = {n:,} for a {d}-D basis", flush=True)
    with TrajectoryStore.create(path, model) as store:
        for _ in range(d + 1):
            with torch.no_grad():
                model.w.add_(torch.randn(n, generator=gen))
            store.append(model)
    basis = dldr(path, d)
    placed = {dtype: basis.on("cpu", mode="resident", dtype=getattr(torch, dtype)) for dtype in DTYPES}
    g = torch.randn(n, generator=gen)
    out = torch.zeros(n)
    times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for r in range(rounds + 1):  # round 0 warms up; the dtypes alternate within a round
        for dtype, on in placed.items():
            started = time.perf_counter()
            on.lift(on.project(g), out=[out], alpha=-1.0)
            if r:
                times[dtype].append(time.perf_counter() - started)
    medians = {dtype: statistics.median(ts) for dtype, ts in times.items()}
    result = {"n": n, "d": d, "rounds": rounds, "seconds": times, "median_seconds": medians,
              "ratio": medians["bfloat16"] / medians["float32"],
              "nbytes": {dtype: on.nbytes for dtype, on in placed.items()}}
    print(f"products (project + lift, n = {n:,}, d = {d}, CPU, {torch.get_num_threads()} threads): float32 "
          f"{medians['float32'] * 1e3:.1f} ms, bfloat16 {medians['bfloat16'] * 1e3:.1f} ms (ratio {result['ratio']:.2f}); "
          f"U {result['nbytes']['float32'] / 2**20:.0f} MiB vs {result['nbytes']['bfloat16'] / 2**20:.0f} MiB", flush=True)
    return result


def main() -> None:
    from pipelines.harness.measure import write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="MNIST-1D seeds (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the product timing (default 5)")
    parser.add_argument("--n", type=int, default=1 << 22, help="parameters of the product timing (default 4M)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bf16_basis.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = mnist1d(args.seeds, Path(tmp))
        timing = products(args.n, 40, args.rounds, Path(tmp))
    summary = {"max_angle_deg": max(r["max_angle_deg"] for r in rows),
               "acc_change_mean": float(np.mean([r["acc_change"] for r in rows])),
               "acc_change_range": [min(r["acc_change"] for r in rows), max(r["acc_change"] for r in rows)],
               "time_ratio_median": statistics.median(r["time_ratio"] for r in rows),
               "products_ratio": timing["ratio"]}
    print(f"MNIST-1D over {len(rows)} seeds: max angle {summary['max_angle_deg']:.4f} deg, accuracy change "
          f"{summary['acc_change_mean']:+.2f} points (range {summary['acc_change_range'][0]:+.2f} to "
          f"{summary['acc_change_range'][1]:+.2f}), training time ratio (median) {summary['time_ratio_median']:.2f}")
    write_result(Path(args.out), {"config": vars(args), "mnist1d": rows, "products": timing, "summary": summary})


if __name__ == "__main__":
    main()
