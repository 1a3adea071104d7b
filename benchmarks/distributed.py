"""Subspace training on 1 and 2 ranks (torch.distributed): step time and per-rank memory.

A thin entry of the benchmark harness (pipelines/harness/distributed.py); see there for what is
measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harness.distributed import main  # noqa: E402

if __name__ == "__main__":
    main()
