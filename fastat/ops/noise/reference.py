"""Reference seeded Gaussian noise: Philox4x32-10 and Box-Muller in pure torch int64 arithmetic.

This reproduces triton's `tl.randn(seed, offset)` (triton/language/random.py) element by element, so the
reference and the Triton kernels draw the same noise and a kernel can regenerate noise that was never
stored. Element i (row-major logical index, whatever the memory layout) of the result is

    (c0, c1, _, _) = Philox4x32-10(counter=(lo32(offset + i), hi32(offset + i), 0, 0),
                                   key=(lo32(seed), hi32(seed)))
    u_k = int32(c_k) mapped to [0, 1): (c_k if c_k >= 0 else ~c_k) * 4.6566127342e-10   (fp32)
    noise_i = sqrt(-2 log(max(u_0, 1e-7))) * cos(2 pi u_1)                               (fp32)

then rounded to the requested dtype. The integer part is bit-exact; log/cos may differ from the
GPU's by an ulp of fp32.
"""
from __future__ import annotations

from typing import Tuple

import torch

M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UINT_TO_UNIFORM = 4.6566127342e-10  # max value with MAX_INT * scale < 1 in fp32
TWO_PI = 6.283185307179586
SEED_LIMIT = 1 << 63  # seeds and offsets are int64 >= 0


def _mul_hi_lo(a: torch.Tensor, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product a*b of uint32 values held in int64, without overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi = a * b_hi  # < 2^48
    p_lo = a * b_lo  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & M32
    return hi, lo


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox4x32-10 on int64 tensors holding uint32 counters; key from a 64-bit seed."""
    k0, k1 = seed & M32, (seed >> 32) & M32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for uint32 values held in int64 -> fp32 in [0, 1)."""
    signed = torch.where(x >= 1 << 31, x - (1 << 32), x)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x on int32
    return signed.to(torch.float32) * torch.tensor(UINT_TO_UNIFORM, dtype=torch.float32)


def randn_flat(seed: int, offset: int, numel: int, device) -> torch.Tensor:
    """fp32 noise for logical indices offset .. offset + numel - 1 (1-D)."""
    idx = torch.arange(numel, device=device, dtype=torch.int64) + offset
    zero = torch.zeros_like(idx)
    c0, c1, _, _ = philox(seed, idx & M32, (idx >> 32) & M32, zero, zero)
    u1 = torch.clamp_min(uint_to_uniform(c0), 1.0e-7)
    u2 = uint_to_uniform(c1)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def noise_layout(like: torch.Tensor) -> torch.memory_format:
    """Seeded noise comes out channels_last when `like` is, else contiguous."""
    if like.is_contiguous():
        return torch.contiguous_format
    if like.ndim == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if like.ndim == 5 and like.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def gaussian_noise(like: torch.Tensor, seed: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    flat = randn_flat(seed, offset, like.numel(), like.device)
    return flat.view(like.shape).to(dtype).contiguous(memory_format=noise_layout(like))


def rand_flat(seed: int, offset: int, numel: int, device) -> torch.Tensor:
    """fp32 U[0, 1) for logical indices offset .. offset + numel - 1 (1-D): triton's tl.rand(seed, offset + i)."""
    idx = torch.arange(numel, device=device, dtype=torch.int64) + offset
    zero = torch.zeros_like(idx)
    c0, _, _, _ = philox(seed, idx & M32, (idx >> 32) & M32, zero, zero)
    return uint_to_uniform(c0)
