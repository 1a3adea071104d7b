"""The benchmark harness behind ``trajstore bench``: one way to measure, shared by the
plan-vs-measurement comparison (``pipelines/bench.py``) and the goal suite (``goals``: append
throughput, the DLDR basis across sizes, step time), which ``benchmarks/*.py`` call."""

SUITES = ("goals", "append", "basis", "step")


def run_suite(name: str, argv: list[str]) -> object:
    """``trajstore bench --suite NAME ARGS``: the suite's own command line."""
    import importlib

    if name not in SUITES:
        raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"pipelines.harness.{name}").main(argv)
