"""A small MLP eps-denoiser for low-dimensional data, with a sinusoidal embedding of the timestep."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..schedules import alphas_cumprod_of


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim]: (cos(t f_i), sin(t f_i)), f_i = max_period^(-i / (dim/2)) (DDPM/ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) from F = concat(x_t, emb(t)) -> [Linear -> SiLU] x depth -> Linear(dim).

    Called as model(x_t, timesteps) with x_t [B, dim] and integer timesteps [B] (fastat's convention); it always
    returns eps. Without `alphas_cumprod` (a 1-D table or a scheduler with one) the network's output F is eps itself. With it, F is read as
    v = a_t eps - s_t x0 (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)) and returned as eps = a_t F + s_t x_t: the same
    function class and the same eps-MSE loss, but an error in F moves the sampler's x0 estimate by s_t |dF| instead
    of (s_t / a_t) |dF|, which matters at large t where a_t is ~0.01-0.1 (the demo's mode weights are decided there)."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, embed_dim: int = 32,
                 alphas_cumprod=None):
        super().__init__()
        if depth < 1 or hidden < 1 or embed_dim < 2:
            raise ValueError(f"need depth >= 1, hidden >= 1, embed_dim >= 2; got {depth}, {hidden}, {embed_dim}")
        self.embed_dim = embed_dim
        layers = []
        width = dim + embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)
        self.v_parameterized = alphas_cumprod is not None
        if self.v_parameterized:
            ab = alphas_cumprod_of(alphas_cumprod).detach().cpu()  # the training loops' table check, in float64
            # stored as float32 buffers (they follow the model's device): no per-call check or host sync
            self.register_buffer("signal", ab.sqrt().float(), persistent=False)
            self.register_buffer("noise", (1 - ab).sqrt().float(), persistent=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(timesteps, self.embed_dim).to(x.dtype)
        if emb.shape[0] == 1 and x.shape[0] != 1:
            emb = emb.expand(x.shape[0], -1)
        out = self.net(torch.cat([x, emb], dim=1))
        if not self.v_parameterized:
            return out
        t = timesteps.reshape(-1).long()
        a, s = self.signal[t].to(x.dtype)[:, None], self.noise[t].to(x.dtype)[:, None]
        return a * out + s * x
