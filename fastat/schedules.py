"""Noise schedules, computed in float64 and handed to kernels as fp32 per-sample coefficients.

DDPM tables (`alphas_cumprod`, abar_t) interoperate with diffusers: any function taking a table also
takes a scheduler with an `alphas_cumprod` attribute (e.g. `DDPMScheduler`). Downcasting abar_t before
the square roots loses small timesteps, so every coefficient is formed in float64 first.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional, Tuple, Union

import torch

from ._checks import check_finite, check_float, check_generator, check_int_at_least, values_checkable

Table = Union[torch.Tensor, object]


def ddpm_linear_alphas_cumprod(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s), beta linear from beta_start to beta_end (Ho et al.), float64 [T]."""
    _check_num_timesteps(num_timesteps)
    check_finite("beta_start", beta_start)
    check_finite("beta_end", beta_end)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddpm_cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal): abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2),
    with betas clipped at `max_beta`, float64 [T]."""
    _check_num_timesteps(num_timesteps)
    check_float("s", s)
    if not 0 < check_float("max_beta", max_beta) <= 1:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta!r}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_of(table: Table) -> torch.Tensor:
    """The abar table as float64: a 1-D tensor, or any object with an `alphas_cumprod` attribute."""
    if not isinstance(table, torch.Tensor):
        if not hasattr(table, "alphas_cumprod"):
            raise TypeError(
                "alphas_cumprod must be a 1-D tensor or a scheduler with an `alphas_cumprod` attribute, "
                f"got {type(table).__name__}"
            )
        table = torch.as_tensor(table.alphas_cumprod)
    if table.ndim != 1 or not table.is_floating_point():
        raise ValueError(f"alphas_cumprod must be a 1-D floating tensor, got shape {tuple(table.shape)} {table.dtype}")
    _check_table_values(table)
    return table.to(torch.float64)


_CHECKED_TABLES: Dict[int, Tuple[weakref.ref, int]] = {}


def _already_checked(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s values were checked at its current version (a table passed every step is read once)."""
    entry = _CHECKED_TABLES.get(id(tensor))
    return entry is not None and entry[0]() is tensor and entry[1] == tensor._version


def _mark_checked(tensor: torch.Tensor) -> torch.Tensor:
    if len(_CHECKED_TABLES) > 64:
        _CHECKED_TABLES.clear()
    _CHECKED_TABLES[id(tensor)] = (weakref.ref(tensor), tensor._version)
    return tensor


def _check_table_values(table: torch.Tensor) -> None:
    """abar_t in [0, 1], finite, at least one value; read once per table tensor and version (the training loops pass
    the same table every step)."""
    if _already_checked(table):
        return
    if not table.numel():
        raise ValueError("alphas_cumprod must hold at least one timestep, got an empty table")
    if table.device.type == "meta":
        raise ValueError("alphas_cumprod is on the meta device (no values); pass the table itself")
    if not values_checkable(table):
        return
    low, high = (float(v) for v in torch.aminmax(table.detach()))
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low and high <= 1.0):
        raise ValueError(f"alphas_cumprod must hold finite values in [0, 1] (abar_t = prod(1 - beta_s)), "
                         f"got values in [{low:g}, {high:g}]")
    _mark_checked(table)


def alpha_sigma(table: Table, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)), formed in float64, returned in `dtype`
    (fp32 by default; the training losses ask for float64 with float64 data) on the device of `timesteps`."""
    abar = alphas_cumprod_of(table)
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor, got {getattr(timesteps, 'dtype', type(timesteps))}")
    if values_checkable(timesteps) and timesteps.numel():
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= abar.numel():
            raise ValueError(f"timesteps must lie in [0, {abar.numel() - 1}], got values in [{lo}, {hi}]")
    abar_t = abar.to(timesteps.device)[timesteps.reshape(-1).long()]
    return abar_t.sqrt().to(dtype), (1.0 - abar_t).sqrt().to(dtype)


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, descending: bool = False
) -> torch.Tensor:
    """EDM/Karras discretisation, float64 [N]:
    sigma_i = (sigma_min^(1/rho) + i/(N-1) * (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
    ascending (consistency-model convention) unless `descending` (EDM sampler convention)."""
    check_int_at_least("num_steps", num_steps, 2)
    check_finite("sigma_min", sigma_min)
    check_finite("sigma_max", sigma_max)
    check_float("rho", rho, positive=True)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    return sigmas.flip(0) if descending else _mark_checked(sigmas)  # ascending, > 0 by construction


def edm_preconditioning(sigma, sigma_data: float = 0.5):
    """EDM (Karras et al. 2022) preconditioning: returns (c_skip, c_out, c_in, c_noise),
    c_skip = sd^2/(s^2+sd^2), c_out = s*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
    sigma = _positive_sigmas("sigma", sigma)
    check_float("sigma_data", sigma_data, positive=True)
    denom = sigma**2 + sigma_data**2
    return sigma_data**2 / denom, sigma * sigma_data / denom.sqrt(), 1 / denom.sqrt(), sigma.log() / 4


def consistency_preconditioning(sigma, sigma_data: float = 0.5, sigma_min: float = 0.002):
    """Consistency-model boundary condition f(x, sigma_min) = x: returns (c_skip, c_out, c_in),
    c_skip = sd^2/((s-smin)^2+sd^2), c_out = (s-smin)*sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2)."""
    sigma = _positive_sigmas("sigma", sigma)
    check_float("sigma_data", sigma_data, positive=True)
    check_float("sigma_min", sigma_min)
    return consistency_coefficients(sigma, sigma_data, sigma_min)


def consistency_coefficients(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """consistency_preconditioning without the argument checks (the training loop's per-pass call, checked once)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def ict_num_steps(training_step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT discretisation curriculum (Song & Dhariwal 2023): N(k) = min(s0 * 2^floor(k/K'), s1) + 1,
    K' = floor(K / (log2(floor(s1/s0)) + 1))."""
    check_int_at_least("training_step", training_step, 0)
    check_int_at_least("total_steps", total_steps, 1)
    check_int_at_least("s0", s0, 1)
    check_int_at_least("s1", s1, 1)
    if not 1 <= s0 <= s1:
        raise ValueError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    k_prime = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (training_step // k_prime), s1) + 1


def ict_timestep_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT lognormal proposal over the N-1 adjacent pairs (sigma_i, sigma_{i+1}) of an ascending grid:
    p(i) proportional to erf((ln sigma_{i+1} - P_mean)/(sqrt2 P_std)) - erf((ln sigma_i - P_mean)/(sqrt2 P_std))."""
    check_finite("p_mean", p_mean)
    check_float("p_std", p_std, positive=True)
    log_s = check_sigma_grid("sigmas", sigmas).log()
    cdf = torch.erf((log_s - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def ict_loss_weights(sigmas: torch.Tensor) -> torch.Tensor:
    """iCT weighting lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) for each adjacent pair, float64 [N-1]."""
    sigmas = check_sigma_grid("sigmas", sigmas)
    return 1.0 / (sigmas[1:] - sigmas[:-1])


def sample_ict_indices(
    sigmas: torch.Tensor, batch: int, generator: Optional[torch.Generator] = None, p_mean: float = -1.1, p_std: float = 2.0
) -> torch.Tensor:
    """Draw `batch` pair indices i in [0, N-2] from the iCT lognormal proposal."""
    check_int_at_least("batch", batch, 0)
    check_generator(generator)
    probs = ict_timestep_probs(sigmas, p_mean, p_std)
    if batch == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(probs, batch, replacement=True, generator=generator)


def _positive_sigmas(name: str, sigma) -> torch.Tensor:
    """A noise level (a number or a tensor) as a float64 tensor, > 0 where its values can be read."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)) or (
            isinstance(sigma, torch.Tensor) and not sigma.is_floating_point()):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got "
                        f"{sigma.dtype if isinstance(sigma, torch.Tensor) else type(sigma).__name__}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if values_checkable(sigma) and sigma.numel():
        low = float(sigma.min())
        if not (low > 0 and math.isfinite(float(sigma.max()))):
            raise ValueError(f"{name} must be finite and > 0, got min {low:g}")
    return sigma


def check_sigma_grid(name: str, sigmas) -> torch.Tensor:
    """An ascending (non-decreasing) grid of >= 2 finite noise levels > 0, as float64 (a consistency model's discretisation)."""
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D tensor of noise levels, got {type(sigmas).__name__}") from None
    if not sigmas.is_floating_point() or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D ascending floating grid of >= 2 values, got shape {tuple(sigmas.shape)} "
                         f"{sigmas.dtype}")
    sigmas = sigmas.to(torch.float64)
    if _already_checked(sigmas) or not values_checkable(sigmas):
        return sigmas
    values = sigmas.tolist()
    if not (all(map(math.isfinite, values)) and values[0] > 0 and all(a <= b for a, b in zip(values, values[1:]))):
        raise ValueError(f"{name} must be finite, > 0 and ascending, got {values[:8]}")
    return _mark_checked(sigmas)


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
