"""Triton kernels of fastat::pgd_step and fastat::random_perturbation (the ops' signatures, see op.py).

pgd_step, L2 (normalize=True):
    pass 1 (reduction, per sample): ||g||^2, <delta, g>, ||delta||^2 and the count of non-finite g,
        as per-program partials [4, B, SPLIT] (no atomics: fixed-order sums, bitwise reproducible);
    pass 2 (elementwise): c = step / max(||g||, 1e-8) (c = step if normalize=False),
        ||delta + c g||^2 = ||delta||^2 + 2c<delta,g> + c^2||g||^2  ->  scale = min(1, R / max(||.||, 1e-8)),
        delta' = (delta + c g) * scale; a sample with any non-finite g keeps delta' = delta.
Linf: delta' = clamp(delta + step * sign(g), -R, R); only the non-finite policy spans tiles. Over several tiles per
sample: one pass writes delta' and a non-finite flag per tile ([B, tiles]), then `_pgd_restore_kernel` reads each
sample's flags and writes delta' = delta back for flagged samples only (no pass over g to count first).
Optional `model_input_base`: pass 2 also writes base + delta' (the next model input) in the same pass.
Launches, by elements per sample D (GPU tiles of 4096):
    D <= 4096       one kernel: the tile holds whole samples (flat tiles of whole consecutive samples for D <= 16)
    D <= SWEEP_MAX_D one kernel for batches of SWEEP_MIN_BATCH or more: each program sweeps one sample twice
                    (statistics, then the update); the grid keeps at most SWEEP_L2_BYTES of samples in flight, so
                    the second sweep reads from L2
    larger          L2: pass 1 on a persistent grid (about two programs per SM), then pass 2; Linf: the flagging
                    pass, then the restore (flags only, unless a gradient is not finite)
Bytes (N = B*D elements, s = element size): 3 N s (2 N s more with a base) up to SWEEP_MAX_D; beyond, L2 reads
delta and g twice (5 N s), Linf stays at 3 N s (+ 4 bytes of flags per 4096 elements).

random_perturbation: the values from tl.rand/tl.randn at each element's logical index (so they do not depend
on the memory layout) from the seed held in a device tensor. Box / Linf-normal: one pass. L2 ball (uniform:
Gaussian direction times R * U^(1/D), U = tl.rand(seed, B*D + b); normal: N(0, (R/sqrt(D))^2) projected on the
ball): a reduction pass for ||n||^2 per sample (none when a tile holds whole samples), then the noise is
regenerated and written once. The same draws as the CUDA and CPU kernels and as reference.random_perturbation.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _triton_utils as tu
from ..._shapes import empty_output, is_channels_last, promote, work_layout
from ..noise.reference import noise_layout

N_STATS = 4  # ||g||^2, <delta,g>, ||delta||^2, #non-finite g
RESTORE_FLAG_BLOCK = 1024  # tile flags a restore program reads per iteration


@triton.jit
def _nonfinite(g):
    return (g != g) | (tl.abs(g) == float("inf"))


@triton.jit
def _pgd_stats_kernel(
    delta, grad, partials, B, D, chunk, nsplit, L2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    part = pid % nsplit
    rows = (pid // nsplit) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    gg = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    dg = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    dd = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    bad = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for start in range(0, chunk, BLOCK_D):
        cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
        mask = (rows < B) & (cols < D)
        g = tl.load(grad + rows * D + cols, mask=mask, other=0.0).to(tl.float32)
        bad += tl.where(_nonfinite(g), 1.0, 0.0)
        if L2:
            d = tl.load(delta + rows * D + cols, mask=mask, other=0.0).to(tl.float32)
            gg += g * g
            dg += d * g
            dd += d * d
    out = rows * nsplit + part
    row_mask = rows < B
    tl.store(partials + out, tl.sum(gg, axis=1)[:, None], mask=row_mask)
    tl.store(partials + B * nsplit + out, tl.sum(dg, axis=1)[:, None], mask=row_mask)
    tl.store(partials + 2 * B * nsplit + out, tl.sum(dd, axis=1)[:, None], mask=row_mask)
    tl.store(partials + 3 * B * nsplit + out, tl.sum(bad, axis=1)[:, None], mask=row_mask)


tu.register_kernel(_pgd_stats_kernel, pointers={"delta": None, "grad": None, "partials": "fp32"},
                   constexprs={"L2": (False, True)})


@triton.jit
def _row_total(partials, k, rows, B, nsplit, NSPLIT_P2: tl.constexpr):
    """Fixed-order sum of stat k's partials for each row -> [BB, 1]."""
    parts = tl.arange(0, NSPLIT_P2)[None, :]
    vals = tl.load(partials + k * B * nsplit + rows * nsplit + parts, mask=(rows < B) & (parts < nsplit), other=0.0)
    return tl.sum(vals, axis=1)[:, None]


@triton.jit
def _pgd_update(d, g, gg, dg, dd, bad, step, radius, L2: tl.constexpr, NORMALIZE: tl.constexpr):
    """delta' (fp32) from the tile's delta and grad and its samples' statistics (see the module docstring)."""
    # a non-finite sample is left unchanged below; keep its lanes free of inf*0 on the way
    g = tl.where(bad == 0, g, 0.0)
    gg = tl.where(bad == 0, gg, 0.0)
    dg = tl.where(bad == 0, dg, 0.0)
    if L2:
        if NORMALIZE:
            c = step / tl.maximum(tl.sqrt(gg), 1e-8)
        else:
            c = step
        norm_sq = tl.maximum(dd + 2.0 * c * dg + c * c * gg, 0.0)
        scale = tl.minimum(radius / tl.maximum(tl.sqrt(norm_sq), 1e-8), 1.0)
        new = (d + c * g) * scale
    else:
        if NORMALIZE:
            direction = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        else:
            direction = g
        new = tl.minimum(tl.maximum(d + step * direction, -radius), radius)
    return tl.where(bad == 0, new, d)


@triton.jit
def _pgd_apply_kernel(
    delta, grad, base, out, xout, partials, step_ptr, step_s, rad_ptr, rad_s, B, D, nsplit, n_col_blocks,
    STEP_T: tl.constexpr, RAD_T: tl.constexpr, L2: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
    FUSED: tl.constexpr, FLAT: tl.constexpr, FLAG_TILES: tl.constexpr, NSPLIT_P2: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    d = tu.load_tile(delta, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    g = tu.load_tile(grad, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if FUSED:  # the tile holds whole samples: reduce in registers, no first pass
        bad = tl.sum(tl.where(_nonfinite(g), 1.0, 0.0), axis=1)[:, None]
        gg = tl.sum(g * g, axis=1)[:, None]
        dg = tl.sum(d * g, axis=1)[:, None]
        dd = tl.sum(d * d, axis=1)[:, None]
    elif FLAG_TILES:  # Linf, samples over several tiles: flag this tile's non-finite rows (`partials`: [B, n_col_blocks])
        bad = tl.sum(tl.where(_nonfinite(g), 1.0, 0.0), axis=1)[:, None]
        tl.store(partials + rows * n_col_blocks + pid % n_col_blocks, bad, mask=rows < B)
        gg = bad
        dg = bad
        dd = bad
    else:
        gg = _row_total(partials, 0, rows, B, nsplit, NSPLIT_P2)
        dg = _row_total(partials, 1, rows, B, nsplit, NSPLIT_P2)
        dd = _row_total(partials, 2, rows, B, nsplit, NSPLIT_P2)
        bad = _row_total(partials, 3, rows, B, nsplit, NSPLIT_P2)
    step = tu.row_coef(step_ptr, step_s, rows, rows < B, STEP_T)
    radius = tu.row_coef(rad_ptr, rad_s, rows, rows < B, RAD_T)
    new = _pgd_update(d, g, gg, dg, dd, bad, step, radius, L2, NORMALIZE).to(out.dtype.element_ty)
    tu.store_tile(out, new, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if HAS_BASE:
        x = tu.load_tile(base, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D) + new.to(tl.float32)
        tu.store_tile(xout, x, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(
    _pgd_apply_kernel,
    pointers=dict.fromkeys(["delta", "grad", "base", "out", "xout"]) | {"partials": "fp32", "step_ptr": "fp32", "rad_ptr": "fp32"},
    constexprs={"STEP_T": (False, True), "RAD_T": (False, True), "L2": (False, True), "NORMALIZE": (False, True),
                "HAS_BASE": (False, True), "FUSED": (False, True), "FLAT": (False, True), "FLAG_TILES": (False, True),
                "NSPLIT_P2": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)},
    scalars={"step_s": "fp32", "rad_s": "fp32"},
)


@triton.jit
def _pgd_restore_kernel(
    delta, base, out, xout, flags, B, D, n_flags, chunk, nsplit, HAS_BASE: tl.constexpr, FLAG_BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Linf over samples larger than a tile, after `_pgd_apply_kernel` (FLAG_TILES): a sample with a flagged tile
    gets delta' = delta (and x' = base + delta) back; program (b, part) copies columns [part * chunk, + chunk) of
    sample b. A clean sample costs the read of its n_flags flags: delta, base, out and xout are touched only for
    samples whose gradient is not finite."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // nsplit
    part = pid % nsplit
    flagged = tl.zeros((FLAG_BLOCK,), tl.float32)
    for start in range(0, n_flags, FLAG_BLOCK):
        idx = start + tl.arange(0, FLAG_BLOCK)
        flagged += tl.load(flags + row * n_flags + idx, mask=idx < n_flags, other=0.0)
    if tl.sum(flagged, axis=0) > 0:
        for start in range(0, chunk, BLOCK_D):
            cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = cols < D
            d = tl.load(delta + row * D + cols, mask=mask, other=0.0)
            tl.store(out + row * D + cols, d, mask=mask)
            if HAS_BASE:
                x = tl.load(base + row * D + cols, mask=mask, other=0.0).to(tl.float32) + d.to(tl.float32)
                tl.store(xout + row * D + cols, x.to(xout.dtype.element_ty), mask=mask)


tu.register_kernel(
    _pgd_restore_kernel,
    pointers=dict.fromkeys(["delta", "base", "out", "xout"]) | {"flags": "fp32"},
    constexprs={"HAS_BASE": (False, True), "FLAG_BLOCK": (RESTORE_FLAG_BLOCK,)},
    rare=("delta", "base", "out", "xout"),
)


@triton.jit
def _pgd_sweep_kernel(
    delta, grad, base, out, xout, step_ptr, step_s, rad_ptr, rad_s, B, D,
    STEP_T: tl.constexpr, RAD_T: tl.constexpr, L2: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Samples larger than a tile (up to SWEEP_MAX_D): each program takes one sample at a time (a persistent grid,
    `tu.sweep_programs`), sums its statistics in a first sweep and writes delta' in a second. The grid keeps no
    more samples in flight than L2 holds, so the second sweep reads from L2: one launch, DRAM bytes = floor."""
    for b in range(tl.program_id(0), B, tl.num_programs(0)):
        rows = tl.zeros((1, 1), tl.int64) + b
        row0 = rows * D
        gg = tl.zeros((1, BLOCK_D), tl.float32)
        dg = tl.zeros((1, BLOCK_D), tl.float32)
        dd = tl.zeros((1, BLOCK_D), tl.float32)
        bad = tl.zeros((1, BLOCK_D), tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
            mask = cols < D
            g = tl.load(grad + row0 + cols, mask=mask, other=0.0).to(tl.float32)
            bad += tl.where(_nonfinite(g), 1.0, 0.0)
            if L2:
                d = tl.load(delta + row0 + cols, mask=mask, other=0.0).to(tl.float32)
                gg += g * g
                dg += d * g
                dd += d * d
        sums = (tl.sum(gg, axis=1)[:, None], tl.sum(dg, axis=1)[:, None], tl.sum(dd, axis=1)[:, None],
                tl.sum(bad, axis=1)[:, None])
        step = tu.row_coef(step_ptr, step_s, rows, rows < B, STEP_T)
        radius = tu.row_coef(rad_ptr, rad_s, rows, rows < B, RAD_T)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
            mask = cols < D
            d = tl.load(delta + row0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad + row0 + cols, mask=mask, other=0.0).to(tl.float32)
            new = _pgd_update(d, g, sums[0], sums[1], sums[2], sums[3], step, radius, L2, NORMALIZE).to(out.dtype.element_ty)
            tl.store(out + row0 + cols, new, mask=mask)
            if HAS_BASE:
                x = tl.load(base + row0 + cols, mask=mask, other=0.0).to(tl.float32) + new.to(tl.float32)
                tl.store(xout + row0 + cols, x.to(xout.dtype.element_ty), mask=mask)


tu.register_kernel(
    _pgd_sweep_kernel,
    pointers=dict.fromkeys(["delta", "grad", "base", "out", "xout"]) | {"step_ptr": "fp32", "rad_ptr": "fp32"},
    constexprs={"STEP_T": (False, True), "RAD_T": (False, True), "L2": (False, True), "NORMALIZE": (False, True),
                "HAS_BASE": (False, True)},
    scalars={"step_s": "fp32", "rad_s": "fp32"},
)


def pgd_step(delta, grad, base, step_size, radius, step_size_s, radius_s, l2, normalize) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastat::pgd_step on the Triton backend: (delta', base + delta' or an empty tensor)."""
    layout = work_layout([delta, grad, base])
    delta, grad, base = layout.tensors
    out = empty_output(layout, delta.dtype)
    if base is None:
        xout = delta.new_empty(0)
    else:
        xout = empty_output(layout, promote(base.dtype, delta.dtype))
    if out.numel() == 0:
        return out, xout
    batch, numel = tu.batch_numel(delta)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    fused = n_col == 1 and tu._OVERRIDES["split"] is None
    coefs = (delta if step_size is None else step_size, step_size_s, delta if radius is None else radius, radius_s)
    flags = dict(STEP_T=step_size is not None, RAD_T=radius is not None, L2=l2, NORMALIZE=normalize, HAS_BASE=base is not None)
    if not fused and tu.use_sweep(batch, numel, delta.device):
        sample_bytes = numel * sum(t.element_size() for t in (delta, grad, base) if t is not None)
        tu.launch(_pgd_sweep_kernel, (tu.sweep_programs(batch, sample_bytes, delta.device),), (
            delta, grad, delta if base is None else base, out, out if base is None else xout, *coefs, batch, numel,
        ), dict(flags, BLOCK_D=bd, num_warps=warps))
        return out, xout
    nsplit = 1
    partials = delta  # unused by the fused kernel; a real allocation, never a null pointer
    flag_tiles = not fused and not l2
    if flag_tiles:  # one pass over delta and grad that flags tiles, then a restore that reads only the flags
        partials = torch.empty((batch, n_col), dtype=torch.float32, device=delta.device)
    elif not fused:
        rgrid, rbb, rbd, rwarps, nsplit, chunk = tu.reduction_grid(batch, numel, delta.device)
        partials = torch.empty((N_STATS, batch, nsplit), dtype=torch.float32, device=delta.device)
        tu.launch(_pgd_stats_kernel, rgrid, (delta, grad, partials, batch, numel, chunk, nsplit),
                  dict(L2=l2, BLOCK_B=rbb, BLOCK_D=rbd, num_warps=rwarps))
    tu.launch(_pgd_apply_kernel, grid, (
        delta, grad, delta if base is None else base, out, out if base is None else xout, partials, *coefs,
        batch, numel, nsplit, n_col,
    ), dict(flags, FUSED=fused, FLAT=fused and tu.is_flat(numel, bd), FLAG_TILES=flag_tiles,
            NSPLIT_P2=tu.next_pow2(nsplit), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    if flag_tiles:
        parts = tu.split(batch, numel, 1, bd, delta.device)
        tu.launch(_pgd_restore_kernel, (batch * parts,), (
            delta, delta if base is None else base, out, out if base is None else xout, partials, batch, numel, n_col,
            tu.chunk(numel, bd, parts), parts,
        ), dict(HAS_BASE=base is not None, FLAG_BLOCK=RESTORE_FLAG_BLOCK, BLOCK_D=bd, num_warps=warps))
    return out, xout


# ---------------------------------------------------------------------------------------------------
# Random starts.


@triton.jit
def _randn_sumsq_kernel(
    seed_ptr, partials, B, D, C, S, chunk, nsplit,
    CHANNELS_LAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    part = pid % nsplit
    rows = (pid // nsplit) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for start in range(0, chunk, BLOCK_D):
        cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
        mask = (rows < B) & (cols < D)
        n = tl.randn(seed, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
        acc += tl.where(mask, n * n, 0.0)
    tl.store(partials + rows * nsplit + part, tl.sum(acc, axis=1)[:, None], mask=rows < B)


tu.register_kernel(_randn_sumsq_kernel, pointers={"seed_ptr": "i64", "partials": "fp32"},
                   constexprs={"CHANNELS_LAST": (False, True)})


@triton.jit
def _random_apply_kernel(
    out, seed_ptr, partials, rad_ptr, rad_s, B, D, C, S, numel, inv_d, inv_sqrt_d, nsplit, n_col_blocks,
    RAD_T: tl.constexpr, L2: tl.constexpr, NORMAL: tl.constexpr, CHANNELS_LAST: tl.constexpr, NSPLIT_P2: tl.constexpr,
    FUSED: tl.constexpr, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    draw = tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST)
    seed = tl.load(seed_ptr)
    radius = tu.row_coef(rad_ptr, rad_s, rows, rows < B, RAD_T)
    if L2:
        n = tl.randn(seed, draw)
        if FUSED:  # the tile holds whole samples: their norms need no first pass
            norm = tl.maximum(tl.sqrt(tl.sum(tl.where(mask, n * n, 0.0), axis=1)[:, None]), 1e-8)
        else:
            norm = tl.maximum(tl.sqrt(_row_total(partials, 0, rows, B, nsplit, NSPLIT_P2)), 1e-8)
        if NORMAL:  # N(0, (R/sqrt(D))^2) projected on the ball of radius R
            s = radius * inv_sqrt_d
            value = n * s * tl.minimum(radius / tl.maximum(norm * s, 1e-8), 1.0)
        else:  # uniform in the ball: direction n/||n||, radius R * U^(1/D) (U from a counter past the elements)
            u = tl.rand(seed, numel + rows)
            value = n * (radius * tl.exp(tl.log(u) * inv_d) / norm)
    else:
        if NORMAL:
            value = tl.minimum(tl.maximum(tl.randn(seed, draw) * radius, -radius), radius)
        else:
            value = (2.0 * tl.rand(seed, draw) - 1.0) * radius
    value = tl.where(mask, value, 0.0)  # padding lanes may hold n / 1e-8: keep them out of the cast
    tu.store_tile(out, value, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(
    _random_apply_kernel,
    pointers={"out": None, "seed_ptr": "i64", "partials": "fp32", "rad_ptr": "fp32"},
    constexprs={"RAD_T": (False, True), "L2": (False, True), "NORMAL": (False, True), "CHANNELS_LAST": (False, True),
                "NSPLIT_P2": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "FUSED": (False, True), "FLAT": (False, True)},
    scalars={"rad_s": "fp32", "numel": "i64", "inv_d": "fp32", "inv_sqrt_d": "fp32"},
)


def random_perturbation(like, seed, radius, radius_s, l2, normal, dtype):
    """fastat::random_perturbation on the Triton backend."""
    out = torch.empty_like(like, dtype=dtype, memory_format=noise_layout(like))
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    c, s, cl = tu.channels(out, is_channels_last(out))
    nsplit = 1
    partials = out  # unused unless l2
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    fused = n_col == 1 and tu._OVERRIDES["split"] is None
    if l2 and not fused:
        rgrid, rbb, rbd, rwarps, nsplit, chunk = tu.reduction_grid(batch, numel, out.device)
        partials = torch.empty((1, batch, nsplit), dtype=torch.float32, device=out.device)
        tu.launch(_randn_sumsq_kernel, rgrid, (seed, partials, batch, numel, c, s, chunk, nsplit),
                  dict(CHANNELS_LAST=cl, BLOCK_B=rbb, BLOCK_D=rbd, num_warps=rwarps))
    tu.launch(_random_apply_kernel, grid, (
        out, seed, partials, out if radius is None else radius, radius_s, batch, numel, c, s, out.numel(),
        1.0 / numel, numel ** -0.5, nsplit, n_col,
    ), dict(RAD_T=radius is not None, L2=l2, NORMAL=normal, CHANNELS_LAST=cl, NSPLIT_P2=tu.next_pow2(nsplit),
            FUSED=fused, FLAT=tu.is_flat(numel, bd), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return out
