"""`diffusion_adv_loss`: a drop-in replacement for the loss call of a DDPM-style training loop that
adds P1 (DRO-equivalent AT), P2 (equivariant AT) or a classic AT method (SPEC §1-3).

Passes per optimizer step for each method: the cost table in ``fastat.training`` (package docstring).

Attack passes take ``torch.autograd.grad(loss, delta)`` only: no weight gradient is formed, nothing is
accumulated in ``.grad`` (so no ``zero_grad`` race), and under DDP they run on ``model.module`` (the
final pass goes through the wrapper, so gradient reduction happens once).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Optional

import torch

from .._checks import check_choice, check_tensor, per_sample
from .._shapes import REDUCTIONS, column, reduce
from ..ops.losses import TARGETS, equivariance_regularizer
from ..ops.noisy_input import noisy_input
from ..ops.perturbation import NORMS, per_sample_norm, pgd_step, random_perturbation, rms_radius
from ..schedules import alpha_sigma, alphas_cumprod_of
from ._common import (
    PREDICTION_TYPES,
    SameRandomness,
    call_model,
    draw_timesteps_noise,
    inner_model,
    input_grad,
    no_sync,
    p1_loss,
    p1_target,
    perturbation_dtype,
    resolve_aliases,
    to_epsilon,
)

METHODS = ("pgd", "fgsm_rs", "input_perturbation", "equivariant_random", "equivariant_adversarial", "standard")
P2_METHODS = ("equivariant_random", "equivariant_adversarial")
EPS_MODES = ("rms", "abs")
INITS = {True: "uniform", False: "zero", "uniform": "uniform", "normal": "normal", "zero": "zero"}

# P2 defaults (SPEC §2): lambda = 0.3, r(t) = max(r_min, eps * sigma_t^rho), rho = 2, r_min = 8/255,
# lambda_t = lambda * sqrt(3) / (beta * r(t)), FGSM step 1.25 * r(t).
P2_LAMBDA = 0.3
P2_BETA = 1.0
P2_RHO = 2.0
P2_R_MIN = 8.0 / 255.0
P2_STEP_FACTOR = 1.25


def p2_radius(sigma: torch.Tensor, eps: float, rho: float = P2_RHO, r_min: float = P2_R_MIN) -> torch.Tensor:
    """P2's time-dependent box radius, shaped like sigma_t: r(t) = max(r_min, eps * sigma_t^rho) [B]."""
    return (eps * sigma.double() ** rho).clamp_min(r_min).to(sigma.dtype)


def p2_weight(radius: torch.Tensor, lam: float = P2_LAMBDA, beta: float = P2_BETA) -> torch.Tensor:
    """lambda_t = lambda * sqrt(3) / (beta * r(t)); sqrt(3)/r is 1/std of Uniform[-r, r]."""
    return lam * math.sqrt(3.0) / (beta * radius)


class _Batch:
    """Everything fixed for one batch: data, noise, timesteps, coefficients and the prediction target."""

    def __init__(self, model, x0, timesteps, noise, table, prediction_type, model_kwargs, generator, same_dropout):
        self.model = model
        self.attack_model = inner_model(model)
        # FSDP(1)-style wrappers cannot be bypassed: run their attack passes under no_sync.
        self.attack_ctx = (lambda: no_sync(model)) if self.attack_model is model else contextlib.nullcontext
        self.x0 = x0
        self.timesteps, self.noise = draw_timesteps_noise(x0, timesteps, noise, alphas_cumprod_of(table).numel(), generator)
        if self.noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(self.noise.shape)}")
        alpha, sigma = alpha_sigma(table, self.timesteps)
        acc = perturbation_dtype(x0)
        self.alpha, self.sigma = alpha.to(x0.device, acc), sigma.to(x0.device, acc)
        self.prediction_type = prediction_type
        self.base, self.scale = p1_target(prediction_type, x0, self.noise, self.alpha, self.sigma)
        self.kwargs = model_kwargs or {}
        self.pdtype = acc
        self.generator = generator
        self.rng = SameRandomness(x0.device, same_dropout)

    def x_t(self, delta=None):
        return noisy_input(self.x0, self.noise, self.alpha, self.sigma, delta)

    def forward(self, x, attack: bool = False):
        self.rng.replay()
        if attack:
            with self.attack_ctx():
                return call_model(self.attack_model, x, self.timesteps, self.kwargs)
        return call_model(self.model, x, self.timesteps, self.kwargs)

    def forward_pair(self, xa, xb, attack: bool = False):
        """One forward of the 2B batch [xa; xb] (model_kwargs tensors with a batch dim are repeated)."""
        batch = xa.shape[0]
        kwargs = {
            k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
            for k, v in self.kwargs.items()
        }
        t2 = torch.cat([self.timesteps, self.timesteps])
        x = torch.cat([xa, xb])
        if xa.ndim == 4 and xa.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        model = self.attack_model if attack else self.model
        self.rng.replay()
        with self.attack_ctx() if attack else contextlib.nullcontext():
            out = call_model(model, x, t2, kwargs)
        return out[:batch], out[batch:]


def diffusion_adv_loss(
    model: Callable,
    x0: torch.Tensor,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    alphas_cumprod=None,
    scheduler=None,
    prediction_type: Optional[str] = None,
    method: str = "pgd",
    eps: Optional[float] = None,
    eps_mode: str = "rms",
    alpha: Optional[float] = None,
    steps: Optional[int] = None,
    norm: Optional[str] = None,
    random_start=None,
    target: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    return_dict: bool = False,
    weight=None,
    scaler=None,
    same_dropout: bool = True,
    batch_branches: bool = False,
    lam: float = P2_LAMBDA,
    beta: float = P2_BETA,
    rho: float = P2_RHO,
    r_min: float = P2_R_MIN,
    radius_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    detach_anchor: bool = False,
    regularizer: str = "equivariant",
    **aliases,
):
    """Adversarial (or plain) DDPM training loss for one batch; call ``.backward()`` on the result.

    x_t = a_t * x0 + s_t * eps, (a_t, s_t) from ``alphas_cumprod`` (a table) or ``scheduler`` (anything
    with ``alphas_cumprod``, e.g. diffusers' DDPMScheduler, whose ``config.prediction_type`` is used when
    ``prediction_type`` is None). ``timesteps`` default: uniform in [0, T); ``noise`` default: N(0, I)
    (both drawn with ``generator``). The model is called as ``model(x_t, timesteps, **model_kwargs)``.

    Methods (P1 loss: loss_i = mean_flat((pred(x_t + delta) - target(delta))^2), see _common for the
    target of each prediction type):
      "standard":   the plain loss (no perturbation).
      "pgd":        delta from ``steps`` input-gradient ascent steps on the P1 loss (default 3), L2
                    normalised step ``alpha`` (default 0.1, P1) or sign step for Linf (default
                    2.5 * eps / steps), radius ``eps`` (default 0.1); ``eps_mode="rms"`` means
                    R = eps * sqrt(D) for L2 (AT_Diff's ``adv_max_norm``). ``random_start``: False/"zero"
                    (default, P1), True/"uniform", "normal". ``target``: "delta_detach" (default),
                    "delta", "original".
      "fgsm_rs":    one step from a uniform random start, step ``alpha`` = 1.25 * R by default.
      "input_perturbation": DDPM-IP, delta = s_t * eps * xi with xi ~ N(0, I) (``eps`` = gamma, default 0.1),
                    target "original".
      "equivariant_random" / "equivariant_adversarial" (P2): omega in the box [-r(t), r(t)]^D,
          L_i = mean_flat((pred(x_t) - target)^2)
              + lambda_t * mean_flat((e(x_t + s_t*omega) - (e(x_t) + omega))^2)
          with e(.) the noise implied by the prediction (to_epsilon), r(t) = max(r_min, eps * s_t^rho)
          (``eps`` default 0.1, ``rho`` 2, ``r_min`` 8/255; or ``radius_fn(sigma) -> r``),
          lambda_t = lam * sqrt(3) / (beta * r(t)) (lam 0.3, beta 1.0). "random": omega uniform in the box.
          "adversarial": uniform start, one sign step of size ``alpha`` * r(t) (alpha = 1.25 by default)
          ascending J = ||e(x_t + s_t*omega) - stop_grad(e(x_t))||^2, clamped to the box.
          ``detach_anchor`` stops the gradient through e(x_t) in the regulariser (default False);
          ``regularizer="invariant"`` is the failing ablation (study only). ``batch_branches=True`` runs
          the clean and perturbed branches as one forward of 2B (dropout masks then differ per row).

    AT_Diff/FreeLB aliases: adv_steps, adv_lr, adv_max_norm, adv_norm_type, adv_target_type (a name
    given twice with different values raises). ``scaler``: a GradScaler whose scale is applied to the
    attack loss and removed from the perturbation gradient (non-finite samples keep their delta).
    ``same_dropout``: each pass of this call replays one RNG state (same dropout mask); set False under
    CUDA-graph capture. ``weight``: per-sample weight of the main term ([B] or float).

    Returns the loss reduced by ``reduction`` ("mean" | "sum" | "none" -> [B]); with ``return_dict``
    a dict: loss, loss_per_sample, mse (main term [B]), reg ([B], P2 else zeros), delta_norm (L2 norm of
    the perturbation of x_t [B]), grad_norm (L2 norm of the last attack gradient [B], zeros if none),
    delta (detached), timesteps, noise.
    """
    check_tensor("x0", x0)
    check_choice("method", method, METHODS)
    check_choice("eps_mode", eps_mode, EPS_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("regularizer", regularizer, ("equivariant", "invariant"))
    if (alphas_cumprod is None) == (scheduler is None):
        raise ValueError("pass exactly one of alphas_cumprod= (a 1-D abar table) or scheduler= (e.g. DDPMScheduler)")
    table = alphas_cumprod if alphas_cumprod is not None else scheduler
    if prediction_type is None:
        config = getattr(scheduler, "config", None)
        prediction_type = getattr(config, "prediction_type", None) or "epsilon"
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    opts = resolve_aliases(
        {"steps": steps, "alpha": alpha, "eps": eps, "norm": norm, "target": target},
        aliases,
        {"eps": 0.1, "norm": "l2", "target": "delta_detach"},
    )
    check_choice("norm", opts["norm"], NORMS)
    check_choice("target", opts["target"], TARGETS)
    if isinstance(opts["eps"], bool) or not isinstance(opts["eps"], (int, float)) or opts["eps"] < 0:
        raise ValueError(f"eps must be a float >= 0, got {opts['eps']!r}")
    _check_steps(method, opts["steps"])
    if random_start is not None and random_start not in INITS:
        raise ValueError(f"random_start must be a bool or one of 'uniform', 'normal', 'zero', got {random_start!r}")

    b = _Batch(model, x0, timesteps, noise, table, prediction_type, model_kwargs, generator, same_dropout)
    weight = per_sample("weight", weight, x0.shape[0], x0.device)
    if method in P2_METHODS:
        out = _p2(b, method, opts, lam, beta, rho, r_min, radius_fn, detach_anchor, regularizer, batch_branches, scaler)
    else:
        out = _p1(b, method, opts, eps_mode, random_start, scaler)
    mse = out["mse"] if weight is None else out["mse"] * column(weight, out["mse"])
    per = mse + out["reg"]
    loss = reduce(per, reduction)
    if not return_dict:
        return loss
    delta = out["delta"]
    zeros = torch.zeros(x0.shape[0], device=x0.device, dtype=b.pdtype)
    return {
        "loss": loss,
        "loss_per_sample": per,
        "mse": out["mse"],
        "reg": out["reg"],
        "delta_norm": per_sample_norm(delta) if delta is not None else zeros,
        "grad_norm": per_sample_norm(out["grad"]) if out.get("grad") is not None else zeros,
        "delta": delta.detach() if delta is not None else None,
        "timesteps": b.timesteps,
        "noise": b.noise,
    }


def _check_steps(method: str, steps) -> None:
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if method == "fgsm_rs" and steps != 1:
        raise ValueError(f"method='fgsm_rs' takes exactly one step, got steps={steps}")
    if method not in ("pgd", "fgsm_rs") and steps != 0:
        raise ValueError(f"steps={steps} has no meaning for method={method!r} (only 'pgd' takes steps)")


def _abs_radius(eps: float, like: torch.Tensor, norm: str, eps_mode: str) -> float:
    return rms_radius(eps, like) if (eps_mode == "rms" and norm == "l2") else eps


def _p1(b: _Batch, method: str, opts, eps_mode: str, random_start, scaler) -> Dict[str, Any]:
    """P1-family losses: standard, input_perturbation, pgd, fgsm_rs."""
    zeros = torch.zeros(b.x0.shape[0], device=b.x0.device, dtype=b.pdtype)
    if method == "standard":
        pred = b.forward(b.x_t())
        return {"mse": p1_loss(pred, b.base, None, None, "original"), "reg": zeros, "delta": None}
    if method == "input_perturbation":
        xi = torch.randn(b.x0.shape, device=b.x0.device, dtype=b.pdtype, generator=b.generator)
        delta = column(b.sigma, xi) * float(opts["eps"]) * xi
        pred = b.forward(b.x_t(delta))
        return {"mse": p1_loss(pred, b.base, None, None, "original"), "reg": zeros, "delta": delta}

    norm, eps, target = opts["norm"], float(opts["eps"]), opts["target"]
    radius = _abs_radius(eps, b.x0, norm, eps_mode)
    if method == "pgd":
        steps = 3 if opts["steps"] is None else opts["steps"]
        init = INITS[False if random_start is None else random_start]
        step_size = opts["alpha"] if opts["alpha"] is not None else (0.1 if norm == "l2" else 2.5 * radius / max(steps, 1))
    else:
        steps = 1
        init = INITS[True if random_start is None else random_start]
        if init == "zero":
            raise ValueError("method='fgsm_rs' needs a random start; use method='pgd' with steps=1 for plain FGSM")
        step_size = opts["alpha"] if opts["alpha"] is not None else 1.25 * radius
    delta = random_perturbation(b.x0, radius, norm, init, b.generator, dtype=b.pdtype)
    grad = None
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        pred = b.forward(b.x_t(delta), attack=True)
        attack_loss = p1_loss(pred, b.base, b.scale, delta, target, reduction="sum")
        grad = input_grad(attack_loss, delta, scaler)
        delta = pgd_step(delta.detach(), grad, step_size, radius, norm)
    delta = delta.detach()
    pred = b.forward(b.x_t(delta))
    mse = p1_loss(pred, b.base, b.scale, delta, target)
    return {"mse": mse, "reg": zeros, "delta": delta, "grad": grad}


def _p2(b: _Batch, method, opts, lam, beta, rho, r_min, radius_fn, detach_anchor, regularizer, batch_branches, scaler):
    """P2: clean term + lambda_t * equivariance regulariser, omega random or one FGSM step."""
    eps = float(opts["eps"])
    radius = radius_fn(b.sigma) if radius_fn is not None else p2_radius(b.sigma, eps, rho, r_min)
    radius = per_sample("radius_fn(sigma)", radius, b.x0.shape[0], b.x0.device, positive=True)
    radius = torch.as_tensor(radius, dtype=b.pdtype, device=b.x0.device).expand(b.x0.shape[0])
    lam_t = p2_weight(radius, lam, beta)
    omega = random_perturbation(b.x0, radius, "linf", "uniform", b.generator, dtype=b.pdtype)
    x_clean = b.x_t()
    pt = b.prediction_type
    grad = None
    pred_clean = None
    if method == "equivariant_adversarial":
        step = (P2_STEP_FACTOR if opts["alpha"] is None else float(opts["alpha"])) * radius
        omega = omega.requires_grad_(True)
        x_start = b.x_t(column(b.sigma, omega) * omega)
        if batch_branches:
            anchor, pred_start = b.forward_pair(x_clean, x_start, attack=True)
            anchor = to_epsilon(anchor, x_clean, b.alpha, b.sigma, pt).detach()
        else:
            pred_clean = b.forward(x_clean)
            anchor = to_epsilon(pred_clean, x_clean, b.alpha, b.sigma, pt).detach()
            pred_start = b.forward(x_start, attack=True)
        e_start = to_epsilon(pred_start, x_start, b.alpha, b.sigma, pt)
        # J = ||e(x_t + s omega) - stop_grad(e(x_t))||^2, as a regulariser with omega = 0 and no weight.
        j = equivariance_regularizer(e_start, anchor, None, mode="invariant", reduction="sum")
        grad = input_grad(j, omega, scaler)
        omega = pgd_step(omega.detach(), grad, step, radius, "linf")
    omega = omega.detach()
    x_pert = b.x_t(column(b.sigma, omega) * omega)
    if batch_branches:
        pred_clean, pred_pert = b.forward_pair(x_clean, x_pert)
    else:
        if pred_clean is None:
            pred_clean = b.forward(x_clean)
        pred_pert = b.forward(x_pert)
    mse = p1_loss(pred_clean, b.base, None, None, "original")
    e_clean = to_epsilon(pred_clean, x_clean, b.alpha, b.sigma, pt)
    e_pert = to_epsilon(pred_pert, x_pert, b.alpha, b.sigma, pt)
    reg = equivariance_regularizer(
        e_pert, e_clean, omega if regularizer == "equivariant" else None, lam_t, detach_anchor, regularizer, "none"
    )
    return {"mse": mse, "reg": reg, "delta": column(b.sigma, omega) * omega, "grad": grad, "omega": omega}
