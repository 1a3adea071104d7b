"""Write the README's results table from run folders (never typed by hand).

    python -m pipelines.readme runs/mnist1d runs/digits [--readme README.md]

Reads each ``RUN/results.json`` and replaces the text between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in the README with one Markdown table row per method and run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .atomic import write_text
from .report import LABELS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| experiment | model (parameters) | method | epochs | test accuracy (%) | seeds | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        cfg, summary = r["config"], r["summary"]
        seeds = len(r["seeds"])
        for method, row in summary.items():
            epochs = f"{row['epochs']}" if method == "sgd" else f"{row['epochs']} (+{row['sampling_epochs']} sampled)"
            model = f"{cfg['model']} ({summary['sgd']['parameters']:,})"
            dim = "" if method == "sgd" else f", d = {row['dim']}"
            lines.append(f"| {cfg['name']} | {model} | {LABELS[method]}{dim} | {epochs} | "
                         f"{row['test_acc_mean']:.2f} ± {row['test_acc_std']:.2f} | {seeds} | "
                         f"{r['wall_seconds']:.0f} s |")
    commits = sorted({str(r["provenance"].get("commit")) for r in results})
    devices = sorted({str(r["provenance"].get("device")) for r in results})
    lines.append("")
    lines.append(f"Test accuracy after the last epoch, mean ± standard deviation over seeds; subspace methods start "
                 f"from SGD's initialization and use the snapshots of SGD's first epochs (\"sampled\"). "
                 f"Device: {', '.join(devices)}; commit {', '.join(commits)}. Wall time: the whole run, all seeds.")
    return "\n".join(lines)


def update(readme: Path, runs: list[Path], command: str) -> str:
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section")
    block = f"{BEGIN}\n<!-- written by `{command}` -->\n\n{table(results)}\n{END}"
    head, rest = text.split(BEGIN, 1)
    new = head + block + rest.split(END, 1)[1]
    write_text(readme, new)
    return block


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding results.json")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    command = "python -m pipelines.readme " + " ".join(str(r) for r in args.runs)
    print(update(args.readme, args.runs, command))


if __name__ == "__main__":
    main()
