"""Writes a kill cannot tear: each result file appears whole under its name, or not at all.

A file is written to ``NAME.tmp`` beside it and renamed over ``NAME`` (``os.replace`` is atomic on
POSIX), so a reader, or a run resumed after a SIGKILL, sees the old file or the new one, never half
of one. A temporary file a kill leaves behind is overwritten by the next write of the same name.
A write that fails (a full disk: ``OSError(ENOSPC, "no space left on device while writing PATH: ...")``)
removes its temporary file and leaves the old file, if any, as it was.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, BinaryIO

from trajstore._backend import write_atomic

__all__ = ["save_figure", "save_json", "save_torch", "write_atomic", "write_text"]


def _write(path: Path, write: Any) -> Path:
    """``write_atomic``, with a full disk named as such: ``OSError(ENOSPC, "no space left on device
    while writing PATH: ...")``; the temporary file is removed and ``path`` left as it was."""
    try:
        return write_atomic(path, write)
    except OSError as e:  # the write's, or the close's (buffered bytes flushed there), or the rename's
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}: {e.strerror or e}") from e
        raise


def write_text(path: Path, text: str) -> Path:
    return _write(path, lambda tmp: tmp.write_text(text))


def save_json(obj: Any, path: Path) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


class _Sink:
    """The binary file ``torch.save`` writes through, keeping the first OSError a write raised:
    torch's zip writer swallows it and raises ``RuntimeError [enforce fail at inline_container.cc]``
    instead, which says nothing of a full disk."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._file.flush()


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` atomically. A failed write raises its own OSError, with its errno (a full
    disk: ``OSError(ENOSPC, "no space left on device while writing PATH: ...")``), not torch's
    RuntimeError; it leaves no temporary file, and ``path`` as it was (the old file, or none)."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                torch.save(obj, sink)
            except Exception as e:
                if sink.error is None:
                    raise
                raise sink.error from e

    return _write(path, write)


def save_figure(fig: Any, path: Path, **kwargs: Any) -> Path:
    """``fig.savefig`` atomically; the format comes from ``path``'s suffix, not the temporary's."""
    return _write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip("."), **kwargs))
