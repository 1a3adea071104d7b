"""Writes a kill cannot tear: each result file appears whole under its name, or not at all.

A file is written to ``NAME.tmp`` beside it and renamed over ``NAME`` (``os.replace`` is atomic on
POSIX), so a reader, or a run resumed after a SIGKILL, sees the old file or the new one, never half
of one. A temporary file a kill leaves behind is overwritten by the next write of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trajstore._backend import write_atomic

__all__ = ["save_figure", "save_json", "save_torch", "write_atomic", "write_text"]


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_json(obj: Any, path: Path) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


def save_torch(obj: Any, path: Path) -> Path:
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig: Any, path: Path, **kwargs: Any) -> Path:
    """``fig.savefig`` atomically; the format comes from ``path``'s suffix, not the temporary's."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip("."), **kwargs))
