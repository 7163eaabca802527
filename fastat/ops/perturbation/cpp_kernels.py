"""CPU C++ kernel of one PGD step (torch.ops.fastat_cpu.pgd_step).

L2: one pass gives ||g||^2, <delta, g>, ||delta||^2 per sample, one pass writes
    delta' = (delta + c_i g) * min(1, R_i / max(||delta + c_i g||, 1e-8)), c_i = step_i / max(||g||, 1e-8);
Linf: delta' = clamp(delta + step_i * sign(g), -R_i, R_i) in one pass.
With model_input_base x_t the result is (delta', x_t + delta'), written in the same pass.
Non-finite policy as the reference: a sample whose gradient holds NaN/Inf keeps its delta.
The step is an update, not a differentiable function: calls that would need a gradient through it
are refused (auto then uses the reference). Importing this module loads (and if needed builds) the
CPU extension.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch, _ext
from ..._shapes import Coef

_ops = _ext.load("cpp")


@torch.library.register_fake("fastat_cpu::pgd_step")
def _pgd_step_fake(delta, grad, step_t, step, radius_t, radius, l2, normalize, base):
    x = _ext.empty_like_kernel(base, delta, grad) if base is not None else delta.new_empty((0,))
    return _ext.empty_like_kernel(delta, grad, base), x


# Not differentiable: autograd passes straight through (outputs never require grad); the glue refuses calls
# that would need a gradient, so auto falls back to the differentiable reference for those.
_autograd_lib = torch.library.Library("fastat_cpu", "IMPL")
_autograd_lib.impl("pgd_step", torch.library.fallthrough_kernel, "Autograd")


def _needs_autograd(delta, grad, step_size, radius, norm="l2", normalize=True, model_input_base=None) -> Optional[str]:
    tensors = (delta, grad, step_size, radius, model_input_base)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return "the cpp pgd_step is not differentiable (call it under torch.no_grad() or on detached tensors)"
    return None


@_dispatch.refuses_when(_needs_autograd)
def pgd_step(
    delta: torch.Tensor,
    grad: torch.Tensor,
    step_size: Coef,
    radius: Coef,
    norm: str = "l2",
    normalize: bool = True,
    model_input_base: Optional[torch.Tensor] = None,
):
    dtype = torch.promote_types(delta.dtype, grad.dtype)  # exact upcast; the reference also computes in it
    # x_t + delta' is fused when everything shares delta's dtype (the usual case); else added after.
    fuse = model_input_base is not None and dtype == delta.dtype and model_input_base.dtype == dtype
    step_t, step = _ext.coef_args(step_size)
    radius_t, radius_f = _ext.coef_args(radius)
    new, x = _ops.pgd_step(
        delta.to(dtype), grad.to(dtype), step_t, step, radius_t, radius_f, norm == "l2", bool(normalize),
        model_input_base if fuse else None,
    )
    new = new.to(delta.dtype)
    if model_input_base is None:
        return new
    if not fuse:
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # compute_dtype(delta, grad)
        x_dtype = torch.promote_types(model_input_base.dtype, delta.dtype)
        x = (model_input_base.to(acc) + new.to(acc)).to(x_dtype)
    return new, x
