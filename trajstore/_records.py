"""Per-snapshot metadata: built from user input on append, validated when read from a store.

Records are plain JSON objects (never pickle): ``step`` (int or null), ``epoch`` (number or
null), ``lr`` (number or null), ``metrics`` (name -> number), ``time`` (Unix seconds),
``append_seconds``, and optionally ``rng`` (torch's CPU RNG state, base64).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidStoreError

if TYPE_CHECKING:
    import torch

__all__ = ["SnapshotRecord", "check_record", "decode_rng", "make_record", "parse_commit"]

SnapshotRecord = dict[str, Any]
MAX_SNAPSHOTS = 10_000_000


def _number(name: str, value: object, *, integer: bool = False) -> int | float | None:
    if value is None:
        return None
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        value = value.item()  # a one-element torch tensor
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # numpy scalars
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def make_record(*, step: object, epoch: object, lr: object, metrics: Mapping[str, object] | None,
                rng_state: bool | torch.Tensor, time: float) -> SnapshotRecord:
    """A validated record; raises TypeError/ValueError before anything is written."""
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers, got {type(metrics).__name__}")
    clean: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        number = _number(f"metric {key!r}", value)
        assert number is not None or value is None
        if number is None:
            raise TypeError(f"metric {key!r} must be a number, got None")
        clean[key] = number
    record: SnapshotRecord = {"step": _number("step", step, integer=True), "epoch": _number("epoch", epoch),
                              "lr": _number("lr", lr), "metrics": clean, "time": time}
    if rng_state is not False and rng_state is not None:
        import torch

        state = torch.get_rng_state() if rng_state is True else rng_state  # a state captured earlier
        record["rng"] = base64.b64encode(state.numpy().tobytes()).decode("ascii")
    return record


def decode_rng(record: SnapshotRecord) -> torch.Tensor | None:
    text = record.get("rng")
    if text is None:
        return None
    import torch

    try:
        data = base64.b64decode(text, validate=True)
    except (TypeError, ValueError) as e:  # binascii.Error is a ValueError
        raise InvalidStoreError(f"recorded RNG state is not base64 ({e}): {text!r:.100}") from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def check_record(i: int, rec: object, where: str) -> SnapshotRecord:
    if not isinstance(rec, dict):
        raise InvalidStoreError(f"{where}: record of snapshot {i} is not a JSON object")
    for key in ("step", "epoch", "lr", "time", "append_seconds"):
        value = rec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidStoreError(f"{where}: snapshot {i} field {key!r} must be a number, got {value!r:.100}")
    metrics = rec.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()
    ):
        raise InvalidStoreError(f"{where}: snapshot {i} metrics must map names to numbers")
    if "rng" in rec and not isinstance(rec["rng"], str):
        raise InvalidStoreError(f"{where}: snapshot {i} rng state must be a base64 string")
    return rec if "metrics" in rec else {**rec, "metrics": metrics}  # readers may rely on the key


def parse_commit(doc: object, where: str) -> tuple[int, list[SnapshotRecord]]:
    """The committed count and records from a trajectory's commit attribute."""
    if not isinstance(doc, Mapping):
        raise InvalidStoreError(f"{where}: missing or malformed commit record (the trajectory was never completed)")
    count, records = doc.get("count"), doc.get("records")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_SNAPSHOTS:
        raise InvalidStoreError(f"{where}: committed count must be an integer in [0, {MAX_SNAPSHOTS}], got {count!r:.100}")
    if not isinstance(records, list) or len(records) != count:
        raise InvalidStoreError(f"{where}: commit lists {len(records) if isinstance(records, list) else records!r:.100} records for {count} snapshots")
    return count, [check_record(i, r, where) for i, r in enumerate(records)]
