"""CPU C++ kernel of the noise-injected input (torch.ops.fastat_cpu.noisy_input), with its autograd.

x_t = alpha_i * x0 + sigma_i * noise (+ delta) in one pass (fp32 math for fp16/bf16/fp32, fp64 for fp64);
backward: dx0 = alpha_i * g, dnoise = sigma_i * g (one pass each, only when needed), ddelta = g.
Importing this module loads (and if needed builds) the CPU extension.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch, _ext
from ..._shapes import Coef
from .reference import output_dtype

_ops = _ext.load("cpp")


@torch.library.register_fake("fastat_cpu::noisy_input")
def _noisy_input_fake(x0, noise, delta, alpha_t, alpha, sigma_t, sigma):
    return _ext.empty_like_kernel(x0, noise, delta)


@torch.library.register_fake("fastat_cpu::scale_by_sample")
def _scale_by_sample_fake(grad, coef_t, coef):
    return _ext.empty_like_kernel(grad)


def _setup_context(ctx, inputs, output):
    _, _, _, alpha_t, alpha, sigma_t, sigma = inputs
    ctx.coefs = (alpha_t, alpha, sigma_t, sigma)


def _backward(ctx, grad):
    alpha_t, alpha, sigma_t, sigma = ctx.coefs
    need_x0, need_noise, need_delta = ctx.needs_input_grad[:3]
    grad_x0 = _ops.scale_by_sample(grad, alpha_t, alpha) if need_x0 else None
    grad_noise = _ops.scale_by_sample(grad, sigma_t, sigma) if need_noise else None
    return grad_x0, grad_noise, grad if need_delta else None, None, None, None, None


torch.library.register_autograd("fastat_cpu::noisy_input", _backward, setup_context=_setup_context)


def _scale_setup_context(ctx, inputs, output):
    _, ctx.coef_t, ctx.coef = inputs


def _scale_backward(ctx, grad):  # linear in grad: the backward is the same scaling (double backward)
    return _ops.scale_by_sample(grad, ctx.coef_t, ctx.coef), None, None


torch.library.register_autograd("fastat_cpu::scale_by_sample", _scale_backward, setup_context=_scale_setup_context)


class _NoisyInput(torch.autograd.Function):
    """The glue's own autograd node (same formulas as the op-level registration, less Python per call)."""

    @staticmethod
    def forward(ctx, x0, noise, delta, alpha_t, alpha, sigma_t, sigma):
        ctx.coefs = (alpha_t, alpha, sigma_t, sigma)
        with _ext.below_autograd():
            return _ops.noisy_input(x0, noise, delta, alpha_t, alpha, sigma_t, sigma)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)  # scale_by_sample keeps its op-level autograd (double backward)


def _coefficient_needs_grad(x0, noise, alpha, sigma, delta=None) -> Optional[str]:
    for name, coef in (("alpha", alpha), ("sigma", sigma)):
        if isinstance(coef, torch.Tensor) and coef.requires_grad and torch.is_grad_enabled():
            return f"{name} requires grad; the cpp kernel differentiates x0, noise and delta only"
    return None


@_dispatch.refuses_when(_coefficient_needs_grad)
def noisy_input(
    x0: torch.Tensor, noise, alpha: Coef, sigma: Coef, delta: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):  # SeededNoise: read as a tensor here (in-kernel only in Triton)
        from ..noise import materialize

        dtype = output_dtype(x0, x0, delta)  # seeded noise takes no part in the promotion
        noise = materialize(noise, x0)
    else:
        dtype = output_dtype(x0, noise, delta)
    # Upcasting to the output dtype is exact; the kernel then sees one dtype.
    x0, noise = x0.to(dtype), noise.to(dtype)
    delta = delta.to(dtype) if delta is not None else None
    alpha_t, alpha_f = _ext.coef_args(alpha)
    sigma_t, sigma_f = _ext.coef_args(sigma)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x0, noise, delta)):
        return _NoisyInput.apply(x0, noise, delta, alpha_t, alpha_f, sigma_t, sigma_f)
    with _ext.below_autograd():
        return _ops.noisy_input(x0, noise, delta, alpha_t, alpha_f, sigma_t, sigma_f)
