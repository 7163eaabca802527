"""Seeded Gaussian noise (docs/maths.md §4.1): noise that is regenerated from (seed, offset) instead of stored.

`gaussian_noise(like, seed, offset)` draws N(0, 1) noise with Philox4x32-10 + Box-Muller exactly as
triton's `tl.randn(seed, offset + i)` does for the element of row-major logical index i, so the
torch reference and every kernel produce the same values (bit-exact integers; log/cos within a few
fp32 ulp).

`SeededNoise(seed, offset)` stands in for a noise tensor: `noisy_input(x0, SeededNoise(s), ...)` and
`equivariant_mse(pred, SeededNoise(s), ...)` use the noise `gaussian_noise(x0, s)`, which the Triton
kernels regenerate in-kernel, so the noise tensor never exists in memory. Seeded noise is always fp32
and does not take part in dtype promotion (an fp16 x0 gives an fp16 x_t).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from ... import _dispatch
from ..._checks import FLOAT_DTYPES, check_like, check_tensor
from ..._shapes import device_type
from . import reference
from .op import GAUSSIAN_NOISE
from .reference import SEED_LIMIT

FLOATS = frozenset(FLOAT_DTYPES)
is_compiling = torch.compiler.is_compiling


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int in [0, 2**63), got {type(value).__name__}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class SeededNoise:
    """Gaussian noise defined by (seed, offset) instead of stored values.

    Where an op accepts a noise tensor shaped like `like` ([B, ...]), SeededNoise(seed, offset) means
    the fp32 tensor `gaussian_noise(like, seed, offset)`: element with row-major index i is
    tl.randn(seed, offset + i). Use one (seed, offset) per training step (e.g. offset = step * like.numel(),
    see `next`). Under CUDA graph capture or torch.compile the values are baked in as constants.
    """

    seed: int
    offset: int = 0

    def __post_init__(self):
        _check_int("SeededNoise.seed", self.seed)
        _check_int("SeededNoise.offset", self.offset)

    def materialize(self, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The noise as a tensor shaped like `like` (what the kernels regenerate in-kernel)."""
        return gaussian_noise(like, self.seed, self.offset, dtype=dtype)

    def next(self, like: torch.Tensor) -> "SeededNoise":
        """The following, non-overlapping stream: offset advanced by numel(like)."""
        return SeededNoise(self.seed, self.offset + like.numel())


Noise = Union[torch.Tensor, SeededNoise]


def gaussian_noise(
    like: torch.Tensor, seed: int, offset: int = 0, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """N(0, 1) noise shaped like `like` from (seed, offset): element i (row-major) = tl.randn(seed, offset + i).

    The result is channels_last when `like` is, else contiguous; dtype `dtype` (default like.dtype),
    computed in fp32 and rounded once. Deterministic: the same (seed, offset) gives the same tensor on
    every backend and device.
    """
    # the common case checked inline (this glue costs as much as the kernel at small sizes), the full checks otherwise
    if not isinstance(like, torch.Tensor) or like.dtype not in FLOATS or like.ndim < 1:
        check_tensor("like", like)
    if type(seed) is not int or not 0 <= seed < SEED_LIMIT:
        _check_int("seed", seed)
    if type(offset) is not int or not 0 <= offset < SEED_LIMIT:
        _check_int("offset", offset)
    total = like.numel()
    if offset + total > SEED_LIMIT:
        raise ValueError(f"offset + like.numel() must stay below 2**63, got {offset} + {total}")
    if dtype is None:
        dtype = like.dtype
    elif dtype not in FLOATS:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    args = (like, seed, offset, dtype)
    if is_compiling():
        return reference.gaussian_noise(*args) if _dispatch.traced_as_reference() else GAUSSIAN_NOISE.overload(*args)
    batch = like.shape[0]
    return _dispatch.select(GAUSSIAN_NOISE, device_type(like), dtype, 0, total // batch if batch else 0).forward(*args)


def check_noise(name: str, noise, ref_name: str, ref: torch.Tensor) -> Noise:
    """A noise tensor shaped like `ref`, or a SeededNoise."""
    if isinstance(noise, SeededNoise):
        if noise.offset + ref.numel() > SEED_LIMIT:
            raise ValueError(f"{name}.offset + {ref_name}.numel() must stay below 2**63")
        return noise
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a fastat.SeededNoise, got {type(noise).__name__}")
    return check_like(name, noise, ref_name, ref)


def materialize(noise: Noise, like: torch.Tensor) -> torch.Tensor:
    """A noise tensor as is; a SeededNoise as its fp32 tensor shaped like `like`, computed by the pure-torch
    reference (the references call this, so the oracle never depends on a kernel)."""
    if isinstance(noise, SeededNoise):
        return reference.gaussian_noise(like, noise.seed, noise.offset, torch.float32)
    return noise


_dispatch.register_public("gaussian_noise", GAUSSIAN_NOISE)
