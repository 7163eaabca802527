"""CPU C++ kernels of the per-sample losses (torch.ops.fastat_cpu.residual_loss and its backward).

All three losses are one residual r = a - (b + k_i * c) reduced per sample:
    equivariant_mse:          a = pred, b = noise, c = delta (detached for "delta_detach"), k_i = 1/sigma_i
    equivariance_regularizer: a = pred_perturbed, b = pred_clean (detached if detach_anchor), c = omega, k = 1
    consistency_distance:     a = pred, b = target; metric l2 -> mean r^2, l1 -> mean |r|,
                              pseudo_huber -> sqrt(sum r^2 + c^2) - c
The forward reads the inputs once and, when a gradient is needed, writes r (fp32; fp64 for fp64) so the
backward is one pass writing only the gradients that are needed. Returns the per-sample loss [B] in fp32
(fp64 for fp64 inputs), like the reference. Importing this module loads (and if needed builds) the CPU
extension.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _dispatch, _ext
from ..._shapes import Coef
from .residual import METRIC_CODES, equivariant_mse_terms, regularizer_terms, sigma_grad_refusal

_ops = _ext.load("cpp")



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastat_cpu::residual_loss")
def _residual_loss_fake(a, b, c, k_t, k, metric, huber_c, save_residual):
    acc = _acc_dtype(a.dtype)
    residual = _ext.empty_like_kernel(a, b, c, dtype=acc) if save_residual else a.new_empty((0,), dtype=acc)
    return a.new_empty((a.shape[0],), dtype=acc), residual


@torch.library.register_fake("fastat_cpu::residual_loss_backward")
def _residual_loss_backward_fake(residual, grad_loss, loss, k_t, k, metric, huber_c, need_a, need_b, need_c, dtype):
    def make(need):
        return _ext.empty_like_kernel(residual, dtype=dtype) if need else residual.new_empty((0,), dtype=dtype)

    return make(need_a), make(need_b), make(need_c)


def _setup_context(ctx, inputs, output):
    a, _, _, k_t, k, metric, huber_c, save_residual = inputs
    loss, residual = output
    ctx.set_materialize_grads(False)  # the residual output gets no gradient: skip a zero-filled buffer
    if save_residual:
        ctx.save_for_backward(residual, loss)
    ctx.args = (k_t, k, metric, huber_c, save_residual, a.dtype)


def _backward(ctx, grad_loss, _grad_residual):
    k_t, k, metric, huber_c, saved, dtype = ctx.args
    if not saved:
        raise RuntimeError("fastat_cpu::residual_loss was called with save_residual=False; it cannot be differentiated")
    residual, loss = ctx.saved_tensors
    need_a, need_b, need_c = ctx.needs_input_grad[:3]
    if grad_loss is None:
        return (None,) * 8
    ga, gb, gc = _ops.residual_loss_backward(
        residual, grad_loss, loss, k_t, k, metric, huber_c, need_a, need_b, need_c, dtype
    )
    return (ga if need_a else None, gb if need_b else None, gc if need_c else None) + (None,) * 5


torch.library.register_autograd("fastat_cpu::residual_loss", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward through fastat's cpp losses is not implemented; use fastat.set_backend('torch') for it"
    )


torch.library.register_autograd(
    "fastat_cpu::residual_loss_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None
)


class _ResidualLoss(torch.autograd.Function):
    """The glue's own autograd node: the same formulas as the op-level registration above, with less
    Python per call (the op runs below autograd, its backward is one residual_loss_backward call)."""

    @staticmethod
    def forward(ctx, a, b, c, k_t, k, metric, huber_c):
        with _ext.below_autograd():
            loss, residual = _ops.residual_loss(a, b, c, k_t, k, metric, huber_c, True)
        ctx.save_for_backward(residual, loss)
        ctx.args = (k_t, k, metric, huber_c, a.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        k_t, k, metric, huber_c, dtype = ctx.args
        residual, loss = ctx.saved_tensors
        need_a, need_b, need_c = ctx.needs_input_grad[:3]
        with _ext.below_autograd():
            ga, gb, gc = _ops.residual_loss_backward(
                residual, grad_loss, loss, k_t, k, metric, huber_c, need_a, need_b, need_c, dtype
            )
        return ga if need_a else None, gb if need_b else None, gc if need_c else None, None, None, None, None


def _residual(a, b, c, k: Coef, metric: str = "l2", huber_c: float = 0.0) -> torch.Tensor:
    present = [t for t in (a, b, c) if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)  # exact upcast: the kernel sees one dtype
    a, b = a.to(dtype), b.to(dtype)
    c = c.to(dtype) if c is not None else None
    k_t, k_f = _ext.coef_args(k)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, c) if t is not None):
        return _ResidualLoss.apply(a, b, c, k_t, k_f, METRIC_CODES[metric], float(huber_c))
    with _ext.below_autograd():
        return _ops.residual_loss(a, b, c, k_t, k_f, METRIC_CODES[metric], float(huber_c), False)[0]


@_dispatch.refuses_when(lambda pred, noise, delta, sigma, target: sigma_grad_refusal(sigma, target))
def equivariant_mse(
    pred: torch.Tensor, noise, delta: Optional[torch.Tensor], sigma: Coef, target: str
) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):  # SeededNoise: read as a tensor here (in-kernel only in Triton)
        from ..noise import materialize

        noise = materialize(noise, pred)
    a, b, c, k = equivariant_mse_terms(pred, noise, delta, sigma, target)
    if c is None:
        return _residual(a, b, None, 0.0)
    # the C++ kernel multiplies: r = a - b - c * (1/k)
    return _residual(a, b, c, 1.0 / k if not isinstance(k, torch.Tensor) else 1.0 / k.detach().double())


def equivariance_regularizer(
    pred_perturbed: torch.Tensor,
    pred_clean: torch.Tensor,
    omega: Optional[torch.Tensor],
    detach_anchor: bool,
    mode: str,
) -> torch.Tensor:
    return _residual(*regularizer_terms(pred_perturbed, pred_clean, omega, detach_anchor, mode))


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, metric: str, c: float) -> torch.Tensor:
    return _residual(pred, target, None, 0.0, metric, c)
