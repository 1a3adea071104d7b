"""DLDR's growth with the number of snapshots t, beside the machine's floor at each t.

    trajstore bench --suite growth [--size 4M] [--ts 51,101,201,401,801] [--d 40] [--repeats 1]

One store of max(ts) synthetic snapshots of a flat 4M-parameter model (built once into
``--data``, 16 MB a snapshot: 12.8 GB for t = 801), then, for each t, each in a fresh process
with the page cache dropped first (when permitted, as root):

- ``trajstore``: ``dldr(store, d, stop=t)`` from scratch (cached Gram matrices and bases deleted
  first): both passes over the window's t snapshots; its wall time and peak RSS (VmHWM);
- ``floor``: reading the window's chunk files once, raw (8 concurrent readers, no decoding), and
  the float64 Gram GEMM ``2 n t^2`` at the rate measured on this machine for that t. The floor
  is ``max(read, Gram GEMM)`` (the issue's definition: the I/O can at best hide under the
  arithmetic, or the reverse). Beside it: writing what the basis pass must write (U and the
  mean, ``n (d + 1)`` float32 values, as new files into the page cache: the floor leaves it out,
  and on this VM it is the largest cost at small t), ``max(read, GEMM) + that write``,
  ``2 x read + GEMM`` (two passes read W, nothing overlapped), and the floor with the read's own
  CPU time counted, ``max(read, GEMM + read CPU / cores)`` (the kernel's copies of a cold read
  take cores from the arithmetic on a machine of few of them).

The growth exponents are least-squares slopes of log(seconds) and log(peak) against log(t).
Results go to ``benchmarks/results/growth.json`` with provenance; a markdown table is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from . import suite_parser
from .basis import HERE, SIZES, build_store, run_child
from .measure import median, report_spread, write_result


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Each key's median over the runs."""
    return {k: median([r[k] for r in runs]) for k in keys}


def exponent(ts: list[int], values: list[float]) -> float:
    """Slope of log(value) against log(t): value ~ t ** slope."""
    return float(np.polyfit(np.log(ts), np.log(values), 1)[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="4M", choices=[s for s in SIZES if not s.startswith("wrn")],
                        help="flat model of that many parameters")
    parser.add_argument("--ts", default="51,101,201,401,801", help="comma-separated snapshot counts t")
    parser.add_argument("--d", type=int, default=40, help="directions of the basis")
    parser.add_argument("--repeats", type=int, default=1, help="runs per t and method; the median is reported")
    parser.add_argument("--data", default=str(HERE / "data"), metavar="DIR",
                        help="folder for the generated store (kept, reused by later runs)")
    parser.add_argument("--out", default=str(HERE / "results" / "growth.json"), metavar="FILE", help="JSON result file")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    ts = sorted(int(v) for v in args.ts.split(","))
    if not ts or ts[0] <= args.d:
        raise SystemExit(f"every t must exceed d = {args.d} (a window of t snapshots spans t - 1 directions)")
    n = SIZES[args.size]
    path = Path(args.data) / f"{args.size}-t{ts[-1]}.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"growth: n = {n:,}, t in {ts}, d = {args.d}; store {path} ({n * 4 * ts[-1] / 1e9:.1f} GB)", flush=True)
    build_store(args.size, ts[-1], path)
    rows = []
    for t in ts:
        row: dict[str, Any] = {"t": t, "n": n}
        for method in ("floor", "trajstore"):
            runs = [run_child(method, path, args.d, t) for _ in range(args.repeats)]
            failed = [r for r in runs if "error" in r]
            if failed:
                raise SystemExit(f"growth: {method} at t = {t} failed: {failed[0]['error'][-1500:]}")
            if method == "floor":  # this suite's floor: the read hidden under the GEMM, or the reverse
                for r in runs:
                    written = run_child("u_write", path, args.d, t)
                    if "error" in written:
                        raise SystemExit(f"growth: writing U's bytes at t = {t} failed: {written['error'][-1500:]}")
                    r.update(seconds=max(r["read_s"], r["gram_blas_s"]), two_reads_plus_gemm_s=r["seconds"],
                             u_write_s=written["seconds"])
                    r["with_u_write_s"] = r["seconds"] + r["u_write_s"]
                    r["with_read_cpu_s"] = max(r["read_s"], r["gram_blas_s"] + r["read_cpu_s"] / r["cores"])
            row[method] = {"runs": runs, "seconds": median([r["seconds"] for r in runs]),
                           "peak_rss_GiB": median([r["peak_rss_bytes"] for r in runs]) / 2**30}
            warning = report_spread(f"t = {t} {method} seconds", [r["seconds"] for r in runs],
                                    advice="rerun or add --repeats")
            if warning:
                row[method]["warning"] = warning
        floor = medians(row["floor"]["runs"], ("read_s", "gram_blas_s", "gemm_GFLOPS", "u_write_s", "with_u_write_s",
                                               "with_read_cpu_s"))
        row["vs_floor"] = row["trajstore"]["seconds"] / row["floor"]["seconds"]
        row["vs_floor_with_u_write"] = row["trajstore"]["seconds"] / floor["with_u_write_s"]
        row["vs_floor_with_read_cpu"] = row["trajstore"]["seconds"] / floor["with_read_cpu_s"]
        rows.append(row)
        print(f"t = {t:4d}: trajstore {row['trajstore']['seconds']:7.1f} s, peak RSS "
              f"{row['trajstore']['peak_rss_GiB']:.2f} GiB; floor {row['floor']['seconds']:6.1f} s (read "
              f"{floor['read_s']:.1f} s, Gram GEMM {floor['gram_blas_s']:.1f} s at {floor['gemm_GFLOPS']:.0f} GFLOPS): "
              f"{row['vs_floor']:.2f}x the floor; U's write {floor['u_write_s']:.1f} s, "
              f"{row['vs_floor_with_u_write']:.2f}x the floor with it", flush=True)
    exponents = {"trajstore_seconds": exponent(ts, [r["trajstore"]["seconds"] for r in rows]),
                 "floor_seconds": exponent(ts, [r["floor"]["seconds"] for r in rows]),
                 "trajstore_peak_rss": exponent(ts, [r["trajstore"]["peak_rss_GiB"] for r in rows])}
    table = summarize(rows, exponents)
    print("\n" + table)
    write_result(Path(args.out), {"rows": rows, "exponents": exponents, "table": table, "args": vars(args)})
    print(f"wrote {args.out}")
    return {"rows": rows, "exponents": exponents, "table": table}


def summarize(rows: list[dict[str, Any]], exponents: dict[str, float]) -> str:
    lines = ["| t | trajstore (s) | floor max(read, GEMM) (s) | read (s) | Gram GEMM (s) | vs floor | read's CPU (s) | "
             "floor with the read's CPU (s) | vs it | U write (s) | vs floor + U write | 2 x read + GEMM (s) | "
             "trajstore peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    parts = ("read_s", "gram_blas_s", "read_cpu_s", "with_read_cpu_s", "u_write_s", "two_reads_plus_gemm_s")
    for r in rows:
        f = medians(r["floor"]["runs"], parts)
        lines.append(f"| {r['t']} | {r['trajstore']['seconds']:.1f} | {r['floor']['seconds']:.1f} | {f['read_s']:.1f} | "
                     f"{f['gram_blas_s']:.1f} | {r['vs_floor']:.2f}x | {f['read_cpu_s']:.1f} | "
                     f"{f['with_read_cpu_s']:.1f} | {r['vs_floor_with_read_cpu']:.2f}x | {f['u_write_s']:.1f} | "
                     f"{r['vs_floor_with_u_write']:.2f}x | {f['two_reads_plus_gemm_s']:.1f} | "
                     f"{r['trajstore']['peak_rss_GiB']:.2f} GiB |")
    lines.append(f"\ngrowth exponents (seconds ~ t^k): trajstore {exponents['trajstore_seconds']:.2f}, floor "
                 f"{exponents['floor_seconds']:.2f}; peak RSS ~ t^{exponents['trajstore_peak_rss']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
