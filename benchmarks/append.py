"""Append throughput of a large model beside the raw write speed of the same disk.

A thin entry of the benchmark harness (pipelines/harness/append.py, also `trajstore bench --suite append`);
see there for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harness.append import main  # noqa: E402

if __name__ == "__main__":
    main()
