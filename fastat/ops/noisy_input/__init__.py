"""Noise-injected model input (SPEC §4.1): x_t = alpha_t * x0 + sigma_t * noise (+ delta)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch
from ..._checks import check_batch, check_like, check_tensor, per_sample
from ..._shapes import Coef
from ..noise import Noise, check_noise
from ...schedules import alpha_sigma

_dispatch.register_kernel("noisy_input", "torch", "fastat.ops.noisy_input.reference:noisy_input")
_dispatch.register_kernel("noisy_input", "cpp", "fastat.ops.noisy_input.cpp_kernels:noisy_input")
_dispatch.register_kernel("noisy_input", "triton", "fastat.ops.noisy_input.triton_kernels:noisy_input")
_dispatch.register_kernel("noisy_input", "cuda", "fastat.ops.noisy_input.cuda_kernels:noisy_input")


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
    regenerated in-kernel by the Triton backend instead of read (it is left out of the dtype promotion).
    """
    check_tensor("x0", x0)
    check_noise("noise", noise, "x0", x0)
    if delta is not None:
        check_like("delta", delta, "x0", x0)
    batch = x0.shape[0]
    alpha = per_sample("alpha", alpha, batch, x0.device)
    sigma = per_sample("sigma", sigma, batch, x0.device)
    return _dispatch.call("noisy_input", x0.device, x0, noise, alpha, sigma, delta)


def q_sample(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod,
    delta: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DDPM forward process at integer `timesteps` [B]: sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise (+ delta).

    `alphas_cumprod` is a table (fastat.schedules or a diffusers scheduler's, or the scheduler itself);
    the coefficients are computed in float64 and applied in fp32 (see `schedules.alpha_sigma`).
    """
    check_tensor("x0", x0)
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timesteps must be an integer tensor of shape [B], got {type(timesteps).__name__}")
    check_batch("timesteps", timesteps.reshape(-1), "x0", x0)
    if timesteps.device != x0.device:
        raise ValueError(f"timesteps is on {timesteps.device} but x0 is on {x0.device}; put them on one device")
    alpha, sigma = alpha_sigma(alphas_cumprod, timesteps)
    return noisy_input(x0, noise, alpha.to(x0.device), sigma.to(x0.device), delta)
