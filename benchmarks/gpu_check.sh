#!/usr/bin/env bash
# GPU check: store and DLDR (gpu_store_check.py), then sampling, basis and P+-BFGS on a WRN-40-10 (gpu_check.py).
source "$(dirname "$0")/_gpu_env.sh"
python3 benchmarks/gpu_store_check.py --out "${OUT:-benchmarks/results}/gpu_store_check.json"
python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.json" "$@"
