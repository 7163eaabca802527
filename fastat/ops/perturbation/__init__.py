"""Perturbation ops (docs/maths.md §4.2): random starts and PGD steps with per-sample radius and step size.

Radius conventions. `radius_mode="abs"` (default): for L2 the radius R bounds ||delta||_2; for Linf it
bounds every coordinate. `radius_mode="rms"` takes AT_Diff's per-coordinate radius r and uses
R = r * sqrt(D) for L2 (D = elements per sample); Linf radii are per-coordinate already, so "rms"
leaves them unchanged. `rms_radius(r, like)` does the same conversion by hand.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ... import _dispatch
from ..._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_flag,
    check_generator,
    check_same,
    check_tensor,
    check_values,
    coefficient,
)
from ..._shapes import Coef, accumulation_dtype, device_type, per_sample_numel
from ..noise.reference import noise_layout
from . import reference
from .op import PGD_STEP, RANDOM_PERTURBATION
from .reference import l2_norm

NORMS = ("l2", "linf")
INITS = ("uniform", "normal", "zero")
RADIUS_MODES = ("abs", "rms")
_DIFFERENTIABLE = PGD_STEP.feature_bits["differentiable"]
FLOATS = frozenset(FLOAT_DTYPES)
is_compiling = torch.compiler.is_compiling
SEED_HIGH = 2**62  # random starts draw their seed from [0, 2**62) with the caller's generator


def rms_radius(r: Coef, like: torch.Tensor) -> Coef:
    """AT_Diff's radius convention: R = r * sqrt(D), D = numel(like[i])."""
    check_tensor("like", like)
    if isinstance(r, torch.Tensor):
        if not r.is_floating_point():
            raise TypeError(f"r must be a float or a floating-point tensor, got {r.dtype}")
    elif isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"r must be a float or a floating-point tensor, got {type(r).__name__}")
    elif not r >= 0:
        raise ValueError(f"r must be >= 0, got {r!r}")
    return r * math.sqrt(per_sample_numel(like))


def _radius(name: str, radius, like: torch.Tensor, norm: str, radius_mode: str, acc: torch.dtype):
    """The radius as the ops take it, (tensor or None, float), in the absolute convention."""
    if radius_mode != "abs":
        check_choice("radius_mode", radius_mode, RADIUS_MODES)
    tensor, value = coefficient(name, radius, like.shape[0], like.device, acc, nonnegative=True)
    if radius_mode == "rms" and norm == "l2":
        scale = math.sqrt(per_sample_numel(like))
        return (None, value * scale) if tensor is None else (tensor * scale, 0.0)
    return tensor, value


def pgd_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: Coef,
    radius: Coef,
    norm: str = "l2",
    normalize: bool = True,
    radius_mode: str = "abs",
    model_input_base: Optional[torch.Tensor] = None,
):
    """One projected ascent step on a per-sample perturbation; returns a new tensor like `delta`.

    L2:   delta' = P_R(delta + step_size * g / max(||g||_2, 1e-8))   (g unnormalised if normalize=False)
          P_R(v) = v * min(1, R / max(||v||_2, 1e-8))
    Linf: delta' = clamp(delta + step_size * sign(g), -R, R)          (g instead of sign(g) if normalize=False)

    step_size and radius: floats or [B] tensors (>= 0, finite). Norms are per sample over all non-batch dims.
    Non-finite policy: a sample whose gradient holds any NaN/Inf keeps its perturbation unchanged (no step,
    no projection), so one overflowing sample (e.g. under fp16 loss scaling) never poisons the batch.

    model_input_base: optional x_t shaped like delta; then the result is (delta', x_t + delta'), the next
    model input written in the same pass (dtype promote(x_t, delta); delta' is added after rounding).
    """
    if not isinstance(delta, torch.Tensor) or delta.dtype not in FLOATS or delta.ndim < 1:
        check_tensor("delta", delta)
    shape, device, dtype = delta.shape, delta.device, delta.dtype
    check_same("grad", grad, "delta", shape, device)
    if norm != "l2" and norm != "linf":
        check_choice("norm", norm, NORMS)
    if normalize is not True and normalize is not False:
        check_flag("normalize", normalize)
    if grad.dtype is not dtype:
        dtype = torch.promote_types(dtype, grad.dtype)
    if model_input_base is not None:
        check_same("model_input_base", model_input_base, "delta", shape, device)
        if model_input_base.dtype is not dtype:
            dtype = torch.promote_types(dtype, model_input_base.dtype)
    acc = torch.float64 if dtype is torch.float64 else torch.float32
    if step_size.__class__ is float and 0.0 <= step_size < math.inf:  # the common case, checked inline
        step, step_s = None, step_size
    else:
        step, step_s = coefficient("step_size", step_size, shape[0], device, acc, nonnegative=True)
    if radius.__class__ is float and 0.0 <= radius < math.inf and (radius_mode == "abs" or norm == "linf"):
        if radius_mode != "abs":
            check_choice("radius_mode", radius_mode, RADIUS_MODES)
        radius, radius_s = None, radius
    else:
        radius, radius_s = _radius("radius", radius, delta, norm, radius_mode, acc)
    args = (delta, grad, model_input_base, step, radius, step_s, radius_s, norm == "l2", normalize)
    differentiable = torch.is_grad_enabled() and (
        delta.requires_grad or grad.requires_grad or (model_input_base is not None and model_input_base.requires_grad)
        or (step is not None and step.requires_grad) or (radius is not None and radius.requires_grad))
    if is_compiling():
        if differentiable or _dispatch.traced_as_reference():
            new, x = reference.pgd_step(*args)
        else:
            new, x = PGD_STEP.overload(*args)
    else:
        batch = shape[0]
        route = _dispatch.select(PGD_STEP, "cuda" if delta.is_cuda else device.type, dtype,
                                 _DIFFERENTIABLE if differentiable else 0, delta.numel() // batch if batch else 0)
        if not route.checks_values:
            check_values("step_size", step, nonnegative=True)
            check_values("radius", radius, nonnegative=True)
        new, x = route.forward(*args)
    return new if model_input_base is None else (new, x)


def random_perturbation(
    like: torch.Tensor,
    radius: Coef,
    norm: str = "l2",
    init: str = "uniform",
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    radius_mode: str = "abs",
) -> torch.Tensor:
    """A random start with the shape, device and layout of `like` (dtype `dtype`, default like.dtype).

    init="uniform": uniform in the L2 ball of radius R (direction uniform, ||delta|| = R * U^(1/D)),
        or uniform in the box [-R, R]^D for Linf. (Not torchattacks' uniform radius.)
    init="normal": i.i.d. N(0, (R/sqrt(D))^2) for L2 (so E||delta||^2 = R^2) or N(0, R^2) for Linf,
        then projected onto the ball / clamped to the box.
    init="zero": zeros.
    """
    if not isinstance(like, torch.Tensor) or like.dtype not in FLOATS or like.ndim < 1:
        check_tensor("like", like)
    if norm != "l2" and norm != "linf":
        check_choice("norm", norm, NORMS)
    if init != "uniform" and init != "normal" and init != "zero":
        check_choice("init", init, INITS)
    if dtype is None:
        dtype = like.dtype
    elif dtype not in FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if generator is not None and (generator.__class__ is not torch.Generator or generator.device.type != like.device.type):
        check_generator(generator)
        raise ValueError(f"generator is on {generator.device} but like is on {like.device}")
    if radius.__class__ is float and radius_mode == "abs" and 0.0 <= radius < math.inf:
        radius_s, radius = radius, None  # the common case, already checked
    else:
        radius, radius_s = _radius("radius", radius, like, norm, radius_mode, accumulation_dtype(dtype))
    if init == "zero":
        return torch.zeros(like.shape, dtype=dtype, device=like.device).contiguous(memory_format=noise_layout(like))
    if not like.numel() and not is_compiling():  # nothing to draw: the generator is not advanced, on any backend
        return torch.empty(like.shape, dtype=dtype, device=like.device).contiguous(memory_format=noise_layout(like))
    if is_compiling():
        route = None if _dispatch.traced_as_reference() else RANDOM_PERTURBATION.operator_route
    else:
        batch = like.shape[0]
        route = _dispatch.select(RANDOM_PERTURBATION, "cpu" if like.is_cpu else device_type(like), dtype, 0,
                                 like.numel() // batch if batch else 0)
        if radius is not None:  # here even where the kernel checks: before the seed draw, so a refusal leaves the RNG
            check_values("radius", radius, nonnegative=True)
    if route is None or route.direct:
        return reference.random_perturbation_from_generator(like, radius_s if radius is None else radius, norm, init,
                                                            generator, dtype)
    seed = torch.randint(0, SEED_HIGH, (1,), generator=generator, device=like.device, dtype=torch.int64)
    return route.forward(like.detach(), seed, radius, radius_s, norm == "l2", init == "normal", dtype)


def per_sample_norm(x: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-sample ||x||_2 or ||x||_inf in fp32 (fp64 for fp64 input) -> [B], for logging."""
    check_tensor("x", x)
    check_choice("norm", norm, NORMS)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(acc)
    if norm == "l2":
        return l2_norm(x)
    return x.abs().reshape(x.shape[0], per_sample_numel(x)).amax(dim=1) if x.numel() else x.new_zeros(x.shape[0])


_dispatch.register_public("pgd_step", PGD_STEP)
_dispatch.register_public("random_perturbation", RANDOM_PERTURBATION)
