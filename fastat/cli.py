"""Command line: `fastat info` (also `python -m fastat info`)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _info(_args: argparse.Namespace) -> int:
    import torch

    import fastat
    from fastat._backend import BACKENDS, _triton_version, backend_status, get_backend
    from fastat._dispatch import registered_backends, registered_ops

    print(f"fastat   {fastat.__version__}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    print(f"torch    {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton   {_triton_version() or 'not installed'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
    else:
        print("device   cpu only (no CUDA device visible)")
    print(f"backend  {get_backend()} (set with fastat.set_backend or FASTAT_BACKEND)")
    print("backends:")
    for name in BACKENDS:
        ok, why = backend_status(name)
        print(f"  {name:<7} {'yes' if ok else 'no ':<4} {why}")
    print("kernels per op:")
    for op in registered_ops():
        print(f"  {op:<26} {', '.join(registered_backends(op))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices, available backends and built extensions")
    info.set_defaults(run=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
