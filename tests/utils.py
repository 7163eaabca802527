"""Shared test helpers: layouts, tolerances and the list of backends this machine can run."""
from __future__ import annotations

from typing import List, Tuple

import torch

from fastat._backend import BACKENDS, backend_status, device_refusal

# Shapes covering 2-D toy data, images and video latents (odd sizes on purpose).
SHAPES = [(7, 2), (3, 5), (4, 3, 5, 6), (2, 4, 3, 5, 6), (1, 1), (5, 3, 17, 9)]
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (atol, rtol) of an op's output against the fp64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x in another memory layout."""
    if kind == "channels_last":
        if x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.ndim == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x
    if kind == "noncontiguous":
        # Interleave with padding along the last dim, then slice it away: same values, strided view.
        padded = torch.stack([x, torch.zeros_like(x)], dim=-1)
        return padded[..., 0]
    return x.contiguous()


def runnable_backends(device: str = "cpu") -> List[str]:
    """Backends that can run on `device` here (the reference always; kernels once they exist)."""
    return [b for b in BACKENDS if backend_status(b)[0] and device_refusal(b, device) is None]


def tol(dtype: torch.dtype) -> Tuple[float, float]:
    return TOLERANCES[dtype]
