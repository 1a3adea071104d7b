"""DLDR basis: trajstore vs the official approach vs dask's svd_compressed, beside the machine's floor.

A thin entry of the benchmark harness (pipelines/harness/basis.py, also `trajstore bench --suite basis`);
see there for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harness.basis import main  # noqa: E402

if __name__ == "__main__":
    main()
