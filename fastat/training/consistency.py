"""`consistency_adv_loss`: consistency training (CT) and distillation (CD) with the P1 perturbation on
the student input (SPEC §1, consistency models; the exact adversarial CM loss is *open*: this is the
placement from the paper's text).

    loss_i = lambda(sigma_n) * d( f_theta(x_{n+1} + delta, sigma_{n+1}),  stop_grad(f_target(xhat_n, sigma_n)) )
    f(x, s) = c_skip(s) * x + c_out(s) * F(c_in(s) * x, c_noise(s))    (consistency preconditioning,
              c_skip = sd^2/((s-smin)^2+sd^2), c_out = (s-smin)*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
              c_noise = ln(s)/4 unless `c_noise_fn` is given)
    x_{n+1} = x0 + sigma_{n+1} * z
    CT: xhat_n = x0 + sigma_n * z
    CD: xhat_n = one ODE step of the teacher from sigma_{n+1} to sigma_n (Euler, or Heun's 2nd order):
        d(x, s) = (x - D(x; s)) / s,  euler: x + (sigma_n - sigma_{n+1}) d(x_{n+1}, sigma_{n+1})
        heun: x + (sigma_n - sigma_{n+1}) (d(x_{n+1}, sigma_{n+1}) + d(x_euler, sigma_n)) / 2
    d: "l2" mean_flat squared, "l1" mean_flat abs, "pseudo_huber" sqrt(||.||^2 + c^2) - c (c = 0.00054 sqrt(D)).

Discretisations: "karras" (fixed N = num_scales, n uniform, weight 1) and "ict" (N from the iCT curriculum
at `training_step` of `total_steps`, n from the lognormal proposal, weight 1/(sigma_{n+1} - sigma_n)).
Target: `target_model` (an EMA copy) or None for the self target (the student under no_grad), always
evaluated under no_grad and detached. Student and target passes replay one RNG state, so dropout draws
the same mask in the compared passes.

Passes: the target pass (no grad) 1 F_nograd (+ 1 or 2 teacher forwards for CD), then as in
diffusion_adv_loss: "none" 1 F + 1 Bw; "pgd" K+1 F, K Bi, 1 Bw; "fgsm_rs" 2 F, 1 Bi, 1 Bw.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional

import torch

from .._checks import check_choice, check_tensor
from .._shapes import REDUCTIONS, column, reduce
from ..ops.losses import METRICS, consistency_distance
from ..ops.perturbation import NORMS, per_sample_norm, pgd_step, random_perturbation, rms_radius
from .. import schedules
from ._common import SameRandomness, inner_model, input_grad, no_sync, perturbation_dtype, resolve_aliases, unwrap_output

CM_METHODS = ("none", "pgd", "fgsm_rs")
DISCRETISATIONS = ("karras", "ict")
SOLVERS = ("euler", "heun")
WEIGHTINGS = ("uniform", "ict")
INITS = {True: "uniform", False: "zero", "uniform": "uniform", "normal": "normal", "zero": "zero"}


def cm_denoise(model, x, sigma, model_kwargs, sigma_data, sigma_min, precondition, c_noise_fn):
    """f(x, sigma) with consistency preconditioning (or model(x, sigma) itself if precondition=False)."""
    kwargs = model_kwargs or {}
    if not precondition:
        return unwrap_output(model(x, sigma, **kwargs))
    c_skip, c_out, c_in = schedules.consistency_preconditioning(sigma, sigma_data, sigma_min)
    acc = perturbation_dtype(x) if x.dtype != torch.float64 else torch.float64
    c_skip, c_out, c_in = (c.to(x.device, acc) for c in (c_skip, c_out, c_in))
    c_noise = c_noise_fn(sigma) if c_noise_fn is not None else (sigma.double().log() / 4).to(sigma.dtype)
    out = unwrap_output(model(column(c_in, x) * x, c_noise, **kwargs))
    return column(c_skip, x) * x + column(c_out, x) * out


def consistency_grid(
    discretisation: str = "karras",
    num_scales: int = 18,
    training_step: Optional[int] = None,
    total_steps: Optional[int] = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    s0: int = 10,
    s1: int = 1280,
) -> torch.Tensor:
    """The ascending sigma grid (float64): Karras with N = num_scales, or iCT with N from the curriculum."""
    check_choice("discretisation", discretisation, DISCRETISATIONS)
    if discretisation == "ict":
        if training_step is None or total_steps is None:
            raise ValueError("discretisation='ict' needs training_step= and total_steps= (the curriculum position)")
        num_scales = schedules.ict_num_steps(training_step, total_steps, s0, s1)
    return schedules.karras_sigmas(num_scales, sigma_min, sigma_max, rho)


def consistency_adv_loss(
    model: Callable,
    target_model: Optional[Callable],
    x0: torch.Tensor,
    *,
    mode: str = "ct",
    teacher: Optional[Callable] = None,
    solver: str = "heun",
    discretisation: str = "karras",
    num_scales: int = 18,
    training_step: Optional[int] = None,
    total_steps: Optional[int] = None,
    sigmas: Optional[torch.Tensor] = None,
    indices: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_data: float = 0.5,
    metric: str = "l2",
    huber_c: Optional[float] = None,
    weighting: Optional[str] = None,
    method: str = "pgd",
    eps: Optional[float] = None,
    eps_mode: str = "rms",
    alpha: Optional[float] = None,
    steps: Optional[int] = None,
    norm: Optional[str] = None,
    random_start=None,
    delta: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    teacher_kwargs: Optional[Dict[str, Any]] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    return_dict: bool = False,
    precondition: bool = True,
    c_noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    same_dropout: bool = True,
    scaler=None,
    **aliases,
):
    """Adversarial consistency loss for one batch (see the module docstring for the formulas).

    mode "ct" | "cd" (CD needs ``teacher``, called as ``teacher(x, sigma, **teacher_kwargs)`` returning the
    denoised estimate D(x; sigma)). The student/target are called as ``model(c_in * x, c_noise, **model_kwargs)``
    with preconditioning applied outside (``precondition=False``: ``model(x, sigma)`` is f itself).
    ``sigmas`` (ascending grid) overrides ``discretisation``; ``indices`` [B] in [0, N-2] and ``noise`` z fix
    the draw (FreeReplay reuses them across replays).
    Perturbation on the student input: method "none" | "pgd" (``steps`` input-gradient ascent steps on d,
    L2-normalised step ``alpha`` default 0.1 or Linf sign step, radius ``eps`` default 0.1 with
    ``eps_mode="rms"`` -> R = eps * sqrt(D)) | "fgsm_rs" (uniform start, one step 1.25 * R).
    ``delta``: a given perturbation used as is (its gradient flows if it requires grad; Free-AT).
    AT_Diff aliases adv_steps, adv_lr, adv_max_norm, adv_norm_type as in diffusion_adv_loss.
    Returns the reduced loss, or with ``return_dict`` a dict: loss, loss_per_sample, delta_norm, grad_norm,
    delta, indices, noise, sigmas.
    """
    check_tensor("x0", x0)
    check_choice("mode", mode, ("ct", "cd"))
    check_choice("solver", solver, SOLVERS)
    check_choice("metric", metric, METRICS)
    check_choice("method", method, CM_METHODS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("eps_mode", eps_mode, ("rms", "abs"))
    if mode == "cd" and teacher is None:
        raise ValueError("mode='cd' (distillation) needs teacher=, a denoiser called as teacher(x, sigma)")
    opts = resolve_aliases(
        {"steps": steps, "alpha": alpha, "eps": eps, "norm": norm}, aliases, {"eps": 0.1, "norm": "l2"}
    )
    check_choice("norm", opts["norm"], NORMS)
    if sigmas is None:
        sigmas = consistency_grid(discretisation, num_scales, training_step, total_steps, sigma_min, sigma_max, rho)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D ascending grid of >= 2 values, got shape {tuple(sigmas.shape)}")
    if weighting is None:
        weighting = "ict" if discretisation == "ict" else "uniform"
    check_choice("weighting", weighting, WEIGHTINGS)

    batch, device = x0.shape[0], x0.device
    acc = perturbation_dtype(x0)
    if indices is None:
        if discretisation == "ict":
            indices = schedules.sample_ict_indices(sigmas, batch, generator=_cpu_gen(generator))
        else:
            indices = torch.randint(0, sigmas.numel() - 1, (batch,), generator=_cpu_gen(generator))
    indices = indices.to(device="cpu", dtype=torch.long).reshape(-1)
    if indices.numel() != batch or int(indices.min()) < 0 or int(indices.max()) > sigmas.numel() - 2:
        raise ValueError(f"indices must be {batch} integers in [0, {sigmas.numel() - 2}]")
    if noise is None:
        noise = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
    s_n = sigmas[indices].to(device, acc)
    s_n1 = sigmas[indices + 1].to(device, acc)
    if weighting == "ict":
        lam = schedules.ict_loss_weights(sigmas)[indices].to(device, acc)
    else:
        lam = None

    x0a = x0.to(acc)
    z = noise.to(acc)
    x_n1 = x0a + column(s_n1, z) * z
    rng = SameRandomness(device, same_dropout)
    denoise = lambda m, x, s: cm_denoise(m, x, s, model_kwargs, sigma_data, sigma_min, precondition, c_noise_fn)  # noqa: E731

    with torch.no_grad():
        if mode == "ct":
            x_n = x0a + column(s_n, z) * z
        else:
            x_n = _ode_step(teacher, x_n1, s_n1, s_n, solver, teacher_kwargs)
        rng.replay()
        target = denoise(target_model if target_model is not None else model, x_n, s_n).detach()

    attack_model = inner_model(model)
    attack_ctx = (lambda: no_sync(model)) if attack_model is model else contextlib.nullcontext

    def student(m, d):
        rng.replay()
        return denoise(m, x_n1 if d is None else x_n1 + d, s_n1)

    grad = None
    if delta is not None:
        if delta.shape != x0.shape:
            raise ValueError(f"delta must have the shape of x0 {tuple(x0.shape)}, got {tuple(delta.shape)}")
    elif method != "none":
        norm_, eps_ = opts["norm"], float(opts["eps"])
        radius = rms_radius(eps_, x0) if (eps_mode == "rms" and norm_ == "l2") else eps_
        if method == "pgd":
            k = 3 if opts["steps"] is None else int(opts["steps"])
            init = INITS[False if random_start is None else random_start]
            step = opts["alpha"] if opts["alpha"] is not None else (0.1 if norm_ == "l2" else 2.5 * radius / max(k, 1))
        else:
            if opts["steps"] not in (None, 1):
                raise ValueError(f"method='fgsm_rs' takes exactly one step, got steps={opts['steps']}")
            k, init = 1, INITS[True if random_start is None else random_start]
            step = opts["alpha"] if opts["alpha"] is not None else 1.25 * radius
        delta = random_perturbation(x0, radius, norm_, init, generator, dtype=acc)
        for _ in range(k):
            delta = delta.detach().requires_grad_(True)
            with attack_ctx():
                pred = student(attack_model, delta)
            d_sum = consistency_distance(pred, target, metric, huber_c, reduction="sum")
            grad = input_grad(d_sum, delta, scaler)
            delta = pgd_step(delta.detach(), grad, step, radius, norm_)
        delta = delta.detach()
    pred = student(model, delta)
    per = consistency_distance(pred, target, metric, huber_c, weight=lam, reduction="none")
    loss = reduce(per, reduction)
    if not return_dict:
        return loss
    zeros = torch.zeros(batch, device=device, dtype=acc)
    return {
        "loss": loss,
        "loss_per_sample": per,
        "delta_norm": per_sample_norm(delta) if delta is not None else zeros,
        "grad_norm": per_sample_norm(grad) if grad is not None else zeros,
        "delta": delta.detach() if delta is not None else None,
        "indices": indices,
        "noise": noise,
        "sigmas": sigmas,
    }


def _cpu_gen(generator):
    """Index draws happen on the CPU grid; a CUDA generator cannot drive them."""
    return generator if generator is not None and generator.device.type == "cpu" else None


def _ode_step(teacher, x, s_from, s_to, solver, teacher_kwargs):
    """One probability-flow ODE step of an EDM denoiser from s_from to s_to (Euler or Heun)."""
    kwargs = teacher_kwargs or {}
    d1 = (x - unwrap_output(teacher(x, s_from, **kwargs))) / column(s_from, x)
    h = column(s_to - s_from, x)
    x_euler = x + h * d1
    if solver == "euler":
        return x_euler
    d2 = (x_euler - unwrap_output(teacher(x_euler, s_to, **kwargs))) / column(s_to, x)
    return x + h * (d1 + d2) / 2
