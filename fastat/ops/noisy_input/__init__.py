"""Noise-injected model input (docs/maths.md §4.1): x_t = alpha_t * x0 + sigma_t * noise (+ delta)."""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from ... import _dispatch
from ..._checks import FLOAT_DTYPES, check_batch, check_same, check_tensor, check_values, coefficient
from ..._shapes import Coef, device_type
from ..._backend import CACHE
from ..._checks import values_checkable
from ...schedules import alphas_cumprod_of
from ..noise import Noise, SeededNoise, check_noise
from . import reference
from .op import NOISY_INPUT

_COEFFICIENT_GRAD = NOISY_INPUT.feature_bits["coefficient_grad"]
FLOATS = frozenset(FLOAT_DTYPES)
is_compiling = torch.compiler.is_compiling


def noisy_input(
    x0: torch.Tensor,
    noise: Noise,
    alpha: Coef,
    sigma: Coef,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x_t = alpha * x0 + sigma * noise (+ delta), differentiable in every tensor argument.

    x0, noise, delta: [B, ...] (any rank, any layout), fp32/fp16/bf16/fp64; accumulation in fp32.
    alpha, sigma: floats or per-sample tensors of shape [B]. The result has the promoted dtype of
    x0, noise and delta (a bf16 x0 with an fp32 delta gives fp32, so the perturbation is not rounded).
    noise may be a `fastat.SeededNoise(seed, offset)`: the fp32 noise gaussian_noise(x0, seed, offset),
    regenerated in-kernel instead of read (it is left out of the dtype promotion).
    """
    if not isinstance(x0, torch.Tensor) or x0.dtype not in FLOATS or x0.ndim < 1:
        check_tensor("x0", x0)
    noise, seed, offset, dtype = _noise_and_dtype(x0, noise, delta)
    device = x0.device
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    batch = x0.shape[0]
    alpha, alpha_s = coefficient("alpha", alpha, batch, device, acc)
    sigma, sigma_s = coefficient("sigma", sigma, batch, device, acc)
    return _run((x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, None))


def _noise_and_dtype(x0: torch.Tensor, noise: Noise, delta: Optional[torch.Tensor]):
    """(noise tensor or None, seed, offset, output dtype) after checking noise and delta against x0: the promoted
    dtype of x0, noise and delta (seeded noise takes no part in the promotion)."""
    shape, device, dtype = x0.shape, x0.device, x0.dtype
    if isinstance(noise, SeededNoise):
        check_noise("noise", noise, "x0", x0)
        seed, offset, noise = noise.seed, noise.offset, None
    else:
        if not isinstance(noise, torch.Tensor):
            check_noise("noise", noise, "x0", x0)
        check_same("noise", noise, "x0", shape, device)
        seed = offset = 0
        if noise.dtype is not dtype:
            dtype = torch.promote_types(dtype, noise.dtype)
    if delta is not None:
        check_same("delta", delta, "x0", shape, device)
        if delta.dtype is not dtype:
            dtype = torch.promote_types(dtype, delta.dtype)
    return noise, seed, offset, dtype


def _run(args: tuple) -> torch.Tensor:
    """fastat::noisy_input on the selected backend, through autograd when a gradient is needed (args: the op's
    arguments; with timesteps, alpha and sigma are per-timestep tables, see op.py)."""
    x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps = args
    grad_mode = torch.is_grad_enabled()
    coefficient_grad = grad_mode and (
        (alpha is not None and alpha.requires_grad) or (sigma is not None and sigma.requires_grad))
    if is_compiling():
        if coefficient_grad or _dispatch.traced_as_reference():
            return reference.noisy_input(*args)
        return NOISY_INPUT.overload(*args)
    batch = x0.shape[0]
    route = _dispatch.select(NOISY_INPUT, device_type(x0), dtype,
                             _COEFFICIENT_GRAD if coefficient_grad else 0, x0.numel() // batch if batch else 0)
    if not route.checks_values and timesteps is None:
        check_values("alpha", alpha)
        check_values("sigma", sigma)
    if grad_mode and (x0.requires_grad or (noise is not None and noise.requires_grad)
                      or (delta is not None and delta.requires_grad) or coefficient_grad):
        return _dispatch.run(NOISY_INPUT, route, args, True)
    return route.forward(*args)


def q_sample(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DDPM forward process at integer `timesteps` [B]: sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise (+ delta).

    `alphas_cumprod` is a table (fastat.schedules or a diffusers scheduler's, or the scheduler itself);
    the coefficients are computed in float64 and applied in fp32 (float64 for float64 data; see
    `schedules.alpha_sigma`); the kernel gathers them by timestep from a device-side table.
    """
    check_tensor("x0", x0)
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be an integer tensor of shape [B], got {type(timesteps).__name__}")
    steps = timesteps.reshape(-1)
    check_batch("timesteps", steps, "x0", x0)
    if timesteps.device != x0.device:
        raise ValueError(f"timesteps is on {timesteps.device} but x0 is on {x0.device}; put them on one device")
    if steps.dtype.is_floating_point or steps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor, got {steps.dtype}")
    noise, seed, offset, dtype = _noise_and_dtype(x0, noise, delta)
    table = _schedule_coefficients(alphas_cumprod, x0.device, torch.float64 if dtype is torch.float64 else torch.float32)
    if values_checkable(steps) and steps.numel():
        values = steps.tolist() if steps.numel() <= 256 else [int(steps.min()), int(steps.max())]
        lo, hi = min(values), max(values)
        if lo < 0 or hi >= table.shape[1]:
            raise ValueError(f"timesteps must lie in [0, {table.shape[1] - 1}], got values in [{lo}, {hi}]")
    if steps.dtype != torch.int64 or not steps.is_contiguous():
        steps = steps.long().contiguous()
    return _run((x0, noise, delta, table[0], table[1], 0.0, 0.0, seed, offset, dtype, steps))


def _schedule_coefficients(alphas_cumprod, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[2, T] in `dtype` (the accumulation dtype) on `device`: sqrt(abar) and sqrt(1 - abar) formed in float64 (as
    schedules.alpha_sigma forms them), kept in the one cache per table tensor (checked by identity and version), so
    q_sample's kernel reads both coefficients from the device with no copy or gather per call."""
    source = alphas_cumprod if isinstance(alphas_cumprod, torch.Tensor) else getattr(alphas_cumprod, "alphas_cumprod", None)
    key = ("q_sample coefficients", id(source), device, dtype)
    entry = CACHE.get(key) if isinstance(source, torch.Tensor) else None
    if entry is not None and entry[0]() is source and entry[1] == source._version:
        return entry[2]
    abar = alphas_cumprod_of(alphas_cumprod)
    table = torch.stack([abar.sqrt(), (1.0 - abar).sqrt()]).to(device, dtype)
    if isinstance(source, torch.Tensor):
        CACHE[key] = (weakref.ref(source), source._version, table)
    return table


_dispatch.register_public("noisy_input", NOISY_INPUT)
_dispatch.register_public("q_sample", NOISY_INPUT)
