"""BatchNorm statistics during P-BFGS's line search: the three ways, and their effect on eval accuracy.

    python benchmarks/bn_modes.py [--seeds 3] [--epochs 6]

On scikit-learn's digits (the pipelines' MLP with BatchNorm, 26,634 parameters): SGD samples 41
snapshots (``trajstore run digits``'s settings), DLDR gives the 40-D basis, then P-BFGS retrains
from the initialization for ``epochs`` epochs (batches of 256) three ways:

- ``every trial`` (``PBFGS(...)``, no ``buffers``): every trial's forward pass updates the
  statistics, 1 + trials updates per step;
- ``rejected undone`` (``buffers=model.buffers()``, the pipelines' choice): two per step, at the
  origin and at the accepted point;
- ``official`` (``official=True, buffers=...``): the official code's step, one update per step.

Per mode, seed and epoch: test accuracy in eval mode (running statistics). Written to
benchmarks/results/bn_modes.json with the config, versions and commit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = {"every trial": {}, "rejected undone": {"buffers": True}, "official": {"buffers": True, "official": True}}


def main() -> None:
    from pipelines.config import ExperimentConfig  # noqa: F401
    from pipelines.experiment import _Setup, _batches, evaluate, sample
    from pipelines.harness.measure import write_result
    from pipelines.validate import configure
    from trajstore import PBFGS, TrajectoryStore, dldr

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--epochs", type=int, default=6, help="P-BFGS epochs (default 6)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bn_modes.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            cfg = configure("digits", {"epochs": "10", "subspace_epochs": str(args.epochs)}, seed=seed,
                            out=str(Path(tmp) / f"s{seed}"))
            folder = Path(cfg.out) / f"seed-{seed}"
            setup = _Setup(cfg, seed)
            sampled = sample(cfg, folder, seed, setup)
            basis = dldr(folder / "trajectory.zarr", 40, stop=sampled["snapshots"])
            for mode, options in MODES.items():
                model = setup.model()
                with TrajectoryStore.open(folder / "trajectory.zarr") as store:
                    store.load_into(model, 0)
                kw = {"official": options.get("official", False)}
                if options.get("buffers"):
                    kw["buffers"] = model.buffers()
                opt = PBFGS(model.parameters(), basis.on("cpu"), **kw)
                accs = []
                for epoch in range(1, args.epochs + 1):
                    model.train()
                    gen = torch.Generator().manual_seed(1000 * seed + epoch)
                    for x, y in _batches(setup.train, 256, setup.device, generator=gen):
                        def closure() -> torch.Tensor:
                            opt.zero_grad()
                            loss = torch.nn.functional.cross_entropy(model(x), y)
                            if torch.is_grad_enabled():
                                loss.backward()
                            return loss

                        opt.step(closure)
                    accs.append(evaluate(model, setup.test, cfg, setup.device)[1])
                rows.append({"seed": seed, "mode": mode, "test_acc": accs, "trials": sum(opt.stats["trials"])})
                print(f"seed {seed} {mode:16s} " + " ".join(f"{a:6.2f}" for a in accs), flush=True)
    table = {m: np.mean([r["test_acc"] for r in rows if r["mode"] == m], axis=0).round(2).tolist() for m in MODES}
    print("mean test accuracy (%) per epoch:")
    for m, accs in table.items():
        print(f"  {m:16s} " + " ".join(f"{a:6.2f}" for a in accs))
    write_result(Path(args.out), {"config": vars(args), "rows": rows, "mean_test_acc": table})


if __name__ == "__main__":
    main()
