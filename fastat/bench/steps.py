"""Whole training-step benchmarks (issue 5 item 7): every AT method, timed interleaved with the standard
DDPM step in one run, time and peak memory per optimizer step.

Cases: the toy 2-D MLP denoiser (fastat.bench.models) (fp32, batch 4096; 65536 too on a GPU) and the DDPM CIFAR-10 UNet
(Ho et al., 35.7 M parameters, batch 128, bf16 autocast) on a GPU; on a CPU a small UNet (ch 32,
16x16, batch 8; quick: ch 16, 8x8, batch 2) stands in so the suite runs anywhere (CI smoke, `fastat bench` on CPU).

Providers:
  "eager":  plain PyTorch loops with the pass structure of the authors' code (the pass structure of docs/maths.md §5)
  "fastat": fastat.diffusion_adv_loss / FreeReplay (fused ops on the selected backend)
  "fastat+cudagraph": the fastat step captured whole in a CUDA graph (toy MLP, CUDA only)

Rows: {suite: "steps", case, provider, method, median_ms, q10_ms, q90_ms, peak_mem_mb, ratio_vs_standard,
device, batch, dtype, params, reps, backend}; times are per optimizer step (a Free-AT call of K replays is divided
by K), ratio_vs_standard = median / median of the eager standard step of the same case and run.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional

import torch

from .. import schedules
from .._backend import get_backend
from ..training import FreeReplay, GraphedStep, diffusion_adv_loss
from ..training.diffusion import p2_radius, p2_weight
from .models import DDPMUNet, ToyMLP, num_params
from .timing import interleaved, peak_memory_mb

K = 3
TABLE = schedules.ddpm_linear_alphas_cumprod(1000)

FASTAT_METHODS = {
    "standard": {"method": "standard"},
    "input_perturbation": {"method": "input_perturbation"},
    "pgd_k3": {"method": "pgd", "steps": K},
    "fgsm_rs": {"method": "fgsm_rs"},
    "p2_random": {"method": "equivariant_random"},
    "p2_adversarial": {"method": "equivariant_adversarial"},
    "p2_adversarial_batched": {"method": "equivariant_adversarial", "batch_branches": True},
}


def _col(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape((-1,) + (1,) * (x.ndim - 1))


def _draw(x0: torch.Tensor, abar: torch.Tensor):
    t = torch.randint(0, abar.numel(), (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    a, s = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
    return t, noise, _col(a, x0), _col(s, x0)


def _l2_step(d, g, step, radius):
    dims = tuple(range(1, d.ndim))
    d = d + step * g / torch.linalg.vector_norm(g, dim=dims, keepdim=True).clamp_min(1e-8)
    return d * (radius / torch.linalg.vector_norm(d, dim=dims, keepdim=True).clamp_min(1e-8)).clamp(max=1.0)


def eager_steps(model, opt, x0, abar) -> Dict[str, Callable[[], int]]:
    """Plain-PyTorch reference steps; each returns the number of optimizer steps it made."""
    radius = 0.1 * math.sqrt(x0[0].numel())

    def standard():
        t, noise, a, s = _draw(x0, abar)
        loss = ((model(a * x0 + s * noise, t) - noise) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return 1

    def pgd_k3():
        t, noise, a, s = _draw(x0, abar)
        x_t = a * x0 + s * noise
        delta = torch.zeros_like(x0, dtype=torch.float32)
        for _ in range(K):
            d = delta.requires_grad_(True)
            (g,) = torch.autograd.grad(((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean(), d)
            delta = _l2_step(d.detach(), g, 0.1, radius)
        loss = ((model(x_t + delta, t) - noise - delta / s) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return 1

    def free_p1():
        t, noise, a, s = _draw(x0, abar)
        x_t = a * x0 + s * noise
        delta = torch.zeros_like(x0, dtype=torch.float32)
        for _ in range(K):
            d = delta.requires_grad_(True)
            loss = ((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            delta = _l2_step(d.detach(), d.grad, 0.1, radius)
        return K

    def p2_adversarial():
        t, noise, a, s = _draw(x0, abar)
        r = _col(p2_radius(s.flatten(), 0.1), x0)
        lam = p2_weight(r)
        x_t = a * x0 + s * noise
        clean = model(x_t, t)
        omega = ((torch.rand_like(x0, dtype=torch.float32) * 2 - 1) * r).requires_grad_(True)
        (g,) = torch.autograd.grad(((model(x_t + s * omega, t) - clean.detach()) ** 2).sum(), omega)
        omega = torch.maximum(torch.minimum(omega.detach() + 1.25 * r * g.sign(), r), -r)
        pert = model(x_t + s * omega, t)
        dims = tuple(range(1, x0.ndim))
        loss = ((clean - noise) ** 2).mean() + (lam.flatten() * ((pert - clean - omega) ** 2).mean(dim=dims)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return 1

    return {"standard": standard, "pgd_k3": pgd_k3, "free_p1": free_p1, "p2_adversarial": p2_adversarial}


def fastat_steps(model, opt, x0) -> Dict[str, Callable[[], int]]:
    def loss_step(kwargs):
        def step():
            loss = diffusion_adv_loss(model, x0, alphas_cumprod=TABLE, **kwargs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return 1

        return step

    steps = {name: loss_step(kw) for name, kw in FASTAT_METHODS.items()}
    free_p1 = FreeReplay(model, opt, K, alphas_cumprod=TABLE)
    free_p2 = FreeReplay(model, opt, K, method="p2", alphas_cumprod=TABLE)
    steps["free_p1"] = lambda: (free_p1.step(x0), K)[1]
    steps["free_p2"] = lambda: (free_p2.step(x0), K)[1]
    return steps


def cudagraph_steps(model, x0) -> Dict[str, Callable[[], int]]:
    """The fastat standard and PGD-K3 steps captured whole (own model copy, capturable AdamW)."""
    out = {}
    for name, kwargs in (("standard", FASTAT_METHODS["standard"]), ("pgd_k3", FASTAT_METHODS["pgd_k3"])):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, capturable=True)
        table = TABLE.to(x0.device)

        def step(x, m=m, opt=opt, kwargs=kwargs, table=table):
            loss = diffusion_adv_loss(m, x, alphas_cumprod=table, same_dropout=False, **kwargs)
            loss.backward()
            opt.step()
            return loss.detach()

        graphed = GraphedStep(step, [x0], optimizer=opt)
        out[name] = lambda graphed=graphed: (graphed(x0), 1)[1]
    return out


def _cases(device: torch.device, quick: bool) -> List[dict]:
    cuda = device.type == "cuda"
    cases = [dict(case="toy_mlp_2d", model=ToyMLP, shape=(4096 if (cuda or not quick) else 256, 2), amp=None)]
    if cuda and not quick:
        cases.append(dict(case="toy_mlp_2d", model=ToyMLP, shape=(65536, 2), amp=None))
    if cuda:
        cases.append(dict(case="ddpm_cifar10_unet", model=DDPMUNet, shape=(32 if quick else 128, 3, 32, 32),
                          amp=torch.bfloat16))
    else:
        if quick:
            small = lambda: DDPMUNet(ch=16, ch_mult=(1, 2), attn_resolutions=(4,), resolution=8)  # noqa: E731
            cases.append(dict(case="ddpm_unet_tiny_cpu", model=small, shape=(2, 3, 8, 8), amp=None))
        else:
            small = lambda: DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16)  # noqa: E731
            cases.append(dict(case="ddpm_unet_small_cpu", model=small, shape=(8, 3, 16, 16), amp=None))
    return cases


def run_case(spec: dict, device: torch.device, quick: bool, reps: Optional[int] = None) -> List[dict]:
    """Time every provider/method of one case interleaved; `reps` overrides the repetition count."""
    torch.manual_seed(0)
    model = spec["model"]().to(device)
    x0 = torch.randn(spec["shape"], device=device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    abar = TABLE.to(device)
    fns: Dict[str, Callable[[], int]] = {}
    for name, fn in eager_steps(model, opt, x0, abar).items():
        fns[f"eager/{name}"] = fn
    for name, fn in fastat_steps(model, opt, x0).items():
        fns[f"fastat/{name}"] = fn
    if device.type == "cuda" and spec["model"] is ToyMLP:
        for name, fn in cudagraph_steps(model, x0).items():
            fns[f"fastat+cudagraph/{name}"] = fn
    amp = spec["amp"]
    per_call = {name: fn() for name, fn in fns.items()}  # also a first warm-up call; counts optimizer steps

    def wrap(fn):
        if amp is None:
            return fn
        def run():
            with torch.autocast(device.type, dtype=amp):
                return fn()
        return run

    timed = {name: wrap(fn) for name, fn in fns.items()}
    cpu = device.type != "cuda"
    if reps is None:
        reps = (3 if quick else 10) if cpu else (5 if quick else 30)
    stats = interleaved(timed, device=device, warmup=0 if quick else 3, reps=reps)
    base = stats["eager/standard"]["median_ms"]
    rows = []
    for name, st in stats.items():
        provider, method = name.split("/")
        k = per_call[name]
        rows.append({
            "suite": "steps",
            "case": spec["case"],
            "provider": provider,
            "method": method,
            "median_ms": st["median_ms"] / k,
            "q10_ms": st["q10_ms"] / k,
            "q90_ms": st["q90_ms"] / k,
            "peak_mem_mb": peak_memory_mb(timed[name], device=device),
            "ratio_vs_standard": st["median_ms"] / k / base,
            "device": str(device),
            "batch": spec["shape"][0],
            "dtype": "bf16-autocast" if amp is torch.bfloat16 else "fp32",
            "params": num_params(model),
            "reps": st["reps"],
            "backend": get_backend() if provider != "eager" else "eager",
        })
    return rows


def run_step_benchmarks(device, *, quick: bool, log: Optional[Callable[[str], None]] = None) -> List[dict]:
    """All step cases on `device` ("cpu" or "cuda"); `quick` shrinks sizes and repetitions (CI smoke);
    `log` gets one line per case ("case k/N ...") and its per-method ratios."""
    device = torch.device(device)
    rows: List[dict] = []
    cases = list(_cases(device, quick))
    for i, spec in enumerate(cases, start=1):
        if log is not None:
            log(f"  case {i}/{len(cases)}: {spec['case']} (batch {spec['shape'][0]})")
        case_rows = run_case(spec, device, quick)
        if log is not None:
            log("    " + "  ".join(f"{r['provider']}/{r['method']} {r['ratio_vs_standard']:.2f}x" for r in case_rows))
        rows.extend(case_rows)
    return rows
