"""Command line: `fastat info`, `fastat demo`, `fastat bench` (also `python -m fastat ...`)."""
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


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(methods=args.methods, settings=args.settings, steps=args.steps, seed=args.seed,
                      device=args.device, out=args.out, quick=args.quick, radius=args.radius, threads=args.threads,
                      lr=args.lr, batch=args.batch,
                      command="fastat " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else None)
    return 0 if all(row.get("finite", False) for rows in result["results"].values() for row in rows.values()) else 1


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.runner import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(device, quick=args.quick, out_dir=args.out, suites=args.suites, compile=False if args.no_compile else None,
        threads=args.threads, note=args.note)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices, available backends and built extensions")
    info.set_defaults(run=_info)

    demo = commands.add_parser("demo", help="adversarial training on an embedded 2-D mixture: table, JSON and PNG (no download)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default 450; --quick 40)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--methods", default=None,
                      help="comma list of standard,ddpm_ip,p1_pgd,p1_free,p2_random,p2_adversarial (default all)")
    demo.add_argument("--settings", default=None, help="comma list of clean,noisy,outliers (default all)")
    demo.add_argument("--radius", type=float, default=0.1, help="evaluation perturbation radius r (L2, R = r sqrt(D))")
    demo.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    demo.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-2, cosine decay)")
    demo.add_argument("--batch", type=int, default=None, help="batch size (default 1024)")
    demo.add_argument("--out", default="fastat_demo_out", help="output folder (default ./fastat_demo_out)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (seconds)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="op and step benchmarks for this machine's backends: JSON, markdown, PNG")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if visible, else cpu)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions, no torch.compile")
    bench.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    bench.add_argument("--suites", default="ops,steps", help="comma list of ops,steps (default both)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's); use 1 on a CPU shared with other jobs")
    bench.add_argument("--note", default=None, help="a remark stored with the results (e.g. 'machine shared')")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ._backend import BackendUnavailableError

    try:
        return args.run(args)
    except (ValueError, BackendUnavailableError) as exc:  # configuration errors (bad FASTAT_BACKEND, ...): one line, no traceback
        print(f"fastat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
