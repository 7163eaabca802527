"""Run fastat's benchmarks and write benchmarks/results/<device>-<date>.json/.md/.png (same as `fastat bench`).

    python benchmarks/run.py [--device cpu|cuda] [--quick] [--out DIR] [--suites ops,steps] [--no-compile]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastat.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    # In a checkout the results go next to the committed ones (`fastat bench` alone writes ./fastat_bench_out).
    default_out = [] if any(a == "--out" or a.startswith("--out=") for a in args) else ["--out", "benchmarks/results"]
    raise SystemExit(main(["bench"] + default_out + args))
