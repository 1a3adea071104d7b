"""An experiment's config checked as the user typed it, before anything is written or trained.

:func:`configure` builds the config of ``trajstore run NAME`` (or ``sample``) from the experiment's
defaults and the ``--set`` overrides, and checks all of it up front: each value's type and range,
the model and data names, the data folder, fields that must agree (``sample_epochs <= epochs``),
and ``dim <= snapshots - 1`` from the sampling settings (t snapshots span at most t - 1 centred
directions), so that a mistake costs no SGD run. Every refusal is a :class:`ConfigError` whose one
line names what the user typed (``--set dim=500``, ``--data-root``, the experiment name) and the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from trajstore.errors import TrajstoreError

__all__ = ["ConfigError", "configure", "snapshot_count", "TRAIN_SIZES"]

# Training examples of the built-in data sets (what the sampling schedule counts steps over).
TRAIN_SIZES = {"mnist1d": 4000, "digits": 1437, "cifar10": 50000, "cifar100": 50000}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class ConfigError(TrajstoreError, ValueError):
    """An experiment config that cannot run; the message names the flag or field and the fix."""


def _typed(key: str, typed: dict[str, str]) -> str:
    """How the user gave ``key`` (``--set key=value``, ``--seeds 0``), or that it is the default."""
    return typed.get(key, f"{key} (the experiment's default)")


def _parse_value(key: str, text: str, current: Any, annotation: str) -> Any:
    from .config import _parse

    ints = annotation == "tuple[int, ...]"
    kind = ("true or false" if isinstance(current, bool) else
            f"a comma-separated list{' of integers' if ints else ''}" if isinstance(current, tuple)
            else "an integer" if isinstance(current, int) else "a number" if isinstance(current, float) else "text")
    bad = ConfigError(f"--set {key}={text}: {key} takes {kind} (default {current!r})")
    try:
        value = _parse(text, current)
    except ValueError:
        raise bad from None
    if (ints and not all(isinstance(v, int) for v in value)) or (isinstance(value, float) and not math.isfinite(value)):
        raise bad
    return value


def snapshot_count(cfg: Any, train_size: int | None) -> int | None:
    """Snapshots the sampling stage records: the initialization plus one per epoch of the first
    ``sample_epochs`` (``snapshot_every = 0``) or one every ``snapshot_every`` steps; None when the
    training set's size is not known without reading it."""
    if not cfg.snapshot_every:
        return cfg.sample_epochs + 1
    if train_size is None:
        return None
    steps = cfg.sample_epochs * math.ceil(train_size / cfg.batch_size)
    return steps // cfg.snapshot_every + 1


def _check_data(cfg: Any, typed: dict[str, str]) -> int | None:
    """The data set exists where the config says; returns its training-set size when known."""
    name = cfg.data
    if name in _CIFAR_FOLDERS:
        folder = _CIFAR_FOLDERS[name]
        if cfg.data_root is None:
            raise ConfigError(f"{name} is read from a local folder (nothing is downloaded): give --data-root DIR "
                              f"(or --set data_root=DIR), DIR holding {folder}/")
        root = Path(cfg.data_root).expanduser()
        if not (root / folder).is_dir():
            found = "does not exist" if not root.exists() else f"has no {folder}/ folder"
            raise ConfigError(f"{_typed('data_root', typed)}: {root} {found}; it must hold {folder}/ (the python "
                              "version of the data set; nothing is downloaded)")
        return TRAIN_SIZES[name]
    if name.startswith("imagefolder:"):
        root = Path(name.split(":", 1)[1]).expanduser()
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            raise ConfigError(f"{_typed('data', typed)}: {root} must hold train/CLASS/*.png and test/CLASS/*.png")
        return sum(1 for p in (root / "train").rglob("*") if p.is_file())
    return TRAIN_SIZES.get(name)


def _check_fields(merged: dict[str, Any], typed: dict[str, str]) -> None:
    """Each value in range (what the user typed first), the model known, sample_epochs <= epochs."""
    from .config import _FIELD_CHECKS
    from .models import parse_model_name

    for key in [*typed, *merged]:
        check, value = _FIELD_CHECKS.get(key), merged.get(key)
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{_typed(key, typed)}: {key} must be {check[1]}, got {value!r:.80}")
    try:
        parse_model_name(merged["model"])
    except ValueError as e:
        where = typed["model"] if "model" in typed else f"experiment {merged['name']!r}"
        raise ConfigError(f"{where}: {e}") from None
    if merged["sample_epochs"] > merged["epochs"]:
        both = [typed[k] for k in ("epochs", "sample_epochs") if k in typed]
        raise ConfigError(f"{' and '.join(both) or 'sample_epochs (the experiment default)'}: snapshots are taken "
                          f"in the first sample_epochs epochs of the run, so sample_epochs ({merged['sample_epochs']}) "
                          f"must be <= epochs ({merged['epochs']})")


def _check_model(cfg: Any, typed: dict[str, str]) -> None:
    """The model builds for the data (on torch's meta device: shapes only, nothing allocated)."""
    import torch

    from .data import signature
    from .models import build_model

    num_classes, input_shape = signature(cfg.data)
    try:
        with torch.device("meta"):
            build_model(cfg.model, num_classes, input_shape)
    except Exception as e:  # a name the registry accepts but the architecture does not (resnet21)
        where = typed["model"] if "model" in typed else f"experiment {cfg.name!r}"
        raise ConfigError(f"{where}: model {cfg.model!r} cannot be built for {cfg.data} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _check_window(cfg: Any, typed: dict[str, str], train_size: int | None) -> None:
    snapshots = snapshot_count(cfg, train_size)
    if snapshots is not None and cfg.dim > snapshots - 1:
        schedule = (f"the initialization + 1 per epoch for sample_epochs={cfg.sample_epochs}" if not cfg.snapshot_every
                    else f"the initialization + 1 every {cfg.snapshot_every} steps of {cfg.sample_epochs} epochs")
        raise ConfigError(f"{_typed('dim', typed)}: the sampling window has {snapshots} snapshots ({schedule}), "
                          f"which span at most {snapshots - 1} directions: use --set dim={max(1, snapshots - 1)} or "
                          "less, or sample more (sample_epochs, snapshot_every)")


def _check_device(cfg: Any, typed: dict[str, str]) -> None:
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{_typed('device', typed)}: torch sees no CUDA device here; use --set device=cpu or auto")
    if cfg.device.startswith("cuda:") and int(cfg.device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"{_typed('device', typed)}: there are {torch.cuda.device_count()} CUDA devices")


def configure(name: str, overrides: dict[str, str] | None = None, *, basis: bool = True, **given: Any) -> Any:
    """The checked config of experiment ``name`` with the ``--set`` ``overrides`` (text, parsed
    to each field's type) and ``given`` values (``out``, ``seed``, ``seeds`` from their own flags).
    ``basis=False`` (``trajstore sample``: no basis is computed) leaves out the check of ``dim``
    against the sampling window.

    Raises
    ------
    ConfigError
        Naming the flag or field and the fix: an unknown experiment or field, a value of the wrong
        type or out of range, an unknown model, a missing data folder, fields that disagree,
        ``dim`` over what the sampling window spans, a CUDA device that is not there.
    """
    from . import EXPERIMENTS, experiment_config

    overrides = dict(overrides or {})
    typed = {k: f"--set {k}={v}" for k, v in overrides.items()}
    typed.update({k: f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None})
    try:
        base = experiment_config(name)
    except ValueError as e:
        close = difflib.get_close_matches(name, [e for e in EXPERIMENTS if "MODEL" not in e], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"{e}{hint}") from None
    names = [f.name for f in fields(base)]
    annotations = {f.name: str(f.type) for f in fields(base)}
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"--set {key}={text}: no such field; {hint}fields: {', '.join(names)}")
        values[key] = _parse_value(key, text, getattr(base, key), annotations[key])
    for key, value in given.items():
        if value is not None:
            values[key] = value
    merged = {**asdict(base), **values}
    _check_fields(merged, typed)
    try:
        cfg = type(base)(**merged)
    except (TypeError, ValueError) as e:
        raise ConfigError(_consistency(str(e), typed)) from None
    if not cfg.data.startswith("imagefolder:"):  # an image folder is sized from its files, checked next
        _check_model(cfg, typed)
    train_size = _check_data(cfg, typed)
    if cfg.data.startswith("imagefolder:"):
        _check_model(cfg, typed)
    if basis:
        _check_window(cfg, typed, train_size)
    _check_device(cfg, typed)
    return cfg


def _consistency(message: str, typed: dict[str, str]) -> str:
    """``ExperimentConfig.__post_init__``'s message, led by the flags the user typed that it names."""
    named = [v for k, v in typed.items() if k in message]
    return f"{', '.join(named)}: {message}" if named else message
