"""Triton kernel for seeded Gaussian noise (element with row-major index i = tl.randn(seed, offset + i))."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton_utils as tu
from .reference import noise_layout


@triton.jit
def _gaussian_noise_kernel(
    out, B, D, C, S, seed, offset, n_col_blocks,
    CHANNELS_LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    noise = tu.seeded_randn(seed, offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
    tl.store(out + rows * D + cols, noise.to(out.dtype.element_ty), mask=mask)


def _fake_noise(like, seed, offset, dtype):
    return torch.empty_like(like, dtype=dtype, memory_format=noise_layout(like))


@torch.library.custom_op("fastat::gaussian_noise", mutates_args=())
def gaussian_noise_op(like: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    out = _fake_noise(like, seed, offset, dtype)
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    c, s, cl = tu.noise_layout_args(out)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    _gaussian_noise_kernel[grid](
        out, batch, numel, c, s, seed, offset, n_col, CHANNELS_LAST=cl, BLOCK_B=bb, BLOCK_D=bd, num_warps=warps
    )
    return out


gaussian_noise_op.register_fake(_fake_noise)


def gaussian_noise(like: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """Triton kernel behind fastat.gaussian_noise (same signature as the reference)."""
    return gaussian_noise_op(like, seed, offset, dtype)
