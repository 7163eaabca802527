"""Learned variance (IDDPM hybrid loss, issue 11 item 9): the VB term evaluated where AT_Diff evaluates it
(x_adv for the "delta"/"delta_detach" targets, the clean x_t for "original"), with the mean frozen, equals
an explicit float64 computation of guided-diffusion's formulas; the adapter returns {"loss", "mse", "vb"}."""
import math

import pytest
import torch

import fastat
from training_utils import TABLE, clone, coefs, grads, l2_step, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")

LN2 = math.log(2.0)


class TwoHeads(torch.nn.Module):
    """[B, D] -> [B, 2D]: the noise prediction from one head, the variance values v in [-1, 1] from another
    (separate parameters, so a frozen mean shows as a zero VB gradient in the mean head)."""

    def __init__(self, dim=2, width=16):
        super().__init__()
        self.mean = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))
        self.var = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.Tanh(), torch.nn.Linear(width, dim),
                                       torch.nn.Tanh())

    def forward(self, x, t):
        h = torch.cat([x, (t.to(x.dtype) / 1000.0).reshape(-1, 1)], dim=1)
        return torch.cat([self.mean(h), self.var(h)], dim=1)


def setup(seed=0, batch=6):
    torch.manual_seed(seed)
    model = TwoHeads().double()
    x0 = torch.rand(batch, 2, dtype=torch.float64) * 2 - 1
    noise = torch.randn(batch, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 250, 700, 999][:batch])
    return model, x0, noise, t


def explicit_vb(t, x0, x_t, eps, v):
    """guided-diffusion's _vb_terms_bpd with LEARNED_RANGE variance, written out in float64 [B]."""
    abar = TABLE.double()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / prev
    post_var = beta * (1 - prev) / (1 - abar)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    c1 = (beta * prev.sqrt() / (1 - abar))[t][:, None]
    c2 = ((1 - prev) * (1 - beta).sqrt() / (1 - abar))[t][:, None]
    a, s = abar[t].sqrt()[:, None], (1 - abar[t]).sqrt()[:, None]
    true_mean = c1 * x0 + c2 * x_t
    true_log = post_log[t][:, None]
    x0_hat = (x_t - s * eps) / a
    mean = c1 * x0_hat + c2 * x_t
    frac = (v + 1) / 2
    log_var = frac * torch.log(beta)[t][:, None] + (1 - frac) * true_log
    kl = 0.5 * (-1.0 + log_var - true_log + torch.exp(true_log - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))

    def cdf(u):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))

    inv_std = torch.exp(-0.5 * log_var)
    upper, lower = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
    log_prob = torch.where(
        x0 < -0.999, torch.log(upper.clamp(min=1e-12)),
        torch.where(x0 > 0.999, torch.log((1 - lower).clamp(min=1e-12)), torch.log((upper - lower).clamp(min=1e-12))),
    )
    return torch.where(t == 0, -log_prob.mean(1) / LN2, kl.mean(1) / LN2)


def split(out):
    return out[:, :2], out[:, 2:]


@pytest.mark.parametrize("target", ["delta_detach", "delta", "original"])
def test_pgd_with_learned_variance_matches_explicit_hybrid_loss(target):
    model, x0, noise, t = setup()
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    radius = 0.1 * math.sqrt(2)

    def terms(d, final):
        x_adv = x_t + d
        eps, v = split(model(x_adv, t))
        moved = 0 if target == "original" else (d.detach() if target == "delta_detach" or final else d) / s
        mse = ((eps - (noise + moved)) ** 2).mean(1)
        x_vb = {"delta": x_adv, "delta_detach": x_adv.detach(), "original": x_t}[target]
        return mse, explicit_vb(t, x0, x_vb, eps.detach(), v)

    delta = torch.zeros_like(x0)
    for _ in range(2):
        d = delta.clone().requires_grad_(True)
        mse, vb = terms(d, False)
        (g,) = torch.autograd.grad((mse + vb).sum(), d)
        delta = l2_step(d.detach(), g, 0.1, radius)
    mse, vb = terms(delta, True)
    ref = (mse + vb).mean()
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", steps=2, target=target,
                                    learn_sigma=True, return_dict=True)
    torch.testing.assert_close(out["vb"], vb, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["mse"], mse, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["loss"], ref, atol=1e-10, rtol=1e-10)
    for x, y in zip(grads(out["loss"], model), grads(ref, model)):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_vb_freezes_the_mean_and_rescale_matches_guided_diffusion():
    model, x0, noise, t = setup(1)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="standard", learn_sigma=True,
                                    return_dict=True)
    mean_grads = torch.autograd.grad(out["vb"].sum(), list(model.mean.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in mean_grads)
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    eps, v = split(model(x_t, t))
    torch.testing.assert_close(out["vb"], explicit_vb(t, x0, x_t, eps, v), atol=1e-10, rtol=1e-10)
    t500 = t.clamp(max=499)  # a 500-step schedule: guided-diffusion's RESCALED_MSE multiplies vb by 500 / 1000
    rescaled = fastat.diffusion_adv_loss(model, x0, t500, noise, alphas_cumprod=TABLE[:500], method="standard",
                                         learn_sigma=True, rescale_learned_sigmas=True, return_dict=True)
    plain = fastat.diffusion_adv_loss(model, x0, t500, noise, alphas_cumprod=TABLE[:500],
                                      method="standard", learn_sigma=True, return_dict=True)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.5, atol=1e-12, rtol=1e-12)


def test_p2_adds_the_vb_term_of_the_clean_branch():
    model, x0, noise, t = setup(2)
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="equivariant_random",
                                    learn_sigma=True, return_dict=True, generator=torch.Generator().manual_seed(3))
    eps, v = split(model(x_t, t))
    torch.testing.assert_close(out["vb"], explicit_vb(t, x0, x_t, eps, v), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["loss_per_sample"], out["mse"] + out["reg"] + out["vb"], atol=1e-12, rtol=1e-12)


def test_free_replay_with_learned_variance_matches_the_official_loop():
    """AT_Diff's Free-AT on a learn_sigma model: the replayed loss is mse + vb at x_adv (delta_detach)."""
    model, x0, noise, t = setup(3)
    ref_model = clone(model)
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    delta = torch.zeros_like(x0)
    for _ in range(3):
        opt.zero_grad()
        d = delta.clone().requires_grad_(True)
        eps, v = split(ref_model(x_t + d, t))
        mse = ((eps - noise - d.detach() / s) ** 2).mean(1)
        (mse + explicit_vb(t, x0, (x_t + d).detach(), eps.detach(), v)).mean().backward()
        opt.step()
        delta = l2_step(d.detach(), d.grad, 0.1, 0.1 * math.sqrt(2))
    fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, alphas_cumprod=TABLE,
                      learn_sigma=True).step(x0, t, noise)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_guided_diffusion_adapter_returns_the_vb_term():
    model, x0, noise, t = setup(4)
    gd = fastat.GuidedDiffusionAdvLosses(TABLE, learn_sigma=True, method="pgd", adv_steps=2)
    terms = gd.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", steps=2,
                                    learn_sigma=True, reduction="none", return_dict=True)
    torch.testing.assert_close(terms["vb"], ref["vb"])
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_learned_variance_needs_twice_the_channels():
    model, x0, noise, t = setup(5)
    with pytest.raises(ValueError, match="learn_sigma"):
        fastat.diffusion_adv_loss(lambda x, ts: model(x, ts)[:, :3], x0, t, noise, alphas_cumprod=TABLE,
                                  learn_sigma=True)
