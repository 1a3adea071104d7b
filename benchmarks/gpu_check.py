"""GPU check of the whole method on a WideResNet-40-10 (55.9M parameters), for a lent GPU machine.

    python benchmarks/gpu_check.py [--steps 200] [--every 5] [--dim 40] [--pbfgs-steps 20]

1. SGD (batch 128, lr 0.05, momentum 0.9, weight decay 5e-4) on CIFAR-shaped synthetic data,
   sampling the parameters every ``--every`` steps into a store (snapshot 0 = initialization)
   with the pipelines' :class:`trajstore.Recorder` (copy off the GPU, write in the background):
   the time it adds to the training loop is printed.
2. The DLDR basis of the samples.
3. From the same initialization, P+-BFGS steps with the basis resident on the GPU: step time vs
   an SGD step, line-search trials, peak GPU memory; and ``project`` in ``stream`` mode checked
   against ``resident``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.models import build_model  # noqa: E402
from trajstore import PBFGS, Recorder, TrajectoryStore, dldr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--dim", type=int, default=40)
    parser.add_argument("--pbfgs-steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    gen = torch.Generator(device=dev).manual_seed(0)
    data = torch.randn(2048, 3, 32, 32, device=dev, generator=gen)
    labels = torch.randint(0, 100, (2048,), device=dev, generator=gen)
    model = build_model("wrn-40-10", 100).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wrn.zarr"
        recorder = Recorder(path, model)  # snapshot 0 = the initialization
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sgd_times = []
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, 2048, (128,), device=dev, generator=gen)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(data[idx]), labels[idx]).backward()
            opt.step()
            torch.cuda.synchronize()
            sgd_times.append(time.perf_counter() - t0)
            if step % args.every == 0:
                recorder.snapshot(step=step)
        recorder.close()
        loop_s = time.perf_counter() - started
        rec = recorder.stats
        sgd_step = sorted(sgd_times[10:])[len(sgd_times[10:]) // 2]
        print(f"sampled {len(TrajectoryStore.open(path))} snapshots in {args.steps} SGD steps "
              f"(median step {sgd_step * 1e3:.1f} ms); recording cost the loop {rec['overhead']:.2f} s "
              f"({rec['overhead'] / loop_s:.1%} of {loop_s:.1f} s: copy {rec['copy']:.2f} s, wait {rec['wait']:.2f} s), "
              f"the writer {rec['write']:.1f} s in the background", flush=True)
        result.update(sampling_overhead_s=rec["overhead"], sampling_loop_s=loop_s, writer_s=rec["write"])
        t0 = time.perf_counter()
        basis = dldr(path, args.dim)
        print(f"basis: {time.perf_counter() - t0:.1f} s, {basis}", flush=True)
        result.update(snapshots=len(TrajectoryStore.open(path)), sgd_step_ms=sgd_step * 1e3,
                      dldr_s=time.perf_counter() - t0, explained=float(basis.explained_variance_ratio.sum()))

        TrajectoryStore.open(path).load_into(model, 0)
        on = basis.on(dev, mode="resident")
        streamed = basis.on(dev, mode="stream")
        g = [torch.randn_like(p) for p in model.parameters()]
        a, b = on.project(g), streamed.project(g)
        rel = float((a - b).abs().max() / a.abs().max())
        print(f"project: stream vs resident on the GPU, max relative difference {rel:.2e}", flush=True)
        torch.cuda.reset_peak_memory_stats()
        pbfgs = PBFGS(model.parameters(), on, plus=True)
        times = []
        for _ in range(args.pbfgs_steps):
            idx = torch.randint(0, 2048, (128,), device=dev, generator=gen)

            def closure() -> torch.Tensor:
                pbfgs.zero_grad()
                loss = loss_fn(model(data[idx]), labels[idx])
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pbfgs.step(closure)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        trials = pbfgs.stats["trials"]
        first = sorted(t for t, n in zip(times[2:], trials[2:]) if n == 1)
        step = sorted(times[2:])[len(times[2:]) // 2]
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"P+-BFGS (basis resident, {on.nbytes / 2**30:.1f} GiB): median step {step * 1e3:.1f} ms = "
              f"{step / sgd_step:.2f}x SGD; first-trial steps "
              f"{(first[len(first) // 2] / sgd_step if first else float('nan')):.2f}x SGD; trials {trials}; "
              f"failures {pbfgs.stats['failures']}; peak GPU memory {peak:.1f} GiB", flush=True)
        result.update(stream_vs_resident=rel, pbfgs_step_ms=step * 1e3, pbfgs_vs_sgd=step / sgd_step,
                      trials=trials, failures=pbfgs.stats["failures"], peak_gpu_GiB=peak)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
