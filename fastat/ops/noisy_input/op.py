"""The operators fastat::noisy_input and fastat::noisy_input_backward: schemas, fakes, autograd, backend support.

    noisy_input(x0, noise?, delta?, alpha?, sigma?, alpha_s, sigma_s, seed, offset, dtype, timesteps?)
        x_t = alpha_b * x0 + sigma_b * noise (+ delta) in `dtype` (fp32 accumulation; fp64 for fp64). A per-sample
        coefficient is a contiguous [B] tensor in the accumulation dtype, or None and the float `*_s`.
        noise None: the noise is gaussian_noise(x0, seed, offset), drawn in-kernel, never stored.
        timesteps (int64 [B], q_sample): alpha and sigma are contiguous per-timestep tables [T] instead, and
        alpha_b = alpha[timesteps[b]] is gathered in the kernel (a timestep outside [0, T) gives NaN coefficients).
    noisy_input_backward(grad, alpha?, sigma?, alpha_s, sigma_s, x0_dtype?, noise_dtype?)
        (alpha_b * grad in x0_dtype, sigma_b * grad in noise_dtype); a None dtype: not wanted (an empty tensor).
Outputs follow the kernels' layout rule (fastat._shapes.work_layout). Gradients into tensor coefficients are the
reference's alone (feature "coefficient_grad"): calls that need them run the reference, whose autograd has them.
"""
from __future__ import annotations

import torch

from ..._dispatch import ANY_DEVICE, OpDef, Support
from ..._shapes import device_type, empty_output, per_sample_numel, work_layout
from . import reference

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)  # the Triton kernels accumulate in fp32 only


def _triton():
    from . import triton_kernels

    return triton_kernels


KERNELS = {"torch": lambda: reference, "triton": _triton}


def _fake_backward(grad, alpha, sigma, alpha_s, sigma_s, x0_dtype, noise_dtype):
    layout = work_layout([grad])

    def out(dtype):
        return grad.new_empty(0) if dtype is None else empty_output(layout, dtype)

    return out(x0_dtype), out(noise_dtype)


class NoisyInputBackwardFunction(torch.autograd.Function):
    """The backward is linear in grad: its own backward, for a double backward, is the noisy input again."""

    @staticmethod
    def forward(ctx, route, grad, alpha, sigma, alpha_s, sigma_s, x0_dtype, noise_dtype):
        ctx.route, ctx.coefs, ctx.dtype = route, (alpha, sigma, alpha_s, sigma_s), grad.dtype
        return route.backward(grad, alpha, sigma, alpha_s, sigma_s, x0_dtype, noise_dtype)

    @staticmethod
    def backward(ctx, grad_x0, grad_noise):
        alpha, sigma, alpha_s, sigma_s = ctx.coefs
        if not ctx.needs_input_grad[1]:
            return (None,) * 8
        x0 = grad_x0 if grad_x0 is not None and grad_x0.numel() else None
        noise = grad_noise if grad_noise is not None and grad_noise.numel() else None
        if x0 is not None and noise is not None:
            g = ctx.route.forward(x0, noise, None, alpha, sigma, alpha_s, sigma_s, 0, 0, ctx.dtype, None)
        elif x0 is not None:
            g = ctx.route.backward(x0, alpha, None, alpha_s, 0.0, ctx.dtype, None)[0]
        elif noise is not None:
            g = ctx.route.backward(noise, sigma, None, sigma_s, 0.0, ctx.dtype, None)[0]
        else:
            g = None
        return None, g, None, None, None, None, None, None


class NoisyInputFunction(torch.autograd.Function):
    """d x_t / d x0 = alpha_b, d x_t / d noise = sigma_b, d x_t / d delta = 1 (the op's one autograd definition)."""

    @staticmethod
    def forward(ctx, route, x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps=None):
        ctx.route = route
        ctx.coefs = (alpha, sigma, alpha_s, sigma_s)
        ctx.timesteps = timesteps
        ctx.dtypes = (x0.dtype, None if noise is None else noise.dtype, None if delta is None else delta.dtype)
        return route.forward(x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps)

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        alpha, sigma, alpha_s, sigma_s = ctx.coefs
        if ctx.timesteps is not None:  # per-timestep tables: the backward kernels take per-sample coefficients
            alpha, sigma = (None if c is None else c.index_select(0, ctx.timesteps) for c in (alpha, sigma))
        x0_dtype, noise_dtype, delta_dtype = ctx.dtypes
        grad_x0 = grad_noise = None
        if need[1] or need[2]:
            args = (grad, alpha, sigma, alpha_s, sigma_s, x0_dtype if need[1] else None, noise_dtype if need[2] else None)
            if torch.is_grad_enabled():  # create_graph: keep the backward differentiable
                grad_x0, grad_noise = NoisyInputBackwardFunction.apply(ctx.route, *args)
            else:
                grad_x0, grad_noise = ctx.route.backward(*args)
        grad_delta = grad.to(delta_dtype) if need[3] else None
        return (None, grad_x0 if need[1] else None, grad_noise if need[2] else None, grad_delta) + (None,) * 8


def _fake(x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps=None):
    return empty_output(work_layout([x0, noise, delta], logical=noise is None), dtype)


def _support(differentiable_coefficients: bool, cpp_checks_values: bool):
    return {
        "torch": Support(ANY_DEVICE, features=("coefficient_grad",) if differentiable_coefficients else ()),
        "triton": Support(("cuda", "cpu"), dtypes=HALF_AND_FLOAT),
        "cuda": Support(("cuda",)),
        "cpp": Support(("cpu",), auto_min_sample_numel=32, checks_values=cpp_checks_values),
    }


NOISY_INPUT_BACKWARD = OpDef(
    "noisy_input_backward",
    "(Tensor grad, Tensor? alpha, Tensor? sigma, float alpha_s, float sigma_s, ScalarType? x0_dtype, "
    "ScalarType? noise_dtype) -> (Tensor, Tensor)",
    fake=_fake_backward,
    python_kernels=KERNELS,
    support=_support(False, False),
    key=lambda grad, *rest: (device_type(grad), grad.dtype, per_sample_numel(grad)),
    function=NoisyInputBackwardFunction,
)

NOISY_INPUT = OpDef(
    "noisy_input",
    "(Tensor x0, Tensor? noise, Tensor? delta, Tensor? alpha, Tensor? sigma, float alpha_s, float sigma_s, "
    "int seed, int offset, ScalarType dtype, Tensor? timesteps=None) -> Tensor",
    fake=_fake,
    python_kernels=KERNELS,
    support=_support(True, True),
    features={"coefficient_grad": "gradients into tensor-valued alpha/sigma"},
    key=lambda x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps=None: (
        device_type(x0), dtype, per_sample_numel(x0)),
    function=NoisyInputFunction,
    backward=NOISY_INPUT_BACKWARD,
)
