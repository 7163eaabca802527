"""Shared test helpers: layouts, tolerances and the list of backends this machine can run."""
from __future__ import annotations

from typing import List, Tuple

import torch

from fastat._backend import BACKENDS, backend_status, device_refusal

# Shapes covering 2-D toy data, images and video latents (odd sizes on purpose).
SHAPES = [(7, 2), (3, 5), (4, 3, 5, 6), (2, 4, 3, 5, 6), (1, 1), (5, 3, 17, 9)]
LAYOUTS = ("contiguous", "channels_last", "noncontiguous")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (atol, rtol) of an op's output against the fp64 reference, per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as x in another memory layout."""
    if kind == "channels_last":
        if x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.ndim == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x
    if kind == "noncontiguous":
        # Interleave with padding along the last dim, then slice it away: same values, strided view.
        padded = torch.stack([x, torch.zeros_like(x)], dim=-1)
        return padded[..., 0]
    return x.contiguous()


def runnable_backends(device: str = "cpu") -> List[str]:
    """Backends that can run on `device` here (the reference always; kernels once they exist)."""
    return [b for b in BACKENDS if backend_status(b)[0] and device_refusal(b, device) is None]


def tol(dtype: torch.dtype) -> Tuple[float, float]:
    return TOLERANCES[dtype]


# ---------------------------------------------------------------------------------------------------
# Hand formulas written from docs/maths.md, independent of fastat's reference code. They compute in the dtype
# of their inputs: call them on float64 inputs for the oracle, on low-precision inputs for the "plain
# torch in that dtype" baseline of the flash-attention tolerance rule.

ETA = 1e-8  # the max(||.||, 1e-8) floor of docs/maths.md


def rows(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, D] (works for B = 0 and any layout)."""
    d = 1
    for s in x.shape[1:]:
        d *= s
    return x.reshape(x.shape[0], d)


def col(c, like: torch.Tensor):
    """A per-sample coefficient (float or [B] tensor) shaped to broadcast against `like`."""
    if isinstance(c, torch.Tensor):
        return c.reshape((-1,) + (1,) * (like.ndim - 1)).to(like.dtype)
    return c


def hand_noisy_input(x0, noise, alpha, sigma, delta=None):
    out = col(alpha, x0) * x0 + col(sigma, x0) * noise
    return out if delta is None else out + delta


def hand_pgd_step(delta, grad, step_size, radius, norm="l2", normalize=True):
    """docs/maths.md §1/§4.2: L2 normalised ascent + ball projection; Linf sign step + box clamp."""
    d, g = rows(delta), rows(grad)
    step, r = col(step_size, d), col(radius, d)
    if norm == "l2":
        if normalize:
            g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(ETA)
        v = d + step * g
        n = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        v = torch.where(n > r, v * (r / n.clamp_min(ETA)), v)
    else:
        v = d + step * (torch.sign(g) if normalize else g)
        if isinstance(r, torch.Tensor):
            v = torch.maximum(torch.minimum(v, r), -r)
        else:
            v = v.clamp(-r, r)
    return v.reshape(delta.shape)


def hand_reduce(per_sample, weight, reduction):
    if weight is not None:
        per_sample = per_sample * (weight.to(per_sample.dtype) if isinstance(weight, torch.Tensor) else weight)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(per_sample.shape[0], 1)


def hand_equivariant_mse(pred, noise, delta, sigma, target="delta_detach", weight=None, reduction="mean"):
    """loss_i = w_i * mean((pred - goal)^2), goal = noise (+ delta/sigma, delta detached for delta_detach)."""
    goal = noise
    if target != "original":
        d = delta.detach() if target == "delta_detach" else delta
        goal = noise + d / col(sigma, d)
    return hand_reduce(rows((pred - goal) ** 2).mean(dim=1), weight, reduction)


def hand_equivariance_regularizer(pp, pc, omega, weight=None, detach_anchor=False, mode="equivariant", reduction="mean"):
    anchor = pc.detach() if detach_anchor else pc
    if mode == "equivariant":
        anchor = anchor + omega
    return hand_reduce(rows((pp - anchor) ** 2).mean(dim=1), weight, reduction)


def hand_consistency_distance(pred, target, metric="l2", c=None, weight=None, reduction="mean"):
    diff = rows(pred - target)
    if metric == "l2":
        per = (diff**2).mean(dim=1)
    elif metric == "l1":
        per = diff.abs().mean(dim=1)
    else:
        if c is None:
            c = 0.00054 * diff.shape[1] ** 0.5
        per = ((diff**2).sum(dim=1) + c * c).sqrt() - c
    return hand_reduce(per, weight, reduction)


def make(shape, dtype=torch.float64, kind="contiguous", generator=None, scale=1.0, device="cpu"):
    """Fresh standard-normal data (times `scale`) in the given dtype and memory layout."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return layout(x.to(device=device, dtype=dtype), kind)


def coefficient(kind, batch, low, high, generator=None, dtype=torch.float32, device="cpu"):
    """A per-sample coefficient in [low, high): a Python float or a [B] tensor."""
    if kind == "float":
        return float(low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64))
    return (low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def as64(c):
    """A coefficient or tensor in float64 (floats stay floats); keeps autograd links."""
    return c.double() if isinstance(c, torch.Tensor) else c


def seed_of(*parts) -> int:
    """A stable per-test seed (Python's str hash is randomised per process, so is unusable under xdist)."""
    import zlib

    return zlib.crc32(repr(parts).encode())
