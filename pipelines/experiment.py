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

import dataclasses
import json
import math
import resource
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import trajstore
from trajstore import TrajectoryStore, dldr
from trajstore._progress import progress_bar
from trajstore.recorder import Recorder

from . import data as datasets
from . import ranks, status
from .atomic import save_json, save_torch
from .models import build_model

__all__ = ["METHODS", "ExperimentConfig", "run", "run_seed", "sample", "compute_basis", "train_subspace",
           "projection_accuracy", "load_config", "config_from_store", "check_store_model"]

from .config import (  # noqa: F401  (re-exported: pipelines.experiment.ExperimentConfig ...)
    METHODS, STORE, ExperimentConfig, check_store_model, config_from_store, load_config)


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
        self.cfg, self.seed, self.device = cfg, seed, _device(cfg)
        data = datasets.load(cfg.data, root=cfg.data_root, label_noise_fraction=cfg.label_noise, seed=seed,
                             augment=cfg.augment)
        self.num_classes, self.input_shape = data.num_classes, data.input_shape
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.device.type == "cpu":  # threads = 0: one for a small model, else the cores shared out
            torch.set_num_threads(ranks.threads_for(cfg.model, self.num_classes, self.input_shape, cfg.batch_size))
        elif ranks.world() > 1:
            torch.set_num_threads(ranks.default_threads())
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
    initialization, or the model after ``cfg.pretrain_epochs`` more epochs before the first, see
    :func:`_pretrain`). Writes ``folder/sgd.pt`` (the final model's state_dict) and then
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
        _say(f"seed {seed}: resuming {cfg.optimizer.upper()} after epoch {state['epoch']} of {cfg.epochs} "
             f"({state['next_snapshot']} snapshots recorded)")
    status.enter(cfg.optimizer.upper(), seed)
    net = ranks.wrap(model)  # DDP on several processes: gradients averaged over the ranks
    if ckpt is None and cfg.pretrain_epochs:  # redone after a kill before the first checkpoint (same bytes on a CPU)
        state["pretrain"] = _pretrain(cfg, setup, seed, model, net, opt)
    recorder = Recorder(folder / STORE, model, resume=True,
                        create_options={"storage_dtype": cfg.storage_dtype,
                                        "attrs": {"experiment": cfg.to_json(), "seed": seed}})
    base = dict(state["recorder"])
    bar = progress_bar(range(state["epoch"] + 1, cfg.epochs + 1), desc=f"seed {seed}: {cfg.optimizer.upper()}",
                       unit="epoch", initial=state["epoch"], total=cfg.epochs, disable=not ranks.is_main())
    try:
        for epoch in bar:
            status.epoch(epoch, cfg.epochs)
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
                                     "snapshots": state["next_snapshot"], "seconds": state["seconds"]})
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
              **({"pretrain": state["pretrain"]} if "pretrain" in state else {}), **_peak_memory(setup.device)}
    _save_atomic(model.state_dict(), folder / "sgd.pt")  # the baseline's final model
    _save_atomic(result, done)
    _remove(ckpt_path)
    ranks.barrier()  # the other ranks go on once rank 0 has written the stage's files
    return result


def _pretrain(cfg: ExperimentConfig, setup: _Setup, seed: int, model: nn.Module, net: nn.Module,
              opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``cfg.pretrain_epochs`` epochs of the sampling optimizer at its first learning rate (the
    scheduler does not step) before snapshot 0 is recorded, so the trajectory, and P-BFGS, which
    restarts from snapshot 0, begin at the pre-trained point; the sampling run's epochs,
    milestones and snapshot steps then count from it, and the momentum carries over. The paper
    pre-trains MobileNet and Inception-v4 for one epoch. Each epoch reseeds from
    (seed, "pretrain", epoch). Returns the per-epoch losses and the test accuracy reached."""
    started, steps, history = time.perf_counter(), 0, []
    for epoch in range(1, cfg.pretrain_epochs + 1):
        gen = _reseed(seed, "pretrain", epoch)
        model.train()
        loss_sum, count = 0.0, 0
        for x, y, rows in _train_batches(setup, cfg.batch_size, gen, cfg.num_workers):
            opt.zero_grad(set_to_none=True)
            loss = ranks.scaled_loss(net(x), y, rows)
            loss.backward()
            opt.step()
            steps += 1
            loss_sum += loss.item() * rows / ranks.world()
            count += len(y)
        loss_sum, count = ranks.all_sum([loss_sum, count])
        history.append({"epoch": epoch, "train_loss": loss_sum / count})
    test_loss, test_acc = evaluate(model, setup.test, cfg, setup.device)
    return {"epochs": cfg.pretrain_epochs, "steps": steps, "history": history, "test_loss": test_loss,
            "test_acc": test_acc, "seconds": time.perf_counter() - started}


def _say(text: str) -> None:
    """A line for the user, from the main process only."""
    if ranks.is_main():
        print(text, flush=True)


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
    status.enter("the basis", sampled.get("seed"))
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
    on_device = basis.on(setup.device, dtype=getattr(torch, cfg.basis_dtype), mode=cfg.basis_mode,
                         shard=cfg.shard_basis)
    opt = _subspace_optimizer(cfg, method, model, on_device)
    state: dict[str, Any] = {"epoch": 0, "history": [], "seconds": 0.0}
    ckpt = _load_checkpoint(ckpt_path)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        _say(f"seed {seed}: resuming {tag} after epoch {state['epoch']} of {epochs}")
    status.enter(tag, seed)
    net = ranks.wrap(model)
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    bar = progress_bar(range(state["epoch"] + 1, epochs + 1), desc=f"seed {seed}: {tag}", unit="epoch",
                       initial=state["epoch"], total=epochs, disable=not ranks.is_main())
    for epoch in bar:
        status.epoch(epoch, epochs)
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
                                 "test_loss": test_loss, "test_acc": test_acc, "seconds": state["seconds"]})
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
    status.enter(f"the projections (k={k})", seed)
    with TrajectoryStore.open(folder / STORE, trajectory=basis.trajectory) as store:
        for j in progress_bar(picks, desc=f"seed {seed}: projections (k={k})", unit="snapshot",
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
    status.enter("the set-up (model and data)", seed)
    setup = _Setup(cfg, seed)
    sampled = sample(cfg, folder, seed, setup)
    basis, basis_info = compute_basis(cfg, folder, sampled)
    runs = {m: train_subspace(cfg, folder, seed, m, basis, setup) for m in cfg.methods}
    projection = projection_accuracy(cfg, folder, seed, basis, setup)
    return {"seed": seed, "sgd": sampled, "basis": basis_info, "subspace": runs, "projection": projection}


# Fields that do not change what a seed folder holds: a run may resume with other values.
_RUNTIME_FIELDS = ("class", "out", "seed", "seeds", "threads", "num_workers", "eval_batch_size", "shard_basis")


def _check_folder(cfg: ExperimentConfig) -> None:
    """Claim ``cfg.folder`` for this config: a new folder, the same config's (a resumed run), or
    one whose run of another config never finished an epoch of any stage (a failed first try:
    its leftovers are removed and it starts over). A folder with finished work of another config
    is refused, naming the fields that differ, with both values."""
    from .validate import ConfigError

    path = cfg.folder / "config.json"
    mine = {k: v for k, v in json.loads(json.dumps(cfg.to_json())).items() if k not in _RUNTIME_FIELDS}
    if path.exists():
        theirs = {k: v for k, v in json.loads(path.read_text()).items() if k not in _RUNTIME_FIELDS}
        for field in dataclasses.fields(cfg):  # a field added since that run: it ran with the default
            if field.name in mine and field.name not in theirs and field.default is not dataclasses.MISSING:
                theirs[field.name] = json.loads(json.dumps(field.default))
        if theirs == mine:
            if any(cfg.folder.glob("seed-*/*.json")) or any(cfg.folder.glob("seed-*/*.ckpt.pt")):
                print(f"{cfg.folder}: resuming the run of this config (finished stages are read back)", flush=True)
        else:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            done = sorted(str(p.relative_to(cfg.folder)) for p in [*cfg.folder.glob("seed-*/*.json"),
                                                                    *cfg.folder.glob("seed-*/*.ckpt.pt")])
            if done:
                what = ", ".join(f"{k}={theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff[:4])
                raise ConfigError(f"{cfg.folder} holds work of another config ({what}; {len(done)} finished "
                                  f"file(s) such as {done[0]}): use --out OTHER, remove the folder, or run that "
                                  "config to resume it")
            for leftover in cfg.folder.glob("seed-*"):  # a first try that finished nothing
                shutil.rmtree(leftover, ignore_errors=True)
            print(f"{cfg.folder}: the earlier run there (differing in {', '.join(diff)}) finished nothing; "
                  "starting over with this config", flush=True)
    cfg.folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(cfg.to_json(), path)


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    """All seeds end to end, then the report (``results.json``, figures, a printed table)."""
    from .report import write_report

    status.reset()  # before the first stage, an interrupt is one "while starting"
    if ranks.is_main():
        _check_folder(cfg)
    ranks.barrier()
    started = time.perf_counter()
    per_seed = [run_seed(cfg, cfg.seed + s) for s in range(cfg.seeds)]
    if not ranks.is_main():
        return {"rank": ranks.rank(), "seeds": per_seed}
    status.enter("the report")
    return write_report(cfg, per_seed, time.perf_counter() - started)
