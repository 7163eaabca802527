"""The learned-variance term of IDDPM's hybrid loss (Nichol & Dhariwal 2021), as guided-diffusion and AT_Diff
train ``learn_sigma`` models: the model outputs 2C channels, [mean prediction, v], and

    L_vb = KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) ) / ln 2          t > 0   (bits per dim, mean_flat)
         = -log p_disc(x0 | mean, var) / ln 2                              t = 0   (discretised Gaussian, 8 bits)
    q:  mean  mu~ = c1 x0 + c2 x_t,  log var = log beta~_t (clipped: beta~_1 at t = 0)
        beta_t = 1 - abar_t / abar_{t-1},  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2 = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)
    p:  mean  = c1 x0_hat + c2 x_t  with x0_hat from the *frozen* (detached) mean prediction at x_t
        log var = f log beta_t + (1 - f) log beta~_t,  f = (v + 1) / 2           (LEARNED_RANGE)

so the VB term trains only the variance channels. ``rescale=True`` multiplies it by T / 1000
(guided-diffusion's RESCALED_MSE, ``rescale_learned_sigmas``). Coefficients are formed in float64.
"""
from __future__ import annotations

import math

import torch

from .._shapes import column, mean_flat
from ..schedules import alphas_cumprod_of

LN2 = math.log(2.0)


def _approx_normal_cdf(u: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by the IDDPM decoder."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def _decoder_nll(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log of the probability of x0's 8-bit bin ([-1, 1] data, bins of width 2/255, open outer bins)."""
    inv_std = torch.exp(-0.5 * log_var)
    centred = x0 - mean
    upper = _approx_normal_cdf(inv_std * (centred + 1.0 / 255))
    lower = _approx_normal_cdf(inv_std * (centred - 1.0 / 255))
    log_prob = torch.where(
        x0 < -0.999,
        upper.clamp_min(1e-12).log(),
        torch.where(x0 > 0.999, (1.0 - lower).clamp_min(1e-12).log(), (upper - lower).clamp_min(1e-12).log()),
    )
    return -log_prob


def hybrid_vb(table, timesteps: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, prediction: torch.Tensor,
              var_values: torch.Tensor, prediction_type: str, rescale: bool = False) -> torch.Tensor:
    """L_vb per sample [B] (module docstring), evaluated at x_t, in x0's accumulation dtype (fp32 / fp64).

    ``prediction`` is the mean prediction (eps, v or x0 per ``prediction_type``), detached here;
    ``var_values`` the model's v in [-1, 1], which carries the gradient."""
    abar = alphas_cumprod_of(table)
    if abar.numel() < 2:
        raise ValueError("learn_sigma=True needs a schedule of at least 2 timesteps (beta~_0 is clipped to beta~_1)")
    acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1.0 - abar / prev
    post_var = beta * (1.0 - prev) / (1.0 - abar)
    post_log = torch.cat([post_var[1:2], post_var[1:]]).log()
    coef = {
        "c1": beta * prev.sqrt() / (1.0 - abar),
        "c2": (1.0 - prev) * (1.0 - beta).sqrt() / (1.0 - abar),
        "a": abar.sqrt(),
        "s": (1.0 - abar).sqrt(),
        "log_beta": beta.log(),
        "post_log": post_log,
    }
    idx = timesteps.reshape(-1).long()  # gathered where the timesteps live: no device-to-host sync
    c = {k: column(v.to(idx.device)[idx].to(x0.device, acc), x0) for k, v in coef.items()}
    x0a, x_ta = x0.to(acc), x_t.to(acc)
    pred = prediction.detach().to(acc)
    if prediction_type == "epsilon":
        x0_hat = (x_ta - c["s"] * pred) / c["a"]
    elif prediction_type == "v_prediction":
        x0_hat = c["a"] * x_ta - c["s"] * pred
    else:
        x0_hat = pred
    true_mean = c["c1"] * x0a + c["c2"] * x_ta
    mean = c["c1"] * x0_hat + c["c2"] * x_ta
    frac = (var_values.to(acc) + 1.0) / 2.0
    log_var = frac * c["log_beta"] + (1.0 - frac) * c["post_log"]
    kl = 0.5 * (-1.0 + log_var - c["post_log"] + torch.exp(c["post_log"] - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))
    vb = torch.where(timesteps.reshape(-1).to(x0.device) == 0, mean_flat(_decoder_nll(x0a, mean, log_var)), mean_flat(kl)) / LN2
    return vb * (abar.numel() / 1000.0) if rescale else vb
