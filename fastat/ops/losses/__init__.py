"""Per-sample losses (SPEC §4.3): P1's equivariant MSE, P2's equivariance regulariser, CM distances.

Every loss is computed per sample over all non-batch dims in fp32 (fp64 for fp64 inputs), multiplied
by an optional per-sample `weight` ([B] tensor or float), then reduced: "none" -> [B], "sum" -> scalar,
"mean" -> mean over the batch (0 for an empty batch).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _dispatch
from ..._checks import check_choice, check_like, check_tensor, per_sample
from ..._shapes import REDUCTIONS, Coef, column, per_sample_numel, reduce
from ..noise import Noise, check_noise

TARGETS = ("delta_detach", "delta", "original")
REGULARIZER_MODES = ("equivariant", "invariant")
METRICS = ("l2", "l1", "pseudo_huber")
ICT_HUBER_C = 0.00054

_dispatch.register_kernel("equivariant_mse", "torch", "fastat.ops.losses.reference:equivariant_mse")
_dispatch.register_kernel("equivariance_regularizer", "torch", "fastat.ops.losses.reference:equivariance_regularizer")
_dispatch.register_kernel("consistency_distance", "torch", "fastat.ops.losses.reference:consistency_distance")
_dispatch.register_kernel("equivariant_mse", "triton", "fastat.ops.losses.triton_kernels:equivariant_mse")
_dispatch.register_kernel("equivariance_regularizer", "triton", "fastat.ops.losses.triton_kernels:equivariance_regularizer")
_dispatch.register_kernel("consistency_distance", "triton", "fastat.ops.losses.triton_kernels:consistency_distance")
_dispatch.register_kernel("equivariant_mse", "cuda", "fastat.ops.losses.cuda_kernels:equivariant_mse")
_dispatch.register_kernel("equivariance_regularizer", "cuda", "fastat.ops.losses.cuda_kernels:equivariance_regularizer")
_dispatch.register_kernel("consistency_distance", "cuda", "fastat.ops.losses.cuda_kernels:consistency_distance")
_dispatch.register_kernel("equivariant_mse", "cpp", "fastat.ops.losses.cpp_kernels:equivariant_mse")
_dispatch.register_kernel("equivariance_regularizer", "cpp", "fastat.ops.losses.cpp_kernels:equivariance_regularizer")
_dispatch.register_kernel("consistency_distance", "cpp", "fastat.ops.losses.cpp_kernels:consistency_distance")


def _finish(per_sample_loss: torch.Tensor, weight: Optional[Coef], reduction: str) -> torch.Tensor:
    if weight is not None:
        per_sample_loss = per_sample_loss * column(weight, per_sample_loss)
    return reduce(per_sample_loss, reduction)


def equivariant_mse(
    pred: torch.Tensor,
    noise: Noise,
    delta: Optional[torch.Tensor],
    sigma: Coef,
    target: str = "delta_detach",
    weight: Optional[Coef] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """P1's loss: loss_i = w_i * mean_flat((pred - target)^2) with
        target = noise + delta / sigma            ("delta": gradient flows into delta through the target)
        target = noise + stop_grad(delta) / sigma ("delta_detach", the official script's choice)
        target = noise                            ("original"; delta may be None)
    pred, noise, delta: [B, ...]; sigma: float or [B] (> 0 unless target="original").
    noise may be a `fastat.SeededNoise(seed, offset)` (the fp32 gaussian_noise(pred, seed, offset)): the
    Triton kernel regenerates it in-kernel, so the noise used for x_t need not be stored."""
    check_tensor("pred", pred)
    check_noise("noise", noise, "pred", pred)
    check_choice("target", target, TARGETS)
    check_choice("reduction", reduction, REDUCTIONS)
    batch = pred.shape[0]
    if delta is not None:
        check_like("delta", delta, "pred", pred)
    elif target != "original":
        raise ValueError(f"delta is None but target={target!r} needs it (use target='original' for the plain loss)")
    sigma = per_sample("sigma", sigma, batch, pred.device, positive=target != "original")
    weight = per_sample("weight", weight, batch, pred.device)
    loss = _dispatch.call("equivariant_mse", pred.device, pred, noise, delta, sigma, target)
    return _finish(loss, weight, reduction)


def equivariance_regularizer(
    pred_perturbed: torch.Tensor,
    pred_clean: torch.Tensor,
    omega: Optional[torch.Tensor],
    weight: Optional[Coef] = None,
    detach_anchor: bool = False,
    mode: str = "equivariant",
    reduction: str = "mean",
) -> torch.Tensor:
    """P2's regulariser: loss_i = w_i * mean_flat((pred_perturbed - (anchor + omega))^2), anchor = pred_clean
    (stop-gradded if detach_anchor). mode="invariant" drops omega (the ablation that fails; for study only).
    The P2 weight lambda_t = lambda * sqrt(3) / (beta * r(t)) is passed as `weight`."""
    check_tensor("pred_perturbed", pred_perturbed)
    check_like("pred_clean", pred_clean, "pred_perturbed", pred_perturbed)
    check_choice("mode", mode, REGULARIZER_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    if omega is not None:
        check_like("omega", omega, "pred_perturbed", pred_perturbed)
    elif mode == "equivariant":
        raise ValueError("omega is None but mode='equivariant' needs it")
    weight = per_sample("weight", weight, pred_perturbed.shape[0], pred_perturbed.device)
    loss = _dispatch.call(
        "equivariance_regularizer", pred_perturbed.device, pred_perturbed, pred_clean, omega, bool(detach_anchor), mode
    )
    return _finish(loss, weight, reduction)


def consistency_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    metric: str = "l2",
    c: Optional[float] = None,
    weight: Optional[Coef] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Consistency-model distance per sample, times w_i:
        "l2":           mean_flat((pred - target)^2)
        "l1":           mean_flat(|pred - target|)
        "pseudo_huber": sqrt(||pred - target||_2^2 + c^2) - c, c = 0.00054 * sqrt(D) if None (iCT).
    Gradients flow into both arguments; detach `target` yourself for a stop-gradient teacher."""
    check_tensor("pred", pred)
    check_like("target", target, "pred", pred)
    check_choice("metric", metric, METRICS)
    check_choice("reduction", reduction, REDUCTIONS)
    if c is None:
        c = ICT_HUBER_C * math.sqrt(per_sample_numel(pred))
    elif isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"c must be a finite float >= 0 or None, got {c!r}")
    weight = per_sample("weight", weight, pred.shape[0], pred.device)
    loss = _dispatch.call("consistency_distance", pred.device, pred, target, metric, float(c))
    return _finish(loss, weight, reduction)
