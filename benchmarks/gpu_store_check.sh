#!/usr/bin/env bash
# GPU check of the store and DLDR, for a lent GPU machine (see benchmarks/gpu_store_check.py).
source "$(dirname "$0")/_gpu_env.sh"
python3 benchmarks/gpu_store_check.py --out "${OUT:-benchmarks/results}/gpu_store_check.json" "$@"
