"""Perturbation ops (SPEC §4.2): random starts and PGD steps with per-sample radius and step size.

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
from ..._checks import check_choice, check_like, check_tensor, per_sample
from ..._shapes import Coef, per_sample_numel
from .reference import l2_norm

NORMS = ("l2", "linf")
INITS = ("uniform", "normal", "zero")
RADIUS_MODES = ("abs", "rms")

_dispatch.register_kernel("pgd_step", "torch", "fastat.ops.perturbation.reference:pgd_step")
_dispatch.register_kernel("pgd_step", "cpp", "fastat.ops.perturbation.cpp_kernels:pgd_step")
_dispatch.register_kernel("random_perturbation", "torch", "fastat.ops.perturbation.reference:random_perturbation")
_dispatch.register_kernel("pgd_step", "triton", "fastat.ops.perturbation.triton_kernels:pgd_step")
_dispatch.register_kernel("random_perturbation", "triton", "fastat.ops.perturbation.triton_kernels:random_perturbation")
_dispatch.register_kernel("pgd_step", "cuda", "fastat.ops.perturbation.cuda_kernels:pgd_step")
_dispatch.register_kernel("random_perturbation", "cuda", "fastat.ops.perturbation.cuda_kernels:random_perturbation")


def rms_radius(r: Coef, like: torch.Tensor) -> Coef:
    """AT_Diff's radius convention: R = r * sqrt(D), D = numel(like[i])."""
    return r * math.sqrt(per_sample_numel(like))


def _radius(name: str, radius, like: torch.Tensor, norm: str, radius_mode: str) -> Coef:
    check_choice("radius_mode", radius_mode, RADIUS_MODES)
    radius = per_sample(name, radius, like.shape[0], like.device, nonnegative=True)
    return rms_radius(radius, like) if radius_mode == "rms" and norm == "l2" else radius


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
    check_tensor("delta", delta)
    check_like("grad", grad, "delta", delta)
    check_choice("norm", norm, NORMS)
    if model_input_base is not None:
        check_like("model_input_base", model_input_base, "delta", delta)
    step_size = per_sample("step_size", step_size, delta.shape[0], delta.device, nonnegative=True)
    radius = _radius("radius", radius, delta, norm, radius_mode)
    args = (delta, grad, step_size, radius, norm, bool(normalize))
    if model_input_base is None:  # kernels written before model_input_base existed keep working
        return _dispatch.call("pgd_step", delta.device, *args)
    return _dispatch.call("pgd_step", delta.device, *args, model_input_base)


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
    check_tensor("like", like)
    check_choice("norm", norm, NORMS)
    check_choice("init", init, INITS)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if generator is not None and generator.device.type != like.device.type:
        raise ValueError(f"generator is on {generator.device} but like is on {like.device}")
    radius = _radius("radius", radius, like, norm, radius_mode)
    return _dispatch.call("random_perturbation", like.device, like, radius, norm, init, generator, dtype)


def per_sample_norm(x: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-sample ||x||_2 or ||x||_inf in fp32 (fp64 for fp64 input) -> [B], for logging."""
    check_tensor("x", x)
    check_choice("norm", norm, NORMS)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(acc)
    if norm == "l2":
        return l2_norm(x)
    return x.abs().reshape(x.shape[0], per_sample_numel(x)).amax(dim=1) if x.numel() else x.new_zeros(x.shape[0])
