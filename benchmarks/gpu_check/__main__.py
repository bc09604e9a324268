"""`python -m benchmarks.gpu_check` (or `python benchmarks/gpu_check`): see the package docstring."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if sys.path[:1] != [str(ROOT)]:  # this checkout's pipeline_lib, whatever else is installed
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
