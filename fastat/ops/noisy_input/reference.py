"""Reference kernels of fastat::noisy_input and its backward: plain torch, fp32 accumulation, differentiable by autograd."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._shapes import accumulation_dtype, column, promote
from ..noise.reference import gaussian_noise


def output_dtype(x0: torch.Tensor, noise: Optional[torch.Tensor], delta: Optional[torch.Tensor]) -> torch.dtype:
    """promote(x0, noise, delta); seeded noise (None) takes no part in the promotion."""
    dtype = x0.dtype if noise is None else promote(x0.dtype, noise.dtype)
    return dtype if delta is None else promote(dtype, delta.dtype)


def noisy_input(x0, noise, delta, alpha, sigma, alpha_s: float, sigma_s: float, seed: int, offset: int, dtype,
                timesteps=None):
    """x_t = alpha * x0 + sigma * noise (+ delta) in `dtype`; noise None: gaussian_noise(x0, seed, offset);
    timesteps: alpha and sigma are per-timestep tables, gathered at timesteps."""
    acc = accumulation_dtype(dtype)
    if timesteps is not None:
        alpha, sigma = (None if c is None else c.index_select(0, timesteps) for c in (alpha, sigma))
    if noise is None:
        noise = gaussian_noise(x0, seed, offset, torch.float32)
    a = alpha_s if alpha is None else column(alpha, x0)
    s = sigma_s if sigma is None else column(sigma, x0)
    out = a * x0.to(acc) + s * noise.to(acc)
    if delta is not None:
        out = out + delta.to(acc)
    return out.to(dtype)


def noisy_input_backward(grad, alpha, sigma, alpha_s: float, sigma_s: float, x0_dtype, noise_dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha * grad in x0_dtype, sigma * grad in noise_dtype); a None dtype: not wanted (an empty tensor)."""
    acc = accumulation_dtype(grad.dtype)
    g = grad.to(acc)

    def scaled(coef, coef_s, dtype):
        if dtype is None:
            return grad.new_empty(0)
        return ((coef_s if coef is None else column(coef, g)) * g).to(dtype)

    return scaled(alpha, alpha_s, x0_dtype), scaled(sigma, sigma_s, noise_dtype)
