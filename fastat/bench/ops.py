"""Op benchmark cases: every public op and the AT inner-step chain, per provider, with bytes moved.

Providers (columns):
    eager     the pure-PyTorch reference through the public API (backend "torch")
    compile   torch.compile of the reference kernels (the same maths, fused by Inductor where it can)
    triton, cuda, cpp   fastat's kernels through the public API, where this machine can run them
              (triton and cuda on a CUDA device; cpp on CPU). The Triton interpreter is not a
              performance path, so triton is never timed on CPU.

Bytes moved (the memory floor of each case: inputs read once + outputs written once; N = elements,
e = bytes per element, per-sample coefficients ignored):
    noisy_input             read x0, noise, delta; write x_t                                   4 N e
    q_sample                the same (coefficients gathered from the table)                     4 N e
    pgd_step_l2 / _linf     read delta, grad; write delta'                                      3 N e
    random_perturbation     write delta (L2 ball, uniform)                                      1 N e
    equivariant_mse         fwd+bwd, target "delta": read pred, noise, delta; write dpred, ddelta  5 N e
    equivariance_regularizer fwd+bwd: read pred_perturbed, pred_clean, omega; write both grads  5 N e
    consistency_distance    fwd+bwd pseudo-Huber: read pred, target; write dpred                3 N e
    chain                   noisy_input + equivariant_mse fwd+bwd (grads wrt pred and delta) + L2 pgd_step:
                            read x0, noise, delta, pred; write x_adv, dpred, delta'             7 N e
Achieved GB/s = bytes / median time; "% of copy" divides by the bandwidth of a device copy measured in
the same run (dst.copy_(src): 2 x buffer bytes per call), the roofline of every plot. The median time is the
event time of one call, host launch gaps included (what a training loop waits for). On CUDA the rows also carry
the CUDA profiler's view of one call: `kernels` launched and `device_us` of kernel time, and
`device_pct_of_copy` = bytes / device_us against the copy: the kernels' own distance from the roofline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _dispatch  # noqa: F401  (registered_backends)
from .._autograd import loss_grads
from .._backend import BackendUnavailableError, backend_status, device_refusal, use_backend
from .timing import device_profile, interleaved, measure

# The shapes of docs/design.md's GPU reference numbers, plus the latent and 2-D toy cases.
ANCHOR_SHAPES: Dict[str, Tuple[int, ...]] = {
    "cifar": (128, 3, 32, 32),
    "latent": (64, 4, 64, 64),
    "imagenet64": (256, 3, 64, 64),
    "pixel256": (64, 3, 256, 256),
    "pixel512": (32, 3, 512, 512),
    "toy2d": (65536, 2),
}
CPU_SHAPES = ("toy2d", "cifar", "latent")
QUICK_SHAPES: Dict[str, Tuple[int, ...]] = {"tiny2d": (256, 2), "tinyimg": (8, 3, 16, 16)}
KERNEL_BACKENDS = ("triton", "cuda", "cpp")


def _ref(op: str) -> Callable:
    """The reference expression of a public op, with the argument order the cases use (reductions "none"). Run under
    backend "torch": eagerly it is the reference; under torch.compile the public functions trace the reference."""
    import fastat

    return {
        "noisy_input": lambda x0, noise, alpha, sigma, delta: fastat.noisy_input(x0, noise, alpha, sigma, delta),
        "pgd_step": lambda delta, grad, step, radius, norm, normalize: fastat.pgd_step(delta, grad, step, radius, norm, normalize),
        "random_perturbation": lambda like, radius, norm, init, generator, dtype: fastat.random_perturbation(
            like, radius, norm, init, generator, dtype),
        "equivariant_mse": lambda pred, noise, delta, sigma, target: fastat.equivariant_mse(
            pred, noise, delta, sigma, target, reduction="none"),
        "equivariance_regularizer": lambda pp, pc, omega, detach_anchor, mode: fastat.equivariance_regularizer(
            pp, pc, omega, None, detach_anchor, mode, "none"),
        "consistency_distance": lambda pred, target, metric, c: fastat.consistency_distance(
            pred, target, metric, c, reduction="none"),
    }[op]


def _on_reference(fn: Callable) -> Callable:
    def call(*args):
        with use_backend("torch"):
            return fn(*args)

    return call


def _coefs(b: int, device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    alpha = torch.rand(b, generator=g).mul(0.9).add(0.05).to(device)
    return {"alpha": alpha, "sigma": (1 - alpha * alpha).sqrt()}


def _setup(shape, device, dtype) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
         for k in ("x0", "noise", "delta", "pred", "grad", "other")}
    t.update(_coefs(shape[0], device))
    t["timesteps"] = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    from ..schedules import ddpm_linear_alphas_cumprod

    t["table"] = ddpm_linear_alphas_cumprod(1000)
    d = math.prod(shape[1:])
    t["radius"] = 0.1 * math.sqrt(d)
    return t


@dataclass
class Case:
    """One benchmark case. public(t) calls fastat's public API; reference(t, ref) calls the reference kernels
    given by ref[op] (eager or compiled). bytes_per_element: the multiple of N * e that must move."""

    name: str
    ops: Tuple[str, ...]
    bytes_per_element: int
    public: Callable[[Dict], Any]
    reference: Callable[[Dict, Dict[str, Callable]], Any]


def _grad_of(out: torch.Tensor, inputs: Sequence[torch.Tensor]):
    return torch.autograd.grad(out.sum(), inputs)


def _req(t, *names):
    return [t[n].detach().requires_grad_(True) for n in names]


def _cases() -> List[Case]:
    import fastat

    def eq_pub(t):
        pred, delta = _req(t, "pred", "delta")
        return _grad_of(fastat.equivariant_mse(pred, t["noise"], delta, t["sigma"], "delta", reduction="none"), (pred, delta))

    def eq_ref(t, r):
        pred, delta = _req(t, "pred", "delta")
        return _grad_of(r["equivariant_mse"](pred, t["noise"], delta, t["sigma"], "delta"), (pred, delta))

    def reg_pub(t):
        pp, pc = _req(t, "pred", "other")
        return _grad_of(fastat.equivariance_regularizer(pp, pc, t["delta"], reduction="none"), (pp, pc))

    def reg_ref(t, r):
        pp, pc = _req(t, "pred", "other")
        return _grad_of(r["equivariance_regularizer"](pp, pc, t["delta"], False, "equivariant"), (pp, pc))

    def cd_pub(t):
        (pred,) = _req(t, "pred")
        return _grad_of(fastat.consistency_distance(pred, t["other"], "pseudo_huber", reduction="none"), (pred,))

    def cd_ref(t, r):
        (pred,) = _req(t, "pred")
        c = 0.00054 * math.sqrt(math.prod(pred.shape[1:]))
        return _grad_of(r["consistency_distance"](pred, t["other"], "pseudo_huber", c), (pred,))

    def chain_pub(t):
        x_adv = fastat.noisy_input(t["x0"], t["noise"], t["alpha"], t["sigma"], t["delta"])
        pred, delta = _req(t, "pred", "delta")
        loss = fastat.equivariant_mse(pred, t["noise"], delta, t["sigma"], "delta", reduction="sum")
        g_pred, g_delta = loss_grads(loss, (pred, delta))  # what the attack loop's input_grad calls
        return x_adv, g_pred, fastat.pgd_step(t["delta"], g_delta, 0.1, t["radius"], "l2")

    def chain_ref(t, r):
        x_adv = r["noisy_input"](t["x0"], t["noise"], t["alpha"], t["sigma"], t["delta"])
        pred, delta = _req(t, "pred", "delta")
        loss = r["equivariant_mse"](pred, t["noise"], delta, t["sigma"], "delta").sum()
        g_pred, g_delta = torch.autograd.grad(loss, (pred, delta))
        return x_adv, g_pred, r["pgd_step"](t["delta"], g_delta, 0.1, t["radius"], "l2", True)

    def q_ref(t, r):
        a, s = fastat.alpha_sigma(t["table"], t["timesteps"])
        return r["noisy_input"](t["x0"], t["noise"], a.to(t["x0"].device), s.to(t["x0"].device), t["delta"])

    return [
        Case("noisy_input", ("noisy_input",), 4,
             lambda t: fastat.noisy_input(t["x0"], t["noise"], t["alpha"], t["sigma"], t["delta"]),
             lambda t, r: r["noisy_input"](t["x0"], t["noise"], t["alpha"], t["sigma"], t["delta"])),
        Case("q_sample", ("noisy_input",), 4,
             lambda t: fastat.q_sample(t["x0"], t["noise"], t["timesteps"], t["table"], t["delta"]), q_ref),
        Case("pgd_step_l2", ("pgd_step",), 3,
             lambda t: fastat.pgd_step(t["delta"], t["grad"], 0.1, t["radius"], "l2"),
             lambda t, r: r["pgd_step"](t["delta"], t["grad"], 0.1, t["radius"], "l2", True)),
        Case("pgd_step_linf", ("pgd_step",), 3,
             lambda t: fastat.pgd_step(t["delta"], t["grad"], 0.01, 0.03, "linf"),
             lambda t, r: r["pgd_step"](t["delta"], t["grad"], 0.01, 0.03, "linf", True)),
        Case("random_perturbation", ("random_perturbation",), 1,
             lambda t: fastat.random_perturbation(t["x0"], t["radius"], "l2", "uniform"),
             lambda t, r: r["random_perturbation"](t["x0"], t["radius"], "l2", "uniform", None, None)),
        Case("equivariant_mse", ("equivariant_mse",), 5, eq_pub, eq_ref),
        Case("equivariance_regularizer", ("equivariance_regularizer",), 5, reg_pub, reg_ref),
        Case("consistency_distance", ("consistency_distance",), 3, cd_pub, cd_ref),
        Case("chain", ("noisy_input", "equivariant_mse", "pgd_step"), 7, chain_pub, chain_ref),
    ]


def kernel_backends(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """(backends timed on this device, {skipped backend: why})."""
    run, skipped = [], {}
    for b in KERNEL_BACKENDS:
        ok, why = backend_status(b)
        refusal = device_refusal(b, device.type)
        if b == "triton" and device.type != "cuda":
            skipped[b] = "GPU column: Triton kernels run on CUDA (the CPU interpreter is not a performance path)"
        elif b == "cuda" and device.type != "cuda":
            skipped[b] = "GPU column: needs a CUDA device"
        elif not ok:
            skipped[b] = why
        elif refusal is not None:
            skipped[b] = refusal
        else:
            run.append(b)
    return run, skipped


def copy_bandwidth(device: torch.device, quick: bool = False) -> Dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written per second) on a large fp32 buffer."""
    mb = 8 if quick else (256 if device.type == "cuda" else 64)
    n = mb * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, warmup=3, reps=5 if quick else 30)
    return {"buffer_mb": mb, "median_ms": t["median_ms"], "gbps": 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9}


def run_op_benchmarks(device, quick: bool = False, shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                      dtype: torch.dtype = torch.float32, compile: Optional[bool] = None,
                      cases: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> Dict:
    """Time every case on every shape and provider. Returns {"rows", "copy", "skipped", "providers"}.

    Defaults: quick -> tiny shapes, 5 reps, no compile; CPU -> CPU_SHAPES; CUDA -> all ANCHOR_SHAPES.
    A provider that raises is recorded with its error (no time) instead of stopping the run."""
    device = torch.device(device)
    if shapes is None:
        if quick:
            shapes = QUICK_SHAPES
        elif device.type == "cuda":
            shapes = ANCHOR_SHAPES
        else:
            shapes = {k: ANCHOR_SHAPES[k] for k in CPU_SHAPES}
    compile = (not quick) if compile is None else compile
    reps = 5 if quick else (50 if device.type == "cuda" else 15)
    backends, skipped = kernel_backends(device)
    if not compile:
        skipped["compile"] = "torch.compile provider off (--quick or compile=False)"
    copy = copy_bandwidth(device, quick)
    log(f"copy bandwidth on {device}: {copy['gbps']:.1f} GB/s (roofline)")
    all_cases = _cases()
    if cases is not None:
        all_cases = [c for c in all_cases if c.name in set(cases)]
    eager_refs = {op: _ref(op) for op in {o for c in all_cases for o in c.ops}}
    if compile:
        import torch._dynamo as dynamo

        # One static-shape graph per (op, shape); the default limit of 8 would silently fall back to eager.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    compiled = {op: _on_reference(torch.compile(fn, dynamic=False)) for op, fn in eager_refs.items()} if compile else {}
    rows = []
    elem = torch.empty((), dtype=dtype).element_size()
    for shape_name, shape in shapes.items():
        t = _setup(shape, device, dtype)
        numel = math.prod(shape)
        for case in all_cases:
            fns: Dict[str, Callable] = {}
            errors: Dict[str, str] = {}

            def eager(case=case):
                with use_backend("torch"):
                    return case.public(t)

            fns["eager"] = eager
            if compile:
                fns["compile"] = (lambda case=case: case.reference(t, compiled))
            for b in backends:
                missing = [op for op in case.ops if b not in _dispatch.registered_backends(op)]
                if missing:
                    errors[b] = f"no {b} kernel for {', '.join(missing)}"
                    continue

                def kernel(case=case, b=b):
                    with use_backend(b):
                        return case.public(t)

                fns[b] = kernel
            for name, fn in list(fns.items()):  # warm-up / compile, and drop providers that fail
                try:
                    for _ in range(3 if name == "compile" else 1):  # compile, then settle any recompiles
                        fn()
                except (BackendUnavailableError, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                    errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    del fns[name]
            timed = interleaved(fns, device=device, warmup=2, reps=reps) if fns else {}
            profiled = {}
            if device.type == "cuda":  # device time and kernel count per call, without the host's gaps
                for name, fn in fns.items():
                    try:
                        profiled[name] = device_profile(fn)
                    except Exception as exc:  # the profiler is optional evidence, never a reason to lose a row
                        log(f"  profiler failed for {name}: {type(exc).__name__}: {str(exc)[:200]}")
            base = timed.get("eager", {}).get("median_ms")
            nbytes = case.bytes_per_element * numel * elem
            for name in ["eager", "compile"] + backends:
                if name in timed:
                    ms = timed[name]["median_ms"]
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    rows.append({"suite": "ops", "case": case.name, "shape_name": shape_name,
                                 "shape": "x".join(map(str, shape)), "numel": numel, "dtype": str(dtype).replace("torch.", ""),
                                 "provider": name, "median_ms": ms, "q10_ms": timed[name]["q10_ms"],
                                 "q90_ms": timed[name]["q90_ms"], "reps": timed[name]["reps"],
                                 "speedup_vs_eager": (base / ms) if base else None, "bytes": nbytes, "gbps": gbps,
                                 "pct_of_copy": 100.0 * gbps / copy["gbps"]})
                    if name in profiled and profiled[name]["device_us"] > 0:
                        dev_gbps = nbytes / (profiled[name]["device_us"] * 1e-6) / 1e9
                        rows[-1].update(kernels=profiled[name]["kernels"], device_us=profiled[name]["device_us"],
                                        device_pct_of_copy=100.0 * dev_gbps / copy["gbps"])
                elif name in errors:
                    rows.append({"suite": "ops", "case": case.name, "shape_name": shape_name,
                                 "shape": "x".join(map(str, shape)), "numel": numel, "dtype": str(dtype).replace("torch.", ""),
                                 "provider": name, "error": errors[name]})
            log(f"  {shape_name:<10} {case.name:<25} " + "  ".join(
                f"{n} {timed[n]['median_ms']:.3f} ms" for n in timed) + ("  (" + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ")" if errors else ""))
    return {"rows": rows, "copy": copy, "skipped": skipped, "providers": ["eager"] + (["compile"] if compile else []) + backends}
