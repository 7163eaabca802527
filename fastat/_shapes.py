"""Per-sample shape helpers: every op reduces over all non-batch dims, whatever the rank or layout."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

Coef = Union[float, torch.Tensor]

REDUCTIONS = ("mean", "sum", "none")


def sample_dims(x: torch.Tensor) -> Tuple[int, ...]:
    """All dims but the batch dim (works for 2-D toy data, images, video, channels_last)."""
    return tuple(range(1, x.ndim))


def per_sample_numel(x: torch.Tensor) -> int:
    """D = numel(x[i])."""
    return math.prod(x.shape[1:])


def column(coef: Optional[Coef], like: torch.Tensor) -> Optional[Coef]:
    """A float stays a float; a [B] tensor becomes [B, 1, ..., 1] to broadcast against `like`."""
    if isinstance(coef, torch.Tensor):
        return coef.reshape((coef.shape[0],) + (1,) * (like.ndim - 1))
    return coef


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 stays fp64."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over every non-batch dim -> [B]."""
    return x.sum(dim=sample_dims(x)) if x.ndim > 1 else x


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over every non-batch dim -> [B] (0 for samples with no elements)."""
    return sum_flat(x) / max(per_sample_numel(x), 1)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """'none' -> [B]; 'sum' -> scalar; 'mean' -> scalar mean over the batch (0 for an empty batch)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(per_sample.shape[0], 1)
