"""Triton kernels of fastat::noisy_input and fastat::noisy_input_backward (the ops' signatures, see op.py).

Forward: one elementwise pass (reads x0, noise, delta; writes x_t); with seeded noise (noise None) the noise is
regenerated in-kernel (tl.randn at each element's logical index), so it is never read: 2 reads + 1 write
instead of 3 + 1. With timesteps (q_sample) alpha and sigma are per-timestep tables gathered in the kernel at
timesteps[b] (no gather launch). Backward: one pass reading grad and writing alpha*g (to x0) and sigma*g (to noise).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ... import _triton_utils as tu
from ..._shapes import empty_output, work_layout


@triton.jit
def _noisy_input_fwd_kernel(
    x0, noise, delta, out, alpha_ptr, alpha_s, sigma_ptr, sigma_s,
    timesteps, n_steps, B, D, C, S, seed, noise_offset, n_col_blocks,
    ALPHA_T: tl.constexpr, SIGMA_T: tl.constexpr, HAS_DELTA: tl.constexpr, SEEDED: tl.constexpr, GATHER: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    if GATHER:  # q_sample: the coefficients of timestep t_b from the [T] tables; t outside [0, T): NaN
        t = tl.load(timesteps + rows, mask=rows < B, other=0)
        valid = (t >= 0) & (t < n_steps)
        alpha = tl.where(valid, tl.load(alpha_ptr + t, mask=valid & (rows < B), other=1.0), float("nan"))
        sigma = tl.where(valid, tl.load(sigma_ptr + t, mask=valid & (rows < B), other=1.0), float("nan"))
    else:
        alpha = tu.row_coef(alpha_ptr, alpha_s, rows, rows < B, ALPHA_T)
        sigma = tu.row_coef(sigma_ptr, sigma_s, rows, rows < B, SIGMA_T)
    if SEEDED:
        eps = tu.seeded_randn(seed, noise_offset, tu.logical_index(rows, cols, D, C, S, CHANNELS_LAST))
    else:
        eps = tu.load_tile(noise, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    y = alpha * tu.load_tile(x0, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D) + sigma * eps
    if HAS_DELTA:
        y += tu.load_tile(delta, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    tu.store_tile(out, y, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(
    _noisy_input_fwd_kernel,
    pointers=dict.fromkeys(["x0", "noise", "delta", "out"]) | {"alpha_ptr": "fp32", "sigma_ptr": "fp32", "timesteps": "i64"},
    constexprs={"ALPHA_T": (False, True), "SIGMA_T": (False, True), "HAS_DELTA": (False, True), "SEEDED": (False, True),
                "GATHER": (False, True), "CHANNELS_LAST": (False, True), "FLAT": (False, True)},
    scalars={"alpha_s": "fp32", "sigma_s": "fp32", "seed": "i64", "noise_offset": "i64", "n_steps": "i64"},
)


@triton.jit
def _noisy_input_bwd_kernel(
    grad, grad_x0, grad_noise, alpha_ptr, alpha_s, sigma_ptr, sigma_s, B, D, n_col_blocks,
    ALPHA_T: tl.constexpr, SIGMA_T: tl.constexpr, WANT_X0: tl.constexpr, WANT_NOISE: tl.constexpr,
    FLAT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows, cols, mask = tu.tile_index(pid, n_col_blocks, B, D, BLOCK_B, BLOCK_D)
    offs = rows * D + cols
    g = tu.load_tile(grad, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if WANT_X0:
        alpha = tu.row_coef(alpha_ptr, alpha_s, rows, rows < B, ALPHA_T)
        tu.store_tile(grad_x0, alpha * g, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)
    if WANT_NOISE:
        sigma = tu.row_coef(sigma_ptr, sigma_s, rows, rows < B, SIGMA_T)
        tu.store_tile(grad_noise, sigma * g, pid, offs, mask, B, FLAT, BLOCK_B, BLOCK_D)


tu.register_kernel(
    _noisy_input_bwd_kernel,
    pointers=dict.fromkeys(["grad", "grad_x0", "grad_noise"]) | {"alpha_ptr": "fp32", "sigma_ptr": "fp32"},
    constexprs={"ALPHA_T": (False, True), "SIGMA_T": (False, True), "WANT_X0": (False, True), "WANT_NOISE": (False, True),
                "FLAT": (False, True)},
    scalars={"alpha_s": "fp32", "sigma_s": "fp32"},
)


def noisy_input(x0, noise, delta, alpha, sigma, alpha_s, sigma_s, seed, offset, dtype, timesteps=None):
    """fastat::noisy_input on the Triton backend."""
    seeded = noise is None
    layout = work_layout([x0, noise, delta], logical=seeded)
    x0, noise, delta = layout.tensors
    out = empty_output(layout, dtype)
    if out.numel() == 0:
        return out
    batch, numel = tu.batch_numel(out)
    c, s, cl = tu.channels(out, layout.channels_last)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    tu.launch(_noisy_input_fwd_kernel, grid, (
        x0, x0 if seeded else noise, x0 if delta is None else delta, out,
        x0 if alpha is None else alpha, alpha_s, x0 if sigma is None else sigma, sigma_s,
        x0 if timesteps is None else timesteps, 0 if timesteps is None else alpha.shape[0],
        batch, numel, c, s, seed, offset, n_col,
    ), dict(ALPHA_T=alpha is not None, SIGMA_T=sigma is not None, HAS_DELTA=delta is not None, SEEDED=seeded,
            GATHER=timesteps is not None, CHANNELS_LAST=cl, FLAT=tu.is_flat(numel, bd), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return out


def noisy_input_backward(grad, alpha, sigma, alpha_s, sigma_s, x0_dtype, noise_dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastat::noisy_input_backward on the Triton backend: (alpha * grad, sigma * grad), each one pass."""
    layout = work_layout([grad])
    (grad,) = layout.tensors
    want_x0, want_noise = x0_dtype is not None, noise_dtype is not None
    gx = empty_output(layout, x0_dtype) if want_x0 else grad.new_empty(0)
    gn = empty_output(layout, noise_dtype) if want_noise else grad.new_empty(0)
    if grad.numel() == 0 or not (want_x0 or want_noise):
        return gx, gn
    batch, numel = tu.batch_numel(grad)
    grid, bb, bd, warps, n_col = tu.launch_grid(batch, numel)
    tu.launch(_noisy_input_bwd_kernel, grid, (
        grad, gx if want_x0 else grad, gn if want_noise else grad,
        grad if alpha is None else alpha, alpha_s, grad if sigma is None else sigma, sigma_s, batch, numel, n_col,
    ), dict(ALPHA_T=alpha is not None, SIGMA_T=sigma is not None, WANT_X0=want_x0, WANT_NOISE=want_noise,
            FLAT=tu.is_flat(numel, bd), BLOCK_B=bb, BLOCK_D=bd, num_warps=warps))
    return gx, gn
