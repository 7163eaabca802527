"""The operators fastat::pgd_step and fastat::random_perturbation: schemas, fakes and backend support.

    pgd_step(delta, grad, base?, step_size?, radius?, step_size_s, radius_s, l2, normalize) -> (delta', x')
        One projected ascent step (see reference.pgd_step); x' = base + delta' (dtype promote(base, delta)), an
        empty tensor when base is None. A per-sample coefficient is a contiguous [B] tensor in the accumulation
        dtype, or None and the float `*_s`. An update, not a differentiable function: autograd falls through the
        operator; calls that need a gradient through the step run the reference (feature "differentiable").
    random_perturbation(like, seed, radius?, radius_s, l2, normal, dtype) -> delta
        A random start drawn from the int64 `seed` held in a 1-element tensor on like's device (so a generator can
        supply it without a host sync): every backend draws the same values (see reference.random_perturbation).
Outputs follow the kernels' layout rule (fastat._shapes.work_layout); random starts are channels_last when `like`
is, else contiguous.
"""
from __future__ import annotations

import torch

from ..._dispatch import ANY_DEVICE, OpDef, Support
from ..._shapes import device_type, empty_output, per_sample_numel, promote, work_layout
from ..noise.reference import noise_layout
from . import reference

HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)  # the Triton kernels accumulate in fp32 only


def _triton():
    from . import triton_kernels

    return triton_kernels


KERNELS = {"torch": lambda: reference, "triton": _triton}


def _fake_pgd(delta, grad, base, step_size, radius, step_size_s, radius_s, l2, normalize):
    layout = work_layout([delta, grad, base])
    out = empty_output(layout, delta.dtype)
    if base is None:
        return out, delta.new_empty(0)
    return out, empty_output(layout, promote(base.dtype, delta.dtype))


def _pgd_dtype(delta, grad, base):
    dtype = promote(delta.dtype, grad.dtype)
    return dtype if base is None else promote(dtype, base.dtype)


PGD_STEP = OpDef(
    "pgd_step",
    "(Tensor delta, Tensor grad, Tensor? base, Tensor? step_size, Tensor? radius, float step_size_s, "
    "float radius_s, bool l2, bool normalize) -> (Tensor, Tensor)",
    fake=_fake_pgd,
    python_kernels=KERNELS,
    support={
        "torch": Support(ANY_DEVICE, features=("differentiable",)),
        "triton": Support(("cuda", "cpu"), dtypes=HALF_AND_FLOAT),
        "cuda": Support(("cuda",)),
        "cpp": Support(("cpu",), auto_min_sample_numel=32, checks_values=True),
    },
    features={"differentiable": "gradients through the step (not differentiable there: call it under torch.no_grad() "
                                "or on detached tensors)"},
    key=lambda delta, grad, base, *rest: (device_type(delta), _pgd_dtype(delta, grad, base), per_sample_numel(delta)),
)


def _fake_random(like, seed, radius, radius_s, l2, normal, dtype):
    return torch.empty_like(like, dtype=dtype, memory_format=noise_layout(like))


RANDOM_PERTURBATION = OpDef(
    "random_perturbation",
    "(Tensor like, Tensor seed, Tensor? radius, float radius_s, bool l2, bool normal, ScalarType dtype) -> Tensor",
    fake=_fake_random,
    python_kernels=KERNELS,
    support={
        "torch": Support(ANY_DEVICE),
        "triton": Support(("cuda", "cpu"), dtypes=HALF_AND_FLOAT),
        "cuda": Support(("cuda",)),
        "cpp": Support(("cpu",), checks_values=True),
    },
    key=lambda like, seed, radius, radius_s, l2, normal, dtype: (device_type(like), dtype, per_sample_numel(like)),
    # auto on CPU draws with torch's generator: its sampler beats Philox in C++ at every size measured (fastat bench
    # --suites overhead, 8x3x8x8 L2 start: reference 60 us, cpp 91 us; the L2 start draws its normals twice).
    auto_order={"cpu": ()},
)
