"""P2's radius schedule (scale, exponent, floor, random bias) and P1's step at the official ||delta||/||eps||
ratio (alpha_mode="cifar_ratio"): against explicit float64 loops."""
import math

import pytest
import torch

import fastat
from fastat.training import p2_radius
from training_utils import TABLE, clone, coefs, grads, l2_step, make, p2_coefs, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_p2_radius_floor_and_random_bias():
    sigma = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    floor = p2_radius(sigma, 0.5, rho=1.5, r_min=0.03)
    torch.testing.assert_close(floor, (0.5 * sigma**1.5).clamp_min(0.03), rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    rand = p2_radius(sigma, 0.5, rho=1.5, r_min=0.03, bias="random", generator=g)
    u = torch.rand(11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rand, 0.5 * sigma**1.5 + 0.03 * (1 + u), rtol=0, atol=1e-15)
    assert bool((rand - 0.5 * sigma**1.5 >= 0.03).all()) and bool((rand - 0.5 * sigma**1.5 <= 0.06).all())
    assert p2_radius(sigma.float(), 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="bias"):
        p2_radius(sigma, 0.1, bias="gaussian")


@pytest.mark.parametrize("adversarial", [False, True])
def test_p2_random_bias_and_scale_match_explicit_loop(adversarial):
    model, x0, noise, t = make(21)
    a, s = coefs(t)
    g = torch.Generator().manual_seed(7)
    r = 1.0 * s**2 + (8 / 255) * (1 + torch.rand(x0.shape[0], dtype=torch.float64, generator=g))[:, None]
    lam_t = 0.3 * math.sqrt(3.0) / r
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=g) * r
    x_t = a * x0 + s * noise
    pc = model(x_t, t)
    if adversarial:
        o = omega.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(((model(x_t + s * o, t) - pc.detach()) ** 2).mean(1).sum(), o)
        omega = torch.maximum(torch.minimum(omega + 1.25 * r * gr.sign(), r), -r)
    pp = model(x_t + s * omega, t)
    ref = (((pc - noise) ** 2).mean(1) + lam_t[:, 0] * ((pp - pc - omega) ** 2).mean(1)).mean()
    loss = fastat.diffusion_adv_loss(
        model, x0, t, noise, alphas_cumprod=TABLE, method="equivariant_adversarial" if adversarial else "equivariant_random",
        eps=1.0, radius_bias="random", generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for p, q in zip(grads(loss, model), grads(ref, model)):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_p2_exponent_and_floor_reach_the_loss():
    model, x0, noise, t = make(22)
    a, s = coefs(t)
    r, lam_t = p2_coefs(s, eps=2.0, rho=1.0, r_min=0.05)
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=torch.Generator().manual_seed(3)) * r
    x_t = a * x0 + s * noise
    pc, pp = model(x_t, t), model(x_t + s * omega, t)
    ref = (((pc - noise) ** 2).mean(1) + lam_t[:, 0] * ((pp - pc - omega) ** 2).mean(1)).mean()
    loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="equivariant_random", eps=2.0,
                                     rho=1.0, r_min=0.05, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dim", [2, 48])
def test_pgd_cifar_ratio_step_matches_explicit_loop(dim):
    model, x0, noise, t = make(23, dim=dim)
    a, s = coefs(t)
    step = 0.1 * math.sqrt(dim / 3072)
    radius = 0.1 * math.sqrt(dim)
    x_t = a * x0 + s * noise
    delta = torch.zeros_like(x0)
    for _ in range(3):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean(1).sum(), d)
        delta = l2_step(d.detach(), g, step, radius)
    ref = ((model(x_t + delta, t) - noise - delta / s) ** 2).mean(1).mean()
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", alpha_mode="cifar_ratio",
                                    return_dict=True)
    torch.testing.assert_close(out["loss"], ref, atol=1e-12, rtol=1e-12)
    # K steps of the scaled size bound ||delta||: ||delta|| / sqrt(D) <= 0.3 / sqrt(3072) at every D
    assert float(out["delta_norm"].max()) <= 3 * step * (1 + 1e-6) and float(out["delta_norm"].max()) > 0


def test_free_replay_cifar_ratio_equals_the_scaled_absolute_step():
    model, x0, noise, t = make(24, dim=12)
    twin = clone(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.05)
    out_a = fastat.FreeReplay(model, opt_a, 3, alphas_cumprod=TABLE, alpha_mode="cifar_ratio").step(x0, t, noise)
    out_b = fastat.FreeReplay(twin, opt_b, 3, alphas_cumprod=TABLE, alpha=0.1 * math.sqrt(12 / 3072)).step(x0, t, noise)
    torch.testing.assert_close(out_a["delta"][0], out_b["delta"][0], atol=0, rtol=0)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert float(out_a["delta"][0].norm(dim=1).max()) > 0


def test_free_replay_p2_random_bias_matches_explicit_loop():
    model, x0, noise, t = make(25)
    ref_model = clone(model)
    a, s = coefs(t)
    g = torch.Generator().manual_seed(2)
    r = 0.1 * s**2 + (8 / 255) * (1 + torch.rand(x0.shape[0], dtype=torch.float64, generator=g))[:, None]
    lam_t = 0.3 * math.sqrt(3.0) / r
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=g) * r
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    x_t = a * x0 + s * noise
    for _ in range(2):
        opt.zero_grad()
        o = omega.clone().requires_grad_(True)
        pc, pp = ref_model(x_t, t), ref_model(x_t + s * o, t)
        (((pc - noise) ** 2).mean(1) + lam_t[:, 0] * ((pp - pc - o) ** 2).mean(1)).mean().backward()
        opt.step()
        omega = torch.maximum(torch.minimum(omega + 1.25 * r * o.grad.sign(), r), -r)
    fr = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 2, method="p2", alphas_cumprod=TABLE,
                           radius_bias="random")
    out = fr.step(x0, t, noise, generator=torch.Generator().manual_seed(2))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out["delta"][0], omega, atol=1e-12, rtol=1e-12)


def test_option_errors_name_the_argument():
    model, x0, noise, t = make(26)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="radius_bias"):
        fastat.diffusion_adv_loss(model, x0, alphas_cumprod=TABLE, method="equivariant_random", radius_bias="uniform")
    with pytest.raises(ValueError, match="alpha_mode"):
        fastat.diffusion_adv_loss(model, x0, alphas_cumprod=TABLE, method="pgd", alpha_mode="rms")
    with pytest.raises(ValueError, match="alpha_mode.*method='pgd'"):
        fastat.diffusion_adv_loss(model, x0, alphas_cumprod=TABLE, method="fgsm_rs", alpha_mode="cifar_ratio")
    with pytest.raises(ValueError, match="alpha_mode.*norm='l2'"):
        fastat.diffusion_adv_loss(model, x0, alphas_cumprod=TABLE, method="pgd", norm="linf", alpha_mode="cifar_ratio")
    with pytest.raises(ValueError, match="alpha_mode.*method='p1'"):
        fastat.FreeReplay(model, opt, method="p2", alphas_cumprod=TABLE, alpha_mode="cifar_ratio")
    with pytest.raises(ValueError, match="alpha_mode.*norm='l2'"):
        fastat.FreeReplay(model, opt, alphas_cumprod=TABLE, norm="linf", alpha_mode="cifar_ratio")
    with pytest.raises(ValueError, match="radius_bias"):
        fastat.FreeReplay(model, opt, method="p2", alphas_cumprod=TABLE, radius_bias="normal")
