"""Command line: `fastat info`, `fastat demo`, `fastat experiment digits`, `fastat bench` (also `python -m fastat ...`)."""
from __future__ import annotations

import argparse
import math
import platform
import sys
from typing import List, Optional

# The demo's method names, for --help (kept here so that `fastat --help` imports no training code).
METHOD_NAMES = ("standard", "ddpm_ip", "p1_pgd", "p1_free", "p2_random", "p2_adversarial", "ft_replay", "ft_p1_free",
                "ft_p1_pgd")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _float_at_least_zero(text: str, *, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(f"expected a finite number {'> 0' if positive else '>= 0'}, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    return _float_at_least_zero(text, positive=True)


def _device(text: str) -> str:
    """cpu, cuda or cuda:N (checked without importing torch)."""
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _info(_args: argparse.Namespace) -> int:
    import torch

    import fastat
    from fastat._backend import BACKENDS, _triton_version, backend_status, get_backend
    from fastat._dispatch import PUBLIC, registered_backends, registered_ops

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
    print("kernels per op: (fastat::<op>, its backends, the public functions that run it)")
    for op in registered_ops():
        users = ", ".join(sorted(name for name, o in PUBLIC.items() if o.name == op))
        print(f"  {op:<26} {', '.join(registered_backends(op)):<26} {users}".rstrip())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(methods=args.methods, settings=args.settings, steps=args.steps, seed=args.seed,
                      device=args.device, out=args.out, quick=args.quick, radius=args.radius, threads=args.threads,
                      lr=args.lr, batch=args.batch, ft_steps=args.ft_steps, p2_scale=args.p2_scale,
                      p2_bias=args.p2_bias, p1_alpha_mode=args.p1_alpha_mode, progress=not args.no_progress,
                      command=_command("demo"))
    return 0 if all(row.get("finite", False) for rows in result["results"].values() for row in rows.values()) else 1


def _command(name: str) -> Optional[str]:
    """The command line as typed, for the results files (None when main() was called with other argv)."""
    return "fastat " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [name] else None


def _experiment(args: argparse.Namespace) -> int:
    from .experiments.digits import run_digits

    result = run_digits(quick=args.quick, seeds=args.seeds, device=args.device, out=args.out, threads=args.threads,
                        progress=not args.no_progress, command=_command("experiment"))
    return 0 if result["finite"] else 1


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.runner import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(device, quick=args.quick, out_dir=args.out, suites=args.suites, compile=False if args.no_compile else None,
        threads=args.threads, note=args.note)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import fastat

    parser = argparse.ArgumentParser(prog="fastat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastat {fastat.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices, available backends and built extensions")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="adversarial training on Gaussian-mixture data with a closed-form denoiser: table, JSON, PNG (no download)")
    demo.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--settings", default=None,
                      help="comma list of clean,noisy,outliers,clean16,noisy16 or 'all' (default clean,noisy16)")
    demo.add_argument("--methods", default=None,
                      help="comma list of " + ",".join(METHOD_NAMES) + " or 'all', run in every setting (default: "
                      "standard,ft_replay,ft_p1_free on clean data; standard,p2_adversarial on corrupted data)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per model trained from scratch in the 2-D settings; the 16-D settings train 0.4 of them (default 6000)")
    demo.add_argument("--ft-steps", type=_positive_int, default=None, help="fine-tuning optimizer steps of the ft_* methods (default 600)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--p2-scale", type=_float_at_least_zero, default=None, help="P2 radius scale: r(t) = max(8/255, scale sigma_t^2) (default 1.0)")
    demo.add_argument("--p2-bias", choices=("floor", "random"), default=None,
                      help="P2 radius floor: max(8/255, .) or a random bias U[8/255, 16/255] added (default floor)")
    demo.add_argument("--p1-alpha-mode", choices=("cifar_ratio", "abs"), default=None,
                      help="P1 step: official alpha 0.1 scaled to the official ||delta||/||eps|| (cifar_ratio, default) or absolute")
    demo.add_argument("--radius", type=_float_at_least_zero, default=0.1, help="evaluation perturbation radius r (L2, R = r sqrt(D))")
    demo.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default 1)")
    demo.add_argument("--lr", type=_positive_float, default=None, help="Adam learning rate (default 3e-3, cosine decay)")
    demo.add_argument("--batch", type=_positive_int, default=None, help="batch size (default 1024)")
    demo.add_argument("--out", default="fastat_demo_out", help="output folder (default ./fastat_demo_out)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for a smoke run (seconds)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    experiment = commands.add_parser("experiment", help="longer experiments with statistics over seeds")
    which = experiment.add_subparsers(dest="experiment", required=True)
    digits = which.add_parser("digits", help="P1 and P2 on scikit-learn's 8x8 digits (needs the [digits] extra)")
    digits.add_argument("--quick", action="store_true", help="1 seed, short training: a check that it runs (<= 3 min)")
    digits.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (default 5; --quick 1)")
    digits.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (cuda: a larger model, longer training)")
    digits.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default 1)")
    digits.add_argument("--out", default="fastat_digits_out", help="output folder (default ./fastat_digits_out)")
    digits.add_argument("--no-progress", action="store_true", help="no progress bar")
    digits.set_defaults(run=_experiment)

    bench = commands.add_parser("bench", help="op and step benchmarks for this machine's backends: JSON, markdown, PNG")
    bench.add_argument("--device", type=_device, default=None, help="cpu or cuda (default: cuda if visible, else cpu)")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions, no torch.compile")
    bench.add_argument("--out", default="fastat_bench_out", help="output folder (default ./fastat_bench_out)")
    bench.add_argument("--suites", default="ops,steps", help="comma list of ops,steps,overhead,audit (default ops,steps)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    bench.add_argument("--threads", type=_positive_int, default=None,
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
