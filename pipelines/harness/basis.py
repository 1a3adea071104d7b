"""DLDR basis: trajstore vs the official approach vs dask's svd_compressed, beside the machine's floor.

    python benchmarks/dldr.py [--sizes 1M,4M,16M,wrn-40-10] [--t 101] [--d 40] [--repeats 1] [--data DIR]
    (or: trajstore bench --suite basis ...)

For each size it builds (once, cached in ``--data``) a store of t synthetic snapshots with a
trajectory-like spectrum: ``1M``/``4M``/``16M`` use a flat model of that many parameters,
``wrn-40-10`` the real WideResNet-40-10 layout (55.9M parameters on CIFAR-100). Then, each in a
fresh subprocess with the page cache dropped first (when permitted, i.e. as root):

- ``trajstore``: ``dldr(store, d)`` from scratch (cached Gram matrix and basis deleted first);
- ``official``: every snapshot stacked into one numpy array (as the official code's ``np.array``
  of flattened state_dicts), then ``sklearn.decomposition.PCA(d).fit_transform``; only where
  its predicted peak (3.6 x W, measured) fits in available memory;
- ``svd_compressed``: ``dask.array.linalg.svd_compressed(k=d)`` of the centred (n, t) dask array
  read from the same store, where its predicted peak (1.75 x W, measured) fits;
- ``floor``: reading every chunk file of W from disk (raw ``readinto``, no decoding) and the
  BLAS time of the float64 Gram products ``2 n t^2`` at the GEMM rate measured on this machine.
  ``floor = 2 x read + Gram BLAS`` (both passes read W; the issue's definition).

Each child reports its wall time and its peak RSS (VmHWM, interpreter and imports included).
Results go to ``benchmarks/results/dldr.json`` with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import suite_parser
from .measure import available_bytes, drop_caches, gemm_rate, peak_rss_bytes, report_spread

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks"
SIZES = {"1M": 1_000_000, "4M": 4_000_000, "16M": 16_000_000, "wrn-40-10": 55_899_444}


# ---------------------------------------------------------------- data

def _model(size: str) -> Any:
    import torch
    from torch import nn

    if size.startswith("wrn"):
        from pipelines.models import build_model

        return build_model(size, 100)
    n = SIZES[size]
    model = nn.Module()
    # A few tensors of uneven sizes, like a real network's layers.
    parts = [n // 2, n // 3, n // 7]
    parts.append(n - sum(parts))
    model.ps = nn.ParameterList(nn.Parameter(torch.zeros(p)) for p in parts)
    return model


def build_store(size: str, t: int, path: Path) -> None:
    """t snapshots w_k = w_0 + sum_j c_kj D_j + noise: 8 directions with decaying scales."""
    import torch

    from trajstore import TrajectoryStore

    if path.exists():
        try:
            if len(TrajectoryStore.open(path)) == t:
                return
        except Exception:
            pass
        shutil.rmtree(path)
    model = _model(size)
    n = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(n, dtype=np.float32) * 0.05
    dirs = rng.standard_normal((8, n), dtype=np.float32)
    coeffs = np.cumsum(rng.standard_normal((t, 8)), axis=0) / np.arange(1, 9) ** 1.5 * 1e-2
    noise = rng.standard_normal(n, dtype=np.float32) * 1e-4
    store = TrajectoryStore.create(path, model, durable=False)
    row = np.empty(n, dtype=np.float32)
    started = time.time()
    for k in range(t):
        np.copyto(row, w0)
        for j in range(8):
            row += np.float32(coeffs[k, j]) * dirs[j]
        row += np.roll(noise, 7919 * k)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(row), model.parameters())
        store.append(model, step=k)
        if (k + 1) % 20 == 0 or k + 1 == t:
            print(f"  building {size}: snapshot {k + 1}/{t} ({time.time() - started:.0f} s)", flush=True)
    store.close()


# ---------------------------------------------------------------- children (one measurement each)

def child_trajstore(path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    import zarr

    from trajstore import TrajectoryStore, dldr

    store = TrajectoryStore.open(path)
    root = zarr.open_group(path, mode="a")
    for key in (f"{store.prefix}/gram", "bases"):
        if key in root:
            del root[key]
    start = time.perf_counter()
    basis = dldr(store, d, stop=stop)
    return {"seconds": time.perf_counter() - start, "orthonormality": basis.orthonormality,
            "sigma": basis.singular_values[:3].tolist(), "window": [basis.start, basis.stop]}


def child_official(path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    from sklearn.decomposition import PCA

    from trajstore import TrajectoryStore

    store = TrajectoryStore.open(path)
    start = time.perf_counter()
    w = np.array([store.snapshot(i) for i in range(stop or len(store))])  # as the official code stacks its list
    pca = PCA(n_components=d)
    pca.fit_transform(w)
    return {"seconds": time.perf_counter() - start, "sigma": pca.singular_values_[:3].tolist()}


def child_svd_compressed(path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    import dask.array as da

    from trajstore import TrajectoryStore

    store = TrajectoryStore.open(path)
    start = time.perf_counter()
    x = store.to_dask()[:stop]
    w = (x - x.mean(axis=0)).T  # (n, t), chunked along n
    u, s, v = da.linalg.svd_compressed(w, k=d, seed=0)
    u, s = da.compute(u, s)
    return {"seconds": time.perf_counter() - start, "sigma": s[:3].tolist()}


def child_floor(path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from trajstore import TrajectoryStore

    store = TrajectoryStore.open(path)
    t, n = stop or len(store), store.n
    chunks = path / store.prefix / "params" / "c"
    files = [f for row in range(t) for f in sorted((chunks / str(row)).glob("*")) if f.is_file()]

    def read_file(f: Path) -> int:
        view, total = memoryview(bytearray(8 << 20)), 0
        with open(f, "rb", buffering=0) as fh:
            while (got := fh.readinto(view)) > 0:
                total += got
        return total

    # The best this disk does for these files: 8 concurrent sequential readers (more did not help).
    # The CPU time the read takes (the kernel's copies, mostly) is kept too: on a machine of few
    # cores it is taken from the arithmetic, which the floor max(read, GEMM) does not count.
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        total = sum(pool.map(read_file, files))
    read_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    read_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    flops_per_s = gemm_rate(t)
    gram_blas_s = 2 * n * t * t / flops_per_s
    return {"read_s": read_s, "read_bytes": total, "read_GBps": total / read_s / 1e9, "read_cpu_s": read_cpu_s,
            "cores": os.cpu_count() or 1, "gemm_GFLOPS": flops_per_s / 1e9,
            "gram_blas_s": gram_blas_s, "seconds": 2 * read_s + gram_blas_s,
            "overlapped_s": 2 * read_s if 2 * read_s > gram_blas_s else gram_blas_s}


def child_u_write(path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    """Seconds to write what the basis pass writes, U and the mean (n (d + 1) float32 values), as
    new files of its chunk size into the page cache, as it does (no fsync), on the store's disk."""
    import tempfile

    from trajstore import TrajectoryStore

    store = TrajectoryStore.open(path)
    n, rows = store.n, store.piece
    chunk = np.random.default_rng(0).standard_normal(rows * (d + 1)).astype(np.float32).tobytes()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".u-write-") as tmp:
        start = time.perf_counter()
        for i in range(-(-n // rows)):
            with open(Path(tmp) / str(i), "wb") as f:
                f.write(chunk)
        return {"seconds": time.perf_counter() - start}


CHILDREN = {"trajstore": child_trajstore, "official": child_official, "svd_compressed": child_svd_compressed,
            "floor": child_floor, "u_write": child_u_write}
PREDICTED_FACTOR = {"official": 3.6, "svd_compressed": 1.75}  # peak / bytes of W, measured (shared/MEASURED.md)


def run_child(method: str, path: Path, d: int, stop: int | None = None) -> dict[str, Any]:
    """One measurement in a fresh process, page cache dropped first; ``stop``: the window
    ``[0, stop)`` of the store's snapshots (default: all)."""
    cold = drop_caches()
    cmd = [sys.executable, "-m", "pipelines.harness.basis", "--child", method, "--store", str(path), "--d", str(d)]
    cmd += [] if stop is None else ["--stop", str(stop)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cold_cache"] = cold
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1M,4M,16M,wrn-40-10",
                        help="comma-separated: 1M, 4M, 16M (flat models of that many parameters), wrn-40-10 (55.9M)")
    parser.add_argument("--t", type=int, default=101, help="snapshots of each store")
    parser.add_argument("--d", type=int, default=40, help="directions of the basis")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size and method; the median is reported")
    parser.add_argument("--methods", default="floor,trajstore,official,svd_compressed",
                        help="comma-separated, from floor, trajstore, official, svd_compressed")
    parser.add_argument("--data", default=str(HERE / "data"), metavar="DIR",
                        help="folder for the generated stores (kept, reused by later runs)")
    parser.add_argument("--out", default=str(HERE / "results" / "dldr.json"), metavar="FILE", help="JSON result file")
    parser.add_argument("--merge", action="store_true", help="keep rows of other sizes from an existing --out file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.child:
        result = CHILDREN[args.child](Path(args.store), args.d, args.stop)
        result["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(result))
        return result

    from .measure import median, write_result

    rows = []
    for size in args.sizes.split(","):
        path = Path(args.data) / f"{size}-t{args.t}.zarr"
        path.parent.mkdir(parents=True, exist_ok=True)
        build_store(size, args.t, path)
        n = SIZES[size]
        w_bytes = n * args.t * 4
        for method in args.methods.split(","):
            factor = PREDICTED_FACTOR.get(method)
            if factor and factor * w_bytes > available_bytes() - 2**30:
                print(f"{size:>10} {method:>15}: skipped, predicted peak {factor * w_bytes / 2**30:.1f} GiB "
                      f"> available {(available_bytes() - 2**30) / 2**30:.1f} GiB", flush=True)
                rows.append({"size": size, "n": n, "t": args.t, "method": method, "skipped": "does not fit in memory",
                             "predicted_peak_GiB": factor * w_bytes / 2**30})
                continue
            runs = [run_child(method, path, args.d) for _ in range(args.repeats)]
            bad = [r for r in runs if "error" in r]
            if bad:
                print(f"{size:>10} {method:>15}: FAILED {bad[0]['error'][-400:]}", flush=True)
                rows.append({"size": size, "n": n, "t": args.t, "method": method, "error": bad[0]["error"]})
                continue
            row = {"size": size, "n": n, "t": args.t, "method": method, "runs": runs,
                   "seconds": median([r["seconds"] for r in runs]),
                   "peak_rss_GiB": median([r["peak_rss_bytes"] for r in runs]) / 2**30}
            warning = report_spread(f"{size} {method} seconds", [r["seconds"] for r in runs],
                                    advice="rerun or add --repeats")
            if warning:
                row["warning"] = warning
            rows.append(row)
            extra = ""
            if method == "floor":
                extra = (f" (read {runs[0]['read_GBps']:.2f} GB/s x 2, Gram BLAS {runs[0]['gram_blas_s']:.1f} s "
                         f"at {runs[0]['gemm_GFLOPS']:.0f} GFLOPS)")
            print(f"{size:>10} {method:>15}: {row['seconds']:8.1f} s, peak RSS {row['peak_rss_GiB']:6.2f} GiB{extra}",
                  flush=True)
    if args.merge and Path(args.out).exists():
        # Keep the rows of sizes not measured in this run (for re-measuring one size).
        measured = {r["size"] for r in rows}
        old = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["size"] not in measured]
        rows = sorted(old + rows, key=lambda r: SIZES[r["size"]])
    table = summarize(rows)
    print("\n" + table)
    write_result(Path(args.out), {"rows": rows, "table": table, "args": vars(args)})
    print(f"wrote {args.out}")
    return {"rows": rows, "table": table}


def summarize(rows: list[dict[str, Any]]) -> str:
    by = {(r["size"], r["method"]): r for r in rows}
    lines = ["| n | floor (s) | trajstore (s) | vs floor | trajstore peak RSS | official (s) | official peak | "
             "svd_compressed (s) | svd_c peak | memory: official / trajstore |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        f, ts, of, sc = (by.get((size, m), {}) for m in ("floor", "trajstore", "official", "svd_compressed"))

        def cell(r: dict[str, Any], key: str, fmt: str) -> str:
            if "skipped" in r:
                return "does not fit"
            if "error" in r:
                return "failed"
            return fmt.format(r[key]) if key in r else "-"

        ratio = f"{ts['seconds'] / f['seconds']:.2f}x" if "seconds" in ts and "seconds" in f else "-"
        mem = f"{of['peak_rss_GiB'] / ts['peak_rss_GiB']:.1f}x" if "peak_rss_GiB" in of and "peak_rss_GiB" in ts else "-"
        lines.append(f"| {size} ({SIZES[size]:,}) | {cell(f, 'seconds', '{:.1f}')} | {cell(ts, 'seconds', '{:.1f}')} | "
                     f"{ratio} | {cell(ts, 'peak_rss_GiB', '{:.2f} GiB')} | {cell(of, 'seconds', '{:.1f}')} | "
                     f"{cell(of, 'peak_rss_GiB', '{:.2f} GiB')} | {cell(sc, 'seconds', '{:.1f}')} | "
                     f"{cell(sc, 'peak_rss_GiB', '{:.2f} GiB')} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
