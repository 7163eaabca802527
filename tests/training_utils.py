"""Small float64 models and explicit (unfused, plain autograd) reference loops for the training tests."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fastat
from fastat import schedules

TABLE = schedules.ddpm_linear_alphas_cumprod(1000)


class TinyDenoiser(torch.nn.Module):
    """x: [B, D], t: [B] -> [B, D]; optional dropout to check mask replay."""

    def __init__(self, dim: int = 2, width: int = 16, dropout: float = 0.0):
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, width)
        self.l2 = torch.nn.Linear(width, dim)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x, t):
        h = torch.cat([x, (t.to(x.dtype) / 1000.0).reshape(-1, 1)], dim=1)
        return self.l2(self.drop(torch.tanh(self.l1(h))))


def make(seed: int = 0, batch: int = 6, dim: int = 2, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = TinyDenoiser(dim, dropout=dropout).double()
    x0 = torch.randn(batch, dim, dtype=torch.float64)
    noise = torch.randn(batch, dim, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,))
    return model, x0, noise, t


def coefs(t):
    """sqrt(abar_t), sqrt(1 - abar_t) in float64 as [B, 1] columns."""
    abar = TABLE[t]
    return abar.sqrt()[:, None], (1.0 - abar).sqrt()[:, None]


def l2_step(d, g, step, radius):
    gn = g.norm(dim=1, keepdim=True).clamp_min(1e-8)
    new = d + step * g / gn
    return new * (radius / new.norm(dim=1, keepdim=True).clamp_min(1e-8)).clamp(max=1.0)


def ball_start(shape, radius, gen):
    """fastat's uniform-in-L2-ball draw, replayed with plain torch (same generator calls)."""
    out = torch.empty(shape, dtype=torch.float64).normal_(generator=gen)
    u = torch.rand(shape[0], generator=gen, dtype=torch.float64).pow(1.0 / shape[1])
    return out * (u / out.norm(dim=1).clamp_min(1e-8))[:, None] * radius


def grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


def clone(model):
    return copy.deepcopy(model)


def p2_coefs(s, eps=0.1, rho=2.0, r_min=8 / 255, lam=0.3, beta=1.0):
    r = (eps * s**rho).clamp_min(r_min)
    return r, lam * math.sqrt(3.0) / (beta * r)


@pytest.fixture
def reference_backend():
    """The loops are checked on the reference ops (kernels have their own tests; see test_training_backends)."""
    with fastat.use_backend("torch"):
        yield
