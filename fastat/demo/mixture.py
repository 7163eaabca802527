"""An embedded 2-D Gaussian mixture whose DDPM-noised density and exact denoiser are closed form.

Clean data: p_0(x) = sum_k w_k N(x; mu_k, s_k^2 I). Under the DDPM forward process
x_t = a_t * x0 + sigma_t * eps (a_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)) every component stays
Gaussian:

    p_t(x) = sum_k w_k N(x; a_t mu_k, v_k I),      v_k = a_t^2 s_k^2 + sigma_t^2

so with responsibilities r_k(x) = w_k N(x; a_t mu_k, v_k I) / p_t(x):

    grad_x log p_t(x) = -sum_k r_k(x) (x - a_t mu_k) / v_k
    eps*(x; t)  = E[eps | x_t = x]  = -sigma_t * grad_x log p_t(x)     (Tweedie)
    x0*(x; t)   = E[x0 | x_t = x]   = (x - sigma_t * eps*(x; t)) / a_t

eps* is the minimiser of the DDPM loss over all functions: the exact denoiser that a trained eps-model
approximates, so ||eps_theta - eps*||^2 measures model error with no noise floor (ANCHORS §3).
Everything is computed in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

Coef = Union[float, torch.Tensor]


def _col(c: Coef, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor as a float64 [B, 1] column (or a 0-d tensor for a float)."""
    if isinstance(c, torch.Tensor):
        c = c.to(device=like.device, dtype=torch.float64)
        return c.reshape(-1, 1) if c.ndim else c
    return torch.tensor(float(c), dtype=torch.float64, device=like.device)


@dataclass
class GaussianMixture:
    """Isotropic Gaussian mixture: means [K, D], stds [K], weights [K] (normalised here)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).reshape(-1).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1).expand(k).clone()
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        if (self.stds <= 0).any() or (self.weights <= 0).any():
            raise ValueError("stds and weights must be > 0")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None, device="cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n i.i.d. samples of p_0 [n, D]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x = self.means[comp] + self.stds[comp, None] * z
        return x.to(device=device, dtype=dtype)

    def _components(self, x: torch.Tensor, alpha: Coef, sigma: Coef):
        """(log of w_k N(x; a mu_k, v_k I)) [B, K], diff x - a mu_k [B, K, D], v_k [B, K] or [K]."""
        x = x.to(torch.float64)
        a, s = _col(alpha, x), _col(sigma, x)
        means = self.means.to(x.device)
        var = a * a * self.stds.to(x.device) ** 2 + s * s  # [B, K] or [K]
        shift = a[..., None] * means if a.ndim else a * means  # [B, K, D] or [K, D]
        diff = x[:, None, :] - shift
        log_comp = (
            self.weights.to(x.device).log()
            - 0.5 * self.dim * torch.log(2 * math.pi * var)
            - 0.5 * (diff * diff).sum(-1) / var
        )
        return log_comp, diff, var

    def log_prob(self, x: torch.Tensor, alpha: Coef = 1.0, sigma: Coef = 0.0) -> torch.Tensor:
        """log p_t(x) [B] (float64) of the noised mixture with coefficients (a_t, sigma_t)."""
        log_comp, _, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: torch.Tensor, alpha: Coef = 1.0, sigma: Coef = 0.0) -> torch.Tensor:
        """grad_x log p_t(x) = -sum_k r_k (x - a mu_k) / v_k  [B, D] (float64)."""
        log_comp, diff, var = self._components(x, alpha, sigma)
        resp = torch.softmax(log_comp, dim=1)
        return -(resp[..., None] * diff / var[..., None]).sum(1)

    def eps_star(self, x: torch.Tensor, alpha: Coef, sigma: Coef) -> torch.Tensor:
        """The exact denoiser eps*(x; t) = E[eps | x_t = x] = -sigma_t * grad log p_t(x)  [B, D] (float64)."""
        return -_col(sigma, x.to(torch.float64)) * self.score(x, alpha, sigma)

    def x0_star(self, x: torch.Tensor, alpha: Coef, sigma: Coef) -> torch.Tensor:
        """E[x0 | x_t = x] = (x - sigma_t eps*) / a_t  [B, D] (float64)."""
        x64 = x.to(torch.float64)
        return (x64 - _col(sigma, x64) * self.eps_star(x, alpha, sigma)) / _col(alpha, x64)


class ExactDenoiser(torch.nn.Module):
    """The mixture's exact eps-denoiser as a model with fastat's calling convention model(x_t, timesteps):
    eps*(x; t) with (a_t, sigma_t) gathered from `alphas_cumprod` in float64, returned in x's dtype."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.mixture = mixture
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(x.device)[timesteps.reshape(-1).long()]
        if abar.numel() == 1 and x.shape[0] != 1:
            abar = abar.expand(x.shape[0])
        return self.mixture.eps_star(x, abar.sqrt(), (1 - abar).sqrt()).to(x.dtype)


def ring_mixture(num_components: int = 8, radius: float = 1.5, std: float = 0.15,
                 uneven: bool = True) -> GaussianMixture:
    """The demo's clean distribution: `num_components` Gaussians on a circle (uneven weights by default,
    so a model that spreads mass evenly is penalised)."""
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.linspace(1.0, 2.0, num_components, dtype=torch.float64) if uneven else torch.ones(num_components)
    return GaussianMixture(means, torch.full((num_components,), std, dtype=torch.float64), weights)


CORRUPTIONS = ("clean", "noisy", "outliers")


def corrupt(x: torch.Tensor, kind: str, *, fraction: Optional[float] = None, noise_std: float = 0.2,
            outlier_box: float = 4.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A corrupted copy of a training set x [N, D]:
      "clean":    x unchanged
      "noisy":    a `fraction` (default 0.9) of the points, chosen at random, get + N(0, noise_std^2 I)
                  (default 0.2: about 20% of the ring's per-coordinate std of ~1.07, and more than the
                  components' own std 0.15, so the corrupted clusters visibly blur)
      "outliers": a `fraction` (default 0.1) of the points are replaced by draws uniform in
                  [-outlier_box, outlier_box]^D (gross outliers, far from most of the clean mass)
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    if kind == "clean":
        return x.clone()
    frac = (0.9 if kind == "noisy" else 0.1) if fraction is None else float(fraction)
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    n = x.shape[0]
    chosen = torch.randperm(n, generator=generator)[: int(round(frac * n))].to(x.device)
    out = x.clone()
    if kind == "noisy":
        out[chosen] += noise_std * torch.randn(len(chosen), x.shape[1], generator=generator).to(x)
    else:
        out[chosen] = (2 * torch.rand(len(chosen), x.shape[1], generator=generator) - 1).to(x) * outlier_box
    return out
