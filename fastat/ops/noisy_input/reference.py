"""Reference: x_t = alpha * x0 + sigma * noise (+ delta), fp32 accumulation, plain autograd."""
from __future__ import annotations

from typing import Optional

import torch

from ..._shapes import Coef, column, compute_dtype
from ..noise import materialize


def output_dtype(x0: torch.Tensor, noise: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x0.dtype, noise.dtype)
    return dtype if delta is None else torch.promote_types(dtype, delta.dtype)


def noisy_input(x0: torch.Tensor, noise, alpha: Coef, sigma: Coef, delta: Optional[torch.Tensor] = None):
    dtype = output_dtype(x0, noise if isinstance(noise, torch.Tensor) else x0, delta)  # seeded noise: not promoted
    noise = materialize(noise, x0)
    acc = compute_dtype(x0, noise, delta)
    out = column(alpha, x0) * x0.to(acc) + column(sigma, x0) * noise.to(acc)
    if delta is not None:
        out = out + delta.to(acc)
    return out.to(dtype)
