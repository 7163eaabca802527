"""Launch helpers shared by fastat's Triton kernels: tile sizes, warps, layouts, coefficient arguments.

Every fastat kernel sees its tensors as a [B, D] matrix in memory order (D = elements per sample) and
works on 2-D tiles [BLOCK_B, BLOCK_D]: many short rows per program for toy data (D = 2), one slice of
a long row for images (D = 3*512*512). Per-sample reductions loop over columns inside a program and
split long rows over SPLIT programs whose partials a later pass sums in a fixed order (deterministic).

Under TRITON_INTERPRET=1 (CPU) a program instance costs ~0.5-0.8 ms whatever its size, so tiles are
as big as possible and rows are never split; on a GPU tiles hold ~4096 elements and autotuning is not
used (the shapes are memory-bound and a fixed heuristic avoids first-call tuning stalls).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._backend import triton_interpreting


GPU_TILE = 4096  # elements per program on a GPU: 16 KB of fp32 per operand, 8 warps
INTERPRET_TILE = 1 << 16  # one big numpy array per program when interpreting


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# Test hooks: force small tiles / several programs per row so the multi-block and split-reduction
# paths run under the interpreter too (see `overrides`).
_OVERRIDES = {"tile": None, "split": None}


@contextlib.contextmanager
def overrides(tile: Optional[int] = None, split: Optional[int] = None) -> Iterator[None]:
    """Temporarily cap the tile size (elements per program) and/or force the reduction split."""
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(tile=tile, split=split)
    try:
        yield
    finally:
        _OVERRIDES.update(saved)


def tile(batch: int, numel: int) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) for a [batch, numel] elementwise or reduction pass."""
    cap = INTERPRET_TILE if triton_interpreting() else GPU_TILE
    if _OVERRIDES["tile"] is not None:
        cap = _OVERRIDES["tile"]
    block_d = max(min(next_pow2(numel), cap), 1)
    block_b = max(min(next_pow2(batch), cap // block_d), 1)
    warps = 1 if triton_interpreting() else max(1, min(8, block_b * block_d // 512))
    return block_b, block_d, warps


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split(batch: int, numel: int, block_b: int, block_d: int, device: torch.device) -> int:
    """Programs per row group for a reduction: enough to fill the GPU (~4 waves), 1 when interpreting."""
    if _OVERRIDES["split"] is not None:
        return int(max(1, min(_OVERRIDES["split"], math.ceil(numel / block_d))))
    if triton_interpreting() or device.type != "cuda":
        return 1  # (checked after the override, so tests can split rows under the interpreter)
    row_groups = math.ceil(batch / block_b)
    col_blocks = math.ceil(numel / block_d)
    want = math.ceil(4 * _sm_count(device) / max(row_groups, 1))
    return int(max(1, min(want, col_blocks, 64)))


def chunk(numel: int, block_d: int, nsplit: int) -> int:
    """Columns handled by one of the `nsplit` programs of a row group (a multiple of BLOCK_D)."""
    return math.ceil(math.ceil(numel / block_d) / nsplit) * block_d


# ---------------------------------------------------------------------------------------------------
# Layouts: kernels read memory order, so any dense layout whose batch dim is outermost (contiguous,
# channels_last, channels_last_3d, ...) works without a copy when every operand shares it.


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (size-1 dims ignored)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _batch_outer_dense(x: torch.Tensor) -> bool:
    if x.ndim == 0 or not _dense(x):
        return False
    if x.shape[0] <= 1:
        return True
    return x.stride(0) == math.prod(x.shape[1:])


def is_channels_last(x: torch.Tensor) -> bool:
    """Memory order (batch, spatial..., channel): what torch calls channels_last / channels_last_3d."""
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.ndim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def common_strides(tensors: Sequence[Optional[torch.Tensor]], *, logical_order: bool = False) -> Optional[Tuple[int, ...]]:
    """The strides every operand can be read with in memory order, or None if they must be copied.

    With `logical_order` (in-kernel noise, indexed by the row-major position) only contiguous and
    channels_last layouts qualify: the kernels can map those memory positions back to logical ones.
    """
    present = [t for t in tensors if t is not None]
    first = present[0]
    if not _batch_outer_dense(first):
        return None
    if logical_order and not (first.is_contiguous() or is_channels_last(first)):
        return None
    strides = first.stride()
    for t in present[1:]:
        if t.stride() != strides and not (t.is_contiguous() and first.is_contiguous()):
            return None
    return strides


def work_layout(tensors: Sequence[Optional[torch.Tensor]], *, logical_order: bool = False):
    """(tensors in one common memory layout, empty_like-able template, channels_last flag).

    Operands already sharing a batch-outer dense layout are used as they are; otherwise every one is
    made contiguous (one copy each). The result of a kernel has the template's strides.
    """
    present = [t for t in tensors if t is not None]
    if common_strides(present, logical_order=logical_order) is None:
        tensors = [t.contiguous() if t is not None else None for t in tensors]
        present = [t for t in tensors if t is not None]
    template = present[0]
    return list(tensors), template, is_channels_last(template)


def empty_like_layout(template: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output with exactly the template's shape and strides."""
    return torch.empty_strided(template.shape, template.stride(), dtype=dtype, device=template.device)


def output_like(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output in like's layout when that is batch-outer dense, else contiguous (nothing is copied)."""
    if _batch_outer_dense(like):
        return empty_like_layout(like, dtype)
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def launch_grid(batch: int, numel: int):
    """(grid, BLOCK_B, BLOCK_D, warps, n_col_blocks) for a 1-D grid of [BLOCK_B, BLOCK_D] tiles.

    One grid axis only: CUDA limits axes 1 and 2 to 65535 programs, so (row group, column block)
    is decoded from the program id."""
    block_b, block_d, warps = tile(batch, numel)
    n_col = triton.cdiv(numel, block_d)
    return (triton.cdiv(batch, block_b) * n_col,), block_b, block_d, warps, n_col


def reduction_grid(batch: int, numel: int, device: torch.device):
    """(grid, BLOCK_B, BLOCK_D, warps, nsplit, chunk) for a per-sample reduction: each of the nsplit
    programs of a row group loops over `chunk` columns and writes one partial per row."""
    block_b, block_d, warps = tile(batch, numel)
    nsplit = split(batch, numel, block_b, block_d, device)
    return (triton.cdiv(batch, block_b) * nsplit,), block_b, block_d, warps, nsplit, chunk(numel, block_d, nsplit)


def noise_layout_args(template: torch.Tensor):
    """(C, S, channels_last) to regenerate logical-order noise in the template's memory order."""
    if is_channels_last(template):
        return template.shape[1], math.prod(template.shape[2:]), True
    return 1, 1, False


def batch_numel(x: torch.Tensor) -> Tuple[int, int]:
    """(B, D) of a [B, ...] tensor."""
    batch = x.shape[0]
    return batch, (x.numel() // batch if batch else math.prod(x.shape[1:]))


# ---------------------------------------------------------------------------------------------------
# In-kernel helpers shared by the op families.


@triton.jit
def tile_index(pid, n_col_blocks, B, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows [BB,1], cols [1,BD], mask) of program `pid` in a 1-D grid of tiles, int64."""
    rows = (pid // n_col_blocks) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    cols = (pid % n_col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    return rows, cols, (rows < B) & (cols < D)


@triton.jit
def row_coef(ptr, scalar, rows, row_mask, IS_TENSOR: tl.constexpr):
    """Per-sample coefficient as fp32 [BB,1]: loaded from a [B] tensor, or a runtime scalar."""
    # one return statement: the compiler (unlike the interpreter) rejects returns inside branches
    if IS_TENSOR:
        value = tl.load(ptr + rows, mask=row_mask, other=1.0).to(tl.float32)  # 1: no 0/0 in padding rows
    else:
        value = tl.zeros(rows.shape, tl.float32) + scalar
    return value


@triton.jit
def logical_index(rows, cols, D, C, S, CHANNELS_LAST: tl.constexpr):
    """Row-major logical index of memory positions (rows [BB,1], cols [1,BD], int64): for channels_last
    a memory position p = s*C + c inside a sample has logical position c*S + s."""
    if CHANNELS_LAST:
        index = rows * D + (cols % C) * S + cols // C
    else:
        index = rows * D + cols
    return index


@triton.jit
def seeded_randn(seed, offset, index):
    """fp32 N(0, 1) for int64 logical indices: tl.randn(seed, offset + index), as the torch reference."""
    return tl.randn(seed, offset + index)
