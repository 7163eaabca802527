"""CUDA C++ kernels behind fastat.pgd_step and fastat.random_perturbation (csrc/cuda/perturbation.cu).

L2 step: a per-sample reduction pass (||g||^2, <delta, g>, ||delta||^2, non-finite count; per-warp partials
summed in a fixed order, so the result is bitwise reproducible), a tiny per-sample finalize, and one
elementwise pass delta' = s * (delta + c g) using ||delta + c g||^2 = ||delta||^2 + 2c<delta, g> + c^2||g||^2.
Linf step: one elementwise pass plus a restore pass that touches only samples with a non-finite gradient.
With model_input_base, x' = base + delta' is written by the same pass. Random starts draw from a seed held in
a 1-element device tensor (taken from the torch generator without a host sync) and regenerate their draws
instead of storing them. Results carry no autograd history (attack steps are not differentiated).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch
from ..noisy_input.cuda_kernels import _like_layout, coef_args, ops

_OPS = ops()


@torch.library.register_fake("fastat_cuda::pgd_step")
def _fake_pgd_step(delta, grad, base, step_size, radius, step_size_s, radius_s, l2, normalize):
    out = _like_layout(delta, grad, base)
    return out, (torch.empty_like(out) if base is not None else delta.new_empty(0))


@torch.library.register_fake("fastat_cuda::random_perturbation")
def _fake_random(like, seed, radius, radius_s, l2, normal, dtype):
    return _like_layout(like, dtype=dtype)


def _refuse_pgd(delta, grad, step_size, radius, norm="l2", normalize=True, model_input_base=None) -> Optional[str]:
    # Found by the first GPU run (cross-backend test): without this the kernel silently dropped the graph.
    leaves = [t for t in (delta, grad, model_input_base, step_size, radius) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return "pgd_step kernels are not differentiable (call them under torch.no_grad() or on detached tensors)"
    return None


@_dispatch.refuses_when(_refuse_pgd)
def pgd_step(delta, grad, step_size, radius, norm="l2", normalize=True, model_input_base=None):
    """CUDA kernels behind fastat.pgd_step (same signature as the reference). Inputs of mixed dtypes are widened
    to their promoted dtype (exact) and the result rounded back to delta's dtype, as the reference does."""
    work = torch.promote_types(delta.dtype, grad.dtype)
    base = model_input_base
    fused_base = base is not None and base.dtype == delta.dtype and work == delta.dtype
    step, step_s = coef_args(step_size, work)
    rad, rad_s = coef_args(radius, work)
    with torch.no_grad():
        new, x = _OPS.pgd_step(
            delta.detach().to(work), grad.detach().to(work), base.detach() if fused_base else None,
            step, rad, step_s, rad_s, norm == "l2", bool(normalize),
        )
        new = new.to(delta.dtype)
        if base is None:
            return new
        if not fused_base:
            acc = torch.float64 if torch.float64 in (base.dtype, delta.dtype) else torch.float32
            x = (base.detach().to(acc) + new.to(acc)).to(torch.promote_types(base.dtype, delta.dtype))
        return new, x


def draw_seed(generator, device) -> torch.Tensor:
    """A 1-element int64 seed drawn on `device` (from `generator` if given): no host round trip."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def random_perturbation(like, radius, norm="l2", init="uniform", generator=None, dtype=None):
    """CUDA kernels behind fastat.random_perturbation (same signature as the reference; the same distribution,
    not the same draws: the stream is Philox from a seed drawn from `generator`)."""
    dtype = dtype or like.dtype
    if init == "zero":
        return torch.zeros_like(like, dtype=dtype)
    rad, rad_s = coef_args(radius, dtype)
    return _OPS.random_perturbation(like.detach(), draw_seed(generator, like.device), rad, rad_s, norm == "l2", init == "normal", dtype)
