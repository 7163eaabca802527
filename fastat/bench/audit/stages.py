"""The two subprocess stages of the audit (each needs its own TRITON_INTERPRET setting, fixed at import):

    python -m fastat.bench.audit.stages capture OUT.json [--shapes a,b] [--backends triton,cuda]
        (TRITON_INTERPRET=1) the events of every bench case (fastat.bench.ops) at every audited shape
    python -m fastat.bench.audit.stages compile LAUNCHES.json OUT.json
        (TRITON_INTERPRET unset) every distinct Triton variant compiled for sm_90 and read
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

import torch


# The audited shapes: the four, named as in fastat.bench.ops where the bench has them.
AUDIT_SHAPES: Dict[str, Tuple[Tuple[int, ...], str]] = {
    "cifar": ((128, 3, 32, 32), "float32"),
    "pixel512": ((32, 3, 512, 512), "bfloat16"),
    "toy2d": ((65536, 2), "float32"),
    "flat16m": ((1, 1 << 24), "float32"),
}


def capture(shapes: List[str], backends: List[str], log=print) -> Dict:
    from fastat.bench import ops as bench_ops
    from fastat.bench.audit import capture as cap

    out = []
    for shape_name in shapes:
        shape, dtype = AUDIT_SHAPES[shape_name]
        tensors = bench_ops._setup(shape, "cpu", getattr(torch, dtype))
        for backend in backends:
            for case in bench_ops._cases():
                row = {"backend": backend, "shape_name": shape_name, "shape": list(shape), "dtype": dtype, "case": case.name,
                       "bench_multiple": case.bytes_per_element}
                try:
                    row["events"] = cap.capture_call(lambda: case.public(tensors), backend, host_tensors=[tensors["table"]])
                except Exception as exc:  # recorded: the report shows which case could not be captured
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                    log(f"  {backend} {shape_name} {case.name}: {row['error']}\n{traceback.format_exc()[-1500:]}")
                out.append(row)
        log(f"  captured {shape_name} {shape} {dtype}")
    return {"cases": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="stage", required=True)
    c = sub.add_parser("capture")
    c.add_argument("out")
    c.add_argument("--shapes", default=",".join(AUDIT_SHAPES))
    c.add_argument("--backends", default="triton,cuda")
    k = sub.add_parser("compile")
    k.add_argument("launches")
    k.add_argument("out")
    k.add_argument("--ptx-dir", default=None, help="also write each variant's PTX here (<variant>.ptx)")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.stage == "capture":
        result = capture(args.shapes.split(","), args.backends.split(","), log)
    else:
        from fastat.bench.audit import triton_aot

        launches = json.loads(Path(args.launches).read_text())
        result = {"variants": triton_aot.compile_all(launches, log, args.ptx_dir),
                  "keys": [triton_aot.variant_key(l) for l in launches]}
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
