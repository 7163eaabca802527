"""Sample metrics for small images (flattened to [N, D]), each with a floor from two sets of real images:

    fid:   Frechet distance between Gaussian fits of a fixed classifier's penultimate features (torchmetrics'
           FrechetInceptionDistance with that classifier as its custom feature extractor)
    sw2:   sliced W2 in pixel space (fastat.eval.sliced_wasserstein, 256 projections)
    resid: off-principal-subspace residual energy, mean_i ||(I - P_k)(x_i - m)||^2 / D with m, P_k the mean and the
           top-k principal subspace of the clean training images: pixel noise in samples raises it
    conf:  the classifier's mean top-class probability (recognisable digits score high)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """MLP D -> 256 -> `features` -> classes; forward returns the penultimate features (FID's extractor),
    logits() the class scores. `num_features` tells torchmetrics the feature size."""

    def __init__(self, dim: int = 64, features: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, features), nn.ReLU())
        self.head = nn.Linear(features, classes)
        self.num_features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.reshape(x.shape[0], -1).float())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, steps: int = 600, seed: int = 0) -> DigitClassifier:
    """A fixed classifier for the metrics: full-batch Adam on (x, y) with light input noise, deterministic in seed."""
    torch.manual_seed(seed)
    model = DigitClassifier(x.shape[1]).to(x.device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator(device=x.device).manual_seed(seed)
    for _ in range(steps):
        noisy = x + 0.05 * torch.randn(x.shape, generator=g, device=x.device)
        loss = nn.functional.cross_entropy(model.logits(noisy), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


class ImageMetrics:
    """Scores sample sets against a fixed real set `reference` [M, D] (e.g. held-out images)."""

    def __init__(self, classifier: DigitClassifier, reference: torch.Tensor, clean_train: torch.Tensor,
                 num_components: Optional[int] = None, variance: float = 0.9):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.classifier, self.reference = classifier, reference
        self.fid = FrechetInceptionDistance(feature=classifier, reset_real_features=False, normalize=True)
        self.fid.update(reference, real=True)
        self.mean = clean_train.double().mean(0)
        centered = clean_train.double() - self.mean
        _, s, vh = torch.linalg.svd(centered, full_matrices=False)
        if num_components is None:
            share = (s ** 2).cumsum(0) / (s ** 2).sum()
            num_components = int((share < variance).sum()) + 1
        self.k = num_components
        self.components = vh[:num_components]  # [k, D]

    def residual(self, x: torch.Tensor) -> float:
        c = x.double().reshape(x.shape[0], -1) - self.mean
        r = c - (c @ self.components.T) @ self.components
        return float(r.pow(2).sum(1).mean() / c.shape[1])

    def __call__(self, samples: torch.Tensor, seed: int = 0) -> Dict[str, float]:
        from ..eval import sliced_wasserstein

        samples = samples.reshape(samples.shape[0], -1)
        self.fid.reset()
        self.fid.update(samples.float(), real=False)
        fid = float(self.fid.compute())
        with torch.no_grad():
            conf = float(self.classifier.logits(samples).softmax(1).max(1).values.mean())
        sw2 = sliced_wasserstein(samples, self.reference, 256, generator=torch.Generator().manual_seed(seed))
        return {"fid": fid, "sw2": float(sw2), "resid": self.residual(samples), "conf": conf}
