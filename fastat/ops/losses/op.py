"""The operators fastat::residual_loss and fastat::residual_loss_backward: schemas, fakes, autograd, support.

Every fused loss is one per-sample reduction of the residual r = a - b - c / sigma_b:

    residual_loss(a, b?, c?, sigma?, weight?, sigma_s, weight_s, metric, huber_c, reduction, seed, offset,
                  save_residual) -> (loss, per_sample, residual)
        metric 0: v_b = mean_flat(r^2); 1: mean_flat(|r|); 2 (pseudo-Huber): sqrt(sum_flat(r^2) + h^2) - h
        reduction 0 (none): loss = w_b v_b [B]; 1 (sum): sum_b w_b v_b; 2 (mean): the sum / B (0 for B = 0)
        b None: seeded noise gaussian_noise(a, seed, offset), drawn in-kernel. per_sample: v_b [B] (fp32, fp64 for
        fp64 data). residual: r when save_residual (what the backward reads), else empty; in the accumulation dtype
        (fp32, fp64 for fp64 data), so that each gradient is rounded once, as in the reference.
    residual_loss_backward(grad_loss, residual, per_sample, sigma?, weight?, sigma_s, weight_s, metric, huber_c,
                           reduction, a_dtype?, b_dtype?, c_dtype?) -> (da, db, dc)
        da = g_b f(r), db = -da, dc = -da / sigma_b, g_b = grad_loss(_b) w_b (/B for the mean),
        f(r) = 2r/D | sign(r)/D | r / (v_b + h) (0 where v_b + h = 0); a None dtype: not wanted (empty).
Why store r instead of recomputing it in the backward: recomputing reads a, b and c again (3 N reads) where
reading r is N, so the pair moves (3 + 1 + 1 + k) N elements instead of (3 + 3 + k) N (k gradients written); with
fp16/bf16 data r takes twice an element's bytes, (3 + 2 + 2 + k) N against (3 + 3 + k) N.
Gradients into tensor sigma or weight are the reference's alone (features "sigma_grad", "weight_grad").
"""
from __future__ import annotations

import torch

from ..._dispatch import ANY_DEVICE, OpDef, Support
from ..._shapes import accumulation_dtype, device_type, empty_output, per_sample_numel, work_layout
from . import reference
from .reference import NONE, residual_dtype

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)  # the Triton kernels accumulate in fp32 only


def _triton():
    from . import triton_kernels

    return triton_kernels


KERNELS = {"torch": lambda: reference, "triton": _triton}


class ResidualLossFunction(torch.autograd.Function):
    """The loss's gradients from the stored residual (one elementwise pass); per_sample and residual are by-products."""

    @staticmethod
    def forward(ctx, route, a, b, c, sigma, weight, sigma_s, weight_s, metric, huber_c, reduction, seed, offset,
                save_residual):
        loss, per_sample, residual = route.forward(a, b, c, sigma, weight, sigma_s, weight_s, metric, huber_c,
                                                   reduction, seed, offset, save_residual)
        ctx.set_materialize_grads(False)
        ctx.route, ctx.saved = route, (residual, per_sample, sigma, weight)
        ctx.args = (sigma_s, weight_s, metric, huber_c, reduction)
        ctx.dtypes = (a.dtype, None if b is None else b.dtype, None if c is None else c.dtype)
        return loss, per_sample, residual

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_sample, _grad_residual):
        if _grad_enabled():  # create_graph=True: differentiable once
            return _raise_when_differentiated(_backward(ctx, grad_loss))
        return _backward(ctx, grad_loss)


def _backward(ctx, grad_loss, *_unused):
    """The gradients (da, db, dc) from the stored residual; without the @once_differentiable wrapper on the usual
    path (grad mode off in the engine), which saves its no_grad context per backward."""
    need = ctx.needs_input_grad
    if grad_loss is None or not (need[1] or need[2] or need[3]):
        return (None,) * 14
    residual, per_sample, sigma, weight = ctx.saved
    if residual.numel() == 0 and per_sample.numel() != 0:
        raise RuntimeError("fastat::residual_loss ran with save_residual=False, so it cannot be differentiated")
    a_dtype, b_dtype, c_dtype = ctx.dtypes
    ga, gb, gc = ctx.route.backward(grad_loss, residual, per_sample, sigma, weight, *ctx.args,
                                    a_dtype if need[1] else None, b_dtype if need[2] else None,
                                    c_dtype if need[3] else None)
    return (None, ga if need[1] else None, gb if need[2] else None, gc if need[3] else None) + (None,) * 10


_grad_enabled = torch.is_grad_enabled
TWICE = ("fastat: the fused losses (equivariant_mse, equivariance_regularizer, consistency_distance) are differentiable "
         "once; a second derivative through them needs the reference: fastat.use_backend('torch')")


def _raise_when_differentiated(grads):
    """The gradients, differentiable only to raise when differentiated again. Unlike @once_differentiable also when
    the incoming gradient has no graph: a gradient penalty through the loss must fail, not lose its second-order term."""
    tensors = [g for g in grads if isinstance(g, torch.Tensor)]
    if not tensors:
        return grads
    fakes = torch._C._functions.DelayedError(TWICE, len(tensors))(*[g.detach().requires_grad_() for g in tensors])
    fakes = iter((fakes,) if isinstance(fakes, torch.Tensor) else fakes)
    return tuple(next(fakes) if isinstance(g, torch.Tensor) else g for g in grads)


def _fake(a, b, c, sigma, weight, sigma_s, weight_s, metric, huber_c, reduction, seed, offset, save_residual):
    acc = accumulation_dtype(residual_dtype(a, b, c))
    batch = a.shape[0]
    loss = a.new_empty((batch,) if reduction == NONE else (), dtype=acc)
    per_sample = a.new_empty((batch,), dtype=acc)
    if not save_residual:
        return loss, per_sample, a.new_empty(0, dtype=acc)
    return loss, per_sample, empty_output(work_layout([a, b, c], logical=b is None), acc)


def _fake_backward(grad_loss, residual, per_sample, sigma, weight, sigma_s, weight_s, metric, huber_c, reduction,
                   a_dtype, b_dtype, c_dtype):
    layout = work_layout([residual])

    def out(dtype):
        return residual.new_empty(0) if dtype is None else empty_output(layout, dtype)

    return out(a_dtype), out(b_dtype), out(c_dtype)


def _support(features, cpp_checks_values):
    return {
        "torch": Support(ANY_DEVICE, features=features),
        "triton": Support(("cuda", "cpu"), dtypes=HALF_AND_FLOAT),
        "cuda": Support(("cuda",)),
        "cpp": Support(("cpu",), auto_min_sample_numel=32, checks_values=cpp_checks_values),
    }


RESIDUAL_LOSS_BACKWARD = OpDef(
    "residual_loss_backward",
    "(Tensor grad_loss, Tensor residual, Tensor per_sample, Tensor? sigma, Tensor? weight, float sigma_s, "
    "float weight_s, int metric, float huber_c, int reduction, ScalarType? a_dtype, ScalarType? b_dtype, "
    "ScalarType? c_dtype) -> (Tensor, Tensor, Tensor)",
    fake=_fake_backward,
    python_kernels=KERNELS,
    support=_support((), False),
    key=lambda grad_loss, residual, *rest: (device_type(residual), residual.dtype, per_sample_numel(residual)),
)

RESIDUAL_LOSS = OpDef(
    "residual_loss",
    "(Tensor a, Tensor? b, Tensor? c, Tensor? sigma, Tensor? weight, float sigma_s, float weight_s, int metric, "
    "float huber_c, int reduction, int seed, int offset, bool save_residual) -> (Tensor, Tensor, Tensor)",
    fake=_fake,
    python_kernels=KERNELS,
    support=_support(("sigma_grad", "weight_grad"), True),
    features={"sigma_grad": "gradients into a tensor-valued sigma", "weight_grad": "gradients into a tensor-valued weight"},
    key=lambda a, b, c, *rest: (device_type(a), residual_dtype(a, b, c), per_sample_numel(a)),
    function=ResidualLossFunction,
    backward=RESIDUAL_LOSS_BACKWARD,
    public_name="residual_loss (equivariant_mse, equivariance_regularizer, consistency_distance)",
)
