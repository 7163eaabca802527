"""Triton kernels of fastat::residual_loss and fastat::residual_loss_backward (the ops' signatures, see op.py).

    r = a - b - c / sigma_b      (sigma: per-sample tensor or float; c optional; b may be seeded noise)
    metric 0: v_b = mean(r^2), 1: mean(|r|), 2: sqrt(sum r^2 + h^2) - h;  loss = w_b v_b | sum | mean over b

Forward, one launch: a reduction pass reads a, b, c (b regenerated in-kernel for seeded noise) and, when a gradient
will be needed, writes r in the inputs' dtype (not 2r/D, which underflows in fp16 for large D). When one program
covers whole rows (nsplit == 1) it writes v_b and, for reduction "none", the weighted loss (for "sum" and "mean",
its share of the batch sum); otherwise each program writes a partial sum per row. The last program to finish (a
ticket counter) then adds the shares, or the partials and the samples, in a fixed order (deterministic: no float
atomics).
Backward: one elementwise pass reads r and writes only the gradients that are needed:
    dL/da = g_b * r * {2/D | sign(r)/D | 1/(v_b + h)},  dL/db = -dL/da,  dL/dc = -dL/da / sigma_b,
g_b = grad_loss (per sample for "none", one value otherwise; times w_b, and 1/B for the mean).
Pseudo-Huber with h = 0 at r = 0 gives gradient 0 (the reference's autograd gives NaN there).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _triton_utils as tu
from ..._backend import CACHE
from ..._shapes import empty_output, work_layout
from .reference import MEAN, NONE

FINISH_TILE = 4096  # rows x partials per step of the finishing program (rows: 1024 at most)


@triton.jit
def _finish(partials, per_sample, loss, w_ptr, w_s, B, nsplit, inv_d, huber_c, batch_scale,
            W_T: tl.constexpr, METRIC: tl.constexpr, FROM_PARTIALS: tl.constexpr, REDUCE: tl.constexpr,
            NSPLIT_P2: tl.constexpr, BLOCK: tl.constexpr):
    """Per-sample values from the partials (their sum in a fixed order), the weights, and the batch sum (a fixed
    order): run by one program. The partials are read past L1 (.cg): other programs wrote them."""
    total = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, B, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        row_mask = rows < B
        if FROM_PARTIALS:
            parts = tl.arange(0, NSPLIT_P2)[None, :]
            vals = tl.load(partials + rows[:, None] * nsplit + parts, mask=row_mask[:, None] & (parts < nsplit),
                           other=0.0, cache_modifier=".cg")
            s = tl.sum(vals, axis=1)
            if METRIC == 2:
                value = tl.sqrt(s + huber_c * huber_c) - huber_c
            else:
                value = s * inv_d
            tl.store(per_sample + rows, value, mask=row_mask)
        else:
            value = tl.load(per_sample + rows, mask=row_mask, other=0.0, cache_modifier=".cg")
        if W_T:
            value = value * tl.load(w_ptr + rows, mask=row_mask, other=0.0)
        else:
            value = value * w_s
        if REDUCE:
            total += tl.where(row_mask, value, 0.0)
        else:
            tl.store(loss + rows, value, mask=row_mask)
    if REDUCE:
        tl.store(loss, tl.sum(total, axis=0) * batch_scale)


@triton.jit
def _loss_fwd_kernel(
    a, b, c, res, partials, per_sample, loss, counter, k_ptr, k_s, w_ptr, w_s, B, D, C, S, seed, noise_offset, chunk,
    nsplit, inv_d, huber_c, batch_scale,
    K_T: tl.constexpr, W_T: tl.constexpr, HAS_C: tl.constexpr, SEEDED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    METRIC: tl.constexpr, SAVE_RES: tl.constexpr, ROWS_WHOLE: tl.constexpr, REDUCE: tl.constexpr,
    NSPLIT_P2: tl.constexpr, FIN_BLOCK: tl.constexpr, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    part = pid % nsplit
    rows = (pid // nsplit) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    row_mask = rows < B
    if HAS_C:
        k = tu.row_coef(k_ptr, k_s, rows, row_mask, K_T)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for start in range(0, chunk, BLOCK_D):
        cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
        mask = row_mask & (cols < D)
        offs = rows * D + cols
        r = tu.load_tile(a, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
        if SEEDED:
            r -= tu.seeded_randn(seed, noise_offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
        else:
            r -= tu.load_tile(b, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
        if HAS_C:
            r -= tu.load_tile(c, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D) / k
        r = tl.where(mask, r, 0.0)
        if SAVE_RES:
            tu.store_tile(res, r, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
        if METRIC == 1:
            acc += tl.abs(r)
        else:
            acc += r * r
    total = tl.sum(acc, axis=1)[:, None]
    if ROWS_WHOLE:  # one program per row group: the per-sample values are final here
        if METRIC == 2:
            value = tl.sqrt(total + huber_c * huber_c) - huber_c
        else:
            value = total * inv_d
        tl.store(per_sample + rows, value, mask=row_mask)
        weighted = value * tu.row_coef(w_ptr, w_s, rows, row_mask, W_T)
        if REDUCE:  # this program's share of the batch sum: the finishing program adds one value per program
            tl.store(partials + pid, tl.sum(tl.sum(tl.where(row_mask, weighted, 0.0), axis=1), axis=0))
        else:
            tl.store(loss + rows, weighted, mask=row_mask)
    else:
        tl.store(partials + rows * nsplit + part, total, mask=row_mask)
    if REDUCE or not ROWS_WHOLE:
        # The last program to finish sums up (deterministic: a fixed order, no float atomics) and resets the
        # counter for the next launch. A scalar atomic runs on one thread, and its release covers only what that
        # thread has seen: the barrier first makes every warp's partial store part of it (semaphore pattern:
        # CTA barrier, then a gpu-scope release by one thread; the acquire side is the last program's atomic).
        tl.debug_barrier()
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == tl.num_programs(0) - 1:
            if ROWS_WHOLE:  # the batch sum of the programs' shares
                _finish(partials, partials, loss, w_ptr, 1.0, tl.num_programs(0), 1, inv_d, huber_c, batch_scale,
                        False, METRIC, False, True, 1, FIN_BLOCK)
            else:
                _finish(partials, per_sample, loss, w_ptr, w_s, B, nsplit, inv_d, huber_c, batch_scale,
                        W_T, METRIC, True, REDUCE, NSPLIT_P2, FIN_BLOCK)
            tl.atomic_xchg(counter, 0)


tu.register_kernel(
    _loss_fwd_kernel,
    pointers=dict.fromkeys(["a", "b", "c"]) | {"res": "fp32", "partials": "fp32", "per_sample": "fp32", "loss": "fp32",
                                               "counter": "i32", "k_ptr": "fp32", "w_ptr": "fp32"},
    constexprs={"K_T": (False, True), "W_T": (False, True), "HAS_C": (False, True), "SEEDED": (False, True),
                "CHANNELS_LAST": (False, True), "METRIC": (0, 1, 2), "SAVE_RES": (False, True),
                "ROWS_WHOLE": (True, False), "REDUCE": (False, True),
                "NSPLIT_P2": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "FIN_BLOCK": (1024, 512, 256, 128, 64, 32, 16, 8),
                "FLAT": (False, True)},
    scalars={"k_s": "fp32", "w_s": "fp32", "seed": "i64", "noise_offset": "i64", "inv_d": "fp32", "huber_c": "fp32",
             "batch_scale": "fp32"},
)


@triton.jit
def _loss_bwd_kernel(
    res, gout, gout_stride, per_sample, ga, gb, gc, k_ptr, k_s, w_ptr, w_s, B, D, n_col_blocks, inv_d, huber_c, batch_scale,
    K_T: tl.constexpr, W_T: tl.constexpr, METRIC: tl.constexpr, WANT_A: tl.constexpr, WANT_B: tl.constexpr,
    WANT_C: tl.constexpr, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    row_mask = rows < B
    r = tu.load_tile(res, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    go = tl.load(gout + rows * gout_stride, mask=row_mask, other=0.0).to(tl.float32) * batch_scale
    go = go * tu.row_coef(w_ptr, w_s, rows, row_mask, W_T)
    if METRIC == 0:
        g = (2.0 * inv_d * go) * r
    elif METRIC == 1:
        g = (go * inv_d) * tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    else:
        denom = tl.load(per_sample + rows, mask=row_mask, other=1.0) + huber_c
        g = tl.where(denom > 0, go / tl.where(denom > 0, denom, 1.0), 0.0) * r
    if WANT_A:
        tu.store_tile(ga, g, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if WANT_B:
        tu.store_tile(gb, -g, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if WANT_C:
        k = tu.row_coef(k_ptr, k_s, rows, row_mask, K_T)
        tu.store_tile(gc, -g / k, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(
    _loss_bwd_kernel,
    pointers=dict.fromkeys(["ga", "gb", "gc"]) | {"res": "fp32", "gout": "fp32", "per_sample": "fp32", "k_ptr": "fp32",
                                                 "w_ptr": "fp32"},
    constexprs={"K_T": (False, True), "W_T": (False, True), "METRIC": (0, 1, 2), "WANT_A": (False, True),
                "WANT_B": (False, True), "WANT_C": (False, True)},
    scalars={"k_s": "fp32", "w_s": "fp32", "inv_d": "fp32", "huber_c": "fp32", "batch_scale": "fp32"},
)


def _counter(device: torch.device) -> torch.Tensor:
    """The loss kernel's ticket counter for this device and stream: zero between launches (the last program
    resets it), so it is allocated once (kept in the one cache); one per stream, as launches on a stream run in
    order while two streams could overlap."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = ("triton loss counter", device, stream)
    counter = CACHE.get(key)
    if counter is None:
        counter = CACHE[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


def residual_loss(a, b, c, sigma, weight, sigma_s, weight_s, metric, huber_c, reduction, seed, offset, save_residual):
    """fastat::residual_loss on the Triton backend: (loss, per_sample, residual) from one kernel launch."""
    seeded = b is None
    layout = work_layout([a, b, c], logical=seeded)
    a, b, c = layout.tensors
    batch, numel = tu.batch_numel(a)
    per_sample = a.new_empty((batch,), dtype=torch.float32)
    loss = per_sample.new_empty((batch,) if reduction == NONE else ())
    # r in fp32 (the accumulation dtype): the backward rounds each gradient once, as the reference does
    residual = empty_output(layout, torch.float32) if save_residual else per_sample.new_empty(0)
    if batch == 0:
        return (loss if reduction == NONE else loss.zero_()), per_sample, residual
    grid, bb, bd, warps, nsplit, chunk = tu.reduction_grid(batch, max(numel, 1), a.device)
    rows_whole = nsplit == 1
    reduce = reduction != NONE
    if rows_whole:  # one weighted share of the batch sum per program, or nothing (per_sample is final)
        partials = a.new_empty(grid[0], dtype=torch.float32) if reduce else per_sample
    else:
        partials = a.new_empty((batch, nsplit), dtype=torch.float32)
    counter = _counter(a.device) if reduce or not rows_whole else per_sample
    nsplit_p2 = tu.next_pow2(nsplit)
    ch, sp, cl = tu.channels(a, layout.channels_last)
    has_c = c is not None
    tu.launch(_loss_fwd_kernel, grid, (
        a, a if seeded else b, c if has_c else a, residual if save_residual else per_sample, partials, per_sample, loss,
        counter,
        sigma if has_c and sigma is not None else per_sample, sigma_s if has_c else 1.0,
        per_sample if weight is None else weight, weight_s, batch, numel, ch, sp, seed, offset, chunk, nsplit,
        1.0 / max(numel, 1), huber_c, 1.0 / batch if reduction == MEAN else 1.0,
    ), dict(K_T=has_c and sigma is not None, W_T=weight is not None, HAS_C=has_c, SEEDED=seeded, CHANNELS_LAST=cl,
            METRIC=metric, SAVE_RES=save_residual, ROWS_WHOLE=rows_whole, REDUCE=reduce, NSPLIT_P2=nsplit_p2,
            FIN_BLOCK=min(1024, FINISH_TILE // nsplit_p2), FLAT=tu.is_flat(numel, bd) and rows_whole,
            BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return loss, per_sample, residual


def residual_loss_backward(grad_loss, residual, per_sample, sigma, weight, sigma_s, weight_s, metric, huber_c,
                           reduction, a_dtype, b_dtype, c_dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastat::residual_loss_backward on the Triton backend: one pass over r writing the wanted gradients."""
    layout = work_layout([residual])
    (residual,) = layout.tensors
    want = (a_dtype is not None, b_dtype is not None, c_dtype is not None)

    def out(dtype):
        return residual.new_empty(0) if dtype is None else empty_output(layout, dtype)

    ga, gb, gc = out(a_dtype), out(b_dtype), out(c_dtype)
    if residual.numel() == 0 or not any(want):
        return ga, gb, gc
    unused = next(g for g, w in zip((ga, gb, gc), want) if w)  # stands in for the gradients not wanted
    batch, numel = tu.batch_numel(residual)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    gout = grad_loss if grad_loss.dtype == torch.float32 else grad_loss.float()
    tu.launch(_loss_bwd_kernel, grid, (
        residual, gout, gout.stride(0) if reduction == NONE else 0, per_sample,
        ga if want[0] else unused, gb if want[1] else unused, gc if want[2] else unused,
        residual if sigma is None else sigma, sigma_s, residual if weight is None else weight, weight_s,
        batch, numel, n_col, 1.0 / numel, huber_c, 1.0 / batch if reduction == MEAN else 1.0,
    ), dict(K_T=sigma is not None, W_T=weight is not None, METRIC=metric, WANT_A=want[0], WANT_B=want[1], WANT_C=want[2],
            FLAT=tu.is_flat(numel, bd), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return ga, gb, gc
