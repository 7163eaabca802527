#!/usr/bin/env python3
"""Kernel audit on a CPU machine: what fastat's GPU kernels compile to for sm_90 and what each op launches and moves.

    python tools/kernel_audit.py                      # all shapes, triton + cuda; writes benchmarks/results/kernel-audit.{md,json}
    python tools/kernel_audit.py --check              # also exit 1 when a check fails (no spills, 128-bit, launches, bytes)
    python tools/kernel_audit.py --shapes cifar --backends triton --out /tmp/audit
    python tools/kernel_audit.py --gpu-archive DIR    # compare the AOT variants with a GPU run's Triton cache (PTX + JSON)

See fastat/bench/audit/__init__.py for the stages and fastat/bench/audit/model.py for the time model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from fastat.bench import audit
    from fastat.bench.audit import report, stages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    parser.add_argument("--stem", default="kernel-audit", help="file name stem (default kernel-audit)")
    parser.add_argument("--shapes", default=",".join(stages.AUDIT_SHAPES), help=f"comma list of {list(stages.AUDIT_SHAPES)}")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--cache", default=None, help="cache folder for the nvcc results (default: a temp folder)")
    parser.add_argument("--gpu-archive", default=None, help="folder of a GPU run's Triton cache (PTX + metadata JSON)")
    parser.add_argument("--archive-triton", default=None,
                        help="folder with the archive's Triton version (pip install --target DIR triton==X) for an exact PTX comparison")
    parser.add_argument("--raw", default=None, help="JSON of captured events + compiled variants: written, or read if it exists")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    result = audit.run(args.shapes.split(","), args.backends.split(","), log=log, cache_dir=args.cache,
                       gpu_archive=args.gpu_archive, raw=args.raw,
                       archive_triton=args.archive_triton)
    paths = report.write(result, args.out, args.stem)
    for chk in result["checks"]:
        print(f"{chk['check']:<10} {'ok' if chk['ok'] else 'FAIL'} ({chk['checked']} checked)")
        for f in chk["failures"][:20]:
            print(f"    {f}")
    print(f"wrote {paths['md']} and {paths['json']} in {result['meta']['seconds']} s")
    return 1 if args.check and not all(c["ok"] for c in result["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
