"""CPU benchmark: eager PyTorch reference ("torch") vs the C++ kernels ("cpp"), the AT inner-step chain and
each op, timed round-robin (fastat.bench.timing.interleaved) so machine drift hits both alike.

Inner-step chain (docs/design.md, the official P1 code's non-network work), fp32:
    x_t   = noisy_input(x0, eps, alpha, sigma, delta)           alpha, sigma: [B] tensors
    pred  = x_t                                                  (identity "model")
    loss  = equivariant_mse(pred, eps, delta, sigma, target="delta")   (mean over the batch)
    g_pred, g_delta = autograd.grad(loss, (pred, delta))
    delta = pgd_step(delta, g_delta, 0.1, 0.1 * sqrt(D), "l2")

Run:  python benchmarks/cpu_chain.py [--shape 128,3,32,32] [--reps 200] [--json benchmarks/results/cpu_chain.json]
Builds the C++ extension first if needed (not timed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time

import torch

import fastat
from fastat import _ext
from fastat.bench.timing import interleaved


def _inputs(shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen).to(dtype)
    eps = torch.randn(shape, generator=gen).to(dtype)
    delta = (0.01 * torch.randn(shape, generator=gen)).to(dtype)
    timesteps = torch.randint(0, 1000, (shape[0],), generator=gen)
    alpha, sigma = fastat.alpha_sigma(fastat.schedules.ddpm_linear_alphas_cumprod(1000), timesteps)
    return x0, eps, delta, alpha, sigma


def cases(shape):
    x0, eps, delta0, alpha, sigma = _inputs(shape)
    radius = 0.1 * math.sqrt(x0[0].numel())
    grad = torch.randn_like(x0)

    def chain():
        delta = delta0.detach().requires_grad_(True)
        x_t = fastat.noisy_input(x0, eps, alpha, sigma, delta)
        loss = fastat.equivariant_mse(x_t, eps, delta, sigma, target="delta")
        _, g_delta = torch.autograd.grad(loss, (x_t, delta))
        return fastat.pgd_step(delta.detach(), g_delta, 0.1, radius, "l2")

    def noisy_input():
        return fastat.noisy_input(x0, eps, alpha, sigma, delta0)

    def mse_fwd_bwd():
        pred = x0.detach().requires_grad_(True)
        delta = delta0.detach().requires_grad_(True)
        loss = fastat.equivariant_mse(pred, eps, delta, sigma, target="delta")
        return torch.autograd.grad(loss, (pred, delta))

    def regularizer_fwd_bwd():
        pred = x0.detach().requires_grad_(True)
        loss = fastat.equivariance_regularizer(pred, eps, delta0, detach_anchor=True)
        return torch.autograd.grad(loss, (pred,))

    def huber_fwd_bwd():
        pred = x0.detach().requires_grad_(True)
        loss = fastat.consistency_distance(pred, eps, "pseudo_huber")
        return torch.autograd.grad(loss, (pred,))

    def pgd_l2():
        return fastat.pgd_step(delta0, grad, 0.1, radius, "l2")

    def pgd_linf():
        return fastat.pgd_step(delta0, grad, 0.01, 0.03, "linf")

    return {
        "chain": chain,
        "noisy_input": noisy_input,
        "equivariant_mse fwd+bwd": mse_fwd_bwd,
        "equivariance_regularizer fwd+bwd": regularizer_fwd_bwd,
        "consistency_distance pseudo_huber fwd+bwd": huber_fwd_bwd,
        "pgd_step l2": pgd_l2,
        "pgd_step linf": pgd_linf,
    }


def _on(backend, fn):
    def run():
        with fastat.use_backend(backend):
            return fn()

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="128,3,32,32")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))

    _ext.load("cpp")
    fastat.preload("cpp")  # load every kernel before timing starts
    load_before = os.getloadavg()
    rows = []
    print(f"shape {shape} fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {load_before[0]:.2f}; medians of {args.reps} interleaved reps (ms)")
    print(f"{'case':<44}{'torch':>9}{'cpp':>9}{'speed-up':>10}   (q10-q90 torch | cpp)")
    for name, fn in cases(shape).items():
        if args.only and args.only not in name:
            continue
        start = time.perf_counter()
        res = interleaved({"torch": _on("torch", fn), "cpp": _on("cpp", fn)}, device="cpu",
                          warmup=args.warmup, reps=args.reps)
        t, c = res["torch"], res["cpp"]
        ratio = t["median_ms"] / c["median_ms"]
        print(f"{name:<44}{t['median_ms']:9.3f}{c['median_ms']:9.3f}{ratio:9.2f}x   "
              f"({t['q10_ms']:.3f}-{t['q90_ms']:.3f} | {c['q10_ms']:.3f}-{c['q90_ms']:.3f})")
        rows.append({"case": name, "shape": list(shape), "dtype": "float32", "torch": t, "cpp": c,
                     "speedup": ratio, "seconds": time.perf_counter() - start})
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    if args.json:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
        meta = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
                "load_average": [load_before[0], load_after[0]], "reps": args.reps,
                "cpp_status": _ext.status("cpp")[1]}
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
