"""Sample metrics between two point clouds x [N, D] and y [M, D] (flattened per sample).

    sliced_wasserstein: SW_p(x, y) = ( E_theta W_p^p(<theta, x>, <theta, y>) )^(1/p), theta uniform on
                        the unit sphere (Monte Carlo over `num_projections`); 1-D W_p from sorted
                        projections (quantile-matched when N != M). For y = x + m: SW_2 = sqrt(E<theta,m>^2)
                        ~ ||m|| / sqrt(D).
    wasserstein2:       exact W_2 between two equal-size empirical measures, sqrt(min_perm mean ||x_i - y_perm(i)||^2)
                        (scipy.optimize.linear_sum_assignment, O(N^3): use a few thousand points at most).
    mmd:                Gaussian-kernel MMD, biased (V-statistic) estimate
                        MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), k = exp(-||a - b||^2 / (2 h^2)),
                        summed over the bandwidths h given; returns sqrt(max(MMD^2, 0)). Identical sets give 0.
All metrics are computed in float64 on the inputs' device.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def _points(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [N, ...]")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _pair(x, y):
    x, y = _points("x", x), _points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same per-sample size, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} but y is on {y.device}")
    return x, y


def _quantiles(sorted_proj: torch.Tensor, n: int) -> torch.Tensor:
    """Empirical quantile function of each column of sorted_proj [N, P] at the n mid-points (i + 0.5)/n."""
    m = sorted_proj.shape[0]
    if m == n:
        return sorted_proj
    idx = ((torch.arange(n, device=sorted_proj.device, dtype=torch.float64) + 0.5) / n * m).floor().long().clamp_max(m - 1)
    return sorted_proj[idx]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, p: int = 2,
                       generator: Optional[torch.Generator] = None) -> float:
    """Sliced Wasserstein-p distance (see module docstring); projections drawn with `generator`."""
    x, y = _pair(x, y)
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    theta = torch.randn(x.shape[1], num_projections, dtype=torch.float64, generator=generator).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    n = max(px.shape[0], py.shape[0])
    diff = (_quantiles(px, n) - _quantiles(py, n)).abs()
    return float(diff.pow(p).mean() ** (1.0 / p))


def wasserstein2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W_2 between equal-size empirical measures via an optimal assignment (needs scipy)."""
    x, y = _pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"wasserstein2 needs equal sample counts, got {x.shape[0]} and {y.shape[0]}")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise ImportError("wasserstein2 needs scipy (pip install scipy); sliced_wasserstein does not") from exc
    cost = torch.cdist(x, y).pow(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** 0.5)


def _kernel_mean(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float], chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        d2 = torch.cdist(a[i:i + chunk], b).pow(2)
        for h in bandwidths:
            total += float(torch.exp(-d2 / (2.0 * h * h)).sum())
    return total / (a.shape[0] * b.shape[0])


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 2048) -> float:
    """Median heuristic: the median pairwise distance of the pooled samples (first max_points of each)."""
    x, y = _pair(x, y)
    z = torch.cat([x[:max_points], y[:max_points]])
    d = torch.cdist(z, z)
    off = d[~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)]
    return float(off.median()) if off.numel() else 1.0


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: Union[None, float, Sequence[float]] = None) -> float:
    """Gaussian-kernel MMD (biased estimate, see module docstring); bandwidth None = median heuristic."""
    x, y = _pair(x, y)
    if bandwidth is None:
        bandwidths = [median_bandwidth(x, y)]
    elif isinstance(bandwidth, (int, float)):
        bandwidths = [float(bandwidth)]
    else:
        bandwidths = [float(h) for h in bandwidth]
    if not bandwidths or any(not h > 0 for h in bandwidths):
        raise ValueError(f"bandwidth must be > 0 (or a non-empty list of such), got {bandwidth!r}")
    m2 = _kernel_mean(x, x, bandwidths) + _kernel_mean(y, y, bandwidths) - 2.0 * _kernel_mean(x, y, bandwidths)
    return max(m2, 0.0) ** 0.5
