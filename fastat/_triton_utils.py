"""Launch helpers shared by fastat's Triton kernels: tile sizes, warps, layouts, coefficient arguments.

Every fastat kernel sees its tensors as a [B, D] matrix in memory order (D = elements per sample) and
works on 2-D tiles [BLOCK_B, BLOCK_D]: many short rows per program for toy data (D = 2), one slice of
a long row for images (D = 3*512*512). Per-sample reductions loop over columns inside a program and
split long rows over SPLIT programs whose partials a later pass sums in a fixed order (deterministic);
the programs of a reduction fill the GPU (a persistent grid of ~2 programs per SM, whatever B).
Small samples (D <= FLAT_MAX_D, a power of two) are "flat": a tile of whole consecutive samples is read
and written as one contiguous run (`load_tile`/`store_tile`), so its accesses are 128-bit.

Under TRITON_INTERPRET=1 (CPU) a program instance costs ~0.5-0.8 ms whatever its size, so tiles are
as big as possible and rows are never split; on a GPU tiles hold ~4096 elements and autotuning is not
used (the shapes are memory-bound and a fixed heuristic avoids first-call tuning stalls).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _checks
from ._backend import triton_interpreting


GPU_TILE = 4096  # elements per program on a GPU: 16 KB of fp32 per operand, 8 warps
INTERPRET_TILE = 1 << 16  # one big numpy array per program when interpreting
FLAT_MAX_D = 16  # samples up to this size (a power of two) are read as whole contiguous runs
PROGRAMS_PER_SM = 2  # a reduction's persistent grid: programs per SM over all row groups


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


# The kernels are decorated when their module is imported, so the interpreter is on or off for the process.
INTERPRETING = triton_interpreting()


@functools.lru_cache(maxsize=4096)
def _tile(batch: int, numel: int, cap: int) -> Tuple[int, int, int]:
    block_d = max(min(next_pow2(numel), cap), 1)
    block_b = max(min(next_pow2(batch), cap // block_d), 1)
    warps = 1 if INTERPRETING else max(1, min(8, block_b * block_d // 512))
    return block_b, block_d, warps


def tile(batch: int, numel: int) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) for a [batch, numel] elementwise or reduction pass."""
    cap = _OVERRIDES["tile"] or (INTERPRET_TILE if INTERPRETING else GPU_TILE)
    return _tile(batch, numel, cap)


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_TARGET: Dict[str, Optional[int]] = {"sm_count": None}  # see `plan_for_device`


@contextlib.contextmanager
def plan_for_device(sm_count: int, interpreting: bool = False) -> Iterator[None]:
    """Plan tiles, warps and grids as for a GPU with `sm_count` SMs, whatever runs the kernels: the kernel
    audit (fastat.bench.audit) records launches under the interpreter and compiles them for that GPU."""
    global INTERPRETING
    saved = (INTERPRETING, _TARGET["sm_count"])
    INTERPRETING, _TARGET["sm_count"] = interpreting, sm_count
    _tile.cache_clear()
    try:
        yield
    finally:
        INTERPRETING, _TARGET["sm_count"] = saved
        _tile.cache_clear()


def gpu_sms(device: torch.device) -> Optional[int]:
    """SMs of the GPU a launch on `device` is planned for; None when the kernels run in the interpreter."""
    if _TARGET["sm_count"] is not None:
        return _TARGET["sm_count"]
    if INTERPRETING or device.type != "cuda":
        return None
    return _sm_count(device)


def split(batch: int, numel: int, block_b: int, block_d: int, device: torch.device) -> int:
    """Programs per row group for a reduction: a persistent grid of PROGRAMS_PER_SM programs per SM in all
    (each loops over its share of the columns), 1 when interpreting."""
    if _OVERRIDES["split"] is not None:
        return int(max(1, min(_OVERRIDES["split"], math.ceil(numel / block_d))))
    sms = gpu_sms(device)
    if sms is None:
        return 1  # (checked after the override, so tests can split rows under the interpreter)
    row_groups = math.ceil(batch / block_b)
    col_blocks = math.ceil(numel / block_d)
    want = math.ceil(PROGRAMS_PER_SM * sms / max(row_groups, 1))
    return int(max(1, min(want, col_blocks)))


SWEEP_MAX_D = 1 << 16  # pgd_step: samples up to this size are done in one launch (`sweep_programs`)
SWEEP_L2_BYTES = 32 << 20  # bytes of samples a sweep keeps in flight: they must stay in L2 for the second read
SWEEP_MIN_BATCH = 32  # fewer samples than this fill the GPU better split over programs (two passes)


def use_sweep(batch: int, numel: int, device: torch.device) -> bool:
    """Whether a per-sample step over samples larger than a tile takes the one-launch sweep (see `sweep_programs`):
    samples of at most SWEEP_MAX_D elements and enough of them to fill the GPU one program per sample (always in
    the interpreter, so its tests run the sweep; the override of `split` forces the two passes)."""
    if _OVERRIDES["split"] is not None or numel > SWEEP_MAX_D:
        return False
    return gpu_sms(device) is None or batch >= SWEEP_MIN_BATCH


def sweep_programs(batch: int, sample_bytes: int, device: torch.device) -> int:
    """Programs of a persistent one-sample-at-a-time grid whose second read of each sample hits L2: as many
    as fill the GPU, no more than SWEEP_L2_BYTES of samples in flight."""
    sms = gpu_sms(device)
    if sms is None:
        return max(1, min(batch, 4))  # the interpreter: a few programs, each looping over samples
    return max(1, min(batch, 4 * sms, SWEEP_L2_BYTES // max(sample_bytes, 1)))


def is_flat(numel: int, block_d: int) -> bool:
    """Whether tiles of [*, block_d] hold whole samples of a small power-of-two size (see `load_tile`)."""
    return numel == block_d and numel <= FLAT_MAX_D


def chunk(numel: int, block_d: int, nsplit: int) -> int:
    """Columns handled by one of the `nsplit` programs of a row group (a multiple of BLOCK_D)."""
    return math.ceil(math.ceil(numel / block_d) / nsplit) * block_d


# ---------------------------------------------------------------------------------------------------
# Launches: every fastat kernel is registered (for an ahead-of-time compile of each variant) and launched
# through `launch`, where the overhead benchmark replaces the launch with a no-op (`replace_launch`).


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One @triton.jit kernel and the variants it is launched with.

    pointers: pointer argument -> element type ("fp32", "i64"; None = the data dtype of the call);
    constexprs: mode switch -> the values the launchers pass (BLOCK_B, BLOCK_D and num_warps come from `tile`:
    see `tile_configs`); scalars: runtime argument -> its Triton type, for the ones that are not i32; rare: pointer
    arguments accessed only on an exceptional path (e.g. samples with a non-finite gradient), not counted as traffic."""

    fn: object
    pointers: Dict[str, Optional[str]]
    constexprs: Dict[str, Tuple]
    scalars: Dict[str, str]
    rare: Tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.fn.fn.__name__ if hasattr(self.fn, "fn") else self.fn.__name__


KERNELS: Dict[str, KernelSpec] = {}


def register_kernel(fn, *, pointers: Dict[str, Optional[str]], constexprs: Dict[str, Tuple], scalars: Optional[Dict[str, str]] = None,
                    rare: Tuple[str, ...] = ()):
    """Record a kernel and its launch variants (the list an audit or an ahead-of-time compile walks)."""
    spec = KernelSpec(fn, dict(pointers), dict(constexprs), dict(scalars or {}), tuple(rare))
    KERNELS[spec.name] = spec
    return fn


def tile_configs(interpreting: bool = False) -> List[Tuple[int, int, int]]:
    """Every (BLOCK_B, BLOCK_D, num_warps) `tile` can return on a GPU (or under the interpreter)."""
    cap = INTERPRET_TILE if interpreting else GPU_TILE
    out = []
    block_d = 1
    while block_d <= cap:
        block_b = 1
        while block_b * block_d <= cap:
            warps = 1 if interpreting else max(1, min(8, block_b * block_d // 512))
            out.append((block_b, block_d, warps))
            block_b *= 2
        block_d *= 2
    return out


_launch_hook: Optional[Callable] = None


def launch(kernel, grid, args: Sequence, meta: Dict) -> None:
    """kernel[grid](*args, **meta), or the benchmark hook's stand-in when one is installed."""
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, meta)
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def replace_launch(hook: Callable) -> Iterator[None]:
    """Benchmark hook: every Triton launch calls `hook(kernel, grid, args, meta)` instead of running.

    fastat.bench.overhead uses it to time the host side of the triton backend (its Python glue) on a machine
    without a GPU, and to count launches; outputs are left uninitialised. As on a GPU, the values of coefficient
    tensors are not read meanwhile (on a GPU each read would be a device sync). Not for anything that reads results."""
    global _launch_hook
    saved, read = _launch_hook, _checks._READ_CPU_VALUES
    _launch_hook, _checks._READ_CPU_VALUES = hook, False
    try:
        yield
    finally:
        _launch_hook, _checks._READ_CPU_VALUES = saved, read


def channels(template: torch.Tensor, channels_last: bool) -> Tuple[int, int, bool]:
    """(C, S, channels_last) to draw logical-order noise in the template's memory order."""
    if channels_last:
        if template[0].numel() >= 2**31:  # logical_index maps positions inside a sample in int32
            raise ValueError(f"channels_last samples of 2^31 elements or more are not supported by the Triton kernels "
                             f"(got {template[0].numel()} per sample); make the tensors contiguous")
        return template.shape[1], math.prod(template.shape[2:]), True
    return 1, 1, False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a ConstexprFunction: ~40k instructions per call from Python)


def launch_grid(batch: int, numel: int):
    """(grid, BLOCK_B, BLOCK_D, warps, n_col_blocks) for a 1-D grid of [BLOCK_B, BLOCK_D] tiles.

    One grid axis only: CUDA limits axes 1 and 2 to 65535 programs, so (row group, column block)
    is decoded from the program id."""
    return _launch_grid(batch, numel, _OVERRIDES["tile"] or (INTERPRET_TILE if INTERPRETING else GPU_TILE))


@functools.lru_cache(maxsize=4096)
def _launch_grid(batch: int, numel: int, cap: int):
    block_b, block_d, warps = _tile(batch, numel, cap)
    n_col = _cdiv(numel, block_d)
    return (_cdiv(batch, block_b) * n_col,), block_b, block_d, warps, n_col


def reduction_grid(batch: int, numel: int, device: torch.device):
    """(grid, BLOCK_B, BLOCK_D, warps, nsplit, chunk) for a per-sample reduction: each of the nsplit
    programs of a row group loops over `chunk` columns and writes one partial per row."""
    cap = _OVERRIDES["tile"] or (INTERPRET_TILE if INTERPRETING else GPU_TILE)
    return _reduction_grid(batch, numel, cap, _OVERRIDES["split"], device.type, device.index)


@functools.lru_cache(maxsize=4096)
def _reduction_grid(batch: int, numel: int, cap: int, forced_split, device_type: str, device_index):
    block_b, block_d, warps = _tile(batch, numel, cap)
    nsplit = split(batch, numel, block_b, block_d, torch.device(device_type, device_index))
    return (_cdiv(batch, block_b) * nsplit,), block_b, block_d, warps, nsplit, chunk(numel, block_d, nsplit)


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
def _flat_offsets(pid, B, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """(offsets, mask) of the BLOCK_B whole samples of program `pid` as one contiguous run (BLOCK_D == D)."""
    offs = pid * (BLOCK_B * BLOCK_D) + tl.arange(0, BLOCK_B * BLOCK_D).to(tl.int64)
    return offs, offs < (pid * 0 + B) * BLOCK_D


@triton.jit
def load_tile(ptr, pid, offs, mask, B, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [BLOCK_B, BLOCK_D] tile at `offs` (masked), in fp32. FLAT: the tile is whole consecutive samples
    (D == BLOCK_D, see `is_flat`), loaded as one contiguous run and reshaped, so the loads are 128-bit."""
    if FLAT:
        flat, flat_mask = _flat_offsets(pid, B, BLOCK_B, BLOCK_D)
        value = tl.reshape(tl.load(ptr + flat, mask=flat_mask, other=0.0), (BLOCK_B, BLOCK_D))
    else:
        value = tl.load(ptr + offs, mask=mask, other=0.0)
    return value.to(tl.float32)


@triton.jit
def store_tile(ptr, value, pid, offs, mask, B, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [BLOCK_B, BLOCK_D] tile in ptr's dtype (see `load_tile`)."""
    if FLAT:
        flat, flat_mask = _flat_offsets(pid, B, BLOCK_B, BLOCK_D)
        tl.store(ptr + flat, tl.reshape(value, (BLOCK_B * BLOCK_D,)).to(ptr.dtype.element_ty), mask=flat_mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


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
    a memory position p = s*C + c inside a sample has logical position c*S + s (in int32: a 64-bit division
    costs ~20 instructions a 32-bit one does not; `channels` refuses samples of 2^31 elements)."""
    if CHANNELS_LAST:
        p = cols.to(tl.int32)
        index = rows * D + ((p % C) * S + p // C).to(tl.int64)
    else:
        index = rows * D + cols
    return index


@triton.jit
def seeded_randn(seed, offset, index):
    """fp32 N(0, 1) for int64 logical indices: tl.randn(seed, offset + index), as the torch reference."""
    return tl.randn(seed, offset + index)
