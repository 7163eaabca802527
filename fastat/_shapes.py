"""Per-sample shape helpers: every op reduces over all non-batch dims, whatever the rank or layout."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

Coef = Union[float, torch.Tensor]

REDUCTIONS = ("mean", "sum", "none")


def sample_dims(x: torch.Tensor) -> Tuple[int, ...]:
    """All dims but the batch dim (works for 2-D toy data, images, video, channels_last)."""
    return tuple(range(1, x.ndim))


def per_sample_numel(x: torch.Tensor) -> int:
    """D = numel(x[i])."""
    return math.prod(x.shape[1:])


_ONES = tuple((1,) * n for n in range(65))  # torch tensors have at most 64 dims


def column(coef: Optional[Coef], like: torch.Tensor) -> Optional[Coef]:
    """A float stays a float; a [B] tensor becomes [B, 1, ..., 1] to broadcast against `like`."""
    if isinstance(coef, torch.Tensor):
        return coef.reshape(coef.shape[0], *_ONES[like.ndim - 1])  # separate ints parse faster than one tuple
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


# ---------------------------------------------------------------------------------------------------
# The layout rule of every kernel (mirrored in C++ by csrc/cuda/host_common.h `work_layout`): operands that share
# one batch-outer dense layout (contiguous, channels_last, any dense order with the batch dim outermost) are read
# as they are and the outputs take their strides; otherwise every operand is copied to contiguous and the outputs
# are contiguous. Kernels see such tensors as [B, D] in memory order. With `logical` (kernels that draw noise
# in-kernel at each element's logical index) only contiguous and channels_last layouts are kept.


class Layout(NamedTuple):
    tensors: List[Optional[torch.Tensor]]  # the operands as the kernels read them
    strides: Optional[Tuple[int, ...]]  # the outputs' strides; None: contiguous
    channels_last: bool  # memory order (batch, spatial..., channel): the logical index needs (C, S)
    template: torch.Tensor  # the first operand as read: the outputs are shaped and laid out like it


def is_channels_last(x: torch.Tensor) -> bool:
    """Memory order (batch, spatial..., channel): what torch calls channels_last / channels_last_3d."""
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.ndim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (size-1 dims ignored)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def batch_outer_dense(x: torch.Tensor) -> bool:
    """Dense, with each sample one block of D elements (the batch dim outermost in memory)."""
    if x.ndim == 0 or not _dense(x):
        return False
    return x.shape[0] <= 1 or x.stride(0) == math.prod(x.shape[1:])


def work_layout(tensors: Sequence[Optional[torch.Tensor]], logical: bool = False) -> Layout:
    """The operands as the kernels read them, and the layout of the outputs (see the rule above). The first
    operand is never None."""
    for t in tensors:
        if t is not None and not t.is_contiguous():
            break
    else:
        return Layout(tensors, None, False, tensors[0])
    present = [t for t in tensors if t is not None]
    first = present[0]
    strides = first.stride()
    keep = batch_outer_dense(first) and (not logical or is_channels_last(first))
    if keep:
        for t in present[1:]:
            if t.stride() != strides:
                keep = False
                break
    if keep:
        return Layout(tensors, strides, is_channels_last(first), first)
    copies = [t.contiguous() if t is not None else None for t in tensors]
    return Layout(copies, None, False, copies[0])


def empty_output(layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """An output of the kernels: shaped and laid out like the layout's template (contiguous when the operands were
    copied). empty_like costs ~8k instructions against ~19k for torch.empty(shape, dtype=, device=)."""
    template = layout.template
    return torch.empty_like(template) if template.dtype is dtype else torch.empty_like(template, dtype=dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 data, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_type(x: torch.Tensor) -> str:
    """x.device.type, cheaply for the common devices (this runs on every op call)."""
    if x.is_cuda:
        return "cuda"
    return "cpu" if x.is_cpu else x.device.type


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """torch.promote_types, without its dispatch (~3.5k instructions) when the dtypes are the same."""
    return a if a is b else torch.promote_types(a, b)
