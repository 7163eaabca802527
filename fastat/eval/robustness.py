"""Robustness of a trained eps-denoiser: error at perturbed intermediate states, and an attack on the sampler.

Denoiser error at x = x_t + delta (x_t = a_t x0 + s_t eps, timestep t):

    err_i = mean_flat((model(x, t) - target(x, t))^2)
    target = reference(x, t)         when an exact (or trusted) denoiser is given, e.g. a mixture's eps*
           = eps + delta / s_t       otherwise: the noise that x implies for the same x0 (P1's target)

perturbation = "none" (delta = 0), "random" (uniform direction on the sphere ||delta||_2 = R, or a random
vertex of the box for Linf) or "pgd" (uniform start in the ball, `steps` ascent steps on sum_i err_i
through the training loops' attack loop, fastat.training.attack; step size 2.5 R / steps by default:
Madry et al.'s rule). radius_mode "rms": R = r sqrt(D) for L2 (AT_Diff's convention); "abs": R = r.

Sampler attack: run deterministic DDIM for `num_steps` steps; before each step index in `attack_at`,
perturb x_i by delta (||delta|| <= R) chosen to maximise ||x_final(x_i + delta) - x_final_clean||^2 by
back-propagating through the rest of the trajectory (mode "pgd"), or at random (mode "random"). The
error is the per-sample RMS of x_final_attacked - x_final_clean.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Dict, Iterable, Optional

import torch

from .._checks import check_callable, check_choice, check_generator, check_tensor
from .._shapes import column, mean_flat, per_sample_numel
from ..ops.noisy_input import q_sample
from ..schedules import alpha_sigma, alphas_cumprod_of
from ..training import attack
from ..training._common import call_model, check_output
from ..training._options import check_model_kwargs
from .sampling import ddim_sample, ddim_timesteps

PERTURBATIONS = ("none", "random", "pgd")


def _abs_radius(radius: float, like: torch.Tensor, norm: str, radius_mode: str) -> float:
    check_choice("radius_mode", radius_mode, ("rms", "abs"))
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not radius >= 0:
        raise ValueError(f"radius must be a float >= 0, got {radius!r}")
    return radius * math.sqrt(per_sample_numel(like)) if (radius_mode == "rms" and norm == "l2") else float(radius)


def _gen_device(generator: Optional[torch.Generator]):
    return generator.device if generator is not None else "cpu"


def random_on_sphere(like: torch.Tensor, radius: float, norm: str = "l2",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """delta with ||delta||_2 = radius exactly and a uniform direction (L2), or uniform signs * radius (Linf)."""
    check_choice("norm", norm, ("l2", "linf"))
    g = torch.randn(like.shape, dtype=torch.float32, generator=generator, device=_gen_device(generator)).to(like.device)
    if norm == "linf":
        return (torch.sign(g) * radius).to(like.dtype)
    n = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    return (g * column(radius / n, g)).to(like.dtype)


def _pgd(loss_fn, x: torch.Tensor, radius: float, norm: str, steps: int, step_size, generator):
    """The training loops' attack loop (fastat.training.attack) from a uniform start in the ball/box;
    step size 2.5 R / steps by default (Madry et al.). Returns (x + delta, delta)."""
    alpha = 2.5 * radius / steps if step_size is None else float(step_size)
    delta = attack.draw_start(x, radius, norm, "uniform", generator, x.dtype)
    delta, x_adv, _ = attack.ascend(loss_fn, x, delta, steps=steps, step_size=alpha, radius=radius, norm=norm)
    return x_adv, delta


def denoiser_error(
    model,
    x0: torch.Tensor,
    alphas_cumprod,
    timesteps: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    reference: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    perturbation: str = "none",
    radius: float = 0.1,
    radius_mode: str = "rms",
    norm: str = "l2",
    steps: int = 5,
    step_size: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs=None,
) -> torch.Tensor:
    """Per-sample error [B] (fp32) of model at x_t + delta against `reference` (see module docstring).

    timesteps default: uniform in [0, T); noise default N(0, I); both drawn with `generator`."""
    check_callable("model", model)
    check_callable("reference", reference, optional=True)
    check_tensor("x0", x0)
    check_choice("perturbation", perturbation, PERTURBATIONS)
    check_choice("norm", norm, ("l2", "linf"))
    check_generator(generator)
    model_kwargs = check_model_kwargs(model_kwargs)
    abar = alphas_cumprod_of(alphas_cumprod)
    if timesteps is None:
        timesteps = torch.randint(0, abar.numel(), (x0.shape[0],), generator=generator, device=_gen_device(generator)).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32, device=_gen_device(generator)).to(
            device=x0.device, dtype=x0.dtype)
    _, sigma = alpha_sigma(abar, timesteps)
    sigma = sigma.to(x0.device)
    x_t = q_sample(x0, noise, timesteps, abar).detach()
    big_r = _abs_radius(radius, x0, norm, radius_mode)

    def error(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        pred = check_output(call_model(model, x, timesteps, model_kwargs), x).float()
        if reference is not None:
            # Not detached: the attack ascends the true error, whose target moves with x too.
            target = check_output(reference(x, timesteps), x, "reference").float()
        else:
            target = noise.float() + delta.float() / column(sigma, delta)
        return mean_flat((pred - target) ** 2)

    x, delta = x_t, torch.zeros_like(x_t)
    if perturbation == "random":
        delta = random_on_sphere(x_t, big_r, norm, generator)
        x = x_t + delta
    elif perturbation == "pgd" and big_r > 0:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 for perturbation='pgd', got {steps!r}")
        x, delta = _pgd(lambda xi, d: error(xi, d).sum(), x_t, big_r, norm, steps, step_size, generator)
    with torch.no_grad():
        return error(x, delta)


def sampler_attack(
    model,
    x_T: torch.Tensor,
    alphas_cumprod,
    num_steps: int,
    *,
    attack_at: Iterable[int] = (0,),
    radius: float = 0.1,
    radius_mode: str = "rms",
    norm: str = "l2",
    mode: str = "pgd",
    steps: int = 5,
    step_size: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs=None,
) -> Dict[str, torch.Tensor]:
    """Attack a DDIM trajectory at the step indices `attack_at` (see module docstring).

    Returns {"error": per-sample RMS of final_attacked - final_clean [B], "clean": final_clean,
    "attacked": final_attacked}."""
    check_callable("model", model)
    check_tensor("x_T", x_T)
    check_choice("mode", mode, ("pgd", "random"))
    check_choice("norm", norm, ("l2", "linf"))
    check_generator(generator)
    num = len(ddim_timesteps(alphas_cumprod_of(alphas_cumprod).numel(), num_steps))
    try:
        attack_at = sorted({operator.index(i) for i in attack_at})
    except TypeError:
        raise TypeError(f"attack_at must be a sequence of int step indices, got {attack_at!r}") from None
    if any(not 0 <= i < num for i in attack_at):
        raise ValueError(f"attack_at must hold step indices in [0, {num}), got {attack_at}")
    big_r = _abs_radius(radius, x_T, norm, radius_mode)
    clean = ddim_sample(model, x_T, alphas_cumprod, num_steps, model_kwargs=model_kwargs)

    def rollout(x, i):
        return ddim_sample(model, x, alphas_cumprod, num_steps, start=i, model_kwargs=model_kwargs, grad=True)

    def perturb(i, x, _t):
        if i not in attack_at:
            return x
        x = x.detach()
        if mode == "random" or big_r == 0:
            return x + random_on_sphere(x, big_r, norm, generator)
        return _pgd(lambda xi, _d: ((rollout(xi, i) - clean) ** 2).sum(), x, big_r, norm, steps, step_size, generator)[0]

    attacked = ddim_sample(model, x_T, alphas_cumprod, num_steps, perturb=perturb, model_kwargs=model_kwargs)
    error = mean_flat((attacked.float() - clean.float()) ** 2).sqrt()
    return {"error": error, "clean": clean, "attacked": attacked}
