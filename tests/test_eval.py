"""fastat.eval and the demo mixture: closed-form denoiser vs autograd, metrics vs known values, attacks."""
import math

import pytest
import torch

import fastat

from fastat.demo.mixture import ExactDenoiser, GaussianMixture, ring_mixture
from fastat.eval import (
    ddim_sample,
    ddim_timesteps,
    denoiser_error,
    memorization_score,
    mmd,
    random_on_sphere,
    sampler_attack,
    sliced_wasserstein,
    wasserstein2,
)
from fastat.schedules import ddpm_linear_alphas_cumprod

TABLE = ddpm_linear_alphas_cumprod(1000)


@pytest.fixture(autouse=True)
def _reference_backend():
    """The evaluation logic is tested on the reference ops (kernels have their own cross-backend tests)."""
    with fastat.use_backend("torch"):
        yield


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("per_sample", [True, False])
def test_eps_star_is_minus_sigma_times_autograd_score(per_sample):
    mix = ring_mixture()
    x = 2.0 * torch.randn(64, 2, generator=_gen(), dtype=torch.float64)
    if per_sample:
        alpha = torch.rand(64, generator=_gen(1), dtype=torch.float64) * 0.98 + 0.01
        sigma = (1 - alpha**2).sqrt()
    else:
        alpha, sigma = 0.6, 0.8
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(mix.log_prob(xr, alpha, sigma).sum(), xr)
    s_col = sigma[:, None] if per_sample else sigma
    torch.testing.assert_close(mix.eps_star(x, alpha, sigma), -s_col * score, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mix.x0_star(x, alpha, sigma), (x - s_col * mix.eps_star(x, alpha, sigma)) / (
        alpha[:, None] if per_sample else alpha))


def test_single_gaussian_denoiser_matches_hand_formula_and_model_wrapper():
    mu, s0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64), 0.3
    mix = GaussianMixture(mu, [s0], [1.0])
    t = torch.tensor([0, 250, 999, 600])
    abar = TABLE[t]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x = torch.randn(4, 2, generator=_gen(), dtype=torch.float64)
    hand = s[:, None] * (x - a[:, None] * mu) / (a[:, None] ** 2 * s0**2 + s[:, None] ** 2)
    torch.testing.assert_close(mix.eps_star(x, a, s), hand)
    torch.testing.assert_close(ExactDenoiser(mix, TABLE)(x.float(), t), hand.float(), rtol=1e-5, atol=1e-6)
    # log-density of the noised Gaussian at its mean: -log(2 pi v)
    v = a**2 * s0**2 + s**2
    torch.testing.assert_close(mix.log_prob(a[:, None] * mu, a, s), -torch.log(2 * math.pi * v))


def test_metrics_of_identical_samples_are_zero():
    x = torch.randn(300, 2, generator=_gen())
    assert sliced_wasserstein(x, x.clone(), generator=_gen()) == pytest.approx(0.0, abs=1e-12)
    assert wasserstein2(x, x.clone()) == pytest.approx(0.0, abs=1e-12)
    assert mmd(x, x.clone(), bandwidth=[0.2, 1.0]) == pytest.approx(0.0, abs=1e-6)


def test_shifted_gaussians_give_the_analytic_w2():
    shift = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ||shift|| = 5
    x = torch.randn(400, 2, generator=_gen(), dtype=torch.float64)
    # A translated empirical measure: the identity coupling is optimal, W2 = ||shift|| exactly.
    assert wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-9)
    # Independent samples of N(0, I) and N(shift, I): W2 = ||shift|| up to finite-sample error.
    y = torch.randn(400, 2, generator=_gen(1), dtype=torch.float64) + shift
    assert wasserstein2(x, y) == pytest.approx(5.0, abs=0.1)
    # Sliced: SW2^2 = E_theta <theta, shift>^2 = ||shift||^2 / D for translated samples.
    assert sliced_wasserstein(x, x + shift, num_projections=4000, generator=_gen(2)) == pytest.approx(5.0 / math.sqrt(2), rel=0.03)


def test_sliced_wasserstein_unequal_sizes_and_mmd_two_points():
    x = torch.randn(200, 3, generator=_gen())
    assert sliced_wasserstein(x, x.repeat(3, 1), generator=_gen()) == pytest.approx(0.0, abs=1e-12)
    a, b, h = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), 0.7
    assert mmd(a, b, bandwidth=h) == pytest.approx(math.sqrt(2 - 2 * math.exp(-2.0 / (2 * h * h))), rel=1e-9)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(a, b, bandwidth=-1.0)
    with pytest.raises(ValueError, match="equal sample counts"):
        wasserstein2(x, x[:10])


def test_memorization_score():
    train = torch.randn(100, 2, generator=_gen())
    copies = memorization_score(train[:20] + 1e-6, train)
    assert copies["memorized_fraction"] == 1.0 and copies["mean_ratio"] < 1e-3
    fresh = memorization_score(torch.randn(200, 2, generator=_gen(1)), train)
    assert fresh["memorized_fraction"] < 0.2 and fresh["mean_ratio"] > 0.5


def test_ddim_with_exact_denoiser_of_a_point_mass_lands_on_it():
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = ExactDenoiser(GaussianMixture(mu, [1e-4], [1.0]), TABLE)
    x_T = torch.randn(16, 2, generator=_gen())
    for n in (1, 5, 20):
        out = ddim_sample(exact, x_T, TABLE, n)
        torch.testing.assert_close(out, mu.float().expand(16, 2), atol=1e-3, rtol=0)
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(1000, 0)


def test_denoiser_error_zero_for_exact_and_pgd_beats_random():
    mix = ring_mixture()
    exact = ExactDenoiser(mix, TABLE)
    x0 = mix.sample(256, _gen())
    for kind in ("none", "random", "pgd"):
        e = denoiser_error(exact, x0, TABLE, reference=exact, perturbation=kind, generator=_gen(1))
        assert e.shape == (256,) and float(e.abs().max()) < 1e-10

    def biased(x, t):  # exact + 0.3 x: the error grows with ||x||, so an attacker pushes x outwards
        return exact(x, t) + 0.3 * x

    t = torch.randint(0, 1000, (256,), generator=_gen(2))
    noise = torch.randn(256, 2, generator=_gen(3))
    kw = dict(reference=exact, radius=0.3, generator=_gen(4))
    clean = denoiser_error(biased, x0, TABLE, t, noise, perturbation="none", **kw).mean()
    rand = denoiser_error(biased, x0, TABLE, t, noise, perturbation="random", **kw).mean()
    pgd = denoiser_error(biased, x0, TABLE, t, noise, perturbation="pgd", **kw).mean()
    assert pgd > rand and pgd > clean


def test_denoiser_error_without_reference_uses_the_p1_target():
    x0 = torch.randn(32, 2, generator=_gen())
    t = torch.randint(0, 1000, (32,), generator=_gen(1))
    a, s = TABLE[t].sqrt().float()[:, None], (1 - TABLE[t]).sqrt().float()[:, None]

    def oracle(x, tt):  # knows x0: the noise implied by x, (x - a x0) / s = eps + delta / s
        return (x - a * x0) / s

    for kind in ("none", "random", "pgd"):
        e = denoiser_error(oracle, x0, TABLE, t, perturbation=kind, radius=0.2, generator=_gen(2))
        assert float(e.max()) < 1e-6


def test_random_on_sphere_and_sampler_attack():
    like = torch.zeros(10, 3, 4)
    d = random_on_sphere(like, 2.5, generator=_gen())
    torch.testing.assert_close(d.reshape(10, -1).norm(dim=1), torch.full((10,), 2.5))
    assert float(random_on_sphere(like, 0.1, "linf", _gen()).abs().max()) == pytest.approx(0.1)
    exact = ExactDenoiser(ring_mixture(), TABLE)
    x_T = torch.randn(64, 2, generator=_gen())
    zero = sampler_attack(exact, x_T, TABLE, 6, attack_at=(2,), radius=0.0)
    assert float(zero["error"].max()) == 0.0
    rand = sampler_attack(exact, x_T, TABLE, 6, attack_at=(2,), radius=0.2, mode="random", generator=_gen(1))
    pgd = sampler_attack(exact, x_T, TABLE, 6, attack_at=(2, 4), radius=0.2, mode="pgd", steps=3, generator=_gen(1))
    assert pgd["error"].mean() > rand["error"].mean() > 0
    with pytest.raises(ValueError, match="attack_at"):
        sampler_attack(exact, x_T, TABLE, 6, attack_at=(6,))


def test_pgd_ascends_through_the_reference():
    """A model that predicts 0 has error ||eps*(x)||^2: only the reference's dependence on x can guide PGD."""
    mix = ring_mixture()
    exact = ExactDenoiser(mix, TABLE)
    x0 = mix.sample(256, _gen())
    t = torch.randint(0, 300, (256,), generator=_gen(1))
    noise = torch.randn(256, 2, generator=_gen(2))

    def zero(x, tt):
        return torch.zeros_like(x)

    kw = dict(reference=exact, radius=0.1, generator=_gen(3))
    rand = denoiser_error(zero, x0, TABLE, t, noise, perturbation="random", **kw).mean()
    pgd = denoiser_error(zero, x0, TABLE, t, noise, perturbation="pgd", **kw).mean()
    assert pgd > 1.1 * rand
