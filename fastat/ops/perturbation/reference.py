"""Reference perturbation ops: random starts and one PGD step with per-sample radius and step size."""
from __future__ import annotations

from typing import Optional

import torch

from ..._shapes import Coef, column, compute_dtype, per_sample_numel, sum_flat

NORM_FLOOR = 1e-8  # the official P1 code's max(||.||, 1e-8)


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample ||x||_2 -> [B]."""
    return sum_flat(x * x).sqrt()


def project_l2(delta: torch.Tensor, radius: Coef) -> torch.Tensor:
    """delta * min(1, R / max(||delta||, 1e-8)) per sample."""
    scale = (column(radius, delta) / column(l2_norm(delta).clamp_min(NORM_FLOOR), delta)).clamp(max=1.0)
    return delta * scale


def clamp_box(delta: torch.Tensor, radius: Coef) -> torch.Tensor:
    """Clamp to [-R, R] per sample."""
    r = column(radius, delta)
    if isinstance(r, torch.Tensor):
        r = r.to(delta.dtype)
        return torch.maximum(torch.minimum(delta, r), -r)
    return delta.clamp(-r, r)


def pgd_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: Coef,
    radius: Coef,
    norm: str = "l2",
    normalize: bool = True,
    model_input_base: Optional[torch.Tensor] = None,
):
    acc = compute_dtype(delta, grad)
    d, g = delta.to(acc), grad.to(acc)
    finite = torch.isfinite(g).flatten(1).all(dim=1) if g.ndim > 1 else torch.isfinite(g)
    g = torch.where(column(finite, g), g, torch.zeros((), dtype=acc, device=g.device))
    step = column(step_size, d)
    if norm == "l2":
        if normalize:
            g = g / column(l2_norm(g).clamp_min(NORM_FLOOR), g)
        new = project_l2(d + step * g, radius)
    else:
        new = clamp_box(d + step * (torch.sign(g) if normalize else g), radius)
    new = torch.where(column(finite, new), new, d).to(delta.dtype)
    if model_input_base is None:
        return new
    x_dtype = torch.promote_types(model_input_base.dtype, delta.dtype)
    return new, (model_input_base.to(acc) + new.to(acc)).to(x_dtype)


def random_perturbation(
    like: torch.Tensor,
    radius: Coef,
    norm: str = "l2",
    init: str = "uniform",
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    dtype = dtype or like.dtype
    if init == "zero":
        return torch.zeros_like(like, dtype=dtype)
    acc = compute_dtype(torch.empty(0, dtype=dtype))
    out = torch.empty_like(like, dtype=acc)
    r = column(radius, out)
    if init == "normal":
        out.normal_(generator=generator)
        if norm == "l2":
            out = project_l2(out * (r / max(per_sample_numel(like), 1) ** 0.5), radius)
        else:
            out = clamp_box(out * r, radius)
    elif norm == "linf":
        out = out.uniform_(-1.0, 1.0, generator=generator) * r
    else:
        # Uniform in the L2 ball: a uniform direction times R * U^(1/D).
        out.normal_(generator=generator)
        u = torch.rand(like.shape[0], generator=generator, device=like.device, dtype=torch.float64)
        u = u.pow(1.0 / max(per_sample_numel(like), 1)).to(acc)
        out = out * column(u / l2_norm(out).clamp_min(NORM_FLOOR), out) * r
    return out.to(dtype)
