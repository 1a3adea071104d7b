"""The goal figures of the store, DLDR and optimizer issues, in one command, with plots:

    trajstore bench --suite goals [--repeats 3] [--data benchmarks/data] [--out benchmarks/results/goals]

1. append throughput of a WRN-40-10 snapshot vs the raw write speed of the same disk
   (:mod:`pipelines.harness.append`);
2. the DLDR basis at n = 1M, 4M, 16M and 55.9M (WRN-40-10), t = 101: time and peak memory
   vs the machine's floor and vs the official approach where it fits
   (:mod:`pipelines.harness.basis`), and at n = 4M for t = 51, 76, 101 (memory vs t);
3. a P+-BFGS step vs an SGD step (ResNet-20, batch 128 and 1024, CPU) and the private memory
   of a WRN-40-10 step with a memory-mapped basis (:mod:`pipelines.harness.step`).

Writes ``OUT/goals.json`` (every row, with provenance), ``OUT/goals.md`` (the tables) and
``OUT/memory_vs_n.png``, ``OUT/memory_vs_t.png``, ``OUT/time_vs_floor.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..atomic import save_figure, write_text
from . import append, basis, step, suite_parser
from .measure import write_result

__all__ = ["main", "run"]


def _args(module: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="runs per DLDR measurement (median)")
    parser.add_argument("--appends", type=int, default=7, help="append rounds (median)")
    parser.add_argument("--steps", type=int, default=6, help="steps per batch size (median)")
    parser.add_argument("--sizes", default="1M,4M,16M,wrn-40-10",
                        help="sizes of the DLDR part: 1M, 4M, 16M (flat models), wrn-40-10 (55.9M)")
    parser.add_argument("--windows", default="51,76", help="other t (> d) for memory vs t at n = 4M (with 101)")
    parser.add_argument("--data", default="benchmarks/data", metavar="DIR",
                        help="folder of the generated stores (kept, reused by later runs)")
    parser.add_argument("--out", default="benchmarks/results/goals", metavar="DIR",
                        help="folder for goals.json, goals.md and the plots")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = suite_parser(__doc__, prog)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("== 1. append vs the disk", flush=True)
    appended = append.run(_args(append, ["--appends", str(args.appends), "--out", str(out / "append.json")]))
    print("== 2. the DLDR basis vs the floor and the official approach", flush=True)
    sizes = basis.run(_args(basis, ["--sizes", args.sizes, "--repeats", str(args.repeats), "--data", args.data,
                                    "--methods", "floor,trajstore,official", "--out", str(out / "basis.json")]))
    windows = []
    for t in [int(v) for v in args.windows.split(",") if v]:
        res = basis.run(_args(basis, ["--sizes", "4M", "--t", str(t), "--repeats", str(args.repeats), "--data",
                                      args.data, "--methods", "trajstore,official", "--out", str(out / f"basis-t{t}.json")]))
        windows += res["rows"]
    windows += [r for r in sizes["rows"] if r["size"] == "4M" and r["method"] in ("trajstore", "official")]
    print("== 3. step time vs SGD", flush=True)
    stepped = step.run(_args(step, ["--steps", str(args.steps), "--mmap-store", str(Path(args.data) / "wrn-40-10-t101.zarr"),
                                    "--out", str(out / "step.json")]))
    figures = [plot_memory_vs_n(sizes["rows"], out / "memory_vs_n.png"),
               plot_memory_vs_t(windows, out / "memory_vs_t.png"),
               plot_time_vs_floor(sizes["rows"], out / "time_vs_floor.png")]
    tables = format_tables(appended, sizes, windows, stepped)
    write_text(out / "goals.md", tables + "\n")
    print("\n" + tables)
    result = {"append": appended, "basis": sizes["rows"], "memory_vs_t": windows, "step": stepped,
              "figures": [f.name for f in figures], "tables": tables}
    write_result(out / "goals.json", result)
    print(f"wrote {out / 'goals.json'}, {out / 'goals.md'} and {', '.join(f.name for f in figures)}")
    return result


def format_tables(appended: dict[str, Any], sizes: dict[str, Any], windows: list[dict[str, Any]],
                  stepped: dict[str, Any]) -> str:
    a = appended
    lines = ["### Append (WRN-40-10, one snapshot of %.0f MiB; medians)" % a["snapshot_MiB"], "",
             "| | trajstore append | raw write, same disk | ratio |", "|---|---|---|---|",
             f"| durable (fsync) | {a['durable_append_MBps']:.0f} MB/s | {a['raw_write_fsync_MBps']:.0f} MB/s | "
             f"{a['durable_vs_raw']:.2f} |",
             f"| page cache | {a['cached_append_MBps']:.0f} MB/s | {a['raw_write_cache_MBps']:.0f} MB/s | "
             f"{a['cached_vs_raw']:.2f} |", "",
             f"Peak extra memory of an append: {a['peak_extra_MiB']:.0f} MiB = {a['peak_extra_vs_snapshot']:.2f} x one snapshot.",
             "", "### DLDR basis, t = 101, d = 40 (medians; fresh process each, page cache dropped)", "", sizes["table"],
             "", "### Peak memory vs t at n = 4M", "", "| t | trajstore | official |", "|---|---|---|"]
    by_t: dict[int, dict[str, Any]] = {}
    for r in windows:
        by_t.setdefault(r.get("t", 101), {})[r["method"]] = r
    for t in sorted(by_t):
        cells = [f"{by_t[t][m]['peak_rss_GiB']:.2f} GiB" if "peak_rss_GiB" in by_t[t].get(m, {}) else "-"
                 for m in ("trajstore", "official")]
        lines.append(f"| {t} | {cells[0]} | {cells[1]} |")
    lines += ["", "### Step time (ResNet-20, CPU; medians of steps accepted at the first trial)", "",
              "| batch | SGD | P+-BFGS (trajstore) | vs SGD | official re-creation | vs SGD |", "|---|---|---|---|---|---|"]
    for key, row in stepped.get("resnet20", {}).items():
        lines.append(f"| {key.removeprefix('batch')} | {row['sgd_s'] * 1e3:.0f} ms | "
                     f"{(row['trajstore_first_trial_s'] or row['trajstore_s']) * 1e3:.0f} ms | "
                     f"{row['trajstore_vs_sgd_first_trial'] or float('nan'):.2f}x | "
                     f"{(row['official_first_trial_s'] or row['official_s']) * 1e3:.0f} ms | "
                     f"{row['official_vs_sgd_first_trial'] or float('nan'):.2f}x |")
    wrn = stepped.get("wrn_mmap", {})
    if "rss_anon_peak_GiB" in wrn:
        lines += ["", f"WRN-40-10 P+-BFGS step with the {wrn['basis_GiB']:.1f} GiB basis memory-mapped: peak private "
                      f"memory {wrn['rss_anon_peak_GiB']:.2f} GiB (goal {wrn['goal_GiB']:.2f} GiB = model + one basis "
                      "chunk + 1 GiB)."]
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_memory_vs_n(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("trajstore", "tab:blue"), ("official", "tab:red")):
        got = [(r["n"], r["peak_rss_GiB"]) for r in rows if r["method"] == method and "peak_rss_GiB" in r]
        if got:
            ax.plot(*zip(*got), marker="o", color=color, label=f"{method} (measured)")
        skipped = [(r["n"], r["predicted_peak_GiB"]) for r in rows if r["method"] == method and "skipped" in r]
        if skipped:
            ax.plot(*zip(*skipped), marker="x", linestyle="none", color=color, label=f"{method} (predicted: does not fit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _finish(fig, ax, path, "parameters n", "peak memory (GiB)", "DLDR basis, t = 101, d = 40: peak memory vs n")


def plot_memory_vs_t(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("trajstore", "tab:blue"), ("official", "tab:red")):
        got = sorted((r.get("t", 101), r["peak_rss_GiB"]) for r in rows if r["method"] == method and "peak_rss_GiB" in r)
        if got:
            ax.plot(*zip(*got), marker="o", color=color, label=method)
    return _finish(fig, ax, path, "snapshots t", "peak memory (GiB)", "DLDR basis at n = 4M: peak memory vs t")


def plot_time_vs_floor(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    by = {(r["size"], r["method"]): r for r in rows}
    x = range(len(sizes))
    for k, (method, color) in enumerate((("floor", "tab:gray"), ("trajstore", "tab:blue"), ("official", "tab:red"))):
        heights = [by.get((s, method), {}).get("seconds", 0) for s in sizes]
        ax.bar([i + (k - 1) * 0.27 for i in x], heights, width=0.27, color=color, label=method)
    ax.set_xticks(list(x), sizes)
    ax.set_yscale("log")
    return _finish(fig, ax, path, "", "seconds", "DLDR basis, t = 101: time vs the machine's floor")
