#!/usr/bin/env bash
# GPU check: store and DLDR (gpu_store_check.py), then sampling, basis and P+-BFGS on a WRN-40-10 (gpu_check.py).
source "$(dirname "$0")/_gpu_env.sh"
python3 benchmarks/gpu_store_check.py --out "${OUT:-benchmarks/results}/gpu_store_check.json"
python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.json" "$@"
# trajstore plan vs measurement with training on the GPU (peak GPU memory beside the plan's).
python3 -m pipelines.bench wrn-40-10 --snapshots 31 --dim 20 --batch 128 --steps 3 --device cuda \
  --stages sample,gram,basis,train --out "${OUT:-benchmarks/results}/plan_vs_bench_wrn-40-10_cuda.json"
