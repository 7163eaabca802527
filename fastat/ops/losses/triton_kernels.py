"""Triton kernels for the per-sample losses, forward and backward, with no target tensor materialised.

All three losses are functions of one residual per element,
    r = a - b - c / k          (k: per-sample float or [B] tensor; c optional; b may be seeded noise)
    equivariant_mse:          a = pred, b = noise, c = delta (None for "original"), k = sigma
    equivariance_regularizer: a = pred_perturbed, b = pred_clean, c = omega ("equivariant"), k = 1
    consistency_distance:     a = pred, b = target, no c
and a per-sample reduction: METRIC 0 mean(r^2), 1 mean(|r|), 2 sqrt(sum r^2 + c_h^2) - c_h.

Forward (one reduction pass; reads a, b, c; b is regenerated in-kernel for SeededNoise): writes the
per-sample loss and, when some input requires grad, the residual r in the inputs' dtype. Backward
(one elementwise pass; reads r; writes only the gradients that are needed):
    dL/da = g_i * r * {2/D | sign(r)/D | 1/(loss_i + c_h)},  dL/db = -dL/da,  dL/dc = -dL/da / k.
Why store r instead of recomputing it in backward: recomputing reads a, b and c again (3 N reads)
where reading r is N, so the pair costs (3 + 1 + 1 + k) N element transfers instead of (3 + 3 + k) N,
k = number of gradients written (e.g. 7 N instead of 8 N for pred + delta); r is kept in the inputs'
dtype (not 2r/D, which underflows in fp16 for large D). Stop-gradients ("delta_detach",
detach_anchor) are expressed by detaching the input, so autograd never asks for that gradient.
Pseudo-Huber with c_h = 0 at r = 0 gives gradient 0 (the reference's autograd gives NaN there).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _dispatch
from ... import _triton_utils as tu
from ..noise import SeededNoise
from .residual import METRIC_CODES, equivariant_mse_terms, regularizer_terms, sigma_grad_refusal
from ..noisy_input.triton_kernels import coef_pair

MEAN_SQUARE = METRIC_CODES["l2"]


@triton.jit
def _loss_fwd_kernel(
    a, b, c, res, partials, loss, k_ptr, k_s, B, D, C, S, seed, noise_offset, chunk, nsplit, inv_d, huber_c,
    K_T: tl.constexpr, HAS_C: tl.constexpr, SEEDED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    METRIC: tl.constexpr, SAVE_RES: tl.constexpr, FINISH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    part = pid % nsplit
    rows = (pid // nsplit) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    row_mask = rows < B
    if HAS_C:
        k = tu.row_coef(k_ptr, k_s, rows, row_mask, K_T)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for start in range(0, chunk, BLOCK_D):
        cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
        mask = row_mask & (cols < D)
        offs = rows * D + cols
        r = tl.load(a + offs, mask=mask, other=0.0).to(tl.float32)
        if SEEDED:
            r -= tu.seeded_randn(seed, noise_offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
        else:
            r -= tl.load(b + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_C:
            r -= tl.load(c + offs, mask=mask, other=0.0).to(tl.float32) / k
        r = tl.where(mask, r, 0.0)
        if SAVE_RES:
            tl.store(res + offs, r.to(res.dtype.element_ty), mask=mask)
        if METRIC == 1:
            acc += tl.abs(r)
        else:
            acc += r * r
    total = tl.sum(acc, axis=1)[:, None]
    if FINISH:
        if METRIC == 2:
            value = tl.sqrt(total + huber_c * huber_c) - huber_c
        else:
            value = total * inv_d
        tl.store(loss + rows, value, mask=row_mask)
    else:
        tl.store(partials + rows * nsplit + part, total, mask=row_mask)


@triton.jit
def _loss_bwd_kernel(
    res, gout, loss, ga, gb, gc, k_ptr, k_s, B, D, n_col_blocks, inv_d, huber_c,
    K_T: tl.constexpr, METRIC: tl.constexpr, WANT_A: tl.constexpr, WANT_B: tl.constexpr, WANT_C: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    row_mask = rows < B
    r = tl.load(res + offs, mask=mask, other=0.0).to(tl.float32)
    go = tl.load(gout + rows, mask=row_mask, other=0.0).to(tl.float32)
    if METRIC == 0:
        g = (2.0 * inv_d * go) * r
    elif METRIC == 1:
        g = (go * inv_d) * tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    else:
        denom = tl.load(loss + rows, mask=row_mask, other=1.0) + huber_c
        g = tl.where(denom > 0, go / tl.where(denom > 0, denom, 1.0), 0.0) * r
    if WANT_A:
        tl.store(ga + offs, g.to(ga.dtype.element_ty), mask=mask)
    if WANT_B:
        tl.store(gb + offs, (-g).to(gb.dtype.element_ty), mask=mask)
    if WANT_C:
        k = tu.row_coef(k_ptr, k_s, rows, row_mask, K_T)
        tl.store(gc + offs, (-g / k).to(gc.dtype.element_ty), mask=mask)


def _residual_dtype(a, b, c):
    dtype = a.dtype
    for t in (b, c):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _fake_fwd(a, b, c, k, k_s, metric, huber_c, seed, offset, save_residual):
    (a, b, c), template, _ = tu.work_layout([a, b, c], logical_order=b is None)
    loss = a.new_empty((a.shape[0],), dtype=torch.float32)
    res_dtype = _residual_dtype(a, b, c)
    residual = tu.empty_like_layout(template, res_dtype) if save_residual else a.new_empty(0, dtype=res_dtype)
    return loss, residual


@torch.library.custom_op("fastat::residual_loss", mutates_args=())
def residual_loss_op(
    a: torch.Tensor, b: Optional[torch.Tensor], c: Optional[torch.Tensor], k: Optional[torch.Tensor], k_s: float,
    metric: int, huber_c: float, seed: int, offset: int, save_residual: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss [B] fp32, residual r = a - b - c/k or an empty tensor); b=None: seeded noise."""
    loss, residual = _fake_fwd(a, b, c, k, k_s, metric, huber_c, seed, offset, save_residual)
    seeded = b is None
    (a, b, c), template, _ = tu.work_layout([a, b, c], logical_order=seeded)
    batch, numel = tu.batch_numel(a)
    if batch == 0:
        return loss, residual
    if numel == 0:
        return loss.zero_(), residual
    grid, bb, bd, warps, nsplit, chunk = tu.reduction_grid(batch, numel, a.device)
    finish = nsplit == 1
    partials = loss if finish else torch.empty((batch, nsplit), dtype=torch.float32, device=a.device)
    ch, sp, cl = tu.noise_layout_args(template)
    _loss_fwd_kernel[grid](
        a, a if seeded else b, a if c is None else c, residual if save_residual else a, partials, loss,
        a if k is None else k, k_s, batch, numel, ch, sp, seed, offset, chunk, nsplit, 1.0 / numel, huber_c,
        K_T=k is not None, HAS_C=c is not None, SEEDED=seeded, CHANNELS_LAST=cl, METRIC=metric,
        SAVE_RES=save_residual, FINISH=finish, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    if not finish:  # fixed-order sum of the per-program partials (deterministic)
        total = partials.sum(dim=1)
        if metric == 2:
            loss.copy_((total + huber_c * huber_c).sqrt() - huber_c)
        else:
            loss.copy_(total / numel)
    return loss, residual


residual_loss_op.register_fake(_fake_fwd)


def _fake_bwd(gout, residual, loss, k, k_s, metric, huber_c, a_dtype, b_dtype, c_dtype, want_a, want_b, want_c):
    def grad(want, dtype):
        return tu.empty_like_layout(residual, dtype) if want else residual.new_empty(0, dtype=dtype)

    return grad(want_a, a_dtype), grad(want_b, b_dtype), grad(want_c, c_dtype)


@torch.library.custom_op("fastat::residual_loss_backward", mutates_args=())
def residual_loss_backward_op(
    gout: torch.Tensor, residual: torch.Tensor, loss: torch.Tensor, k: Optional[torch.Tensor], k_s: float,
    metric: int, huber_c: float, a_dtype: torch.dtype, b_dtype: torch.dtype, c_dtype: torch.dtype,
    want_a: bool, want_b: bool, want_c: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i gout_i * loss_i to a, b, c (an unwanted one is an empty tensor)."""
    ga, gb, gc = _fake_bwd(gout, residual, loss, k, k_s, metric, huber_c, a_dtype, b_dtype, c_dtype, want_a, want_b, want_c)
    if residual.numel() == 0 or not (want_a or want_b or want_c):
        return ga, gb, gc
    batch, numel = tu.batch_numel(residual)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    _loss_bwd_kernel[grid](
        residual, gout.contiguous(), loss, ga if want_a else residual, gb if want_b else residual,
        gc if want_c else residual, residual if k is None else k, k_s, batch, numel, n_col, 1.0 / numel, huber_c,
        K_T=k is not None, METRIC=metric, WANT_A=want_a, WANT_B=want_b, WANT_C=want_c,
        BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return ga, gb, gc


residual_loss_backward_op.register_fake(_fake_bwd)


def _setup_context(ctx, inputs, output):
    a, b, c, k, k_s, metric, huber_c, _, _, save_residual = inputs
    loss, residual = output
    ctx.save_for_backward(residual, loss, k)
    ctx.args = (k_s, metric, huber_c, save_residual)
    ctx.dtypes = (a.dtype, a.dtype if b is None else b.dtype, a.dtype if c is None else c.dtype)


def _backward(ctx, grad_loss, _grad_residual):
    residual, loss, k = ctx.saved_tensors
    k_s, metric, huber_c, save_residual = ctx.args
    want_a, want_b, want_c = ctx.needs_input_grad[:3]
    if not (want_a or want_b or want_c):
        return (None,) * 10
    if not save_residual:
        raise RuntimeError("fastat::residual_loss was called with save_residual=False but a gradient is needed")
    ga, gb, gc = residual_loss_backward_op(grad_loss, residual, loss, k, k_s, metric, huber_c, *ctx.dtypes, want_a, want_b, want_c)
    return (ga if want_a else None, gb if want_b else None, gc if want_c else None) + (None,) * 7


residual_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _residual_loss(a, b, c, k, metric: int, huber_c: float = 0.0) -> torch.Tensor:
    seeded = isinstance(b, SeededNoise)
    k_t, k_s = coef_pair(k if c is not None else 1.0)
    tensors = [t for t in (a, None if seeded else b, c, k_t) if t is not None]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    loss, _ = residual_loss_op(
        a, None if seeded else b, c, k_t, k_s, metric, float(huber_c),
        b.seed if seeded else 0, b.offset if seeded else 0, save,
    )
    return loss


def _refuse(*tensors_and_coefs) -> Optional[str]:
    tensors = [t for t in tensors_and_coefs if isinstance(t, torch.Tensor)]
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs run on the reference (the kernels accumulate in fp32)"
    return None


@_dispatch.refuses_when(lambda pred, noise, delta, sigma, target: sigma_grad_refusal(sigma, target) or _refuse(pred, noise, delta))
def equivariant_mse(pred, noise, delta, sigma, target):
    """Triton kernels behind fastat.equivariant_mse (see residual.equivariant_mse_terms)."""
    return _residual_loss(*equivariant_mse_terms(pred, noise, delta, sigma, target), MEAN_SQUARE)


@_dispatch.refuses_when(lambda pp, pc, omega, detach_anchor, mode: _refuse(pp, pc, omega))
def equivariance_regularizer(pred_perturbed, pred_clean, omega, detach_anchor, mode):
    """Triton kernels behind fastat.equivariance_regularizer (see residual.regularizer_terms)."""
    return _residual_loss(*regularizer_terms(pred_perturbed, pred_clean, omega, detach_anchor, mode), MEAN_SQUARE)


@_dispatch.refuses_when(lambda pred, target, metric, c: _refuse(pred, target))
def consistency_distance(pred, target, metric, c):
    """Triton kernels behind fastat.consistency_distance: r = pred - target."""
    return _residual_loss(pred, target, None, 1.0, METRIC_CODES[metric], c)
