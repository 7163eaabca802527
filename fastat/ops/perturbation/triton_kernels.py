"""Triton kernels for PGD steps and random starts with per-sample radius and step size.

pgd_step, L2 (normalize=True):
    pass 1 (reduction, per sample): ||g||^2, <delta, g>, ||delta||^2 and the count of non-finite g,
        as per-program partials [4, B, SPLIT] (no atomics: fixed-order sums, bitwise reproducible);
    pass 2 (elementwise): c = step / max(||g||, 1e-8) (c = step if normalize=False),
        ||delta + c g||^2 = ||delta||^2 + 2c<delta,g> + c^2||g||^2  ->  scale = min(1, R / max(||.||, 1e-8)),
        delta' = (delta + c g) * scale; a sample with any non-finite g keeps delta' = delta.
    When a whole sample fits in one tile (D <= 4096 on a GPU) both passes are one kernel.
Linf: pass 1 only counts non-finite g; pass 2 is delta' = clamp(delta + step * sign(g), -R, R).
Optional `model_input_base`: pass 2 also writes base + delta' (the next model input) in the same pass.

Bytes (N = B*D elements, s = element size): L2 reads delta and g twice and writes delta' once (5 N s;
3 N s fused), plus 2 N s with a base; Linf reads g, then delta and g, and writes delta' (4 N s; 3 N s fused).

random_perturbation: the seed is drawn on the device from `generator` (no host sync), the values from
tl.rand/tl.randn. Box / Linf-normal: one pass. L2 ball (uniform: Gaussian direction times R * U^(1/D);
normal: N(0, (R/sqrt(D))^2) projected on the ball): a reduction pass for ||n||^2 per sample, then the
noise is regenerated and written once. Values differ from torch's RNG; the distributions are the same.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _dispatch
from ... import _triton_utils as tu
from ..noisy_input.triton_kernels import coef_pair

N_STATS = 4  # ||g||^2, <delta,g>, ||delta||^2, #non-finite g


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


@triton.jit
def _row_total(partials, k, rows, B, nsplit, NSPLIT_P2: tl.constexpr):
    """Fixed-order sum of stat k's partials for each row -> [BB, 1]."""
    parts = tl.arange(0, NSPLIT_P2)[None, :]
    vals = tl.load(partials + k * B * nsplit + rows * nsplit + parts, mask=(rows < B) & (parts < nsplit), other=0.0)
    return tl.sum(vals, axis=1)[:, None]


@triton.jit
def _pgd_apply_kernel(
    delta, grad, base, out, xout, partials, step_ptr, step_s, rad_ptr, rad_s, B, D, nsplit, n_col_blocks,
    STEP_T: tl.constexpr, RAD_T: tl.constexpr, L2: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
    FUSED: tl.constexpr, NSPLIT_P2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    d = tl.load(delta + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad + offs, mask=mask, other=0.0).to(tl.float32)
    if FUSED:  # the tile holds whole samples: reduce in registers, no first pass
        bad = tl.sum(tl.where(_nonfinite(g), 1.0, 0.0), axis=1)[:, None]
        gg = tl.sum(g * g, axis=1)[:, None]
        dg = tl.sum(d * g, axis=1)[:, None]
        dd = tl.sum(d * d, axis=1)[:, None]
    else:
        gg = _row_total(partials, 0, rows, B, nsplit, NSPLIT_P2)
        dg = _row_total(partials, 1, rows, B, nsplit, NSPLIT_P2)
        dd = _row_total(partials, 2, rows, B, nsplit, NSPLIT_P2)
        bad = _row_total(partials, 3, rows, B, nsplit, NSPLIT_P2)
    # a non-finite sample is left unchanged below; keep its lanes free of inf*0 on the way
    g = tl.where(bad == 0, g, 0.0)
    gg = tl.where(bad == 0, gg, 0.0)
    dg = tl.where(bad == 0, dg, 0.0)
    step = tu.row_coef(step_ptr, step_s, rows, rows < B, STEP_T)
    radius = tu.row_coef(rad_ptr, rad_s, rows, rows < B, RAD_T)
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
    new = tl.where(bad == 0, new, d).to(out.dtype.element_ty)
    tl.store(out + offs, new, mask=mask)
    if HAS_BASE:
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) + new.to(tl.float32)
        tl.store(xout + offs, x.to(xout.dtype.element_ty), mask=mask)


def _fake_pgd(delta, grad, base, step, step_s, radius, radius_s, l2, normalize):
    (delta, grad, base), template, _ = tu.work_layout([delta, grad, base])
    out = tu.empty_like_layout(template, delta.dtype)
    if base is None:
        return out, delta.new_empty(0)
    return out, tu.empty_like_layout(template, torch.promote_types(base.dtype, delta.dtype))


@torch.library.custom_op("fastat::pgd_step", mutates_args=())
def pgd_step_op(
    delta: torch.Tensor, grad: torch.Tensor, base: Optional[torch.Tensor],
    step: Optional[torch.Tensor], step_s: float, radius: Optional[torch.Tensor], radius_s: float,
    l2: bool, normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(delta', base + delta'); the second is empty when base is None. step/radius: [B] or None + float."""
    out, xout = _fake_pgd(delta, grad, base, step, step_s, radius, radius_s, l2, normalize)
    (delta, grad, base), _, _ = tu.work_layout([delta, grad, base])
    if out.numel() == 0:
        return out, xout
    batch, numel = tu.batch_numel(delta)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    fused = n_col == 1 and tu._OVERRIDES["split"] is None
    nsplit = 1
    partials = delta  # unused by the fused kernel; a real allocation, never a null pointer
    if not fused:
        rgrid, rbb, rbd, rwarps, nsplit, chunk = tu.reduction_grid(batch, numel, delta.device)
        partials = torch.empty((N_STATS, batch, nsplit), dtype=torch.float32, device=delta.device)
        _pgd_stats_kernel[rgrid](
            delta, grad, partials, batch, numel, chunk, nsplit, L2=l2, BLOCK_B=rbb, BLOCK_D=rbd, num_warps=rwarps
        )
    _pgd_apply_kernel[grid](
        delta, grad, delta if base is None else base, out, out if base is None else xout, partials,
        delta if step is None else step, step_s, delta if radius is None else radius, radius_s,
        batch, numel, nsplit, n_col,
        STEP_T=step is not None, RAD_T=radius is not None, L2=l2, NORMALIZE=normalize, HAS_BASE=base is not None,
        FUSED=fused, NSPLIT_P2=tu.next_pow2(nsplit), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return out, xout


pgd_step_op.register_fake(_fake_pgd)


def _refuse_pgd(delta, grad, step_size, radius, norm="l2", normalize=True, model_input_base=None) -> Optional[str]:
    tensors = [t for t in (delta, grad, model_input_base) if t is not None]
    if any(t.dtype == torch.float64 for t in tensors):
        return "float64 inputs run on the reference (the kernels accumulate in fp32)"
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in tensors + [c for c in (step_size, radius) if isinstance(c, torch.Tensor)]
    ):
        return "pgd_step kernels are not differentiable (call them under torch.no_grad() or on detached tensors)"
    return None


@_dispatch.refuses_when(_refuse_pgd)
def pgd_step(delta, grad, step_size, radius, norm="l2", normalize=True, model_input_base=None):
    """Triton kernels behind fastat.pgd_step (same signature as the reference)."""
    step, step_s = coef_pair(step_size)
    rad, rad_s = coef_pair(radius)
    out, xout = pgd_step_op(delta, grad, model_input_base, step, step_s, rad, rad_s, norm == "l2", bool(normalize))
    return out if model_input_base is None else (out, xout)


# ---------------------------------------------------------------------------------------------------
# Random starts.


@triton.jit
def _randn_sumsq_kernel(
    seed_ptr, partials, B, D, chunk, nsplit, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    part = pid % nsplit
    rows = (pid // nsplit) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    for start in range(0, chunk, BLOCK_D):
        cols = part * chunk + start + tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
        mask = (rows < B) & (cols < D)
        n = tl.randn(seed, rows * D + cols)
        acc += tl.where(mask, n * n, 0.0)
    tl.store(partials + rows * nsplit + part, tl.sum(acc, axis=1)[:, None], mask=rows < B)


@triton.jit
def _random_apply_kernel(
    out, seed_ptr, partials, rad_ptr, rad_s, B, D, numel, inv_d, inv_sqrt_d, nsplit, n_col_blocks,
    RAD_T: tl.constexpr, L2: tl.constexpr, NORMAL: tl.constexpr, NSPLIT_P2: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    seed = tl.load(seed_ptr)
    radius = tu.row_coef(rad_ptr, rad_s, rows, rows < B, RAD_T)
    if L2:
        norm = tl.maximum(tl.sqrt(_row_total(partials, 0, rows, B, nsplit, NSPLIT_P2)), 1e-8)
        n = tl.randn(seed, offs)
        if NORMAL:  # N(0, (R/sqrt(D))^2) projected on the ball of radius R
            s = radius * inv_sqrt_d
            value = n * s * tl.minimum(radius / tl.maximum(norm * s, 1e-8), 1.0)
        else:  # uniform in the ball: direction n/||n||, radius R * U^(1/D) (U from a counter past the elements)
            u = tl.rand(seed, numel + rows)
            value = n * (radius * tl.exp(tl.log(u) * inv_d) / norm)
    else:
        if NORMAL:
            value = tl.minimum(tl.maximum(tl.randn(seed, offs) * radius, -radius), radius)
        else:
            value = (2.0 * tl.rand(seed, offs) - 1.0) * radius
    value = tl.where(mask, value, 0.0)  # padding lanes may hold n / 1e-8: keep them out of the cast
    tl.store(out + offs, value.to(out.dtype.element_ty), mask=mask)


def _fake_random(like, seed, radius, radius_s, l2, normal, dtype):
    return tu.output_like(like, dtype)


@torch.library.custom_op("fastat::random_perturbation", mutates_args=())
def random_perturbation_op(
    like: torch.Tensor, seed: torch.Tensor, radius: Optional[torch.Tensor], radius_s: float,
    l2: bool, normal: bool, dtype: torch.dtype,
) -> torch.Tensor:
    """A random start shaped like `like` from the int64 seed held in the 1-element tensor `seed`."""
    out = tu.output_like(like, dtype)
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    nsplit = 1
    partials = out  # unused unless l2
    if l2:
        rgrid, rbb, rbd, rwarps, nsplit, chunk = tu.reduction_grid(batch, numel, out.device)
        partials = torch.empty((1, batch, nsplit), dtype=torch.float32, device=out.device)
        _randn_sumsq_kernel[rgrid](seed, partials, batch, numel, chunk, nsplit, BLOCK_B=rbb, BLOCK_D=rbd, num_warps=rwarps)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    _random_apply_kernel[grid](
        out, seed, partials, out if radius is None else radius, radius_s, batch, numel, out.numel(),
        1.0 / numel, numel ** -0.5, nsplit, n_col,
        RAD_T=radius is not None, L2=l2, NORMAL=normal, NSPLIT_P2=tu.next_pow2(nsplit),
        BLOCK_B=bb, BLOCK_D=bd, num_warps=warps,
    )
    return out


random_perturbation_op.register_fake(_fake_random)


def draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """A 1-element int64 seed drawn on `device` (from `generator` if given): no host round trip."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def random_perturbation(like, radius, norm="l2", init="uniform", generator=None, dtype=None):
    """Triton kernels behind fastat.random_perturbation (same signature as the reference)."""
    dtype = dtype or like.dtype
    if init == "zero":
        return torch.zeros_like(like, dtype=dtype)
    rad, rad_s = coef_pair(radius)
    seed = draw_seed(generator, like.device)
    return random_perturbation_op(like, seed, rad, rad_s, norm == "l2", init == "normal", dtype)
