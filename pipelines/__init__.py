"""Whole experiments, one readable file each; ``trajstore run NAME`` dispatches here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["EXPERIMENTS", "run_experiment"]

EXPERIMENTS = ("demo",)


def run_experiment(name: str, *, out: str | None = None, seed: int = 0) -> dict[str, Any]:
    if name == "demo":
        from . import demo

        config = demo.DemoConfig(out=str(Path(out or "runs/demo")), seed=seed)
        return demo.main(config)
    raise SystemExit(f"trajstore run: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
