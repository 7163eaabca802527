"""CUDA C++ kernels behind the per-sample losses (csrc/cuda/losses.cu), forward and backward, no target tensor.

All three losses are functions of one residual r = a - b - c / k (k a per-sample divisor, c optional, b possibly
SeededNoise regenerated in-kernel):
    equivariant_mse:          a = pred, b = noise, c = delta (None for "original"), k = sigma
    equivariance_regularizer: a = pred_perturbed, b = pred_clean, c = omega ("equivariant"), k = 1
    consistency_distance:     a = pred, b = target, no c
metric 0: mean(r^2), 1: mean(|r|), 2: sqrt(sum r^2 + c_h^2) - c_h, per sample, fp32 accumulation (fp64 for fp64).
Forward: one reduction pass (per-warp partials, fixed-order per-sample sum: bitwise reproducible) that also
stores r in the inputs' dtype when a gradient will be needed. Backward: one elementwise pass over r writing
only the requested gradients: dL/da = g_b f(r), dL/db = -dL/da, dL/dc = -dL/da / k_b, with
f(r) = 2r/D | sign(r)/D | r/(loss_b + c_h). Stop-gradients (delta_detach, detach_anchor) detach the input.
"""
from __future__ import annotations


import torch

from ... import _dispatch
from ..noise import SeededNoise
from .residual import METRIC_CODES, equivariant_mse_terms, regularizer_terms, sigma_grad_refusal
from ..noisy_input.cuda_kernels import _like_layout, coef_args, ops

_OPS = ops()


@torch.library.register_fake("fastat_cuda::residual_loss")
def _fake_residual_loss(a, b, c, k, k_s, metric, huber_c, save_residual, seed, offset):
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    loss = a.new_empty((a.shape[0],), dtype=acc)
    if not save_residual:
        return loss, a.new_empty(0)
    return loss, (a.new_empty(a.shape) if seed >= 0 else _like_layout(a, b, c))


@torch.library.register_fake("fastat_cuda::residual_loss_backward")
def _fake_residual_backward(grad_loss, residual, loss, k, k_s, metric, huber_c, need_a, need_b, need_c):
    return [torch.empty_like(residual) for need in (need_a, need_b, need_c) if need]


class ResidualLossFunction(torch.autograd.Function):
    """Per-sample loss of r = a - b - c / k; b None means seeded noise (seed, offset)."""

    @staticmethod
    def forward(ctx, a, b, c, k, metric, huber_c, seed, offset):
        present = [t for t in (a, b, c) if t is not None]
        work = present[0].dtype
        for t in present[1:]:
            work = torch.promote_types(work, t.dtype)
        kt, k_s = coef_args(k, work) if c is not None else (None, 1.0)
        save = any(ctx.needs_input_grad[:3])
        loss, residual = _OPS.residual_loss(
            a.to(work), None if b is None else b.to(work), None if c is None else c.to(work),
            kt, k_s, metric, huber_c, save, seed, offset,
        )
        if save:
            ctx.save_for_backward(residual, loss)
        ctx.k = (kt, k_s)
        ctx.metric, ctx.huber_c = metric, huber_c
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (a, b, c))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        residual, loss = ctx.saved_tensors
        kt, k_s = ctx.k
        need = ctx.needs_input_grad[:3]
        outs = iter(_OPS.residual_loss_backward(grad_loss, residual, loss, kt, k_s, ctx.metric, ctx.huber_c, *need))
        grads = [next(outs).to(dtype) if n else None for n, dtype in zip(need, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def _residual_loss(a, b, c, k, metric: int, huber_c: float = 0.0):
    if isinstance(b, SeededNoise):
        # Seeded noise is fp32 in registers; it never requires grad.
        return ResidualLossFunction.apply(a, None, c, k, metric, huber_c, b.seed, b.offset)
    return ResidualLossFunction.apply(a, b, c, k, metric, huber_c, -1, 0)


@_dispatch.refuses_when(lambda pred, noise, delta, sigma, target: sigma_grad_refusal(sigma, target))
def equivariant_mse(pred, noise, delta, sigma, target):
    """CUDA kernels behind fastat.equivariant_mse (see residual.equivariant_mse_terms)."""
    return _residual_loss(*equivariant_mse_terms(pred, noise, delta, sigma, target), METRIC_CODES["l2"])


def equivariance_regularizer(pred_perturbed, pred_clean, omega, detach_anchor, mode):
    """CUDA kernels behind fastat.equivariance_regularizer (see residual.regularizer_terms)."""
    return _residual_loss(*regularizer_terms(pred_perturbed, pred_clean, omega, detach_anchor, mode), METRIC_CODES["l2"])


def consistency_distance(pred, target, metric, c):
    """CUDA kernels behind fastat.consistency_distance: r = pred - target."""
    return _residual_loss(pred, target, None, 1.0, METRIC_CODES[metric], float(c))
