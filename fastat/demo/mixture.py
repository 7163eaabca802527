"""Gaussian mixtures (2-D, or a 2-D ring embedded in a higher-dimensional space) whose DDPM-noised density and
exact denoiser are closed form.

Clean data: p_0(x) = sum_k w_k N(x; mu_k, s_k^2 I). Under the DDPM forward process
x_t = a_t * x0 + sigma_t * eps (a_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)) every component stays
Gaussian:

    p_t(x) = sum_k w_k N(x; a_t mu_k, v_k I),      v_k = a_t^2 s_k^2 + sigma_t^2

so with responsibilities r_k(x) = w_k N(x; a_t mu_k, v_k I) / p_t(x):

    grad_x log p_t(x) = -sum_k r_k(x) (x - a_t mu_k) / v_k
    eps*(x; t)  = E[eps | x_t = x]  = -sigma_t * grad_x log p_t(x)     (Tweedie)
    x0*(x; t)   = E[x0 | x_t = x]   = (x - sigma_t * eps*(x; t)) / a_t

With a subspace basis U [D, d] (orthonormal columns, P = U U^T) a component's covariance is
s_k^2 P + tau_k^2 (I - P) (tau_k = `off_stds`, 0 for data on the subspace); P and I - P are noised
separately, v_k = a_t^2 s_k^2 + sigma_t^2 in the subspace and u_k = a_t^2 tau_k^2 + sigma_t^2 off it:

    grad_x log p_t(x) = -sum_k r_k (P (x - a_t mu_k) / v_k + (I - P)(x - a_t mu_k) / u_k)

eps* is the minimiser of the DDPM loss over all functions: the exact denoiser that a trained eps-model
approximates, so ||eps_theta - eps*||^2 measures model error with no noise floor (a closed-form yardstick).
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
    """Gaussian mixture: means [K, D], stds [K], weights [K] (normalised here). Isotropic when `basis` is None;
    with `basis` [D, d] (orthonormal columns) the stds act in span(basis) and `off_stds` [K] (default 0:
    the data lie on the affine subspaces mu_k + span(basis)) in its orthogonal complement."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    basis: Optional[torch.Tensor] = None
    off_stds: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).reshape(-1).expand(k).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).reshape(-1).expand(k).clone()
        if (self.stds <= 0).any() or (self.weights <= 0).any():
            raise ValueError("stds and weights must be > 0")
        self.weights = self.weights / self.weights.sum()
        if self.basis is None:
            if self.off_stds is not None:
                raise ValueError("off_stds needs a basis (the subspace they are orthogonal to)")
            return
        self.basis = torch.as_tensor(self.basis, dtype=torch.float64)
        if self.basis.ndim != 2 or self.basis.shape[0] != self.dim or not 1 <= self.basis.shape[1] <= self.dim:
            raise ValueError(f"basis must be [D={self.dim}, d] with 1 <= d <= D, got shape {tuple(self.basis.shape)}")
        eye = torch.eye(self.basis.shape[1], dtype=torch.float64)
        if not torch.allclose(self.basis.T @ self.basis, eye, atol=1e-8):
            raise ValueError("basis must have orthonormal columns")
        off = 0.0 if self.off_stds is None else self.off_stds
        self.off_stds = torch.as_tensor(off, dtype=torch.float64).reshape(-1).expand(k).clone()
        if (self.off_stds < 0).any():
            raise ValueError("off_stds must be >= 0")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None, device="cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n i.i.d. samples of p_0 [n, D]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        if self.basis is None:
            x = self.means[comp] + self.stds[comp, None] * z
        else:
            inside = z @ self.basis @ self.basis.T
            x = self.means[comp] + self.stds[comp, None] * inside + self.off_stds[comp, None] * (z - inside)
        return x.to(device=device, dtype=dtype)

    def off_subspace(self, x: torch.Tensor) -> torch.Tensor:
        """(I - P) x [B, D]: the part of x orthogonal to span(basis) (zeros without a basis)."""
        x = x.to(torch.float64)
        if self.basis is None:
            return torch.zeros_like(x)
        u = self.basis.to(x.device)
        return x - (x @ u) @ u.T

    def projected_quantiles(self, directions: torch.Tensor, levels: torch.Tensor, grid: int = 8192) -> torch.Tensor:
        """Quantiles [L, P] of <theta_j, x>, x ~ p_0, at `levels` [L] in (0, 1), one column per unit direction
        theta_j (columns of `directions` [D, P]). Each projection is a 1-D mixture with means <theta, mu_k> and
        variances s_k^2 |P theta|^2 + tau_k^2 |(I - P) theta|^2; its CDF is tabulated on `grid` points spanning
        every component +-9 sd and inverted by linear interpolation (float64)."""
        theta = directions.to(torch.float64).cpu()
        if theta.ndim != 2 or theta.shape[0] != self.dim:
            raise ValueError(f"directions must be [{self.dim}, P], got {tuple(theta.shape)}")
        levels = levels.to(torch.float64).cpu()
        if levels.ndim != 1 or not ((levels > 0) & (levels < 1)).all():
            raise ValueError("levels must be a 1-D tensor of probabilities in (0, 1)")
        mu = self.means @ theta  # [K, P]
        if self.basis is None:
            var = self.stds[:, None] ** 2 * (theta * theta).sum(0)
        else:
            inside = (self.basis.T @ theta).pow(2).sum(0)
            var = self.stds[:, None] ** 2 * inside + self.off_stds[:, None] ** 2 * ((theta * theta).sum(0) - inside)
        sd = var.clamp_min(1e-24).sqrt()
        lo, hi = (mu - 9 * sd).min(0).values, (mu + 9 * sd).max(0).values
        x = (lo + (hi - lo) * torch.linspace(0, 1, grid, dtype=torch.float64)[:, None]).T.contiguous()  # [P, G]
        z = (x[None] - mu[:, :, None]) / (sd[:, :, None] * math.sqrt(2.0))  # [K, P, G]
        cdf = (self.weights[:, None, None] * 0.5 * (1 + torch.erf(z))).sum(0)  # [P, G], nondecreasing
        u = levels[None].expand(theta.shape[1], -1).contiguous()  # [P, L]
        j = torch.searchsorted(cdf, u).clamp(1, grid - 1)
        f0, f1, x0, x1 = cdf.gather(1, j - 1), cdf.gather(1, j), x.gather(1, j - 1), x.gather(1, j)
        frac = ((u - f0) / (f1 - f0).clamp_min(1e-300)).clamp(0, 1)
        return (x0 + (x1 - x0) * frac).T.contiguous()

    def _components(self, x: torch.Tensor, alpha: Coef, sigma: Coef):
        """(log of w_k N(x; a mu_k, Sigma_k(t))) [B, K] and Sigma_k(t)^-1 (x - a mu_k) [B, K, D]."""
        x = x.to(torch.float64)
        a, s = _col(alpha, x), _col(sigma, x)
        means = self.means.to(x.device)
        var = a * a * self.stds.to(x.device) ** 2 + s * s  # [B, K] or [K]
        shift = a[..., None] * means if a.ndim else a * means  # [B, K, D] or [K, D]
        diff = x[:, None, :] - shift
        log_w = self.weights.to(x.device).log()
        if self.basis is None:
            log_comp = log_w - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * (diff * diff).sum(-1) / var
            return log_comp, diff / var[..., None]
        u = self.basis.to(x.device)
        d = u.shape[1]
        var_off = a * a * self.off_stds.to(x.device) ** 2 + s * s
        inside = (diff @ u) @ u.T
        outside = diff - inside
        log_comp = (log_w - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * (self.dim - d) * torch.log(2 * math.pi * var_off)
                    - 0.5 * (inside * inside).sum(-1) / var - 0.5 * (outside * outside).sum(-1) / var_off)
        return log_comp, inside / var[..., None] + outside / var_off[..., None]

    def log_prob(self, x: torch.Tensor, alpha: Coef = 1.0, sigma: Coef = 0.0) -> torch.Tensor:
        """log p_t(x) [B] (float64) of the noised mixture with coefficients (a_t, sigma_t)."""
        log_comp, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: torch.Tensor, alpha: Coef = 1.0, sigma: Coef = 0.0) -> torch.Tensor:
        """grad_x log p_t(x) = -sum_k r_k Sigma_k(t)^-1 (x - a mu_k)  [B, D] (float64)."""
        log_comp, whitened = self._components(x, alpha, sigma)
        resp = torch.softmax(log_comp, dim=1)
        return -(resp[..., None] * whitened).sum(1)

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
                 uneven: bool = True, dim: int = 2, seed: int = 0) -> GaussianMixture:
    """The demo's clean distribution: `num_components` Gaussians on a circle (uneven weights by default,
    so a model that spreads mass evenly is penalised). dim > 2 embeds the ring's plane in R^dim with a
    random orthonormal basis (from `seed`): the data lie on a 2-D subspace (off_stds 0), as in P2's
    low-dimensional tests, so isotropic corruption has directions off the data's manifold."""
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.linspace(1.0, 2.0, num_components, dtype=torch.float64) if uneven else torch.ones(num_components)
    stds = torch.full((num_components,), std, dtype=torch.float64)
    if dim == 2:
        return GaussianMixture(means, stds, weights)
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return GaussianMixture(means @ basis.T, stds, weights, basis=basis, off_stds=0.0)


def noisy_mixture(mixture: GaussianMixture, fraction: float = 0.9, noise_std: float = 0.2) -> GaussianMixture:
    """The distribution of corrupt(x, "noisy") for x ~ mixture: each component once clean (weight 1 - fraction)
    and once convolved with N(0, noise_std^2 I) (weight fraction). Its exact denoiser is the best any model
    trained on the corrupted data can do (the demo's "oracle_corrupted" row)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    n2 = noise_std ** 2
    means = torch.cat([mixture.means, mixture.means])
    stds = torch.cat([mixture.stds, (mixture.stds ** 2 + n2).sqrt()])
    weights = torch.cat([(1 - fraction) * mixture.weights, fraction * mixture.weights]).clamp_min(1e-300)
    if mixture.basis is None:
        return GaussianMixture(means, stds, weights)
    off = torch.cat([mixture.off_stds, (mixture.off_stds ** 2 + n2).sqrt()])
    return GaussianMixture(means, stds, weights, basis=mixture.basis, off_stds=off)


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
