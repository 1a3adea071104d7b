"""``trajstore bench``: measure each stage for real, beside :func:`trajstore.plan.plan`'s prediction.

    trajstore bench MODEL --snapshots T --dim D [--batch B] [--stages sample,gram,basis,train,official]

Each stage runs in a fresh Python process, so its peak memory is its own: a sampled peak of
private, anonymous memory (``RssAnon``, compared with the plan) and the kernel's peak resident
size (``VmHWM``, which also counts library code and mapped files), with the private memory at
the child's start (Python, torch, trajstore imported: the plan's baseline).

- ``sample``: SGD state (one forward and backward pass of a synthetic batch) and a
  :class:`~trajstore.Recorder` appending T snapshots; the trajectory moves every parameter tensor
  by its own random amount at each snapshot (no extra memory; rank min(T, tensors)).
- ``gram`` / ``basis``: the two passes of :func:`~trajstore.dldr` (page cache dropped first when
  this process may, so reads come from the disk).
- ``train``: P+-BFGS steps from snapshot 0 with the basis ``resident``, ``mmap`` and ``stream``,
  against SGD steps in the same process.
- ``official``: the official approach re-created (all snapshots stacked in one float32 numpy
  array and ``sklearn.decomposition.PCA(D)``), where the plan says it fits in available memory.

Disk bytes are the store's files after the stage. The machine's floor (``--floor``) is measured
too: sequential write with fsync and cold read of the store's own chunk files, memory bandwidth,
and the float64 GEMM rate, with the lower bound they give each stage.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import save_json
from .harness.measure import PeakMemory, available_bytes, drop_caches, du

__all__ = ["floor_bounds", "main", "measure_floor"]

STAGES = ("sample", "gram", "basis", "train", "official")
TRAIN_MODES = ("resident", "mmap", "stream")


# ------------------------------------------------------------------------------- the floor


def floor_bounds(*, write_bytes: int, read_bytes: int, basis_write_bytes: int, gram_flops: float,
                 basis_flops: float, write_Bps: float, read_Bps: float, flops: float) -> dict[str, float]:
    """Lower bounds in seconds for each stage, from the machine's measured rates: the sample stage
    must write every snapshot byte; each DLDR pass must read all of W (the basis pass also writes
    U, on the same disk) and do its arithmetic, which I/O can overlap at best (the bound is the
    larger of the two)."""
    return {"sample": write_bytes / write_Bps,
            "gram": max(read_bytes / read_Bps, gram_flops / flops),
            "basis": max(read_bytes / read_Bps + basis_write_bytes / write_Bps, basis_flops / flops)}


def measure_floor(folder: Path, t: int, nbytes: int = 1 << 30) -> dict[str, Any]:
    """Sequential write + fsync and cold read of ``nbytes`` in 4 MiB blocks, memory bandwidth
    (a 512 MiB copy), and the float64 GEMM rate of a Gram-pass product (t x 65,536 by its
    transpose)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "floor.bin"
    block = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    cold = drop_caches()
    view = memoryview(bytearray(8 << 20))
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    a = np.ones(64 << 20)
    b = np.empty_like(a)
    np.copyto(b, a)
    start = time.perf_counter()
    for _ in range(3):
        np.copyto(b, a)
    copy_s = (time.perf_counter() - start) / 3
    x = np.random.default_rng(0).standard_normal((t, 1 << 16))
    x @ x.T
    start = time.perf_counter()
    for _ in range(5):
        x @ x.T
    gemm_s = (time.perf_counter() - start) / 5
    return {"write_Bps": nbytes / write_s, "read_Bps": nbytes / read_s, "read_cold": cold,
            "memory_Bps": 2 * a.nbytes / copy_s, "flops": 2 * t * t * x.shape[1] / gemm_s}


# ------------------------------------------------------------------------------- children


def _model(spec: str, input_shape: list[int] | None) -> tuple[Any, tuple[int, ...] | None]:
    from pipelines.models import resolve_model

    return resolve_model(spec, tuple(input_shape) if input_shape else None)


def _batch(model: Any, shape: tuple[int, ...] | None, batch: int) -> tuple[Any, Any]:
    import torch

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(device)
    with torch.no_grad():
        classes = model.eval()(x[:1]).shape[1]
    model.train()
    return x, torch.randint(0, classes, (batch,), generator=gen).to(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_peak(device: str) -> dict[str, int]:
    import torch

    return {"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if device.startswith("cuda") else {}


def child_sample(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trajstore import Recorder

    path = Path(a["path"])
    with PeakMemory() as mem:
        model, shape = _model(a["model"], a["input_shape"])
        model.to(a["device"])
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if a["batch"] and shape:
            x, y = _batch(model, shape, a["batch"])
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            del x, y
        gen = np.random.default_rng(0)
        started = time.perf_counter()
        with Recorder(path, model, create_options={"durable": a["durable"]}) as rec:
            for k in range(1, a["t"]):
                with torch.no_grad():
                    for p in model.parameters():  # in place: a trajectory that costs no memory
                        p.add_(float(gen.standard_normal()) * 1e-2)
                rec.snapshot(step=k)
        seconds = time.perf_counter() - started
    return {**mem.to_json(), **_gpu_peak(a["device"]), "seconds": seconds,
            "append_seconds": rec.stats["write"] / a["t"], "disk_bytes": du(path), "snapshots": a["t"]}


def child_gram(a: dict[str, Any]) -> dict[str, Any]:
    from trajstore import TrajectoryStore, gram_matrix

    with PeakMemory() as mem:
        started = time.perf_counter()
        with TrajectoryStore.open(a["path"]) as store:
            gram_matrix(store, num_workers=a["workers"])
        seconds = time.perf_counter() - started
    return {**mem.to_json(), "seconds": seconds, "disk_bytes": du(Path(a["path"]))}


def child_basis(a: dict[str, Any]) -> dict[str, Any]:
    from trajstore import dldr

    with PeakMemory() as mem:
        started = time.perf_counter()
        basis = dldr(a["path"], a["d"], name="bench", overwrite=True, num_workers=a["workers"])
        seconds = time.perf_counter() - started
    return {**mem.to_json(), "seconds": seconds, "disk_bytes": du(Path(a["path"])),
            "orthonormality": basis.orthonormality}


def child_train(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trajstore import PBFGS, TrajectoryStore, open_basis

    with PeakMemory() as mem:
        model, shape = _model(a["model"], a["input_shape"])
        TrajectoryStore.open(a["path"]).load_into(model.to(a["device"]), 0)
        x, y = _batch(model, shape, a["batch"])
        opt = PBFGS(model.parameters(), open_basis(a["path"], "bench").on(a["device"], mode=a["mode"]), plus=True)

        def closure() -> torch.Tensor:
            if torch.is_grad_enabled():
                opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if torch.is_grad_enabled():
                loss.backward()
            return loss

        times = []
        for _ in range(a["steps"]):
            _sync(a["device"])
            started = time.perf_counter()
            opt.step(closure)
            _sync(a["device"])
            times.append(time.perf_counter() - started)
    gpu = _gpu_peak(a["device"])
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sgd_times = []
    for _ in range(a["steps"]):
        _sync(a["device"])
        started = time.perf_counter()
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
        _sync(a["device"])
        sgd_times.append(time.perf_counter() - started)
    return {**mem.to_json(), **gpu, "step_seconds": float(np.median(times)), "sgd_step_seconds": float(np.median(sgd_times)),
            "trials": opt.stats["trials"], "disk_bytes": du(Path(a["path"]))}


def child_official(a: dict[str, Any]) -> dict[str, Any]:
    from sklearn.decomposition import PCA

    from trajstore import TrajectoryStore

    with PeakMemory() as mem:
        started = time.perf_counter()
        store = TrajectoryStore.open(a["path"])
        w = np.stack([store.snapshot(i) for i in range(len(store))])  # as the official code: one array
        PCA(a["d"]).fit(w)
        seconds = time.perf_counter() - started
    return {**mem.to_json(), "seconds": seconds}


CHILDREN = {"sample": child_sample, "gram": child_gram, "basis": child_basis, "train": child_train,
            "official": child_official}


def run_child(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    cold = drop_caches() if stage in ("gram", "basis", "official") else False
    cmd = [sys.executable, "-m", "pipelines.bench", "--child", stage, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"bench stage {stage} failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cold_cache": cold}


# ------------------------------------------------------------------------------- the parent


@functools.lru_cache(maxsize=8)
def _layout(spec: str, input_shape: tuple[int, ...] | None, batch: int) -> tuple[Any, int]:
    """The model's layout and a training step's activation bytes, from one pass on the meta
    device (computed once per bench run, however many stages are planned)."""
    import torch

    from pipelines.models import resolve_model
    from trajstore.layout import Layout
    from trajstore.plan import activation_bytes

    with torch.device("meta"):
        model, shape = resolve_model(spec, input_shape)
    return Layout.from_model(model, allow_meta=True), activation_bytes(model, shape, batch) if batch and shape else 0


def _plan(spec: str, input_shape: tuple[int, ...] | None, t: int, d: int, batch: int, workers: int,
          baseline: int, device: str = "cpu") -> Any:
    from trajstore.plan import plan

    layout, acts = _layout(spec, input_shape, batch)
    return plan(layout, t, d, workers=workers, baseline_bytes=baseline, activations=acts,
                device="cuda" if device.startswith("cuda") else "cpu")


def _row(stage: str, planned: Any, measured: dict[str, Any], floor: dict[str, float] | None) -> dict[str, Any]:
    # The plan was made with the baseline the child measured (what the process held before the
    # stage: interpreter and libraries, not the stage's doing).
    host = planned.host_peak_bytes
    row = {"stage": stage, "plan_host_peak_bytes": host, "peak_rss_bytes": measured["peak_rss_bytes"],
           "peak_anon_bytes": measured["peak_anon_bytes"], "baseline_rss_bytes": measured["baseline_rss_bytes"],
           "baseline_anon_bytes": measured["baseline_anon_bytes"],
           "host_ratio": measured["peak_anon_bytes"] / host, "plan_disk_bytes": planned.disk_bytes}
    if "disk_bytes" in measured and not stage.startswith(("train", "official")):
        row.update(disk_bytes=measured["disk_bytes"], disk_ratio=measured["disk_bytes"] / planned.disk_bytes)
    for key in ("seconds", "step_seconds", "sgd_step_seconds"):
        if key in measured:
            row[key] = measured[key]
    if "step_seconds" in measured:
        row["step_vs_sgd"] = measured["step_seconds"] / measured["sgd_step_seconds"]
    if "peak_gpu_bytes" in measured and planned.gpu_peak_bytes:
        row.update(plan_gpu_peak_bytes=planned.gpu_peak_bytes, peak_gpu_bytes=measured["peak_gpu_bytes"],
                   gpu_ratio=measured["peak_gpu_bytes"] / planned.gpu_peak_bytes)
    if floor and stage in floor:
        row["floor_seconds"] = floor[stage]
    return row


def bench(spec: str, *, t: int, d: int, batch: int, stages: tuple[str, ...], folder: Path,
          input_shape: tuple[int, ...] | None = None, workers: int | None = None, steps: int = 3,
          with_floor: bool = False, durable: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Measure ``stages`` on a synthetic trajectory of ``spec``'s layout in ``folder`` and
    compare with the plan. Returns rows with both, ratios, and the floor."""
    workers = workers or os.cpu_count() or 1
    path = folder / "bench.zarr"
    common = {"model": spec, "input_shape": list(input_shape) if input_shape else None, "path": str(path),
              "t": t, "d": d, "batch": batch, "workers": workers, "durable": durable, "device": device}
    rows, floor = [], None
    if with_floor:
        floor = measure_floor(folder, t)
    for stage in stages:
        if stage == "sample" and path.exists():
            shutil.rmtree(path)
        if stage != "sample" and not path.exists():
            raise SystemExit(f"stage {stage} needs the store of the sample stage: include 'sample' first")
        if stage == "train" and not (path / "bases" / "bench").exists():
            raise SystemExit("stage train needs the basis of the basis stage: include 'basis' before it")
        todo = [(f"train ({m})", {**common, "mode": m, "steps": steps}) for m in TRAIN_MODES] if stage == "train" \
            else [(stage if stage != "official" else "official basis", common)]
        for name, args in todo:
            if stage == "official":
                estimate = _plan(spec, input_shape, t, d, batch, workers, 0).stage(name).host_peak_bytes
                if estimate > available_bytes() - (1 << 30):
                    rows.append({"stage": name, "skipped": f"needs {estimate / 2**30:.1f} GiB, "
                                 f"{available_bytes() / 2**30:.1f} GiB available"})
                    print(f"{name:>16}: skipped (needs {estimate / 2**30:.1f} GiB)", flush=True)
                    continue
            measured = run_child(stage, args)
            planned = _plan(spec, input_shape, t, d, batch, workers, measured["baseline_anon_bytes"], device).stage(name)
            bounds = None
            if floor is not None and stage in ("sample", "gram", "basis"):
                p = _plan(spec, input_shape, t, d, batch, workers, 0)
                bounds = floor_bounds(write_bytes=p.stage("sample").write_bytes, read_bytes=p.stage("gram").read_bytes,
                                      basis_write_bytes=p.stage("basis").write_bytes,
                                      gram_flops=2.0 * p.n * t * t, basis_flops=2.0 * p.n * t * (t + d),
                                      write_Bps=floor["write_Bps"], read_Bps=floor["read_Bps"], flops=floor["flops"])
            row = _row(name, planned, measured, bounds)
            rows.append(row)
            print(_format_row(row), flush=True)
    from pipelines.provenance import provenance

    return {"model": spec, "t": t, "d": d, "batch": batch, "workers": workers, "floor": floor, "rows": rows,
            "provenance": provenance()}


def _format_row(r: dict[str, Any]) -> str:
    g = 2**30
    text = (f"{r['stage']:>16}: peak private {r['peak_anon_bytes'] / g:6.3f} GiB (plan {r['plan_host_peak_bytes'] / g:6.3f}, "
            f"x{r['host_ratio']:.2f}; baseline {r['baseline_anon_bytes'] / g:.3f}), peak RSS {r['peak_rss_bytes'] / g:.3f}")
    if "disk_bytes" in r:
        text += f", disk {r['disk_bytes'] / g:7.3f} GiB (plan x{r['disk_ratio']:.3f})"
    if "seconds" in r:
        text += f", {r['seconds']:.1f} s"
    if "floor_seconds" in r:
        text += f" (floor {r['floor_seconds']:.1f} s)"
    if "step_vs_sgd" in r:
        text += f", step {r['step_seconds'] * 1e3:.0f} ms = {r['step_vs_sgd']:.2f}x SGD"
    if "gpu_ratio" in r:
        text += f", peak GPU {r['peak_gpu_bytes'] / g:.2f} GiB (plan x{r['gpu_ratio']:.2f})"
    return text


def format_table(result: dict[str, Any]) -> str:
    g = 2**30
    lines = ["| stage | plan host peak (GiB) | measured peak private (GiB) | measured / plan | plan disk (GiB) | "
             "measured disk (GiB) | measured / plan | time |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | | skipped: {r['skipped']} | | | | | |")
            continue
        disk = (f"{r['plan_disk_bytes'] / g:.3f} | {r['disk_bytes'] / g:.3f} | {r['disk_ratio']:.3f}"
                if "disk_bytes" in r else "| |")
        when = (f"{r['seconds']:.1f} s" if "seconds" in r else
                f"{r['step_seconds'] * 1e3:.0f} ms/step ({r['step_vs_sgd']:.2f}x SGD)")
        if "floor_seconds" in r:
            when += f" (floor {r['floor_seconds']:.1f} s)"
        lines.append(f"| {r['stage']} | {r['plan_host_peak_bytes'] / g:.3f} | {r['peak_anon_bytes'] / g:.3f} | "
                     f"{r['host_ratio']:.2f} | {disk} | {when} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--suite" in argv[:-1]:
        from .harness import run_suite

        i = argv.index("--suite")
        run_suite(argv[i + 1], argv[:i] + argv[i + 2:])
        return 0
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](json.loads(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(prog="trajstore bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="wrn-40-10 | resnet20 | torchvision:resnet50 | package.module:factory | ...")
    parser.add_argument("--suite", default=None, choices=("goals", "append", "basis", "step"),
                        help="instead of a model: the goal figures of the earlier issues (goals) or one part of "
                             "them; the suite's own options follow (e.g. --suite goals --repeats 3)")
    parser.add_argument("--snapshots", type=int, default=101, help="T (default 101)")
    parser.add_argument("--dim", type=int, default=40, help="D (default 40)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the training steps (default 8)")
    parser.add_argument("--input-shape", default=None, help="e.g. 3,224,224 (for package.module:factory)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=3, help="P+-BFGS and SGD steps per train mode")
    parser.add_argument("--workers", type=int, default=None, help="threads of the DLDR passes (default: CPUs)")
    parser.add_argument("--floor", action="store_true", help="also measure the machine's floor")
    parser.add_argument("--device", default="cpu", help="where the model trains: cpu or cuda (peak GPU memory too)")
    parser.add_argument("--dir", default=None, help="folder for the synthetic store (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the store")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        raise SystemExit("trajstore bench: give a MODEL or --suite NAME")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="trajstore-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(args.model, t=args.snapshots, d=args.dim, batch=args.batch, stages=stages, folder=folder,
                       input_shape=shape, workers=args.workers, steps=args.steps, with_floor=args.floor,
                       device=args.device)
    finally:
        if not args.keep:
            shutil.rmtree(folder / "bench.zarr", ignore_errors=True)
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
