"""The Gram pass on dask.distributed workers with and without a nanny (BLAS threads per task).

A thin entry of the benchmark harness (pipelines/harness/workers.py); see there for what is
measured and how.
"""

import sys
from pathlib import Path

# the repository root instead of this folder, whose distributed.py would shadow dask.distributed
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipelines.harness.workers import main  # noqa: E402

if __name__ == "__main__":
    main()
