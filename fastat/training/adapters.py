"""Adapters so common codebases drop in without a rewrite.

- guided-diffusion / AT_Diff: ``GuidedDiffusionAdvLosses(alphas_cumprod, method=..., ...)`` has the
  ``training_losses(model, x_start, t, model_kwargs=None, noise=None)`` method of GaussianDiffusion and
  returns its dict of per-sample terms {"loss": [B], "mse": [B]} (+ "reg" for P2). Learned-variance
  models (2C output channels): pass ``learn_sigma=True``; the first C channels are the mean prediction.
  The hybrid VB term is not added (evaluate it yourself at x_adv with a frozen mean if you need it).
- EDM (Karras et al. 2022): ``EDMAdvLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5, method=...)`` is called
  like EDM's ``EDMLoss`` as ``loss_fn(net, images, labels=None, augment_pipe=None)`` and returns the
  per-element loss weight(sigma) * (D(y + n + delta; sigma) - y)^2, with
  sigma = exp(P_mean + P_std * N(0,1)), weight = (sigma^2 + sd^2) / (sigma * sd)^2, n = sigma * N(0, I).
  The denoiser predicts y (x0), so P1's folded target is y itself (see _common: x0 is unchanged by delta).
  delta comes from ``steps`` input-gradient steps on the same loss (``method="pgd"``), one step from a
  random start (``"fgsm_rs"``) or none (``"standard"``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_choice, check_tensor
from .._shapes import column
from ..ops.losses import equivariant_mse
from ..ops.noisy_input import noisy_input
from ..ops.perturbation import NORMS, pgd_step, random_perturbation, rms_radius
from ._common import SameRandomness, input_grad, perturbation_dtype, unwrap_output
from .diffusion import diffusion_adv_loss


class GuidedDiffusionAdvLosses:
    """guided-diffusion's ``GaussianDiffusion.training_losses`` with AT (any diffusion_adv_loss keyword)."""

    def __init__(self, alphas_cumprod, learn_sigma: bool = False, **adv_kwargs):
        self.alphas_cumprod = alphas_cumprod
        self.learn_sigma = learn_sigma
        self.adv_kwargs = adv_kwargs

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs=None, noise=None):
        """Per-sample terms of one batch: {"loss", "mse"} (and "reg" for P2), each [B]."""
        net = model
        if self.learn_sigma:
            channels = x_start.shape[1]

            def net(x, ts, **kw):
                return unwrap_output(model(x, ts, **kw))[:, :channels]

        out = diffusion_adv_loss(
            net, x_start, t, noise, alphas_cumprod=self.alphas_cumprod, model_kwargs=model_kwargs,
            reduction="none", return_dict=True, **self.adv_kwargs,
        )
        terms = {"loss": out["loss_per_sample"], "mse": out["mse"]}
        if self.adv_kwargs.get("method") in ("equivariant_random", "equivariant_adversarial"):
            terms["reg"] = out["reg"]
        return terms


class EDMAdvLoss:
    """EDM's EDMLoss with a P1 perturbation of the noisy input; returns the per-element loss [B, ...]."""

    def __init__(
        self,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        method: str = "pgd",
        eps: float = 0.1,
        eps_mode: str = "rms",
        alpha: Optional[float] = None,
        steps: int = 3,
        norm: str = "l2",
        random_start: bool = False,
        scaler=None,
        same_dropout: bool = True,
    ):
        check_choice("method", method, ("pgd", "fgsm_rs", "standard"))
        check_choice("norm", norm, NORMS)
        check_choice("eps_mode", eps_mode, ("rms", "abs"))
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.method, self.eps, self.eps_mode, self.alpha, self.steps, self.norm = method, eps, eps_mode, alpha, steps, norm
        self.random_start, self.scaler, self.same_dropout = random_start, scaler, same_dropout

    def __call__(self, net, images: torch.Tensor, labels=None, augment_pipe=None, generator=None):
        check_tensor("images", images)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        acc = perturbation_dtype(y)
        rnd = torch.randn(y.shape[0], device=y.device, dtype=acc, generator=generator)
        sigma = (rnd * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        z = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
        sig_col = sigma.reshape((-1,) + (1,) * (y.ndim - 1))
        rng = SameRandomness(y.device, self.same_dropout)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}

        def denoise(delta):
            rng.replay()
            return unwrap_output(net(noisy_input(y, z, 1.0, sigma, delta), sig_col, labels, **kwargs))

        delta = None
        if self.method != "standard":
            radius = rms_radius(self.eps, y) if (self.eps_mode == "rms" and self.norm == "l2") else self.eps
            if self.method == "pgd":
                k, init = self.steps, ("uniform" if self.random_start else "zero")
                step = self.alpha if self.alpha is not None else (0.1 if self.norm == "l2" else 2.5 * radius / max(k, 1))
            else:
                k, init = 1, "uniform"
                step = self.alpha if self.alpha is not None else 1.25 * radius
            delta = random_perturbation(y, radius, self.norm, init, generator, dtype=acc)
            for _ in range(k):
                delta = delta.detach().requires_grad_(True)
                per = equivariant_mse(denoise(delta), y, None, 1.0, "original", weight, "sum")
                delta = pgd_step(delta.detach(), input_grad(per, delta, self.scaler), step, radius, self.norm)
            delta = delta.detach()
        d_yn = denoise(delta)
        return column(weight, y) * (d_yn.to(acc) - y.to(acc)) ** 2
