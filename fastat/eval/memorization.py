"""Memorisation score: nearest-neighbour distance ratio of generated samples to the training set.

For a sample x with nearest and second-nearest training points at distances d1 <= d2 (Euclidean over all
elements), ratio(x) = d1 / d2. A copy of a training point has ratio ~0; a fresh sample ratio ~1. A sample
counts as memorised when ratio < threshold (1/3, Carlini et al. 2023 / Yoon et al. 2023).
"""
from __future__ import annotations

from typing import Dict

import torch


def nn_distance_ratio(samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """d1 / d2 per sample [N] (float64)."""
    if samples.ndim < 1 or train.ndim < 1 or train.shape[0] < 2:
        raise ValueError(f"need samples [N, ...] and at least 2 training points, got {tuple(train.shape)}")
    s = samples.reshape(samples.shape[0], -1).to(torch.float64)
    tr = train.reshape(train.shape[0], -1).to(device=s.device, dtype=torch.float64)
    if s.shape[1] != tr.shape[1]:
        raise ValueError(f"samples and train differ in per-sample size: {s.shape[1]} vs {tr.shape[1]}")
    out = []
    for i in range(0, s.shape[0], chunk):
        d = torch.cdist(s[i:i + chunk], tr).topk(2, dim=1, largest=False).values
        out.append(d[:, 0] / d[:, 1].clamp_min(1e-12))
    return torch.cat(out)


def memorization_score(samples: torch.Tensor, train: torch.Tensor, threshold: float = 1.0 / 3.0) -> Dict[str, float]:
    """{"memorized_fraction": share of samples with ratio < threshold, "mean_ratio", "median_ratio"}."""
    ratio = nn_distance_ratio(samples, train)
    return {
        "memorized_fraction": float((ratio < threshold).double().mean()),
        "mean_ratio": float(ratio.mean()),
        "median_ratio": float(ratio.median()),
    }
