#!/usr/bin/env bash
# GPU check: store and DLDR (gpu_store_check.py), then sampling, basis and P+-BFGS on a WRN-40-10 (gpu_check.py).
# The machine's image has torch; zarr, dask and crc32c travel as wheels in .whl/ (see README there).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/gpu_store_check.py --out "${OUT:-benchmarks/results}/gpu_store_check.json"
python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.json" "$@"
