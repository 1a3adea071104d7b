"""The benchmark harness behind ``trajstore bench``: one way to measure, shared by the
plan-vs-measurement comparison (``pipelines/bench.py``) and the goal suite (``goals``: append
throughput, the DLDR basis across sizes, step time), which ``benchmarks/*.py`` call."""

from __future__ import annotations

import argparse
import re

SUITES = ("goals", "append", "basis", "step", "growth")


def suite_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of a suite or benchmark script: its module docstring as the description
    (reST markup removed), every option's default in its help (:class:`trajstore.cli.HelpFormatter`)."""
    from trajstore.cli import HelpFormatter

    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", (doc or "").strip()).replace("``", "").replace("**", "")
    return argparse.ArgumentParser(prog=prog, description=text, formatter_class=HelpFormatter)


def run_suite(name: str, argv: list[str]) -> object:
    """``trajstore bench --suite NAME ARGS``: the suite's own command line."""
    import importlib

    if name not in SUITES:
        raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"pipelines.harness.{name}").main(argv, prog=f"trajstore bench --suite {name}")
