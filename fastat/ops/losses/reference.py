"""Reference per-sample losses (fp32 accumulation, plain autograd). Each returns [B]; the public
functions apply the weight and the reduction."""
from __future__ import annotations

from typing import Optional

import torch

from ..._shapes import Coef, column, compute_dtype, mean_flat, sum_flat
from ..noise import materialize


def equivariant_mse(
    pred: torch.Tensor, noise, delta: Optional[torch.Tensor], sigma: Coef, target: str
) -> torch.Tensor:
    noise = materialize(noise, pred)
    acc = compute_dtype(pred, noise, delta)
    goal = noise.to(acc)
    if target != "original" and delta is not None:
        d = delta.to(acc)
        goal = goal + (d.detach() if target == "delta_detach" else d) / column(sigma, d)
    return mean_flat((pred.to(acc) - goal) ** 2)


def equivariance_regularizer(
    pred_perturbed: torch.Tensor, pred_clean: torch.Tensor, omega: Optional[torch.Tensor], detach_anchor: bool, mode: str
) -> torch.Tensor:
    acc = compute_dtype(pred_perturbed, pred_clean, omega)
    anchor = pred_clean.to(acc)
    if detach_anchor:
        anchor = anchor.detach()
    if mode == "equivariant" and omega is not None:
        anchor = anchor + omega.to(acc)
    return mean_flat((pred_perturbed.to(acc) - anchor) ** 2)


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, metric: str, c: float) -> torch.Tensor:
    acc = compute_dtype(pred, target)
    diff = pred.to(acc) - target.to(acc)
    if metric == "l2":
        return mean_flat(diff * diff)
    if metric == "l1":
        return mean_flat(diff.abs())
    return (sum_flat(diff * diff) + c * c).sqrt() - c
