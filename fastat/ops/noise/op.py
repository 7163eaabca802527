"""The operator fastat::gaussian_noise: its schema, fake and what each backend's kernel supports."""
from __future__ import annotations

import torch

from ..._dispatch import ANY_DEVICE, OpDef, Support
from ..._shapes import device_type, per_sample_numel
from . import reference


def _triton():
    from . import triton_kernels

    return triton_kernels


def _fake(like, seed, offset, dtype):
    return torch.empty_like(like, dtype=dtype, memory_format=reference.noise_layout(like))


GAUSSIAN_NOISE = OpDef(
    "gaussian_noise",
    "(Tensor like, int seed, int offset, ScalarType dtype) -> Tensor",
    fake=_fake,
    python_kernels={"torch": lambda: reference, "triton": _triton},
    support={
        "torch": Support(ANY_DEVICE),
        "triton": Support(("cuda", "cpu")),
        "cuda": Support(("cuda",)),
        "cpp": Support(("cpu",)),
    },
    key=lambda like, seed, offset, dtype: (device_type(like), dtype, per_sample_numel(like)),
)
