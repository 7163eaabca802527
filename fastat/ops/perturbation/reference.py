"""Reference perturbation ops: random starts and one PGD step with per-sample radius and step size."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..._shapes import Coef, column, compute_dtype, per_sample_numel, promote, sum_flat
from ..noise.reference import noise_layout, rand_flat, randn_flat

NORM_FLOOR = 1e-8  # the official P1 code's max(||.||, 1e-8)


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample ||x||_2 -> [B]."""
    return sum_flat(x * x).sqrt()


def project_l2(delta: torch.Tensor, radius: Coef) -> torch.Tensor:
    """delta * min(1, R / max(||delta||, 1e-8)) per sample."""
    scale = (column(radius, delta) / column(l2_norm(delta).clamp_min(NORM_FLOOR), delta)).clamp(max=1.0)
    return delta * scale


def clamp_box(delta: torch.Tensor, radius: Coef) -> torch.Tensor:
    """Clamp to [-R, R] per sample. R is first rounded to delta's dtype, as the kernels do (a radius beyond the
    dtype's range is an unbounded box, not an error)."""
    r = column(radius, delta)
    if isinstance(r, torch.Tensor):
        r = r.to(delta.dtype)
        return torch.maximum(torch.minimum(delta, r), -r)
    if r > torch.finfo(delta.dtype).max:
        r = math.inf
    return delta.clamp(-r, r)


def _coef(coef: Optional[torch.Tensor], coef_s: float) -> Coef:
    return coef_s if coef is None else coef


def pgd_step(delta, grad, base, step_size, radius, step_size_s: float, radius_s: float, l2: bool, normalize: bool):
    """fastat::pgd_step: (delta', base + delta' or an empty tensor), differentiable by autograd.

    L2:   delta' = P_R(delta + step * g / max(||g||, 1e-8)),  P_R(v) = v * min(1, R / max(||v||, 1e-8))
    Linf: delta' = clamp(delta + step * sign(g), -R, R)     (g itself for both when normalize is False)
    A sample whose g holds any NaN/Inf keeps delta' = delta. delta' has delta's dtype; base + delta' is formed
    from the rounded delta' in fp32 (fp64) and has dtype promote(base, delta)."""
    step, r = _coef(step_size, step_size_s), _coef(radius, radius_s)
    acc = compute_dtype(delta, grad)
    d, g = delta.to(acc), grad.to(acc)
    finite = torch.isfinite(g).flatten(1).all(dim=1) if g.ndim > 1 else torch.isfinite(g)
    g = torch.where(column(finite, g), g, torch.zeros((), dtype=acc, device=g.device))
    if l2:
        if normalize:
            g = g / column(l2_norm(g).clamp_min(NORM_FLOOR), g)
        new = project_l2(d + column(step, d) * g, r)
    else:
        new = clamp_box(d + column(step, d) * (torch.sign(g) if normalize else g), r)
    new = torch.where(column(finite, new), new, d).to(delta.dtype)
    if base is None:
        return new, delta.new_empty(0)
    x_dtype = promote(base.dtype, delta.dtype)
    return new, (base.to(acc) + new.to(acc)).to(x_dtype)


def random_perturbation(like, seed, radius, radius_s: float, l2: bool, normal: bool, dtype):
    """fastat::random_perturbation: the kernels' random start, in plain torch (the same draws as every kernel).

    Element with logical index j draws n_j = tl.randn(s, j) or u_j = tl.rand(s, j), s = seed.item():
      Linf uniform: (2 u_j - 1) R_b;  Linf normal: clamp(n_j R_b, -R_b, R_b);
      L2 normal: n * c_b, c_b = (R_b/sqrt(D)) min(1, R_b / max(||n_b|| R_b/sqrt(D), 1e-8)) (projected on the ball);
      L2 uniform: n * R_b U_b^(1/D) / max(||n_b||, 1e-8), U_b = tl.rand(s, B*D + b).
    The result is channels_last when `like` is, else contiguous."""
    sd = int(seed.reshape(()).item())
    batch, numel = like.shape[0], like.numel()
    d = max(per_sample_numel(like), 1)
    acc = compute_dtype(torch.empty(0, dtype=dtype))
    r = _coef(radius, radius_s)
    r = r.to(acc).reshape(batch, 1) if isinstance(r, torch.Tensor) else r
    if not l2 and not normal:
        v = (2.0 * rand_flat(sd, 0, numel, like.device).to(acc) - 1.0).reshape(batch, -1) * r
    else:
        v = randn_flat(sd, 0, numel, like.device).to(acc).reshape(batch, -1)
        if not l2:
            v = clamp_box(v * r, radius if radius is not None else radius_s)
        else:
            norm = l2_norm(v).reshape(batch, 1)
            if normal:
                s = r / d**0.5
                c = s * (r / (norm * s).clamp_min(NORM_FLOOR)).clamp(max=1.0)
            else:
                u = rand_flat(sd, numel, batch, like.device).double().pow(1.0 / d).to(acc).reshape(batch, 1)
                c = u * r / norm.clamp_min(NORM_FLOOR)
            v = v * c
    return v.reshape(like.shape).to(dtype).contiguous(memory_format=noise_layout(like))


def random_perturbation_from_generator(
    like: torch.Tensor,
    radius: Coef,
    norm: str = "l2",
    init: str = "uniform",
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """What the torch backend draws for fastat.random_perturbation: the same distributions as the kernels, from
    torch's generator (`generator`, else the global one). The draws fill a contiguous buffer in logical order, so
    they do not depend on the memory layout of `like`; the result is channels_last when `like` is."""
    dtype = dtype or like.dtype
    layout = noise_layout(like)
    if init == "zero":
        return torch.zeros(like.shape, dtype=dtype, device=like.device).contiguous(memory_format=layout)
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    batch = like.shape[0]
    d = max(like.numel() // batch, 1) if batch else max(per_sample_numel(like), 1)
    fresh = dict(dtype=acc, memory_format=torch.contiguous_format)  # draws fill it in logical order
    if init == "normal":
        out = torch.empty_like(like, **fresh).normal_(generator=generator)
        r = column(radius, like)
        out = project_l2(out * (r / d**0.5), radius) if norm == "l2" else clamp_box(out * r, radius)
    elif norm == "linf":
        out = torch.empty_like(like, **fresh).uniform_(-1.0, 1.0, generator=generator).mul_(column(radius, like))
    else:
        # Uniform in the L2 ball: a uniform direction times R * U^(1/D). Eight aten calls, as few as the plain
        # eager expression makes (this is auto's route on CPU; randn_like is the cheapest way to draw).
        if generator is None:
            out = torch.randn_like(like, **fresh)
        else:
            out = torch.empty_like(like, **fresh).normal_(generator=generator)
        scale = torch.rand(batch, generator=generator, device=like.device, dtype=acc).pow_(1.0 / d).mul_(radius)
        length = torch.linalg.vector_norm(out.view(batch, out.numel() // batch if batch else 0), dim=1)
        out = out.mul_(column(scale.div_(length.clamp_min_(NORM_FLOOR)), out))
    if out.dtype is not dtype:
        out = out.to(dtype)
    return out if layout is torch.contiguous_format else out.contiguous(memory_format=layout)
