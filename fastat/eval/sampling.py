"""Deterministic DDIM sampling (eta = 0) for eps-prediction models, with optional perturbation hooks.

With abar from the training table and descending timesteps t_0 > t_1 > ... > t_{n-1}:

    eps_i   = model(x_i, t_i)
    x0_i    = (x_i - sqrt(1 - abar_{t_i}) eps_i) / sqrt(abar_{t_i})
    x_{i+1} = sqrt(abar_{t_{i+1}}) x0_i + sqrt(1 - abar_{t_{i+1}}) eps_i        (abar after the last step = 1)

so the returned sample is x0 predicted at the last step. Coefficients are formed in float64 and applied
in the data's dtype.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..schedules import alphas_cumprod_of
from .._checks import check_callable, check_tensor
from ..training._common import call_model, check_output


def ddim_timesteps(num_timesteps: int, num_steps: int) -> List[int]:
    """num_steps integer timesteps evenly spaced from T-1 down to 0 (descending, distinct)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")
    if num_steps == 1:
        return [num_timesteps - 1]
    grid = torch.linspace(num_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
    return grid


def ddim_step(model, x: torch.Tensor, t: int, t_next: Optional[int], abar: torch.Tensor, model_kwargs=None) -> torch.Tensor:
    """One DDIM (eta = 0) update from timestep t to t_next (None: return the x0 prediction)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = check_output(call_model(model, x, tt, model_kwargs), x)
    a_t = float(abar[t])
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
    if t_next is None:
        return x0
    a_n = float(abar[t_next])
    return a_n ** 0.5 * x0 + (1.0 - a_n) ** 0.5 * eps


def ddim_sample(
    model,
    x_T: torch.Tensor,
    alphas_cumprod,
    num_steps: int,
    *,
    perturb: Optional[Callable[[int, torch.Tensor, int], torch.Tensor]] = None,
    start: int = 0,
    model_kwargs=None,
    grad: bool = False,
) -> torch.Tensor:
    """DDIM from x_T (the state at step `start` of the `num_steps` grid) to a sample.

    perturb(i, x_i, t_i) -> x_i' is applied before step i (for attacks and robustness studies).
    Runs under no_grad unless grad=True (the sampler attack differentiates through the trajectory)."""
    check_callable("model", model)
    check_tensor("x_T", x_T)
    check_callable("perturb", perturb, optional=True)
    abar = alphas_cumprod_of(alphas_cumprod)
    ts = ddim_timesteps(abar.numel(), num_steps)
    x = x_T
    with torch.set_grad_enabled(grad):
        for i in range(start, len(ts)):
            if perturb is not None:
                x = perturb(i, x, ts[i])
            x = ddim_step(model, x, ts[i], ts[i + 1] if i + 1 < len(ts) else None, abar, model_kwargs)
    return x
