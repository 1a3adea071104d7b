"""An experiment's config: the fields and their defaults, parsing ``--set`` values, and the checks
of a config read back from a store (hostile input) before anything is built from it.

:class:`ExperimentConfig` is frozen; each family file (``mnist1d.py``, ``digits.py``, ``cifar.py``)
overrides its defaults, and :func:`pipelines.validate.configure` checks what a user typed.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from trajstore.errors import InvalidStoreError, LayoutMismatchError
from trajstore.layout import Layout

from . import data as datasets
from .models import build_model

__all__ = ["METHODS", "STORE", "ExperimentConfig", "check_store_model", "config_from_store", "load_config"]

METHODS = ("pbfgs", "pbfgs+", "psgd")
STORE = "trajectory.zarr"


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. The families override the defaults; ``trajstore run NAME --set k=v`` too."""

    name: str = "experiment"
    out: str | None = None             # run folder (default runs/NAME)
    # -- data and model
    data: str = "mnist1d"              # mnist1d | digits | cifar10 | cifar100 | imagefolder:PATH
    data_root: str | None = None       # folder holding CIFAR (python version); nothing is downloaded
    label_noise: float = 0.0           # fraction of training labels replaced by another class
    augment: bool = True               # CIFAR: random 4-pixel pad + crop and horizontal flip
    model: str = "cnn1d"               # see pipelines.models.build_model
    # -- the SGD run: baseline and sampled trajectory (paper: batch 128, momentum 0.9, wd 5e-4)
    optimizer: str = "sgd"             # "sgd" or "adam"
    lr: float = 0.1                    # paper: 0.1 for SGD, 1e-3 for Adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 100                  # the full SGD run, the baseline of the comparison
    milestones: tuple[int, ...] = (50, 75)  # step decay: lr *= gamma at these epochs
    gamma: float = 0.1
    sample_epochs: int = 30            # snapshots are taken during the first sample_epochs epochs
    pretrain_epochs: int = 0           # epochs before snapshot 0 (paper: 1 for MobileNet and Inception-v4)
    snapshot_every: int = 0            # steps between snapshots; 0 = one snapshot per epoch
    storage_dtype: str = "float32"
    # -- DLDR and the subspace optimizers
    dim: int = 40                      # d, the dimension of the subspace
    methods: tuple[str, ...] = ("pbfgs", "pbfgs+", "psgd")
    subspace_epochs: int = 20          # at most a quarter of epochs, as in the paper
    subspace_batch_size: int = 1024
    psgd_lr: float = 0.1               # P-SGD (momentum 0.9) step size on the coordinates
    residual_lr: float = 0.01          # P+-BFGS: SGD with momentum 0.9 on the residual gradient
    basis_mode: str = "auto"           # resident | mmap | stream | auto (see DeviceBasis)
    basis_dtype: str = "float32"       # U on the device: float32 or bfloat16 (half the bytes; see DeviceBasis)
    shard_basis: bool = False          # several processes: each holds 1/N of U's rows (see DeviceBasis)
    # -- evaluation and running
    projection_k: int = 5              # Figure 2b: projection onto the top k directions
    projection_snapshots: int = 0      # snapshots evaluated for Figure 2b (0 = all of the window)
    eval_batch_size: int = 1024
    device: str = "auto"               # auto = cuda when there is one, else cpu
    num_workers: int = 0               # DataLoader workers (image data sets)
    threads: int = 0                   # torch CPU threads (0 = 1 for a small model, else the cores)
    seed: int = 0                      # first seed; seeds run seed, seed + 1, ...
    seeds: int = 1

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose among {', '.join(METHODS)}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 < self.sample_epochs <= self.epochs:
            raise ValueError(f"sample_epochs must be in 1..epochs={self.epochs}, got {self.sample_epochs}")
        for name in ("epochs", "batch_size", "dim", "subspace_batch_size", "eval_batch_size", "seeds", "projection_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.snapshot_every < 0 or self.subspace_epochs < 0:
            raise ValueError("snapshot_every and subspace_epochs must be >= 0")
        if type(self.pretrain_epochs) is not int or self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an integer >= 0, got {self.pretrain_epochs!r}")

    @property
    def folder(self) -> Path:
        return Path(self.out or f"runs/{self.name}")

    def with_overrides(self, **changes: Any) -> ExperimentConfig:
        """A copy with fields changed; strings are parsed to each field's type (``--set k=v``)."""
        names = [f.name for f in fields(self)]
        parsed = {}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"{type(self).__name__} has no field {key!r}; fields: {', '.join(names)}")
            parsed[key] = _parse(value, getattr(self, key)) if isinstance(value, str) else value
        return type(self)(**{**asdict(self), **parsed})

    def to_json(self) -> dict[str, Any]:
        return {"class": type(self).__name__, **asdict(self)}


def _parse(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        items = [s for s in text.replace(" ", "").split(",") if s]
        return tuple(int(s) if s.lstrip("-").isdigit() else s for s in items)
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return None if text.lower() == "none" else text


def load_config(doc: dict[str, Any]) -> ExperimentConfig:
    """The config recorded in a store or a result file (JSON, lists back to tuples)."""
    known = {f.name for f in fields(ExperimentConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.items() if k in known}
    return ExperimentConfig(**values)


# ---------------------------------------------------------- a config read from a store (hostile input)

# What each field of a config read from a store may hold, beyond its type: the checks run before
# anything is built from it, so a store cannot ask for a model, a batch or a thread pool that does
# not fit (bounds wider than any experiment's).
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "label_noise": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr": (lambda v: 0 < v <= 1e3, "in (0, 1000]"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v <= 1e3, "in [0, 1000]"),
    "gamma": (lambda v: 0 < v <= 1e3, "in (0, 1000]"),
    "psgd_lr": (lambda v: 0 < v <= 1e3, "in (0, 1000]"),
    "residual_lr": (lambda v: 0 <= v <= 1e3, "in [0, 1000]"),
    "epochs": (lambda v: 1 <= v <= 10**6, "in [1, 10**6]"),
    "sample_epochs": (lambda v: 1 <= v <= 10**6, "in [1, 10**6]"),
    "pretrain_epochs": (lambda v: 0 <= v <= 10**6, "in [0, 10**6]"),
    "subspace_epochs": (lambda v: 0 <= v <= 10**6, "in [0, 10**6]"),
    "batch_size": (lambda v: 1 <= v <= 2**24, "in [1, 2**24]"),
    "subspace_batch_size": (lambda v: 1 <= v <= 2**24, "in [1, 2**24]"),
    "eval_batch_size": (lambda v: 1 <= v <= 2**24, "in [1, 2**24]"),
    "snapshot_every": (lambda v: 0 <= v <= 2**31, "in [0, 2**31]"),
    "dim": (lambda v: 1 <= v <= 10**5, "in [1, 10**5]"),
    "projection_k": (lambda v: 1 <= v <= 10**5, "in [1, 10**5]"),
    "projection_snapshots": (lambda v: 0 <= v <= 2**31, "in [0, 2**31]"),
    "num_workers": (lambda v: 0 <= v <= 256, "in [0, 256]"),
    "threads": (lambda v: 0 <= v <= 4096, "in [0, 4096]"),
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    "seeds": (lambda v: 1 <= v <= 10**4, "in [1, 10**4]"),
    "milestones": (lambda v: len(v) <= 1000 and all(0 <= m <= 10**6 for m in v), "epochs in [0, 10**6]"),
    "methods": (lambda v: 1 <= len(v) <= len(METHODS) and set(v) <= set(METHODS), f"among {', '.join(METHODS)}"),
    "optimizer": (lambda v: v in ("sgd", "adam"), "'sgd' or 'adam'"),
    "storage_dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "basis_mode": (lambda v: v in ("auto", "resident", "mmap", "stream"), "auto, resident, mmap or stream"),
    "basis_dtype": (lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", v, re.ASCII) is not None,
               "auto, cpu, mps, cuda or cuda:N"),
    "data": (lambda v: v in ("mnist1d", "digits", "cifar10", "cifar100") or v.startswith("imagefolder:"),
             "mnist1d, digits, cifar10, cifar100 or imagefolder:PATH"),
}
# The type each annotation asks for (int accepts no bool; float accepts an int).
_FIELD_TYPES = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "str | None": (str, type(None)),
                "tuple[int, ...]": (int,), "tuple[str, ...]": (str,)}


def _check_field(name: str, annotation: str, value: Any) -> Any:
    bad = f"the store's experiment config has {name} = {value!r:.100}: "
    kinds = _FIELD_TYPES[annotation]
    if annotation.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(type(v) in kinds for v in value):
            raise InvalidStoreError(f"{bad}expected a list of {kinds[0].__name__}")
        value = tuple(value)
    elif type(value) not in kinds:
        raise InvalidStoreError(f"{bad}expected {annotation}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidStoreError(f"{bad}expected a finite number")
    if isinstance(value, str) and len(value) > 4096:
        raise InvalidStoreError(f"{bad}a string of {len(value)} characters")
    check = _FIELD_CHECKS.get(name)
    if check is not None and value is not None and not check[0](value):
        raise InvalidStoreError(f"{bad}expected {check[1]}")
    return value


def config_from_store(doc: object) -> ExperimentConfig:
    """The config a store's ``attrs["experiment"]`` records (by ``trajstore sample``), checked
    field by field before anything is built from it: each value of its field's type, numbers
    finite and in range (:data:`_FIELD_CHECKS`), the model a name of :data:`MODEL_NAMES`.
    Unknown keys are ignored (a newer trajstore may record more). Raises InvalidStoreError
    naming the field and its value."""
    from .models import parse_model_name

    if not isinstance(doc, dict):
        raise InvalidStoreError(f"the store's experiment config must be a JSON object, got {type(doc).__name__}")
    values = {f.name: _check_field(f.name, str(f.type), doc[f.name]) for f in fields(ExperimentConfig) if f.name in doc}
    if "model" in values:
        try:
            parse_model_name(values["model"])
        except ValueError as e:
            raise InvalidStoreError(f"the store's experiment config has model = {values['model']!r:.100}: {e}") from e
    try:
        return ExperimentConfig(**values)
    except ValueError as e:  # fields inconsistent with each other (sample_epochs > epochs)
        raise InvalidStoreError(f"the store's experiment config is inconsistent: {e}") from e


def check_store_model(cfg: ExperimentConfig, layout: Layout) -> None:
    """Build ``cfg``'s model on torch's ``meta`` device (shapes only: no memory, whatever its size)
    and check it is the model the store holds: the same parameter count ``n``, then the same
    layout fingerprint (names, shapes, dtypes). Raises LayoutMismatchError naming the model, or
    ValueError for a model or data name outside the registry."""
    num_classes, input_shape = datasets.signature(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, num_classes, input_shape)
    n = sum(p.numel() for p in model.parameters())
    if n != layout.n:
        raise LayoutMismatchError(f"model {cfg.model!r} for {cfg.data!r} has {n:,} parameters but the store's "
                                  f"layout has n = {layout.n:,}: the store does not hold that model")
    fingerprint = Layout.from_model(model, allow_meta=True).fingerprint
    if fingerprint != layout.fingerprint:
        raise LayoutMismatchError(f"model {cfg.model!r} for {cfg.data!r} has the store's {n:,} parameters but "
                                  f"other names, shapes or dtypes (layout fingerprint {fingerprint}, the store's "
                                  f"{layout.fingerprint})")
