"""The paper's two largest models on a GPU: sampling, basis, and P+-BFGS with U in float32 and bfloat16.

    python benchmarks/gpu_paper.py [--models wrn-40-10,inception-v4] [--steps 60] [--every 3] [--dim 20]
    (on the lent GPU machine: bash benchmarks/gpu_paper.sh; about 3 minutes on an H100-class GPU)

Per model (CIFAR-100 versions: WRN-40-10, 55.9M parameters; Inception-v4, 41.3M), on synthetic
CIFAR-100-shaped data held on the device:

1. SGD (batch ``--batch``, lr 0.05, momentum 0.9, weight decay 5e-4) for ``--steps`` steps, a
   snapshot every ``--every`` steps through :class:`trajstore.Recorder` (snapshot 0 = the
   initialization); the median SGD step, and the median forward pass of a line-search trial
   (train mode, no gradient);
2. the DLDR basis of the samples (``dim`` <= snapshots - 1);
3. from the initialization, ``--pbfgs-steps`` P+-BFGS steps with U resident on the device, once
   in float32 and once in bfloat16: the median step against SGD's and against the floor (an SGD
   step + one forward: the gradient step plus the one trial a step needs at least), the line
   search's trials, and the peak device memory beside :func:`trajstore.plan.plan`'s
   ``train (resident)`` prediction for that dtype.

``--device cpu`` runs the same script at toy sizes (the test suite does, with ``resnet20``), so
it is known to run before a GPU is lent. Written to ``--out`` (JSON, with provenance).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPES = ("float32", "bfloat16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times[1:] if len(times) > 2 else times)  # the first warms up


def one_model(name: str, args: argparse.Namespace, device: torch.device, folder: Path) -> dict[str, Any]:
    from pipelines.models import build_model
    from trajstore import PBFGS, Recorder, TrajectoryStore, dldr
    from trajstore.layout import Layout
    from trajstore.plan import activation_bytes, plan

    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.randn(1024, 3, 32, 32, device=device, generator=gen)
    labels = torch.randint(0, 100, (1024,), device=device, generator=gen)
    model = build_model(name, 100).to(device)
    n = sum(p.numel() for p in model.parameters())
    loss_fn = nn.CrossEntropyLoss()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, data.shape[0], (args.batch,), device=device, generator=gen)
        return data[idx], labels[idx]

    path = folder / f"{name}.zarr"
    recorder = Recorder(path, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sgd, forward = [], []
    for step in range(1, args.steps + 1):
        x, y = batch()
        _sync(device)
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        _sync(device)
        sgd.append(time.perf_counter() - started)
        if step % args.every == 0:
            recorder.snapshot(step=step)
        if step > args.steps - 6:  # a trial's forward pass, measured at the end of the run
            with torch.no_grad():
                _sync(device)
                started = time.perf_counter()
                loss_fn(model(x), y)
                _sync(device)
                forward.append(time.perf_counter() - started)
    recorder.close()
    snapshots = len(TrajectoryStore.open(path))
    started = time.perf_counter()
    basis = dldr(path, min(args.dim, snapshots - 1))
    dldr_s = time.perf_counter() - started
    sgd_ms, forward_ms = _median_ms(sgd), _median_ms(forward)
    row: dict[str, Any] = {"model": name, "n": n, "snapshots": snapshots, "d": basis.d, "dldr_s": dldr_s,
                           "sgd_step_ms": sgd_ms, "forward_ms": forward_ms, "floor_ms": sgd_ms + forward_ms}
    print(f"{name}: {n:,} parameters; {snapshots} snapshots, SGD step {sgd_ms:.1f} ms, forward {forward_ms:.1f} ms; "
          f"basis ({basis.d}-D) in {dldr_s:.1f} s", flush=True)
    with torch.device("meta"):
        meta = build_model(name, 100)
    acts = activation_bytes(meta, (3, 32, 32), args.batch)
    layout = Layout.from_model(meta, allow_meta=True)
    del opt
    for dtype in DTYPES:
        TrajectoryStore.open(path).load_into(model, 0)
        placed = basis.on(device, mode="resident", dtype=getattr(torch, dtype))
        pbfgs = PBFGS(model.parameters(), placed, plus=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.pbfgs_steps):
            x, y = batch()

            def closure() -> torch.Tensor:
                if torch.is_grad_enabled():
                    pbfgs.zero_grad()
                loss = loss_fn(model(x), y)
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            _sync(device)
            started = time.perf_counter()
            pbfgs.step(closure)
            _sync(device)
            times.append(time.perf_counter() - started)
        step_ms = _median_ms(times)
        planned = plan(layout, snapshots, basis.d, device=device.type if device.type == "cuda" else "cpu",
                       activations=acts, basis_dtype=dtype).stage("train (resident)")
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        planned_peak = planned.gpu_peak_bytes if device.type == "cuda" else None
        row[dtype] = {"step_ms": step_ms, "vs_sgd": step_ms / sgd_ms, "vs_floor": step_ms / row["floor_ms"],
                      "trials": pbfgs.stats["trials"], "failures": pbfgs.stats["failures"], "basis_bytes": placed.nbytes,
                      "peak_gpu_bytes": peak, "plan_gpu_peak_bytes": planned_peak}
        memory = (f"; peak GPU memory {peak / 2**30:.2f} GiB (plan {planned_peak / 2**30:.2f} GiB)"
                  if peak is not None else "")
        print(f"{name} P+-BFGS, U resident in {dtype} ({placed.nbytes / 2**30:.2f} GiB): step {step_ms:.1f} ms = "
              f"{step_ms / sgd_ms:.2f}x SGD, {step_ms / row['floor_ms']:.2f}x the floor; mean trials "
              f"{statistics.mean(pbfgs.stats['trials']):.2f}{memory}", flush=True)
    row["bf16_vs_fp32_step"] = row["bfloat16"]["step_ms"] / row["float32"]["step_ms"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | n | SGD step (ms) | floor (ms) | U | P+-BFGS step (ms) | x SGD | x floor | peak GPU (GiB) | plan (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for dtype in DTYPES:
            c = r[dtype]
            peak = f"{c['peak_gpu_bytes'] / 2**30:.2f}" if c["peak_gpu_bytes"] is not None else "-"
            planned = f"{c['plan_gpu_peak_bytes'] / 2**30:.2f}" if c["plan_gpu_peak_bytes"] is not None else "-"
            lines.append(f"| {r['model']} | {r['n'] / 1e6:.1f}M | {r['sgd_step_ms']:.1f} | {r['floor_ms']:.1f} | {dtype} | "
                         f"{c['step_ms']:.1f} | {c['vs_sgd']:.2f} | {c['vs_floor']:.2f} | {peak} | {planned} |")
    return "\n".join(lines)


def main() -> None:
    from pipelines.harness.measure import write_result

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wrn-40-10,inception-v4", help="comma-separated model names")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (toy sizes only)")
    parser.add_argument("--steps", type=int, default=60, help="SGD steps of the sampling run")
    parser.add_argument("--every", type=int, default=3, help="SGD steps between snapshots")
    parser.add_argument("--dim", type=int, default=20, help="d (at most snapshots - 1)")
    parser.add_argument("--batch", type=int, default=128, help="batch of every step")
    parser.add_argument("--pbfgs-steps", type=int, default=15, help="timed P+-BFGS steps per dtype")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_paper.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_paper: no CUDA device here (use --device cpu for a toy run)")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(one_model(name.strip(), args, device, Path(tmp)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    text = table(rows)
    print("\n" + text + f"\n({time.perf_counter() - started:.0f} s in all)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_result(Path(args.out), {"config": vars(args), "device": gpu, "rows": rows, "table": text})


if __name__ == "__main__":
    main()
