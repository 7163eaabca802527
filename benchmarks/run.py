"""Run fastat's benchmarks and write benchmarks/results/<device>-<date>.json/.md/.png (same as `fastat bench`).

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--out DIR] [--suites ops,steps] [--no-compile]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastat.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench"] + sys.argv[1:]))
