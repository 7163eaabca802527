"""CUDA C++ kernels behind fastat.noisy_input and fastat.gaussian_noise (csrc/cuda/noisy_input.cu).

Forward: one elementwise pass x_t = alpha_b * x0 + sigma_b * noise (+ delta) with 16-byte packs; with a
SeededNoise the noise is regenerated in-kernel from (seed, offset) with triton's tl.randn stream (Philox
words and uniforms bit-identical to fastat.ops.noise.reference; the Gaussian within a few fp32 ulp).
Backward: dL/ddelta = g (no kernel), dL/dx0 = alpha_b * g, dL/dnoise = sigma_b * g (one pass each, only when
asked for). Mixed input dtypes are widened to the output dtype first (exact), so the kernels see one dtype.

Also the shared glue conventions of the CUDA backend: `coef_args`, `ops()` and the fake implementations
that let torch.compile trace the fastat_cuda ops without running them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import _dispatch, _ext
from ..noise import SeededNoise
from .reference import output_dtype

_OPS = _ext.load("cuda")  # torch.ops.fastat_cuda; raises BackendUnavailableError when not built or no GPU


def ops():
    """torch.ops.fastat_cuda (the extension is loaded when this module is imported)."""
    return _OPS


def coef_args(coef, data_dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], float]:
    """A per-sample coefficient as the C++ ops take it: (contiguous fp32 [B] tensor, or fp64 for fp64 data, or
    None; float used when the tensor is None). A 0-d coefficient arrives expanded (stride 0): made dense here."""
    if isinstance(coef, torch.Tensor):
        acc = torch.float64 if data_dtype == torch.float64 else torch.float32
        return coef.detach().to(acc).contiguous(), 0.0
    return None, float(coef)


def _like_layout(*tensors: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The output the C++ op allocates: empty_like(first) when all share a batch-major dense layout, else contiguous."""
    return _ext.empty_like_kernel(*[t for t in tensors if t is not None], dtype=dtype)


@torch.library.register_fake("fastat_cuda::noisy_input")
def _fake_noisy_input(x0, noise, alpha, sigma, alpha_s, sigma_s, delta):
    return _like_layout(x0, noise, delta)


@torch.library.register_fake("fastat_cuda::noisy_input_seeded")
def _fake_noisy_input_seeded(x0, seed, offset, alpha, sigma, alpha_s, sigma_s, delta):
    return x0.new_empty(x0.shape)


@torch.library.register_fake("fastat_cuda::gaussian_noise")
def _fake_gaussian_noise(like, seed, offset, dtype):
    return like.new_empty(like.shape, dtype=dtype)


@torch.library.register_fake("fastat_cuda::scale_per_sample")
def _fake_scale(grad, coef, coef_s):
    return _like_layout(grad)


class NoisyInputFunction(torch.autograd.Function):
    """x_t = alpha * x0 + sigma * noise (+ delta); `noise` None means seeded noise (seed, offset)."""

    @staticmethod
    def forward(ctx, x0, noise, delta, alpha, sigma, seed, offset, out_dtype):
        a, a_s = coef_args(alpha, out_dtype)
        s, s_s = coef_args(sigma, out_dtype)
        x = x0.to(out_dtype)
        d = None if delta is None else delta.to(out_dtype)
        if noise is None:
            out = _OPS.noisy_input_seeded(x, seed, offset, a, s, a_s, s_s, d)
        else:
            out = _OPS.noisy_input(x, noise.to(out_dtype), a, s, a_s, s_s, d)
        ctx.coefs = (a, a_s, s, s_s)
        ctx.dtypes = (x0.dtype, None if noise is None else noise.dtype, None if delta is None else delta.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, a_s, s, s_s = ctx.coefs
        x0_dtype, noise_dtype, delta_dtype = ctx.dtypes
        g_x0 = g_noise = g_delta = None
        if ctx.needs_input_grad[0]:
            g_x0 = _OPS.scale_per_sample(grad, a, a_s).to(x0_dtype)
        if ctx.needs_input_grad[1]:
            g_noise = _OPS.scale_per_sample(grad, s, s_s).to(noise_dtype)
        if ctx.needs_input_grad[2]:
            g_delta = grad.to(delta_dtype)
        return g_x0, g_noise, g_delta, None, None, None, None, None


def _refuse(x0, noise, alpha, sigma, delta=None) -> Optional[str]:
    if torch.is_grad_enabled() and any(isinstance(c, torch.Tensor) and c.requires_grad for c in (alpha, sigma)):
        return "gradients to per-sample alpha/sigma are not implemented in the CUDA kernel"
    return None


@_dispatch.refuses_when(_refuse)
def noisy_input(x0, noise, alpha, sigma, delta=None):
    """CUDA kernel behind fastat.noisy_input (same signature as the reference)."""
    if isinstance(noise, SeededNoise):
        # Seeded noise is fp32 in registers and takes no part in the dtype promotion.
        return NoisyInputFunction.apply(x0, None, delta, alpha, sigma, noise.seed, noise.offset, output_dtype(x0, x0, delta))
    return NoisyInputFunction.apply(x0, noise, delta, alpha, sigma, 0, 0, output_dtype(x0, noise, delta))


def gaussian_noise(like, seed, offset, dtype):
    """CUDA kernel behind fastat.gaussian_noise: element i (row-major) = tl.randn(seed, offset + i), computed
    in fp32 and rounded once to `dtype`; channels_last when `like` is (as the reference), else contiguous."""
    from ..noise.reference import noise_layout

    out = _OPS.gaussian_noise(like, seed, offset, dtype)
    layout = noise_layout(like)
    return out if layout == torch.contiguous_format else out.contiguous(memory_format=layout)
