"""Child process for the resume test: run P+-BFGS steps on a seeded problem, optionally saving or
loading model + optimizer state, and print the SHA-256 of the final parameters.

    python tests/_resume_process.py STEPS [--save PATH] [--load PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_pbfgs import problem  # noqa: E402

from trajstore import PBFGS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=int)
    parser.add_argument("--save")
    parser.add_argument("--load")
    args = parser.parse_args()
    model, closure, basis, *_ = problem(torch.float32, seed=5, in_subspace=False)
    opt = PBFGS(model.parameters(), basis.on("cpu"), plus=True)
    if args.load:
        saved = torch.load(args.load, weights_only=True)  # nothing read back may execute code
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    for _ in range(args.steps):
        opt.step(closure)
    if args.save:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.save)
    print(hashlib.sha256(model.x.detach().numpy().tobytes()).hexdigest(), opt.stats["steps"])


if __name__ == "__main__":
    main()
