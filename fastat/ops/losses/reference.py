"""Reference kernels of fastat::residual_loss and its backward: plain torch, fp32 accumulation, autograd.

Every loss is one residual r = a - b - c / sigma_b reduced per sample (see op.py); the public losses map onto it.
"""
from __future__ import annotations

import torch

from ..._shapes import accumulation_dtype, column, mean_flat, promote, sum_flat
from ..noise.reference import gaussian_noise

L2, L1, PSEUDO_HUBER = 0, 1, 2
NONE, SUM, MEAN = 0, 1, 2


def residual_dtype(a, b, c) -> torch.dtype:
    """promote(a, b, c); seeded noise (b None) takes no part in the promotion."""
    dtype = a.dtype
    for t in (b, c):
        if t is not None:
            dtype = promote(dtype, t.dtype)
    return dtype


def per_sample_metric(r: torch.Tensor, metric: int, huber_c: float) -> torch.Tensor:
    """v_b: mean_flat(r^2) | mean_flat(|r|) | sqrt(sum_flat(r^2) + h^2) - h."""
    if metric == L2:
        return mean_flat(r * r)
    if metric == L1:
        return mean_flat(r.abs())
    return (sum_flat(r * r) + huber_c * huber_c).sqrt() - huber_c


def reduce_batch(per_sample: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == NONE:
        return per_sample
    total = per_sample.sum()
    return total if reduction == SUM else total / max(per_sample.shape[0], 1)


def residual_loss(a, b, c, sigma, weight, sigma_s: float, weight_s: float, metric: int, huber_c: float,
                  reduction: int, seed: int, offset: int, save_residual: bool):
    """(loss, per-sample v_b, residual r or an empty tensor). b None: gaussian_noise(a, seed, offset)."""
    dtype = residual_dtype(a, b, c)
    acc = accumulation_dtype(dtype)
    if b is None:
        b = gaussian_noise(a, seed, offset, torch.float32)
    r = a.to(acc) - b.to(acc)
    if c is not None:
        r = r - c.to(acc) / (sigma_s if sigma is None else column(sigma, r))
    per_sample = per_sample_metric(r, metric, huber_c)
    weighted = per_sample * (weight_s if weight is None else weight)
    loss = reduce_batch(weighted, reduction)
    residual = r if save_residual else a.new_empty(0, dtype=acc)  # kept in acc: the backward rounds once
    return loss, per_sample, residual


def residual_loss_backward(grad_loss, residual, per_sample, sigma, weight, sigma_s: float, weight_s: float, metric: int,
                           huber_c: float, reduction: int, a_dtype, b_dtype, c_dtype):
    """(dL/da, dL/db, dL/dc) from the residual; a None dtype: not wanted (an empty tensor)."""
    acc = accumulation_dtype(residual.dtype)
    r = residual.to(acc)
    batch = r.shape[0]
    d = max(r[0].numel(), 1) if batch else 1
    g = grad_loss.to(acc)
    g = g if reduction == NONE else g.reshape(1).expand(batch)
    if reduction == MEAN:
        g = g / max(batch, 1)
    g = g * (weight_s if weight is None else weight)
    if metric == L2:
        f = column(2.0 * g / d, r) * r
    elif metric == L1:
        f = column(g / d, r) * torch.sign(r)
    else:
        denom = per_sample.to(acc) + huber_c
        f = column(torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), 0.0), r) * r

    def out(value, dtype):
        return residual.new_empty(0) if dtype is None else value.to(dtype)

    grad_c = -f / (sigma_s if sigma is None else column(sigma, r)) if c_dtype is not None else None
    return out(f, a_dtype), out(-f, b_dtype), out(grad_c, c_dtype)
