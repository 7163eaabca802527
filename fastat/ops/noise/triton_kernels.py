"""Triton kernel of fastat::gaussian_noise: element with logical (row-major) index i = tl.randn(seed, offset + i)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _triton_utils as tu
from ..._shapes import is_channels_last
from .reference import noise_layout


@triton.jit
def _gaussian_noise_kernel(
    out, B, D, C, S, seed, offset, n_col_blocks,
    CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    noise = tu.seeded_randn(seed, offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
    tu.store_tile(out, noise, pid, rows * D + cols, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(_gaussian_noise_kernel, pointers={"out": None},
                   constexprs={"CHANNELS_LAST": (False, True), "FLAT": (False, True)},
                   scalars={"seed": "i64", "offset": "i64"})


def gaussian_noise(like: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """fastat::gaussian_noise on the Triton backend (the op's signature)."""
    out = torch.empty_like(like, dtype=dtype, memory_format=noise_layout(like))
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    c, s, cl = tu.channels(out, is_channels_last(out))
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    tu.launch(_gaussian_noise_kernel, grid, (out, batch, numel, c, s, seed, offset, n_col),
              dict(CHANNELS_LAST=cl, FLAT=tu.is_flat(numel, bd), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return out
