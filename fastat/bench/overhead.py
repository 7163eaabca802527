"""`fastat bench --suites overhead`: host time per op call, and per AT inner-step chain, beside the eager PyTorch
expression each op replaces; and how many device kernels each call launches.

Providers: `eager` (the plain torch expression, written out here), `torch` (fastat's reference through the public
API), `auto`, and every kernel backend this machine can run (`cpp`; `triton`, `cuda` on a GPU).
  * Without a GPU, `triton` runs its real Python glue with every launch replaced by a no-op: the benchmark hook
    `fastat._triton_utils.replace_launch` (outputs are left uninitialised; only host time is meaningful). The
    Triton launcher's own cost is then not included; on a GPU it is.
  * On a GPU the launches are real. Host time = wall time of a loop of calls that never synchronises (the round
    synchronises once, at its end), so it is what the Python thread spends per call; `device_us` adds the sync.
Kernels per call: on a GPU, CUDA kernels, memcpys and memsets in a torch.profiler trace of one call; without one,
the calls that would launch a kernel on a GPU: aten compute ops (seen by a TorchDispatchMode; views, empty tensors
and metadata are free) plus Triton launches (counted by the hook). A cpp call's work is a CPU loop: not counted.

Timing: interleaved rounds; each round runs `inner` calls of every provider back to back (the backend chosen once
per provider per round); the median over rounds is reported. While launches are replaced, coefficient values are
not read either (as on a GPU, where each read is a device sync). The targets of issue 9 are printed with the results:
CPU 8x3x8x8 `auto` <= 1.0x eager for every op; GPU path (triton/cuda, no-op launches on CPU) <= 15 us per fused op
call, the chain <= 60 us and <= 4 kernels; the CPU chain at 64x4x64x64 still >= 3x eager.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastat

from .. import _backend
from .._autograd import loss_grads
from .._backend import backend_status, device_refusal

SMALL = (8, 3, 8, 8)
LARGE = (64, 4, 64, 64)
KERNEL_BACKENDS = ("cpp", "triton", "cuda")
# aten ops that launch no kernel: allocation, views and metadata
_FREE_OPS = {
    "promote_types", "result_type", "empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "detach", "alias", "expand", "t",
    "permute", "squeeze", "unsqueeze", "select", "slice", "transpose", "reshape", "lift_fresh", "new_empty",
    "new_empty_strided", "_reshape_alias", "split", "unbind", "sym_size", "sym_stride", "sym_numel", "is_same_size",
}


# --------------------------------------------------------------------------------------------------- cases


def _inputs(shape, device) -> Dict:
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(shape, generator=g).to(device) for k in ("x0", "noise", "delta", "grad", "pred", "other")}
    b = shape[0]
    t["alpha"] = (torch.rand(b, generator=g) * 0.8 + 0.1).to(device)
    t["sigma"] = (torch.rand(b, generator=g) * 0.8 + 0.1).to(device)
    t["p"] = t["pred"].clone().requires_grad_()
    t["d"] = t["delta"].clone().requires_grad_()
    t["timesteps"] = torch.randint(0, 1000, (b,), generator=g).to(device)
    t["table"] = fastat.schedules.ddpm_linear_alphas_cumprod(1000).to(device)
    t["table32"] = t["table"].float()
    t["radius"] = 0.5 * math.sqrt(math.prod(shape[1:]))
    return t


def _col(v, like):
    return v.view((-1,) + (1,) * (like.ndim - 1))


def _l2_step(delta, grad, step, radius):
    gn = grad.flatten(1).norm(dim=1).clamp_min(1e-8)
    v = delta + step * grad / _col(gn, grad)
    vn = v.flatten(1).norm(dim=1).clamp_min(1e-8)
    return v * _col(torch.clamp(radius / vn, max=1.0), v)


def cases(t: Dict) -> Dict[str, Tuple[Callable, Callable]]:
    """name -> (eager expression, fastat call), both on the tensors of `t`."""
    x0, noise, delta, grad, pred, other = (t[k] for k in ("x0", "noise", "delta", "grad", "pred", "other"))
    alpha, sigma, p, d, radius = t["alpha"], t["sigma"], t["p"], t["d"], t["radius"]
    d_elems = x0[0].numel()

    def mse_eager():
        loss = ((p - (noise + d / _col(sigma, d))) ** 2).flatten(1).mean(1).mean()
        return torch.autograd.grad(loss, (p, d))

    def mse_fused():
        return torch.autograd.grad(fastat.equivariant_mse(p, noise, d, sigma, "delta"), (p, d))

    def reg_eager():
        loss = ((p - (other + d)) ** 2).flatten(1).mean(1).mean()
        return torch.autograd.grad(loss, (p, d))

    def reg_fused():
        return torch.autograd.grad(fastat.equivariance_regularizer(p, other, d), (p, d))

    huber_c = 0.00054 * math.sqrt(d_elems)

    def huber_eager():
        loss = (((p - other) ** 2).flatten(1).sum(1) + huber_c ** 2).sqrt().sub(huber_c).mean()
        return torch.autograd.grad(loss, (p,))

    def huber_fused():
        return torch.autograd.grad(fastat.consistency_distance(p, other, "pseudo_huber"), (p,))

    def q_eager():
        abar = t["table32"][t["timesteps"]]
        return _col(abar.sqrt(), x0) * x0 + _col((1 - abar).sqrt(), x0) * noise + delta

    def random_eager():
        n = torch.randn_like(x0)
        u = torch.rand(x0.shape[0], device=x0.device).pow(1.0 / d_elems)
        return n * _col(u * radius / n.flatten(1).norm(dim=1).clamp_min(1e-8), n)

    def chain_eager():
        x_adv = _col(alpha, x0) * x0 + _col(sigma, x0) * noise + delta
        loss = ((p - (noise + d / _col(sigma, d))) ** 2).flatten(1).sum(1).sum()
        g_pred, g_delta = torch.autograd.grad(loss, (p, d))
        new = _l2_step(delta, g_delta, 0.1, radius)
        return x_adv, g_pred, new, x_adv + new

    def chain_fused():
        x_adv = fastat.noisy_input(x0, noise, alpha, sigma, delta)
        loss = fastat.equivariant_mse(p, noise, d, sigma, "delta", reduction="sum")
        g_pred, g_delta = loss_grads(loss, (p, d))  # what the attack loop's input_grad calls
        new, x_next = fastat.pgd_step(delta, g_delta, 0.1, radius, model_input_base=x_adv)
        return x_adv, g_pred, new, x_next

    return {
        "noisy_input": (lambda: _col(alpha, x0) * x0 + _col(sigma, x0) * noise + delta,
                        lambda: fastat.noisy_input(x0, noise, alpha, sigma, delta)),
        "q_sample": (q_eager, lambda: fastat.q_sample(x0, noise, t["timesteps"], t["table"], delta)),
        "gaussian_noise": (lambda: torch.randn_like(x0), lambda: fastat.gaussian_noise(x0, 7)),
        "random_perturbation": (random_eager, lambda: fastat.random_perturbation(x0, radius)),
        "pgd_step_l2": (lambda: _l2_step(delta, grad, 0.1, radius), lambda: fastat.pgd_step(delta, grad, 0.1, radius)),
        "pgd_step_linf": (lambda: (delta + 0.01 * grad.sign()).clamp(-0.03, 0.03),
                          lambda: fastat.pgd_step(delta, grad, 0.01, 0.03, "linf")),
        "equivariant_mse_fwd_bwd": (mse_eager, mse_fused),
        "equivariance_regularizer_fwd_bwd": (reg_eager, reg_fused),
        "consistency_distance_fwd_bwd": (huber_eager, huber_fused),
        "chain": (chain_eager, chain_fused),
    }


# ------------------------------------------------------------------------------------------------ measuring


def providers(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """(providers timed here, {backend: why it is not})."""
    run, skipped = ["eager", "torch", "auto"], {}
    for name in KERNEL_BACKENDS:
        ok, why = backend_status(name)
        refusal = device_refusal(name, device.type)
        if not ok:
            skipped[name] = why
        elif refusal is not None:
            skipped[name] = refusal
        else:
            run.append(name)
    return run, skipped


def _no_launch(kernel, grid, args, meta) -> None:
    """The benchmark hook's stand-in for a Triton launch (counts it when counting)."""
    if _Counter.active is not None:
        _Counter.active.count += 1


class _Counter(TorchDispatchMode):
    """Counts aten ops that would launch a kernel on a GPU (and, through `_no_launch`, Triton launches)."""

    active: Optional["_Counter"] = None

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _FREE_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable, device: torch.device) -> Optional[int]:
    """Device kernels one call of fn launches (see the module docstring)."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    counter = _Counter()
    _Counter.active = counter
    try:
        with counter:
            fn()
    finally:
        _Counter.active = None
    return counter.count


def _round(fn: Callable, inner: int, device: torch.device) -> Tuple[float, float]:
    """(host us per call, us per call including the device) for `inner` back-to-back calls."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    host = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    return host / inner * 1e6, total / inner * 1e6


def measure_case(eager: Callable, fused: Callable, names: List[str], device: torch.device, *, rounds: int,
                 inner: int, hook_launches: bool) -> Dict[str, Dict]:
    """Interleaved rounds of every provider; medians; kernels per call."""
    if hook_launches:
        from .. import _triton_utils  # the benchmark hook (importing it imports triton)
    results: Dict[str, Dict] = {}
    samples: Dict[str, List[Tuple[float, float]]] = {n: [] for n in names}
    errors: Dict[str, str] = {}
    saved = _backend._requested

    def call(name, fn, count):
        if name != "eager":
            fastat.set_backend(name)
        try:
            if name == "triton" and hook_launches:
                with _triton_utils.replace_launch(_no_launch):
                    return count(fn)
            return count(fn)
        finally:
            _backend._requested = saved

    active = list(names)
    for name in list(active):  # warm-up (loads kernels, compiles, fills the caches); drop providers that fail
        try:
            for _ in range(3):
                call(name, eager if name == "eager" else fused, lambda f: f())
        except Exception as exc:  # a provider that cannot run this case is recorded, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            active.remove(name)
    for _ in range(rounds):
        for name in active:
            fn = eager if name == "eager" else fused
            samples[name].append(call(name, fn, lambda f: _round(f, inner, device)))
    for name in active:
        host = [h for h, _ in samples[name]]
        total = [t for _, t in samples[name]]
        fn = eager if name == "eager" else fused
        results[name] = {"host_us": statistics.median(host), "host_us_q10": sorted(host)[len(host) // 10],
                         "host_us_q90": sorted(host)[(9 * len(host)) // 10], "device_us": statistics.median(total),
                         "kernels": None if name == "cpp" else call(name, fn, lambda f: count_kernels(f, device))}
    for name, why in errors.items():
        results[name] = {"error": why}
    return results


def run_overhead_benchmarks(device, quick: bool = False, log: Callable[[str], None] = print,
                            shape: Tuple[int, ...] = SMALL) -> Dict:
    """Every case at `shape` (8x3x8x8) on every provider, plus the chain at 64x4x64x64 on CPU; returns
    {"rows", "skipped", "providers"}."""
    device = torch.device(device)
    names, skipped = providers(device)
    hook = device.type != "cuda" and "triton" in names
    rounds, inner = (3, 20) if quick else (15, 200)
    rows: List[Dict] = []
    t = _inputs(shape, device)
    for case, (eager, fused) in cases(t).items():
        res = measure_case(eager, fused, names, device, rounds=rounds, inner=inner, hook_launches=hook)
        rows += _rows(case, shape, res, hook)
        log(f"  {case:<34} " + "  ".join(
            f"{n} {r['host_us']:.1f}us" + (f"/{r['kernels']}k" if r.get("kernels") is not None else "")
            for n, r in res.items() if "host_us" in r))
    if device.type == "cpu" and not quick:
        large = _inputs(LARGE, device)
        eager, fused = cases(large)["chain"]
        big = [n for n in names if n in ("eager", "torch", "auto", "cpp")]  # torch: the reference as fastat runs it
        res = measure_case(eager, fused, big, device, rounds=31, inner=1, hook_launches=False)
        rows += _rows("chain", LARGE, res, False)
        log(f"  {'chain ' + 'x'.join(map(str, LARGE)):<34} " + "  ".join(
            f"{n} {r['host_us'] / 1e3:.2f}ms" for n, r in res.items() if "host_us" in r))
    return {"rows": rows, "skipped": skipped, "providers": names}


def _rows(case: str, shape, results: Dict[str, Dict], hook: bool) -> List[Dict]:
    eager = results.get("eager", {}).get("host_us")
    out = []
    for name, r in results.items():
        row = {"suite": "overhead", "case": case, "shape": "x".join(map(str, shape)), "provider": name,
               "launches_replaced": hook and name == "triton"}
        row.update(r)
        if "host_us" in r and eager:
            row["x_eager"] = r["host_us"] / eager
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------- reporting


def markdown(rows: List[Dict]) -> List[str]:
    """The overhead tables: host us per call (x eager) [kernels per call], one row per case and shape."""
    rows = [r for r in rows if r.get("suite") == "overhead"]
    if not rows:
        return []
    names = list(dict.fromkeys(r["provider"] for r in rows))
    out = ["## host overhead per call", "",
           "Host time per call in us (ratio to the eager expression) [device kernels per call]. "
           + ("`triton` without a GPU: launches replaced by a no-op (host cost only). " if any(
               r.get("launches_replaced") for r in rows) else "")
           + "Targets (issue 9): `auto` <= 1.0x eager at 8x3x8x8 on CPU; GPU path <= 15 us per op, chain <= 60 us "
             "and <= 4 kernels; CPU chain at 64x4x64x64 >= 3x eager.", "",
           "| case | shape | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for case, shape in dict.fromkeys((r["case"], r["shape"]) for r in rows):
        cells = []
        for name in names:
            r = next((r for r in rows if r["case"] == case and r["shape"] == shape and r["provider"] == name), None)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("error")
            else:
                k = f" [{r['kernels']}]" if r.get("kernels") is not None else ""
                cells.append(f"{r['host_us']:.1f} ({r.get('x_eager', float('nan')):.2f}x){k}")
        out.append(f"| {case} | {shape} | " + " | ".join(cells) + " |")
    errors = {(r["provider"], r["error"]) for r in rows if "error" in r}
    out += [""] + [f"- {p}: {why}" for p, why in sorted(errors)] + [""]
    return out
