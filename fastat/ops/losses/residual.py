"""The one form every fused loss kernel computes: a per-sample reduction of the residual

    r = a - b - c / k          (c optional, k a float or a [B] tensor)

with metric "l2" (mean_flat r^2), "l1" (mean_flat |r|) or "pseudo_huber" (sqrt(||r||^2 + c_h^2) - c_h).
This module maps each public loss onto (a, b, c, k) once, for every kernel backend; stop-gradients are
expressed by detaching the argument.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._shapes import Coef

METRIC_CODES = {"l2": 0, "l1": 1, "pseudo_huber": 2}  # the integer the kernels take

Terms = Tuple[torch.Tensor, object, Optional[torch.Tensor], Coef]


def equivariant_mse_terms(pred, noise, delta, sigma, target) -> Terms:
    """P1: r = pred - noise - delta/sigma (delta detached for "delta_detach", absent for "original")."""
    if target == "original" or delta is None:
        return pred, noise, None, 1.0
    return pred, noise, delta.detach() if target == "delta_detach" else delta, sigma


def regularizer_terms(pred_perturbed, pred_clean, omega, detach_anchor, mode) -> Terms:
    """P2: r = pred_perturbed - anchor - omega (omega dropped for the invariant ablation)."""
    anchor = pred_clean.detach() if detach_anchor else pred_clean
    return pred_perturbed, anchor, omega if mode == "equivariant" else None, 1.0


def sigma_grad_refusal(sigma, target) -> Optional[str]:
    """The kernels differentiate a, b and c only: a per-sample sigma that needs a gradient goes to the reference."""
    if target != "original" and isinstance(sigma, torch.Tensor) and sigma.requires_grad and torch.is_grad_enabled():
        return "gradients to a per-sample sigma are not implemented in the kernels"
    return None
