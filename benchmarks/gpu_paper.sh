#!/usr/bin/env bash
# The paper's two largest models on the lent GPU: sampling, basis, P+-BFGS with U in float32 and bfloat16.
source "$(dirname "$0")/_gpu_env.sh"
python3 benchmarks/gpu_paper.py --out "${OUT:-benchmarks/results}/gpu_paper.json" "$@"
