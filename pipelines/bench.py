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
  against SGD steps in the same process, in ``--rounds`` rounds that each time both under the same
  load; the ratio is the median of the rounds', and a warning says when they spread by more than
  :data:`~pipelines.harness.measure.SPREAD_LIMIT` (a noisy machine).
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
from .harness import SUITES
from .harness.measure import PeakMemory, available_bytes, drop_caches, du, report_spread

__all__ = ["bench", "floor_bounds", "format_table", "main", "measure_floor"]

STAGES = ("sample", "gram", "basis", "train", "official")
TRAIN_MODES = ("resident", "mmap", "stream")

DESCRIPTION = """\
Measures each stage on a synthetic trajectory of MODEL's layout (SGD steps and T appended
snapshots; the Gram and basis passes of DLDR, page cache dropped first when allowed; P+-BFGS
steps with the basis resident, memory-mapped and streamed, against SGD steps; the official
approach: all snapshots in one array and sklearn's PCA), each in a fresh Python process, and
prints its peak memory, disk bytes and time beside 'trajstore plan MODEL'. Expect minutes for a
small model (resnet20: 5 min on a shared 2-core machine, much of it starting the 7 processes);
a line is printed as each run starts and ends, the table at the end."""

EPILOG = """\
examples:
  trajstore bench resnet20                        every stage, T = 101, d = 40
  trajstore bench wrn-40-10 --stages sample,gram,basis --floor --out bench.json
  trajstore bench --suite goals --help            the goal suite and its options"""


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


def _timed(step: Any, steps: int, device: str) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def child_train(a: dict[str, Any]) -> dict[str, Any]:
    """``rounds`` rounds of ``steps`` P+-BFGS steps, each followed by ``steps`` SGD steps on a copy
    of the model, so that each round's ratio compares steps taken under the same machine load;
    the peak memory is the first round's P+-BFGS steps'."""
    import copy

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

        rounds = [(_timed(lambda: opt.step(closure), a["steps"], a["device"]), [])]
    gpu = _gpu_peak(a["device"])
    sgd_model = copy.deepcopy(model)  # SGD moving the P+-BFGS model would change its line searches
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)

    def sgd_step() -> None:
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(sgd_model(x), y).backward()
        sgd.step()

    _timed(sgd_step, 1, a["device"])  # warm-up: the first backward of a fresh module allocates its graph
    rounds[0][1].extend(_timed(sgd_step, a["steps"], a["device"]))
    for _ in range(a.get("rounds", 1) - 1):
        rounds.append((_timed(lambda: opt.step(closure), a["steps"], a["device"]),
                       _timed(sgd_step, a["steps"], a["device"])))
    ratios = [float(np.median(p) / np.median(q)) for p, q in rounds]
    return {**mem.to_json(), **gpu, "step_seconds": float(np.median([t for p, _ in rounds for t in p])),
            "sgd_step_seconds": float(np.median([t for _, q in rounds for t in q])),
            "step_vs_sgd": float(np.median(ratios)), "step_vs_sgd_rounds": ratios,
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
        row["step_vs_sgd"] = measured.get("step_vs_sgd", measured["step_seconds"] / measured["sgd_step_seconds"])
        row["step_vs_sgd_rounds"] = measured.get("step_vs_sgd_rounds", [row["step_vs_sgd"]])
    if "peak_gpu_bytes" in measured and planned.gpu_peak_bytes:
        row.update(plan_gpu_peak_bytes=planned.gpu_peak_bytes, peak_gpu_bytes=measured["peak_gpu_bytes"],
                   gpu_ratio=measured["peak_gpu_bytes"] / planned.gpu_peak_bytes)
    if floor and stage in floor:
        row["floor_seconds"] = floor[stage]
    return row


def _header(spec: str, t: int, d: int, batch: int, stages: tuple[str, ...], steps: int, rounds: int,
            with_floor: bool) -> str:
    runs = sum(len(TRAIN_MODES) if s == "train" else 1 for s in stages)
    what = ", ".join(f"train ({'/'.join(TRAIN_MODES)}: {rounds} rounds of {steps} P+-BFGS and {steps} SGD steps)"
                     if s == "train" else s for s in stages)
    return (f"trajstore bench {spec}: T = {t} snapshots, d = {d}, batch {batch}; {runs} runs, each in a fresh process "
            f"(seconds to start, then its work)\n  measuring {what}{'; the floor first' if with_floor else ''}")


def bench(spec: str, *, t: int, d: int, batch: int, stages: tuple[str, ...], folder: Path,
          input_shape: tuple[int, ...] | None = None, workers: int | None = None, steps: int = 3,
          rounds: int = 3, with_floor: bool = False, durable: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Measure ``stages`` on a synthetic trajectory of ``spec``'s layout in ``folder`` and
    compare with the plan. Returns rows with both, ratios, the floor, and ``warnings`` (figures
    whose ``rounds`` spread by more than :data:`~pipelines.harness.measure.SPREAD_LIMIT`).
    Prints a header, a line as each run starts and one with its figures as it ends."""
    workers = workers or os.cpu_count() or 1
    path = folder / "bench.zarr"
    common = {"model": spec, "input_shape": list(input_shape) if input_shape else None, "path": str(path),
              "t": t, "d": d, "batch": batch, "workers": workers, "durable": durable, "device": device}
    rows, floor, warnings = [], None, []
    print(_header(spec, t, d, batch, stages, steps, rounds, with_floor), flush=True)
    started = time.perf_counter()
    if with_floor:
        print("           floor: measuring (1 GiB written and read back, a memory copy, a GEMM) ...", flush=True)
        floor = measure_floor(folder, t)
    total = sum(len(TRAIN_MODES) if s == "train" else 1 for s in stages)
    for stage in stages:
        if stage == "sample" and path.exists():
            shutil.rmtree(path)
        if stage != "sample" and not path.exists():
            raise SystemExit(f"stage {stage} needs the store of the sample stage: include 'sample' first")
        if stage == "train" and not (path / "bases" / "bench").exists():
            raise SystemExit("stage train needs the basis of the basis stage: include 'basis' before it")
        todo = [(f"train ({m})", {**common, "mode": m, "steps": steps, "rounds": rounds}) for m in TRAIN_MODES] \
            if stage == "train" \
            else [(stage if stage != "official" else "official basis", common)]
        for name, args in todo:
            if stage == "official":
                estimate = _plan(spec, input_shape, t, d, batch, workers, 0).stage(name).host_peak_bytes
                if estimate > available_bytes() - (1 << 30):
                    rows.append({"stage": name, "skipped": f"needs {estimate / 2**30:.1f} GiB, "
                                 f"{available_bytes() / 2**30:.1f} GiB available"})
                    print(f"{name:>16}: skipped (needs {estimate / 2**30:.1f} GiB)", flush=True)
                    continue
            print(f"{name:>16}: measuring ({len(rows) + 1}/{total}, {time.perf_counter() - started:.0f} s so far) ...",
                  flush=True)
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
            warning = report_spread(f"{name} x SGD", row.get("step_vs_sgd_rounds", []))
            if warning:
                warnings.append(warning)
    from pipelines.provenance import provenance

    return {"model": spec, "t": t, "d": d, "batch": batch, "workers": workers, "steps": steps, "rounds": rounds,
            "floor": floor, "rows": rows, "warnings": warnings, "provenance": provenance()}


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
        text += f", step {r['step_seconds'] * 1e3:.0f} ms = {r['step_vs_sgd']:.2f}x SGD{_spread(r)}"
    if "gpu_ratio" in r:
        text += f", peak GPU {r['peak_gpu_bytes'] / g:.2f} GiB (plan x{r['gpu_ratio']:.2f})"
    return text


def _spread(r: dict[str, Any]) -> str:
    runs = r.get("step_vs_sgd_rounds", [])
    return f", {min(runs):.2f}-{max(runs):.2f} over {len(runs)} rounds" if len(runs) > 1 else ""


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
                f"{r['step_seconds'] * 1e3:.0f} ms/step ({r['step_vs_sgd']:.2f}x SGD{_spread(r)})")
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
    from trajstore.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="trajstore bench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?",
                        help="wrn-40-10 | resnet20 | torchvision:resnet50 | package.module:factory | ... "
                             "(needed unless --suite)")
    parser.add_argument("--suite", default=None, choices=SUITES, metavar="SUITE",
                        help="instead of a model, a benchmark suite: goals (append throughput vs the disk, the DLDR "
                             "basis at 1M to 55.9M parameters vs the floor and the official approach, P+-BFGS step "
                             "time vs SGD; 18 min on the 2-core machine of benchmarks/README.md, after building "
                             "stores of up to 23 GB the first time) or one part of it: append, basis, step; or "
                             "growth (DLDR time and memory for t = 51 to 801 at n = 4M beside the floor, with "
                             "fitted exponents; builds a 12.8 GB store the first time). The "
                             "suite's own options follow: trajstore bench --suite goals --help")
    parser.add_argument("--snapshots", type=int, default=101, metavar="T", help="snapshots of the synthetic trajectory")
    parser.add_argument("--dim", type=int, default=40, metavar="D", help="directions of the basis")
    parser.add_argument("--batch", type=int, default=8, help="batch of the training steps")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="e.g. 3,224,224 (default: the model's own; needed for package.module:factory)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed P+-BFGS steps, and SGD steps, per round of a train mode")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --steps steps per train mode; x SGD is the median of the rounds' ratios, "
                             "and a spread over 1.5x between rounds is reported as a warning")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="threads of the DLDR passes (default: one per CPU)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the machine's floor (1 GiB written and read back, memory copy, GEMM) and "
                             "the lower bound it gives each stage")
    parser.add_argument("--device", default="cpu", help="where the model trains: cpu, or cuda[:N], which also measures peak GPU memory")
    parser.add_argument("--dir", default=None, metavar="DIR",
                        help="folder for the synthetic store (default: a temporary folder, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the store")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="also write the result, with provenance, as JSON to FILE (default: print only)")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        raise SystemExit("trajstore bench: give a MODEL or --suite NAME")
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {', '.join(STAGES)}")
    for option, value in (("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            raise SystemExit(f"trajstore bench: {option} must be >= 1, got {value}")
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="trajstore-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(args.model, t=args.snapshots, d=args.dim, batch=args.batch, stages=stages, folder=folder,
                       input_shape=shape, workers=args.workers, steps=args.steps, rounds=args.rounds,
                       with_floor=args.floor,
                       device=args.device)
    finally:
        if not args.keep:
            shutil.rmtree(folder / "bench.zarr", ignore_errors=True)
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)
    print(format_table(result))
    for warning in result["warnings"]:  # again under the table, where a reader looks for the figures
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_json(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
