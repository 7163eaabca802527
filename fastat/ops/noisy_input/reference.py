"""Reference: x_t = alpha * x0 + sigma * noise (+ delta), fp32 accumulation, plain autograd."""
from __future__ import annotations

from typing import Optional

import torch

from ..._shapes import Coef, column, compute_dtype


def output_dtype(x0: torch.Tensor, noise: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x0.dtype, noise.dtype)
    return dtype if delta is None else torch.promote_types(dtype, delta.dtype)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, alpha: Coef, sigma: Coef, delta: Optional[torch.Tensor] = None):
    acc = compute_dtype(x0, noise, delta)
    out = column(alpha, x0) * x0.to(acc) + column(sigma, x0) * noise.to(acc)
    if delta is not None:
        out = out + delta.to(acc)
    return out.to(output_dtype(x0, noise, delta))
