"""Per-sample losses (docs/maths.md §4.3): P1's equivariant MSE, P2's equivariance regulariser, CM distances.

Every loss is computed per sample over all non-batch dims in fp32 (fp64 for fp64 inputs), multiplied
by an optional per-sample `weight` ([B] tensor or float), then reduced: "none" -> [B], "sum" -> scalar,
"mean" -> mean over the batch (0 for an empty batch).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _dispatch
from ..._checks import FLOAT_DTYPES, check_choice, check_flag, check_same, check_tensor, check_values, coefficient
from ..._shapes import REDUCTIONS, Coef, per_sample_numel
from ..noise import Noise, SeededNoise, check_noise
from . import reference
from .op import RESIDUAL_LOSS

TARGETS = ("delta_detach", "delta", "original")
REGULARIZER_MODES = ("equivariant", "invariant")
METRICS = ("l2", "l1", "pseudo_huber")
ICT_HUBER_C = 0.00054
METRIC_CODES = {"l2": reference.L2, "l1": reference.L1, "pseudo_huber": reference.PSEUDO_HUBER}
REDUCTION_CODES = {"none": reference.NONE, "sum": reference.SUM, "mean": reference.MEAN}
_SIGMA_GRAD = RESIDUAL_LOSS.feature_bits["sigma_grad"]
_WEIGHT_GRAD = RESIDUAL_LOSS.feature_bits["weight_grad"]
FLOATS = frozenset(FLOAT_DTYPES)
is_compiling = torch.compiler.is_compiling


def _residual_loss(a, b, c, sigma: Coef, weight: Optional[Coef], metric: str, huber_c: float, reduction: str,
                   positive_sigma: bool) -> torch.Tensor:
    """The per-sample loss of r = a - b - c / sigma (b a tensor or None for seeded noise, whose seed and offset
    the caller put in _seeded), weighted and reduced, on the backend that `select` picks (the shared body of the
    three public losses; a, b and c are checked by the caller)."""
    if b.__class__ is SeededNoise:
        seed, offset, b = b.seed, b.offset, None
    else:
        seed = offset = 0
    dtype = a.dtype
    if b is not None and b.dtype is not dtype:
        dtype = torch.promote_types(dtype, b.dtype)
    if c is not None and c.dtype is not dtype:
        dtype = torch.promote_types(dtype, c.dtype)
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    shape = a.shape
    batch = shape[0]
    if c is None:
        sigma, sigma_s = None, 1.0
    elif sigma.__class__ is float and (sigma > 0.0 if positive_sigma else True) and sigma < math.inf:
        sigma, sigma_s = None, sigma
    else:
        sigma, sigma_s = coefficient("sigma", sigma, batch, a.device, acc, positive=positive_sigma)
    if weight is None:
        weight_s = 1.0
    else:
        weight, weight_s = coefficient("weight", weight, batch, a.device, acc)
    grad_mode = torch.is_grad_enabled()
    features = 0
    if grad_mode and sigma is not None and sigma.requires_grad:
        features |= _SIGMA_GRAD
    if grad_mode and weight is not None and weight.requires_grad:
        features |= _WEIGHT_GRAD
    needs_grad = grad_mode and (a.requires_grad or (b is not None and b.requires_grad)
                                or (c is not None and c.requires_grad) or features != 0)
    args = [a, b, c, sigma, weight, sigma_s, weight_s, METRIC_CODES[metric], float(huber_c),
            REDUCTION_CODES[reduction], seed, offset, needs_grad]
    if is_compiling():
        if features or _dispatch.traced_as_reference():
            args[-1] = False
            return reference.residual_loss(*args)[0]
        return RESIDUAL_LOSS.overload(*args)[0]
    route = _dispatch.select(RESIDUAL_LOSS, "cuda" if a.is_cuda else a.device.type, dtype, features,
                             a.numel() // batch if batch else 0)
    if not route.checks_values:
        if positive_sigma:
            check_values("sigma", sigma, positive=True)
        check_values("weight", weight)
    if route.direct:
        args[-1] = False  # the reference's own autograd needs no stored residual
    elif needs_grad:
        return _dispatch.run(RESIDUAL_LOSS, route, args, True)[0]
    return route.forward(*args)[0]


def _check_operands(a_name: str, a, *others):
    """a is a floating [B, ...] tensor; each (name, tensor or None) of `others` has its shape and device."""
    if not isinstance(a, torch.Tensor) or a.dtype not in FLOATS or a.ndim < 1:
        check_tensor(a_name, a)
    shape, device = a.shape, a.device
    for name, t in others:
        if t is not None:
            check_same(name, t, a_name, shape, device)


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
    if noise.__class__ is SeededNoise or not isinstance(noise, torch.Tensor):
        check_tensor("pred", pred)
        check_noise("noise", noise, "pred", pred)
        _check_operands("pred", pred, ("delta", delta))
    else:
        _check_operands("pred", pred, ("noise", noise), ("delta", delta))
    if target not in TARGETS:
        check_choice("target", target, TARGETS)
    if reduction not in REDUCTIONS:
        check_choice("reduction", reduction, REDUCTIONS)
    if delta is None and target != "original":
        raise ValueError(f"delta is None but target={target!r} needs it (use target='original' for the plain loss)")
    if target == "original":
        c = None
        check_values("sigma", coefficient("sigma", sigma, pred.shape[0], pred.device, torch.float32)[0])  # unused
    else:
        c = delta.detach() if target == "delta_detach" else delta
    return _residual_loss(pred, noise, c, sigma, weight, "l2", 0.0, reduction, positive_sigma=c is not None)


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
    _check_operands("pred_perturbed", pred_perturbed, ("pred_clean", pred_clean), ("omega", omega))
    if pred_clean is None:
        check_tensor("pred_clean", pred_clean)
    if mode not in REGULARIZER_MODES:
        check_choice("mode", mode, REGULARIZER_MODES)
    if reduction not in REDUCTIONS:
        check_choice("reduction", reduction, REDUCTIONS)
    if detach_anchor is not True and detach_anchor is not False:
        check_flag("detach_anchor", detach_anchor)
    if omega is None and mode == "equivariant":
        raise ValueError("omega is None but mode='equivariant' needs it")
    anchor = pred_clean.detach() if detach_anchor else pred_clean
    c = omega if mode == "equivariant" else None
    return _residual_loss(pred_perturbed, anchor, c, 1.0, weight, "l2", 0.0, reduction, positive_sigma=False)


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
    _check_operands("pred", pred, ("target", target))
    if target is None:
        check_tensor("target", target)
    if metric not in METRICS:
        check_choice("metric", metric, METRICS)
    if reduction not in REDUCTIONS:
        check_choice("reduction", reduction, REDUCTIONS)
    if c is None:
        c = ICT_HUBER_C * math.sqrt(per_sample_numel(pred))
    elif isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"c must be a finite float >= 0 or None, got {c!r}")
    return _residual_loss(pred, target, None, 1.0, weight, metric, float(c), reduction, positive_sigma=False)


_dispatch.register_public("equivariant_mse", RESIDUAL_LOSS)
_dispatch.register_public("equivariance_regularizer", RESIDUAL_LOSS)
_dispatch.register_public("consistency_distance", RESIDUAL_LOSS)
