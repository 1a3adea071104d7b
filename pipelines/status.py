"""Where a run is, for the one line an interrupted command prints (``trajstore: interrupted during
SGD (seed 0, epoch 3 of 10); run the same command to resume``)."""

from __future__ import annotations

__all__ = ["describe", "enter", "epoch", "reset"]

_where: dict[str, object] = {}


def enter(stage: str, seed: int | None = None) -> None:
    """A stage of the run starts (its epochs are reported by :func:`epoch`)."""
    _where.clear()
    _where.update(stage=stage, seed=seed)


def reset() -> None:
    """No stage is running (a command starts)."""
    _where.clear()


def epoch(current: int, total: int) -> None:
    """Epoch ``current`` of ``total`` of the stage is running."""
    _where.update(epoch=current, total=total)


def describe() -> str:
    """``SGD (seed 0, epoch 3 of 10)``, or "" outside any stage."""
    if not _where:
        return ""
    parts = [f"seed {_where['seed']}"] if _where.get("seed") is not None else []
    if "epoch" in _where:
        parts.append(f"epoch {_where['epoch']} of {_where['total']}")
    return f"{_where['stage']}" + (f" ({', '.join(parts)})" if parts else "")
