"""Triton kernels for x_t = alpha * x0 + sigma * noise (+ delta), forward and backward.

Forward: one elementwise pass (reads x0, noise, delta; writes x_t); with a SeededNoise the noise is
regenerated in-kernel (tl.randn), so it is never read: 2 reads + 1 write instead of 3 + 1.
Backward: one pass reading grad_out and writing alpha*g (to x0) and sigma*g (to noise); the gradient
to delta is grad_out itself (cast to delta's dtype). Per-sample alpha/sigma that require grad
would need per-sample reductions: those calls are refused, so "auto" runs the reference.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _dispatch
from ... import _triton_utils as tu
from ..noise import SeededNoise
from .reference import output_dtype


@triton.jit
def _noisy_input_fwd_kernel(
    x0, noise, delta, out, alpha_ptr, alpha_s, sigma_ptr, sigma_s,
    B, D, C, S, seed, noise_offset, n_col_blocks,
    ALPHA_T: tl.constexpr, SIGMA_T: tl.constexpr, HAS_DELTA: tl.constexpr, SEEDED: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    alpha = tu.row_coef(alpha_ptr, alpha_s, rows, rows < B, ALPHA_T)
    sigma = tu.row_coef(sigma_ptr, sigma_s, rows, rows < B, SIGMA_T)
    if SEEDED:
        eps = tu.seeded_randn(seed, noise_offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
    else:
        eps = tl.load(noise + offs, mask=mask, other=0.0).to(tl.float32)
    y = alpha * tl.load(x0 + offs, mask=mask, other=0.0).to(tl.float32) + sigma * eps
    if HAS_DELTA:
        y += tl.load(delta + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _noisy_input_bwd_kernel(
    grad, grad_x0, grad_noise, alpha_ptr, alpha_s, sigma_ptr, sigma_s, B, D, n_col_blocks,
    ALPHA_T: tl.constexpr, SIGMA_T: tl.constexpr, WANT_X0: tl.constexpr, WANT_NOISE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    if WANT_X0:
        alpha = tu.row_coef(alpha_ptr, alpha_s, rows, rows < B, ALPHA_T)
        tl.store(grad_x0 + offs, (alpha * g).to(grad_x0.dtype.element_ty), mask=mask)
    if WANT_NOISE:
        sigma = tu.row_coef(sigma_ptr, sigma_s, rows, rows < B, SIGMA_T)
        tl.store(grad_noise + offs, (sigma * g).to(grad_noise.dtype.element_ty), mask=mask)


def _layout(x0, noise, delta, seeded):
    (x0, noise, delta), template, _ = tu.work_layout([x0, noise, delta], logical_order=seeded)
    return x0, noise, delta, template


def _fake_fwd(x0, noise, delta, alpha, alpha_s, sigma, sigma_s, seed, offset, out_dtype):
    template = _layout(x0, noise, delta, noise is None)[3]
    return tu.empty_like_layout(template, out_dtype)


@torch.library.custom_op("fastat::noisy_input", mutates_args=())
def noisy_input_op(
    x0: torch.Tensor, noise: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor], alpha_s: float, sigma: Optional[torch.Tensor], sigma_s: float,
    seed: int, offset: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """x_t = alpha * x0 + sigma * noise (+ delta); noise=None means tl.randn(seed, offset + i).
    alpha/sigma: [B] tensor, or None and the float alpha_s/sigma_s."""
    seeded = noise is None
    x0, noise, delta, template = _layout(x0, noise, delta, seeded)
    out = tu.empty_like_layout(template, out_dtype)
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    c, s, cl = tu.noise_layout_args(template)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    _noisy_input_fwd_kernel[grid](
        x0, x0 if seeded else noise, x0 if delta is None else delta, out,
        x0 if alpha is None else alpha, alpha_s, x0 if sigma is None else sigma, sigma_s,
        batch, numel, c, s, seed, offset, n_col,
        ALPHA_T=alpha is not None, SIGMA_T=sigma is not None, HAS_DELTA=delta is not None, SEEDED=seeded,
        CHANNELS_LAST=cl, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return out


noisy_input_op.register_fake(_fake_fwd)


def _fake_bwd(grad, alpha, alpha_s, sigma, sigma_s, x0_dtype, noise_dtype, want_x0, want_noise):
    (grad,), template, _ = tu.work_layout([grad])
    gx = tu.empty_like_layout(template, x0_dtype) if want_x0 else grad.new_empty(0, dtype=x0_dtype)
    gn = tu.empty_like_layout(template, noise_dtype) if want_noise else grad.new_empty(0, dtype=noise_dtype)
    return gx, gn


@torch.library.custom_op("fastat::noisy_input_backward", mutates_args=())
def noisy_input_backward_op(
    grad: torch.Tensor, alpha: Optional[torch.Tensor], alpha_s: float, sigma: Optional[torch.Tensor], sigma_s: float,
    x0_dtype: torch.dtype, noise_dtype: torch.dtype, want_x0: bool, want_noise: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alpha * grad, sigma * grad) in the dtypes of x0 and noise; an unwanted one is an empty tensor."""
    gx, gn = _fake_bwd(grad, alpha, alpha_s, sigma, sigma_s, x0_dtype, noise_dtype, want_x0, want_noise)
    (grad,), _, _ = tu.work_layout([grad])
    if grad.numel() == 0 or not (want_x0 or want_noise):
        return gx, gn
    batch, numel = tu.batch_numel(grad)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    _noisy_input_bwd_kernel[grid](
        grad, gx if want_x0 else grad, gn if want_noise else grad,
        grad if alpha is None else alpha, alpha_s, grad if sigma is None else sigma, sigma_s, batch, numel, n_col,
        ALPHA_T=alpha is not None, SIGMA_T=sigma is not None, WANT_X0=want_x0, WANT_NOISE=want_noise,
        BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return gx, gn


noisy_input_backward_op.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    x0, noise, delta, alpha, alpha_s, sigma, sigma_s, _, _, _ = inputs
    ctx.save_for_backward(alpha, sigma)
    ctx.coefs = (alpha_s, sigma_s)
    ctx.dtypes = (x0.dtype, x0.dtype if noise is None else noise.dtype, None if delta is None else delta.dtype)


def _backward(ctx, grad):
    alpha, sigma = ctx.saved_tensors
    alpha_s, sigma_s = ctx.coefs
    x0_dtype, noise_dtype, delta_dtype = ctx.dtypes
    want_x0, want_noise, want_delta = ctx.needs_input_grad[:3]
    gx = gn = gd = None
    if want_x0 or want_noise:
        gx, gn = noisy_input_backward_op(grad, alpha, alpha_s, sigma, sigma_s, x0_dtype, noise_dtype, want_x0, want_noise)
        gx, gn = (gx if want_x0 else None), (gn if want_noise else None)
    if want_delta:
        gd = grad.to(delta_dtype)
    return gx, gn, gd, None, None, None, None, None, None, None


noisy_input_op.register_autograd(_backward, setup_context=_setup_context)


def _refuse(x0, noise, alpha, sigma, delta=None) -> Optional[str]:
    tensors = [t for t in (x0, noise, delta) if isinstance(t, torch.Tensor)]
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs run on the reference (the kernels accumulate in fp32)"
    if torch.is_grad_enabled() and any(isinstance(c, torch.Tensor) and c.requires_grad for c in (alpha, sigma)):
        return "gradients to per-sample alpha/sigma are not implemented in the kernel"
    return None


def coef_pair(coef):
    """A float or [B] tensor as the (tensor or None, float) pair the custom ops take."""
    if isinstance(coef, torch.Tensor):
        return coef.contiguous(), 0.0  # a 0-d coefficient arrives expanded (stride 0)
    return None, float(coef)


@_dispatch.refuses_when(_refuse)
def noisy_input(x0, noise, alpha, sigma, delta=None):
    """Triton kernel behind fastat.noisy_input (same signature as the reference)."""
    seeded = isinstance(noise, SeededNoise)
    out_dtype = output_dtype(x0, x0 if seeded else noise, delta)
    a, a_s = coef_pair(alpha)
    s, s_s = coef_pair(sigma)
    return noisy_input_op(
        x0, None if seeded else noise, delta, a, a_s, s, s_s,
        noise.seed if seeded else 0, noise.offset if seeded else 0, out_dtype,
    )
