"""Benchmark models: the DDPM CIFAR-10 UNet of Ho et al. (35.7 M parameters at the default config)
and a toy 2-D MLP denoiser. Plain torch, no extra dependency (the GPU machines have
no package registry), called as ``model(x_t, timesteps)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Ho et al. / tensor2tensor): [sin(t f_k), cos(t f_k)], f_k = 10000^(-k/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if ch % 32 == 0 else math.gcd(ch, 8), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.drop, self.conv2 = _norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DDPMUNet(nn.Module):
    """Ho et al. (2020) CIFAR-10 UNet: ch=128, ch_mult=(1,2,2,2), 2 res blocks per level, attention at
    16x16, dropout 0.1 -> 35.7 M parameters. Smaller configs (ch, ch_mult) serve as CPU smoke cases."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), resolution: int = 32, in_ch: int = 3, dropout: float = 0.1):
        super().__init__()
        self.ch, temb = ch, 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * mult, temb, dropout)]
                                               + ([Attention(ch * mult)] if res in attn_resolutions else [])))
                cur = ch * mult
                chans.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                chans.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, dropout), Attention(cur), ResBlock(cur, cur, temb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + chans.pop(), ch * mult, temb, dropout)]
                                             + ([Attention(ch * mult)] if res in attn_resolutions else [])))
                cur = ch * mult
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.norm_out, self.conv_out = _norm(cur), nn.Conv2d(cur, in_ch, 3, padding=1)

    def forward(self, x, t):
        emb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if isinstance(block[0], ResBlock):
                h = block[0](h, emb)
                for layer in block[1:]:
                    h = layer(h)
            else:
                h = block[0](h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
                for layer in block[1:]:
                    h = layer(h)
            else:
                h = block[1](block[0](h))
        return self.conv_out(F.silu(self.norm_out(h)))


class ToyMLP(nn.Module):
    """The toy 2-D denoiser: sinusoidal time embedding (64) concatenated to x, 4 linear layers of
    width 256 with SiLU."""

    def __init__(self, dim: int = 2, width: int = 256, temb: int = 64):
        super().__init__()
        self.temb_dim = temb
        self.net = nn.Sequential(
            nn.Linear(dim + temb, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, self.temb_dim).to(x.dtype)], dim=1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
