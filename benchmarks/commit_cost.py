"""What a commit costs as a trajectory grows (snapshot 10 vs 10,000) and for a 50,000-tensor model.

A thin entry of the benchmark harness (pipelines/harness/commit.py);
see there for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harness.commit import main  # noqa: E402

if __name__ == "__main__":
    main()
