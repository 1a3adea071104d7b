"""The paper's experiment, stage by stage: sample -> basis -> subspace training -> evaluation.

Every family file (``mnist1d.py``, ``digits.py``, ``cifar.py``) is a frozen
:class:`ExperimentConfig` with its own defaults and a ``main(config)`` that calls :func:`run`.

A run folder holds one folder per seed::

    OUT/config.json                 the config the folder belongs to (a different one is refused)
    OUT/seed-S/trajectory.zarr      the SGD trajectory and its DLDR basis
    OUT/seed-S/sgd.json             the SGD run: per-epoch losses and accuracies, sampling overhead
    OUT/seed-S/sgd.pt               the SGD run's final model (state_dict)
    OUT/seed-S/METHOD.json          one subspace run (pbfgs, pbfgs+, psgd); METHOD.pt its model
    OUT/seed-S/projection.json      Figure 2b: accuracy of each snapshot and of its projection
    OUT/seed-S/*.ckpt.pt            per-epoch checkpoints of the stage in progress
    OUT/results.json, OUT/*.png     the report

Resuming: a stage whose ``.json`` exists is done and is read back; a stage with a checkpoint
continues after its last finished epoch. Every epoch reseeds torch from (seed, stage, epoch), so
a resumed stage draws the same batches, augmentations and dropout masks as an uninterrupted one
and, on a CPU, produces the same bytes. Every file is written under a temporary name and renamed
(``pipelines/atomic.py``), a stage's ``.json`` last, so a run killed at any moment (SIGKILL
included) leaves each file whole or absent and resumes with the same command.
"""

from __future__ import annotations

import json
import math
import re
import resource
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

import trajstore
from trajstore import TrajectoryStore, dldr
from trajstore.errors import InvalidStoreError, LayoutMismatchError
from trajstore.layout import Layout
from trajstore.recorder import Recorder

from . import data as datasets
from . import ranks
from .atomic import save_json, save_torch
from .models import build_model

__all__ = ["METHODS", "ExperimentConfig", "run", "run_seed", "sample", "compute_basis", "train_subspace",
           "projection_accuracy", "load_config", "config_from_store", "check_store_model"]

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
    shard_basis: bool = False          # several processes: each holds 1/N of U's rows (see DeviceBasis)
    # -- evaluation and running
    projection_k: int = 5              # Figure 2b: projection onto the top k directions
    projection_snapshots: int = 0      # snapshots evaluated for Figure 2b (0 = all of the window)
    eval_batch_size: int = 1024
    device: str = "auto"               # auto = cuda when there is one, else cpu
    num_workers: int = 0               # DataLoader workers (image data sets)
    threads: int = 0                   # torch CPU threads (0 = torch's default)
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


# ------------------------------------------------------------------------------- helpers


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _reseed(seed: int, stage: str, epoch: int) -> torch.Generator:
    """Seed torch (dropout, augmentation) for one epoch of one stage and return the generator
    of its batch order: every epoch's randomness depends on (seed, stage, epoch) only."""
    value = (seed * 1_000_003 + zlib.crc32(stage.encode()) * 1009 + epoch) % 2**63
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value + 1)


def _on_device(dataset: Dataset[Any], device: torch.device) -> Dataset[Any]:
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t.to(device) for t in dataset.tensors))
    return dataset


def _batches(dataset: Dataset[Any], batch_size: int, device: torch.device, *, generator: torch.Generator | None,
             num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches, shuffled by ``generator`` (None: in order). Tensor data sets are sliced on
    the device directly; others go through a DataLoader."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
        for idx in order.split(batch_size):
            idx = idx.to(x.device)
            yield x[idx], y[idx]
        return
    loader = DataLoader(dataset, batch_size, shuffle=generator is not None, generator=generator,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _num_batches(dataset: Dataset[Any], batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset[Any], cfg: ExperimentConfig, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of ``model`` in eval mode (on several processes,
    each evaluates its part of ``dataset`` and the sums are all-reduced)."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in _batches(ranks.part_of(dataset), cfg.eval_batch_size, device, generator=None,
                         num_workers=cfg.num_workers):
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    loss, correct, count = ranks.all_sum([loss, correct, count])
    return loss / count, 100.0 * correct / count


def _peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        peak["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return peak


def _save_atomic(obj: Any, path: Path) -> None:
    # a reader, or a resumed run, sees the old file or the new one, never half of one
    if not ranks.is_main():
        return  # on several processes rank 0 writes every file (the ranks hold the same state)
    if path.suffix == ".json":
        save_json(obj, path)
    else:
        save_torch(obj, path)


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class _Setup:
    """Data, device and a model factory for one seed of an experiment."""

    def __init__(self, cfg: ExperimentConfig, seed: int) -> None:
        if cfg.threads or ranks.world() > 1:
            torch.set_num_threads(cfg.threads or ranks.default_threads())
        self.cfg, self.seed, self.device = cfg, seed, _device(cfg)
        data = datasets.load(cfg.data, root=cfg.data_root, label_noise_fraction=cfg.label_noise, seed=seed,
                             augment=cfg.augment)
        self.num_classes, self.input_shape = data.num_classes, data.input_shape
        self.train, self.test = _on_device(data.train, self.device), _on_device(data.test, self.device)

    def model(self) -> nn.Module:
        torch.manual_seed(self.seed)  # the initialization: snapshot 0 of the trajectory
        model = build_model(self.cfg.model, self.num_classes, self.input_shape).to(self.device)
        return ranks.sync_batchnorm(model)  # on several processes: the global batch's statistics


# ------------------------------------------------------------------------------- stage 1: sample


def _sampler(cfg: ExperimentConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)


def sample(cfg: ExperimentConfig, folder: Path, seed: int, setup: _Setup | None = None) -> dict[str, Any]:
    """Train with SGD (or Adam) for ``cfg.epochs`` epochs, recording snapshots into
    ``folder/trajectory.zarr`` during the first ``cfg.sample_epochs`` (snapshot 0 = the
    initialization). Writes ``folder/sgd.pt`` (the final model's state_dict) and then
    ``folder/sgd.json``; resumes from ``folder/sgd.ckpt.pt``."""
    done, ckpt_path = folder / "sgd.json", folder / "sgd.ckpt.pt"
    if done.exists():
        _remove(ckpt_path)  # a run killed between the two left it
        return json.loads(done.read_text())
    setup = setup or _Setup(cfg, seed)
    ranks.check_split(setup.train, cfg.batch_size, "batch_size")
    folder.mkdir(parents=True, exist_ok=True)
    model = setup.model()
    opt, sched = _sampler(cfg, model)
    state = {"epoch": 0, "step": 0, "next_snapshot": 1, "history": [], "seconds": 0.0,
             "recorder": {"copy": 0.0, "wait": 0.0, "write": 0.0}}
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
    net = ranks.wrap(model)  # DDP on several processes: gradients averaged over the ranks
    recorder = Recorder(folder / STORE, model, resume=True,
                        create_options={"storage_dtype": cfg.storage_dtype,
                                        "attrs": {"experiment": cfg.to_json(), "seed": seed}})
    base = dict(state["recorder"])
    bar = tqdm(range(state["epoch"] + 1, cfg.epochs + 1), desc=f"seed {seed}: {cfg.optimizer.upper()}",
               unit="epoch", initial=state["epoch"], total=cfg.epochs, disable=not ranks.is_main())
    try:
        for epoch in bar:
            started = time.perf_counter()
            gen = _reseed(seed, "sample", epoch)
            model.train()
            loss_sum, correct, count = 0.0, 0, 0
            sampling = epoch <= cfg.sample_epochs
            for x, y, rows in _train_batches(setup, cfg.batch_size, gen, cfg.num_workers):
                opt.zero_grad(set_to_none=True)
                logits = net(x)
                loss = ranks.scaled_loss(logits, y, rows)
                loss.backward()
                opt.step()
                state["step"] += 1
                loss_sum += loss.item() * rows / ranks.world()  # this rank's share of the batch's loss sum
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
                if sampling and cfg.snapshot_every and state["step"] % cfg.snapshot_every == 0:
                    _snapshot(recorder, state, epoch, opt)
            if sampling and not cfg.snapshot_every:
                _snapshot(recorder, state, epoch, opt)
            sched.step()
            loss_sum, correct, count = ranks.all_sum([loss_sum, correct, count])
            test_loss, test_acc = evaluate(model, setup.test, cfg, setup.device)
            recorder.flush()  # the checkpoint must not claim a snapshot that is not committed
            state["seconds"] += time.perf_counter() - started
            state["history"].append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / count,
                                     "train_acc": 100.0 * correct / count, "test_loss": test_loss, "test_acc": test_acc,
                                     "snapshots": state["next_snapshot"]})
            state["epoch"] = epoch
            state["recorder"] = {k: base[k] + recorder.stats[k] for k in base}
            _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "state": state}, ckpt_path)
            bar.set_postfix(test_acc=f"{test_acc:.2f}", snapshots=state["next_snapshot"])
    finally:
        recorder.close()
        bar.close()
    rec = state["recorder"]
    result = {"seed": seed, "epochs": cfg.epochs, "steps": state["step"], "history": state["history"],
              "snapshots": state["next_snapshot"], "train_seconds": state["seconds"],
              "sampling": {"copy_seconds": rec["copy"], "wait_seconds": rec["wait"], "write_seconds": rec["write"],
                           "overhead_seconds": rec["copy"] + rec["wait"],
                           "overhead_fraction": (rec["copy"] + rec["wait"]) / max(state["seconds"], 1e-9)},
              **_peak_memory(setup.device)}
    _save_atomic(model.state_dict(), folder / "sgd.pt")  # the baseline's final model
    _save_atomic(result, done)
    _remove(ckpt_path)
    ranks.barrier()  # the other ranks go on once rank 0 has written the stage's files
    return result


def _remove(path: Path) -> None:
    if ranks.is_main():
        path.unlink(missing_ok=True)


def _train_batches(setup: _Setup, batch_size: int, generator: torch.Generator,
                   num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(x, y, rows of the global batch)``: the whole batch on one process, this rank's part of
    it on several (pipelines.ranks)."""
    if ranks.world() > 1:
        yield from ranks.rank_batches(setup.train, batch_size, setup.device, generator=generator,
                                      num_workers=num_workers)
        return
    for x, y in _batches(setup.train, batch_size, setup.device, generator=generator, num_workers=num_workers):
        yield x, y, len(y)


def _snapshot(recorder: Recorder, state: dict[str, Any], epoch: int, opt: torch.optim.Optimizer) -> None:
    # After a resume the store may already hold snapshots of the epoch being redone (written
    # after the last checkpoint); they are the same snapshots, so they are kept, not re-written.
    if state["next_snapshot"] >= len(recorder):
        recorder.snapshot(step=state["step"], epoch=epoch, lr=opt.param_groups[0]["lr"])
    state["next_snapshot"] += 1


# ------------------------------------------------------------------------------- stage 2: basis


def compute_basis(cfg: ExperimentConfig, folder: Path, sampled: dict[str, Any]) -> tuple[trajstore.Basis, dict[str, Any]]:
    """The DLDR basis of every snapshot of the sampling window (cached in the store)."""
    started = time.perf_counter()
    window = sampled["snapshots"]
    if ranks.is_main():
        dldr(folder / STORE, cfg.dim, stop=window, name=f"window-d{cfg.dim}", progress=True)
    ranks.barrier()  # every rank opens the basis rank 0 computed (dldr finds it complete)
    basis = dldr(folder / STORE, cfg.dim, stop=window, name=f"window-d{cfg.dim}", progress=ranks.is_main())
    evr = basis.explained_variance_ratio
    return basis, {"name": basis.name, "window": [basis.start, basis.stop], "d": basis.d, "n": basis.n,
                   "singular_values": basis.singular_values.tolist(), "explained_variance_ratio": evr.tolist(),
                   "explained": float(evr.sum()), "residuals": basis.residuals().tolist(),
                   "orthonormality": basis.orthonormality, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------- stage 3: subspace training


def _subspace_optimizer(cfg: ExperimentConfig, method: str, model: nn.Module, basis: Any) -> torch.optim.Optimizer:
    if method == "psgd":
        return trajstore.PSGD(model.parameters(), basis, lr=cfg.psgd_lr, momentum=0.9)
    # Rejected line-search trials must not leave their passes in the BatchNorm statistics.
    return trajstore.PBFGS(model.parameters(), basis, plus=method == "pbfgs+", residual_lr=cfg.residual_lr,
                           buffers=model.buffers())


def train_subspace(cfg: ExperimentConfig, folder: Path, seed: int, method: str, basis: trajstore.Basis,
                   setup: _Setup | None = None, *, epochs: int | None = None, batch_size: int | None = None,
                   tag: str | None = None, store: Path | str | None = None,
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train from the window's first snapshot (parameters and buffers: the SGD run's
    initialization) with ``method`` in the basis' subspace. Writes ``folder/TAG.json`` (the
    record) and ``folder/TAG.pt`` (the trained model's state_dict); resumes from
    ``folder/TAG.ckpt.pt``. The trajectory is ``store`` (default ``folder/trajectory.zarr``), a
    URL opened with ``storage_options`` (as for :meth:`trajstore.TrajectoryStore.open`)."""
    tag = tag or method
    epochs = cfg.subspace_epochs if epochs is None else epochs
    batch_size = batch_size or cfg.subspace_batch_size
    done, ckpt_path = folder / f"{tag}.json", folder / f"{tag}.ckpt.pt"
    if done.exists():
        _remove(ckpt_path)  # a run killed between the two left it
        return json.loads(done.read_text())
    setup = setup or _Setup(cfg, seed)
    ranks.check_split(setup.train, batch_size, "subspace_batch_size")
    model = setup.model()
    folder.mkdir(parents=True, exist_ok=True)
    with TrajectoryStore.open(store or folder / STORE, trajectory=basis.trajectory,
                              storage_options=storage_options) as trajectory:
        trajectory.load_into(model, basis.start)
    on_device = basis.on(setup.device, mode=cfg.basis_mode, shard=cfg.shard_basis)
    opt = _subspace_optimizer(cfg, method, model, on_device)
    state: dict[str, Any] = {"epoch": 0, "history": [], "seconds": 0.0}
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
    net = ranks.wrap(model)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    bar = tqdm(range(state["epoch"] + 1, epochs + 1), desc=f"seed {seed}: {tag}", unit="epoch",
               initial=state["epoch"], total=epochs, disable=not ranks.is_main())
    for epoch in bar:
        started = time.perf_counter()
        gen = _reseed(seed, tag, epoch)
        model.train()
        loss_sum, correct, count = 0.0, [0], 0
        for x, y, rows in _train_batches(setup, batch_size, gen, cfg.num_workers):
            def closure() -> torch.Tensor:
                grad = torch.is_grad_enabled()  # line-search trials run without gradients
                if grad:
                    opt.zero_grad(set_to_none=False)
                logits = net(x)
                loss = ranks.scaled_loss(logits, y, rows)
                if grad:
                    loss.backward()
                    correct[0] += int((logits.argmax(1) == y).sum())  # at the step's origin, as for SGD
                return loss

            loss = opt.step(closure)  # on several processes: the mean over the ranks, the batch's mean
            loss_sum += (loss.item() if isinstance(loss, torch.Tensor) else float(loss)) * rows
            count += rows
        correct[0] = int(ranks.all_sum([correct[0]])[0])
        test_loss, test_acc = evaluate(model, setup.test, cfg, setup.device)
        state["seconds"] += time.perf_counter() - started
        state["history"].append({"epoch": epoch, "train_loss": loss_sum / count, "train_acc": 100.0 * correct[0] / count,
                                 "test_loss": test_loss, "test_acc": test_acc})
        state["epoch"] = epoch
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt_path)
        bar.set_postfix(test_acc=f"{test_acc:.2f}")
    bar.close()
    result = {"seed": seed, "method": method, "epochs": epochs, "batch_size": batch_size, "basis": basis.name,
              "history": state["history"], "train_seconds": state["seconds"], **_peak_memory(setup.device)}
    if isinstance(opt, trajstore.PBFGS):
        stats = opt.stats
        trials = stats.pop("trials")
        result["line_search"] = {**stats, "mean_trials": float(np.mean(trials)) if trials else 0.0,
                                 "max_trials": int(max(trials, default=0))}
    _save_atomic(model.state_dict(), folder / f"{tag}.pt")  # the trained model
    _save_atomic(result, done)
    _remove(ckpt_path)
    ranks.barrier()
    return result


# ------------------------------------------------------------------------------- stage 4: Figure 2b


def projection_accuracy(cfg: ExperimentConfig, folder: Path, seed: int, basis: trajstore.Basis,
                        setup: _Setup | None = None) -> dict[str, Any]:
    """Test accuracy of each snapshot of the window and of its projection onto the top
    ``cfg.projection_k`` directions, ``mean + U_k U_k^T (w - mean)`` (paper, Figure 2b). The
    projected model keeps the snapshot's buffers (BatchNorm statistics).

    Holds ``U[:, :k]`` in memory (``4 k n`` bytes) and one parameter vector."""
    done = folder / "projection.json"
    if done.exists():
        return json.loads(done.read_text())
    setup = setup or _Setup(cfg, seed)
    k = min(cfg.projection_k, basis.d)
    model = setup.model()
    step = 1 << 22
    uk = np.concatenate([basis.rows(a, min(a + step, basis.n))[:, :k] for a in range(0, basis.n, step)])
    mean, coords = basis.mean.astype(np.float32), basis.coordinates()[:, :k].astype(np.float32)
    picks = np.arange(basis.start, basis.stop)
    if cfg.projection_snapshots and cfg.projection_snapshots < len(picks):
        picks = np.unique(np.linspace(basis.start, basis.stop - 1, cfg.projection_snapshots).round().astype(int))
    rows = []
    with TrajectoryStore.open(folder / STORE, trajectory=basis.trajectory) as store:
        for j in tqdm(picks, desc=f"seed {seed}: projections (k={k})", unit="snapshot",
                      disable=not ranks.is_main()):
            store.load_into(model, int(j))
            _, acc = evaluate(model, setup.test, cfg, setup.device)
            projected = torch.from_numpy(mean + uk @ coords[j - basis.start]).to(setup.device)
            with torch.no_grad():
                nn.utils.vector_to_parameters(projected, model.parameters())
            _, acc_k = evaluate(model, setup.test, cfg, setup.device)
            rows.append({"snapshot": int(j), "epoch": store.records[j].get("epoch"), "test_acc": acc,
                         "projected_test_acc": acc_k})
    result = {"k": k, "snapshots": rows}
    _save_atomic(result, done)
    ranks.barrier()
    return result


# ------------------------------------------------------------------------------- the whole run


def run_seed(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Every stage for one seed, each skipped when already done."""
    folder = cfg.folder / f"seed-{seed}"
    setup = _Setup(cfg, seed)
    sampled = sample(cfg, folder, seed, setup)
    basis, basis_info = compute_basis(cfg, folder, sampled)
    runs = {m: train_subspace(cfg, folder, seed, m, basis, setup) for m in cfg.methods}
    projection = projection_accuracy(cfg, folder, seed, basis, setup)
    return {"seed": seed, "sgd": sampled, "basis": basis_info, "subspace": runs, "projection": projection}


# Fields that do not change what a seed folder holds: a run may resume with other values.
_RUNTIME_FIELDS = ("class", "out", "seed", "seeds", "threads", "num_workers", "eval_batch_size", "shard_basis")


def _check_folder(cfg: ExperimentConfig) -> None:
    path = cfg.folder / "config.json"
    mine = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k not in _RUNTIME_FIELDS}
    if path.exists():
        theirs = {k: v for k, v in json.loads(path.read_text()).items() if k not in _RUNTIME_FIELDS}
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SystemExit(f"{cfg.folder} holds a run of a different config (differs in {', '.join(diff)}); "
                             "choose another --out or remove the folder")
    cfg.folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(cfg.to_json(), path)


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """All seeds end to end, then the report (``results.json``, figures, a printed table)."""
    from .report import write_report

    if ranks.is_main():
        _check_folder(cfg)
    ranks.barrier()
    started = time.perf_counter()
    per_seed = [run_seed(cfg, cfg.seed + s) for s in range(cfg.seeds)]
    if not ranks.is_main():
        return {"rank": ranks.rank(), "seeds": per_seed}
    return write_report(cfg, per_seed, time.perf_counter() - started)
