"""`consistency_adv_loss`: consistency training (CT) and distillation (CD) with the P1 perturbation on
the student input (docs/maths.md §1, consistency models; the exact adversarial CM loss is *open*: this is the
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
import functools
from typing import Any, Callable, Dict, Optional

import torch

from .._checks import check_callable, check_choice, check_float, check_int_at_least, check_like, check_tensor, per_sample
from .._shapes import REDUCTIONS, column, reduce
from ..ops.losses import METRICS, consistency_distance
from ..ops.noise import SeededNoise
from ..ops.noisy_input import noisy_input
from ..ops.perturbation import per_sample_norm
from .. import schedules
from . import attack
from ._common import (SameRandomness, call_model, check_output, inner_model, no_sync, perturbation_dtype,
                      running_stat_modules, standard_normal, unwrap_output)
from ._options import check_bools, check_generator, check_model_kwargs, check_scaler, resolve_aliases

CM_METHODS = ("none", "pgd", "fgsm_rs")
DISCRETISATIONS = ("karras", "ict")
SOLVERS = ("euler", "heun")
WEIGHTINGS = ("uniform", "ict")


def cm_denoise(model, x, sigma, model_kwargs, sigma_data, sigma_min, precondition, c_noise_fn, model_dtype=None,
               name: str = "model"):
    """f(x, sigma) with consistency preconditioning (or model(x, sigma) itself if precondition=False).
    x (the state) stays in fp32/fp64; the model is fed ``model_dtype`` (the data's dtype)."""
    model_dtype = x.dtype if model_dtype is None else model_dtype
    if not precondition:
        return check_output(call_model(model, x.to(model_dtype), sigma, model_kwargs), x, name)
    c_skip, c_out, c_in = schedules.consistency_coefficients(sigma, sigma_data, sigma_min)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_skip, c_out, c_in = (c.to(x.device, acc) for c in (c_skip, c_out, c_in))
    c_noise = c_noise_fn(sigma) if c_noise_fn is not None else (sigma.double().log() / 4).to(sigma.dtype)
    out = check_output(call_model(model, (column(c_in, x) * x).to(model_dtype), c_noise, model_kwargs), x, name)
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
    if discretisation == "karras":
        check_int_at_least("num_scales", num_scales, 2)
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
    init_mag: Optional[float] = None,
    at_diff_grad_scale: bool = False,
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
    weights=None,
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
    ``eps_mode="rms"`` -> R = eps * sqrt(D); math.inf: no projection) | "fgsm_rs" (uniform start, one step
    1.25 * R); ``random_start``, ``init_mag``, ``at_diff_grad_scale`` as in diffusion_adv_loss; the attack
    runs through the shared loop of attack.py (x_{n+1} formed once, pgd_step writes the next input).
    ``delta``: a given perturbation used as is (its gradient flows if it requires grad; Free-AT).
    AT_Diff aliases adv_steps, adv_lr, adv_max_norm, adv_norm_type, adv_init_mag as in diffusion_adv_loss.
    ``noise``: z as a tensor or a fastat.SeededNoise. ``weights``: per-sample loss weights [B] (times the
    iCT weighting). Randomness: indices, noise, then the random start are drawn with ``generator`` before any
    pass; the passes share one RNG state and leave the global generator where one pass left it.
    Returns the reduced loss, or with ``return_dict`` a dict: loss, loss_per_sample, delta_norm, grad_norm,
    delta, indices, noise, sigmas.
    """
    check_callable("model", model)
    check_callable("target_model", target_model, optional=True)
    check_callable("teacher", teacher, optional=True)
    check_callable("c_noise_fn", c_noise_fn, optional=True)
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
        {"steps": steps, "alpha": alpha, "eps": eps, "norm": norm, "init_mag": init_mag}, aliases, {"eps": 0.1, "norm": "l2"}
    )
    attack.check_random_start(random_start)
    check_generator(generator)
    model_kwargs = check_model_kwargs(model_kwargs)
    teacher_kwargs = check_model_kwargs(teacher_kwargs, "teacher_kwargs", "the teacher")
    check_scaler(scaler)
    check_bools(return_dict=return_dict, precondition=precondition, same_dropout=same_dropout,
                at_diff_grad_scale=at_diff_grad_scale)
    check_float("sigma_data", sigma_data, positive=True)
    check_float("sigma_min", sigma_min)
    check_float("huber_c", huber_c, optional=True)
    if sigmas is None:
        sigmas = consistency_grid(discretisation, num_scales, training_step, total_steps, sigma_min, sigma_max, rho)
    else:
        sigmas = schedules.check_sigma_grid("sigmas", sigmas)
    if weighting is None:
        weighting = "ict" if discretisation == "ict" else "uniform"
    check_choice("weighting", weighting, WEIGHTINGS)
    batch, device = x0.shape[0], x0.device
    weights = per_sample("weights", weights, batch, device, nonnegative=True)
    plan = None
    if delta is not None:
        check_like("delta", delta, "x0", x0)
    elif method != "none":
        plan = attack.AttackPlan.resolve(
            method, x0, eps=opts["eps"], eps_mode=eps_mode, norm=opts["norm"], alpha=opts["alpha"], steps=opts["steps"],
            random_start=random_start, init_mag=opts["init_mag"], at_diff_grad_scale=at_diff_grad_scale)

    # The call's own draws, in this order and before any model pass: indices, noise, the random start.
    acc = perturbation_dtype(x0)
    if indices is None:
        if discretisation == "ict":
            indices = schedules.sample_ict_indices(sigmas, batch, generator=_cpu_gen(generator))
        else:
            indices = torch.randint(0, sigmas.numel() - 1, (batch,), generator=_cpu_gen(generator))
    indices = _check_indices(indices, batch, sigmas.numel())
    if noise is None:
        noise = standard_normal(x0, x0.dtype, generator)
    elif not isinstance(noise, SeededNoise):
        check_tensor("noise", noise)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if plan is not None:
        delta = plan.start(x0, generator, acc)
    s_n = sigmas[indices].to(device, acc)
    s_n1 = sigmas[indices + 1].to(device, acc)
    lam = schedules.ict_loss_weights(sigmas)[indices].to(device, acc) if weighting == "ict" else None

    x0a = x0.to(acc)
    x_n1 = noisy_input(x0a, noise, 1.0, s_n1)
    rng = SameRandomness(device, same_dropout)
    denoise = functools.partial(cm_denoise, model_kwargs=model_kwargs, sigma_data=sigma_data, sigma_min=sigma_min,
                                precondition=precondition, c_noise_fn=c_noise_fn, model_dtype=x0.dtype)

    with torch.no_grad():
        x_n = noisy_input(x0a, noise, 1.0, s_n) if mode == "ct" else _ode_step(teacher, x_n1, s_n1, s_n, solver, teacher_kwargs)
        rng.replay()
        target = denoise(target_model if target_model is not None else model, x_n, s_n,
                         name="model" if target_model is None else "target_model").detach()

    attack_model = inner_model(model)
    attack_ctx = (lambda: no_sync(model)) if attack_model is model else contextlib.nullcontext

    def student(m, x):
        rng.replay()
        return denoise(m, x, s_n1)

    def attack_loss(x_in, _delta):
        with attack_ctx():
            pred = student(attack_model, x_in)
        return consistency_distance(pred, target, metric, huber_c, reduction="sum")

    grad = None
    x_in = x_n1 if delta is None else x_n1 + delta
    if plan is not None:
        x_in = attack.first_input(x_n1, delta, plan.init == "zero", acc)
        delta, x_in, grad = attack.ascend(attack_loss, x_n1, delta, steps=plan.steps, step_size=plan.step_size,
                                          radius=plan.radius, norm=plan.norm, x_in=x_in, scaler=scaler,
                                          grad_divisor=plan.grad_divisor, model_dtype=acc,
                                          norm_layers=running_stat_modules(model))
    per = consistency_distance(student(model, x_in), target, metric, huber_c, weight=lam, reduction="none")
    if weights is not None:
        per = per * weights.to(per.dtype)
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


def _check_indices(indices, batch: int, num_sigmas: int) -> torch.Tensor:
    """[B] integers in [0, N-2] (index n pairs sigma_n with sigma_{n+1}), moved to the CPU grid."""
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor of shape [B], got {getattr(indices, 'dtype', type(indices).__name__)}")
    indices = indices.to(device="cpu", dtype=torch.long).reshape(-1)
    if indices.numel() != batch or (batch and (int(indices.min()) < 0 or int(indices.max()) > num_sigmas - 2)):
        raise ValueError(f"indices must be {batch} integers in [0, {num_sigmas - 2}], got {indices.tolist()[:8]}")
    return indices


def _cpu_gen(generator):
    """Index draws happen on the CPU grid; a CUDA generator cannot drive them."""
    return generator if generator is not None and generator.device.type == "cpu" else None


def _ode_step(teacher, x, s_from, s_to, solver, teacher_kwargs):
    """One probability-flow ODE step of an EDM denoiser from s_from to s_to (Euler or Heun)."""
    kwargs = teacher_kwargs or {}
    d1 = (x - check_output(unwrap_output(teacher(x, s_from, **kwargs), "teacher"), x, "teacher")) / column(s_from, x)
    h = column(s_to - s_from, x)
    x_euler = x + h * d1
    if solver == "euler":
        return x_euler
    d2 = (x_euler - check_output(unwrap_output(teacher(x_euler, s_to, **kwargs), "teacher"), x, "teacher")) / column(s_to, x)
    return x + h * (d1 + d2) / 2
