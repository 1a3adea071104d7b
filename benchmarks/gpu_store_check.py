"""GPU check of the store and DLDR: a WideResNet-40-10 (55.9M parameters) trained on the GPU,
recorded into a store, restored onto the GPU bit for bit, and its basis computed.

    python benchmarks/gpu_store_check.py [--snapshots 6] [--out results.json]

Prints append throughput from GPU parameters (durable and page-cache), the time of an SGD step
for scale, the load_into check, and the DLDR basis of the recorded snapshots. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines.models import build_model  # noqa: E402
from trajstore import TrajectoryStore, dldr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/gpu_store_check.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA device"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("wrn-40-10", 100).to(dev)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(128, 3, 32, 32, device=dev)
    y = torch.randint(0, 100, (128,), device=dev)

    def sgd_step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        sgd_step()  # warm-up (cuDNN autotuning)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        sgd_step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / 10
    print(f"{torch.cuda.get_device_name(0)}: WRN-40-10, n = {n:,}; SGD step at batch 128: {step_s * 1e3:.1f} ms", flush=True)

    result: dict[str, object] = {"device": torch.cuda.get_device_name(0), "n": n, "sgd_step_ms": step_s * 1e3}
    with tempfile.TemporaryDirectory() as tmp:
        for durable in (False, True):
            path = Path(tmp) / f"traj-{durable}.zarr"
            store = TrajectoryStore.create(path, model, durable=durable)
            times = []
            for k in range(args.snapshots):
                sgd_step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                store.append(model, step=k)
                times.append(time.perf_counter() - t0)
            store.close()
            mbps = sorted(n * 4 / t / 1e6 for t in times)[len(times) // 2]
            print(f"append from GPU (durable={durable}): median {mbps:.0f} MB/s over {len(times)} snapshots "
                  f"of {n * 4 / 2**20:.0f} MiB ({', '.join(f'{t:.2f}' for t in times)} s)", flush=True)
            result[f"append_MBps_durable_{durable}"] = mbps

        store = TrajectoryStore.open(path)
        fresh = build_model("wrn-40-10", 100).to(dev)
        t0 = time.perf_counter()
        store.load_into(fresh, -1)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        print(f"load_into a CUDA model: {load_s:.2f} s, parameters and buffers bit-identical: {same}", flush=True)
        result.update(load_into_s=load_s, load_into_exact=same)

        t0 = time.perf_counter()
        basis = dldr(store, args.snapshots - 2)
        dldr_s = time.perf_counter() - t0
        print(f"dldr of {len(store)} snapshots: {dldr_s:.1f} s, {basis}", flush=True)
        result.update(dldr_s=dldr_s, orthonormality=basis.orthonormality,
                      explained=float(basis.explained_variance_ratio.sum()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    if not same:
        raise SystemExit("load_into was not exact")


if __name__ == "__main__":
    main()
