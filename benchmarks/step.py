"""Time of one training step: SGD vs trajstore's P+-BFGS vs the official P+-BFGS step, and the

A thin entry of the benchmark harness (pipelines/harness/step.py, also `trajstore bench --suite step`);
see there for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.harness.step import main  # noqa: E402

if __name__ == "__main__":
    main()
