"""Adapters so common codebases drop in without a rewrite.

- guided-diffusion / AT_Diff: ``GuidedDiffusionAdvLosses(alphas_cumprod, method=..., ...)`` has the
  ``training_losses(model, x_start, t, model_kwargs=None, noise=None)`` method of GaussianDiffusion and
  returns its dict of per-sample terms {"loss": [B], "mse": [B]} (+ "reg" for P2). Learned-variance
  models (2C output channels, ``learn_sigma=True``): the first C channels are the mean prediction and
  the dict adds "vb", IDDPM's VB term with the mean frozen, evaluated at x_adv as AT_Diff does (vb.py);
  ``rescale_learned_sigmas=True`` scales it by T/1000 (guided-diffusion's RESCALED_MSE).
- EDM (Karras et al. 2022): ``EDMAdvLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5, method=...)`` is called
  like EDM's ``EDMLoss`` as ``loss_fn(net, images, labels=None, augment_pipe=None)`` and returns the
  per-element loss weight(sigma) * (D(y + n + delta; sigma) - y)^2, with
  sigma = exp(P_mean + P_std * N(0,1)), weight = (sigma^2 + sd^2) / (sigma * sd)^2, n = sigma * N(0, I),
  drawn in EDM's order (ln sigma's normal in the default dtype, the augmentation pipe, the noise).
  The denoiser predicts y (x0), so P1's folded target is y itself (see _common: x0 is unchanged by delta).
  delta comes from ``steps`` input-gradient steps on the same loss (``method="pgd"``), one step from a
  random start (``"fgsm_rs"``) or none (``"standard"``), through the shared attack loop (attack.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import (check_callable, check_choice, check_finite, check_flag, check_float, check_generator, check_like,
                       check_tensor)
from .._shapes import column
from ..ops.losses import equivariant_mse
from ..ops.noisy_input import noisy_input
from ..schedules import alphas_cumprod_of
from . import attack
from ._common import (SameRandomness, check_output, check_timesteps, perturbation_dtype, running_stat_modules,
                      unwrap_output)
from ._options import check_eps, check_norm, check_scaler, check_steps
from .diffusion import diffusion_adv_loss


class GuidedDiffusionAdvLosses:
    """guided-diffusion's ``GaussianDiffusion.training_losses`` with AT (any diffusion_adv_loss keyword)."""

    def __init__(self, alphas_cumprod, learn_sigma: bool = False, rescale_learned_sigmas: bool = False, **adv_kwargs):
        alphas_cumprod_of(alphas_cumprod)  # checked now; the other options at the first training_losses call
        check_flag("learn_sigma", learn_sigma)
        check_flag("rescale_learned_sigmas", rescale_learned_sigmas)
        self.alphas_cumprod = alphas_cumprod
        self.learn_sigma = learn_sigma
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.adv_kwargs = adv_kwargs

    def training_losses(self, model, x_start: torch.Tensor, t: torch.Tensor, model_kwargs=None, noise=None):
        """Per-sample terms of one batch: {"loss", "mse"} (+ "reg" for P2, + "vb" with learn_sigma), each [B]."""
        check_tensor("x_start", x_start)
        check_timesteps("t", t, x_start)  # under guided-diffusion's names
        out = diffusion_adv_loss(
            model, x_start, t, noise, alphas_cumprod=self.alphas_cumprod, model_kwargs=model_kwargs,
            reduction="none", return_dict=True, learn_sigma=self.learn_sigma,
            rescale_learned_sigmas=self.rescale_learned_sigmas, **self.adv_kwargs,
        )
        terms = {"loss": out["loss_per_sample"], "mse": out["mse"]}
        if self.adv_kwargs.get("method") in ("equivariant_random", "equivariant_adversarial"):
            terms["reg"] = out["reg"]
        if self.learn_sigma:
            terms["vb"] = out["vb"]
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
        check_choice("eps_mode", eps_mode, ("rms", "abs"))
        attack.check_random_start(random_start)
        check_finite("P_mean", P_mean)
        check_float("P_std", P_std, positive=True)
        check_float("sigma_data", sigma_data, positive=True)
        check_scaler(scaler)
        check_flag("same_dropout", same_dropout)
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.method, self.eps_mode, self.norm = method, eps_mode, check_norm("norm", norm)
        self.eps, self.alpha = check_eps("eps", eps), check_float("alpha", alpha, optional=True)
        self.steps = check_steps("steps", steps)
        self.random_start, self.scaler, self.same_dropout = random_start, scaler, same_dropout

    def __call__(self, net, images: torch.Tensor, labels=None, augment_pipe=None, generator=None):
        check_callable("net", net)
        check_tensor("images", images)
        check_callable("augment_pipe", augment_pipe, optional=True)
        check_generator(generator)
        # EDM's order of draws: ln(sigma)'s normal (in the default dtype, as EDM's torch.randn), then the
        # augmentation pipe's own draws, then the noise; so a seeded run draws what EDMLoss draws.
        rnd = torch.randn(images.shape[0], device=images.device, dtype=torch.get_default_dtype(), generator=generator)
        y, augment_labels = images, None
        if augment_pipe is not None:
            augmented = augment_pipe(images)
            if not isinstance(augmented, (tuple, list)) or len(augmented) != 2:
                raise TypeError("augment_pipe must return (images, augment_labels) as EDM's AugmentPipe does, got "
                                f"{type(augmented).__name__}")
            y, augment_labels = augmented
            check_like("augment_pipe(images)[0]", y, "images", images)
        acc = perturbation_dtype(y)
        sigma = (rnd.to(acc) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        z = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
        sig_col = sigma.reshape((-1,) + (1,) * (y.ndim - 1))
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        plan = None
        if self.method != "standard":
            plan = attack.AttackPlan.resolve(self.method, y, eps=self.eps, eps_mode=self.eps_mode, norm=self.norm,
                                             alpha=self.alpha, steps=self.steps if self.method == "pgd" else None,
                                             random_start=self.random_start if self.method == "pgd" else None)
            delta = plan.start(y, generator, acc)  # drawn before any pass
        rng = SameRandomness(y.device, self.same_dropout)
        x_noisy = noisy_input(y, z, 1.0, sigma)

        def denoise(x):
            rng.replay()
            return check_output(unwrap_output(net(x, sig_col, labels, **kwargs), "net"), x, "net")

        x_in = x_noisy
        if plan is not None:
            x_in = attack.first_input(x_noisy, delta, plan.init == "zero", y.dtype)
            _, x_in, _ = attack.ascend(
                lambda x, _d: equivariant_mse(denoise(x), y, None, 1.0, "original", weight, "sum"), x_noisy, delta,
                steps=plan.steps, step_size=plan.step_size, radius=plan.radius, norm=plan.norm, x_in=x_in,
                scaler=self.scaler, model_dtype=y.dtype, norm_layers=running_stat_modules(net))
        d_yn = denoise(x_in)
        return column(weight, y) * (d_yn.to(acc) - y.to(acc)) ** 2
