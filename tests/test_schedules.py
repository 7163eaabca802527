"""Schedules: DDPM tables, the (alpha, sigma) gather, Karras sigmas, preconditioning, iCT curriculum."""
import math
from types import SimpleNamespace

import pytest
import torch

from fastat import schedules as S


def hand_linear(T, b0, b1):
    out, prod = [], 1.0
    for i in range(T):
        beta = b0 + (b1 - b0) * i / (T - 1) if T > 1 else b0
        prod *= 1.0 - beta
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


def hand_cosine(T, s=0.008, max_beta=0.999):
    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    out, prod = [], 1.0
    for i in range(T):
        prod *= 1.0 - min(1 - f(i + 1) / f(i), max_beta)
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("T,b0,b1", [(1000, 1e-4, 0.02), (10, 1e-3, 0.2), (1, 0.01, 0.01), (4000, 1e-4, 0.02)])
def test_linear_table(T, b0, b1):
    table = S.ddpm_linear_alphas_cumprod(T, b0, b1)
    assert table.dtype == torch.float64 and table.shape == (T,)
    torch.testing.assert_close(table, hand_linear(T, b0, b1), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("T", [1000, 50, 1])
def test_cosine_table(T):
    table = S.ddpm_cosine_alphas_cumprod(T)
    assert table.dtype == torch.float64 and table.shape == (T,)
    torch.testing.assert_close(table, hand_cosine(T), atol=1e-14, rtol=1e-12)
    # the last beta is clipped at max_beta = 0.999, so abar_{T-1} <= 1 - 0.999
    assert (table[1:] < table[:-1]).all() and 0 <= table[-1] <= 1e-3 + 1e-15


def test_alpha_sigma_fp32_rounded_once():
    table = S.ddpm_linear_alphas_cumprod()
    t = torch.tensor([0, 1, 2, 17, 500, 998, 999])
    alpha, sigma = S.alpha_sigma(table, t)
    assert alpha.dtype == sigma.dtype == torch.float32 and alpha.shape == sigma.shape == (7,)
    want_a = torch.tensor([math.sqrt(table[i].item()) for i in t], dtype=torch.float64).float()
    want_s = torch.tensor([math.sqrt(1 - table[i].item()) for i in t], dtype=torch.float64).float()
    assert torch.equal(alpha, want_a) and torch.equal(sigma, want_s)
    # the trap this avoids: sqrt(1 - abar) formed in fp32 loses the small timesteps
    assert sigma[0].item() == pytest.approx(0.01, rel=1e-6)
    # [B, 1] timesteps, int32 timesteps and a 0-d timestep gather the same values
    torch.testing.assert_close(S.alpha_sigma(table, t[:, None].int())[0], alpha)
    assert S.alpha_sigma(table, torch.tensor(999))[1].shape == (1,)


def test_alpha_sigma_from_scheduler_like_object():
    table = S.ddpm_cosine_alphas_cumprod()
    t = torch.tensor([3, 300, 900])
    scheduler = SimpleNamespace(alphas_cumprod=table.float())  # diffusers stores an fp32 table
    alpha, sigma = S.alpha_sigma(scheduler, t)
    abar = table.float().double()[t]
    assert torch.equal(alpha, abar.sqrt().float()) and torch.equal(sigma, (1 - abar).sqrt().float())
    torch.testing.assert_close(S.alphas_cumprod_of(scheduler), table.float().double())
    assert S.alphas_cumprod_of(SimpleNamespace(alphas_cumprod=[0.9, 0.5])).dtype == torch.float64
    e = S.alpha_sigma(table, torch.zeros(0, dtype=torch.long))
    assert e[0].shape == e[1].shape == (0,)


@pytest.mark.parametrize("beta_schedule,ours", [("linear", S.ddpm_linear_alphas_cumprod), ("squaredcos_cap_v2", S.ddpm_cosine_alphas_cumprod)])
def test_matches_diffusers_scheduler(beta_schedule, ours):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    torch.testing.assert_close(S.alphas_cumprod_of(scheduler), ours(1000), atol=1e-6, rtol=0)
    t = torch.tensor([0, 250, 999])
    alpha, sigma = S.alpha_sigma(scheduler, t)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(
        alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * noise, scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5
    )


def hand_karras(N, smin, smax, rho):
    return [(smin ** (1 / rho) + i / (N - 1) * (smax ** (1 / rho) - smin ** (1 / rho))) ** rho for i in range(N)]


@pytest.mark.parametrize("N,smin,smax,rho", [(18, 0.002, 80.0, 7.0), (2, 0.01, 1.0, 3.0), (1281, 0.002, 80.0, 7.0)])
def test_karras_sigmas(N, smin, smax, rho):
    up = S.karras_sigmas(N, smin, smax, rho)
    assert up.dtype == torch.float64 and up.shape == (N,)
    torch.testing.assert_close(up, torch.tensor(hand_karras(N, smin, smax, rho), dtype=torch.float64), atol=0, rtol=1e-12)
    assert up[0].item() == pytest.approx(smin, rel=1e-12) and up[-1].item() == pytest.approx(smax, rel=1e-12)
    assert (up[1:] > up[:-1]).all()
    down = S.karras_sigmas(N, smin, smax, rho, descending=True)
    assert down[0].item() == pytest.approx(smax, rel=1e-12) and down[-1].item() == pytest.approx(smin, rel=1e-12)
    assert torch.equal(down, up.flip(0))


def test_edm_preconditioning():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = S.edm_preconditioning(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    # at sigma = sigma_data: c_skip = 1/2, c_out = sd/sqrt2, c_in = 1/(sd sqrt2)
    assert c_skip[1].item() == pytest.approx(0.5) and c_out[1].item() == pytest.approx(sd / math.sqrt(2))
    assert c_in[1].item() == pytest.approx(1 / (sd * math.sqrt(2)))
    # unit-variance training target (EDM eq. 8): (1 - c_skip)^2 sd^2 + c_skip^2 sigma^2 = c_out^2
    torch.testing.assert_close((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2, c_out**2)
    # float input works too
    assert S.edm_preconditioning(0.5)[0].item() == pytest.approx(0.5)


def test_consistency_preconditioning_boundary():
    smin, sd = 0.002, 0.5
    c_skip, c_out, c_in = S.consistency_preconditioning(torch.tensor([smin, 1.0, 80.0], dtype=torch.float64), sd, smin)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_skip[1].item() == pytest.approx(sd**2 / ((1 - smin) ** 2 + sd**2), rel=1e-12)
    assert c_out[1].item() == pytest.approx((1 - smin) * sd / math.sqrt(1 + sd**2), rel=1e-12)
    assert c_in[2].item() == pytest.approx(1 / math.sqrt(80.0**2 + sd**2), rel=1e-12)
    assert c_skip[2].item() < 1e-4 and c_out[2].item() == pytest.approx(sd, rel=1e-3)


def test_ict_curriculum():
    K = 400_000
    assert S.ict_num_steps(0, K, 10, 1280) == 11
    assert S.ict_num_steps(K - 1, K, 10, 1280) == 1281
    # K' = floor(K / (log2(1280 // 10) + 1)) = 50000: N doubles every K' steps
    assert [S.ict_num_steps(k, K) for k in (49_999, 50_000, 100_000, 350_000)] == [11, 21, 41, 1281]
    ns = [S.ict_num_steps(k, K) for k in range(0, K, 997)]
    assert ns == sorted(ns)
    assert S.ict_num_steps(10**9, K) == 1281


@pytest.mark.parametrize("N", [11, 1281])
def test_ict_probabilities_and_weights(N):
    sigmas = S.karras_sigmas(N)
    probs = S.ict_timestep_probs(sigmas)
    assert probs.shape == (N - 1,) and (probs >= 0).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # by hand: differences of the lognormal CDF at ln sigma, normalised
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    raw = [cdf[i + 1] - cdf[i] for i in range(N - 1)]
    torch.testing.assert_close(probs, torch.tensor(raw, dtype=torch.float64) / sum(raw), atol=1e-12, rtol=1e-9)
    w = S.ict_loss_weights(sigmas)
    torch.testing.assert_close(w, 1 / (sigmas[1:] - sigmas[:-1]))
    idx = S.sample_ict_indices(sigmas, 4096, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (4096,) and idx.min() >= 0 and idx.max() <= N - 2
    assert torch.equal(idx, S.sample_ict_indices(sigmas, 4096, generator=torch.Generator().manual_seed(0)))
    # empirical frequencies follow the proposal
    freq = torch.bincount(idx, minlength=N - 1).double() / 4096
    assert (freq - probs).abs().max() < 0.03


ERRORS = [
    ("linear-T-zero", lambda: S.ddpm_linear_alphas_cumprod(0), ValueError, "num_timesteps"),
    ("linear-T-float", lambda: S.ddpm_linear_alphas_cumprod(10.5), ValueError, "num_timesteps"),
    ("linear-T-bool", lambda: S.ddpm_linear_alphas_cumprod(True), ValueError, "num_timesteps"),
    ("linear-beta-zero", lambda: S.ddpm_linear_alphas_cumprod(10, 0.0, 0.02), ValueError, "beta_start"),
    ("linear-beta-order", lambda: S.ddpm_linear_alphas_cumprod(10, 0.03, 0.02), ValueError, "beta_start"),
    ("linear-beta-one", lambda: S.ddpm_linear_alphas_cumprod(10, 0.01, 1.0), ValueError, "beta_end"),
    ("cosine-T", lambda: S.ddpm_cosine_alphas_cumprod(-3), ValueError, "num_timesteps"),
    ("karras-N", lambda: S.karras_sigmas(1), ValueError, "num_steps"),
    ("karras-sigma-min", lambda: S.karras_sigmas(10, 0.0, 80.0), ValueError, "sigma_min"),
    ("karras-order", lambda: S.karras_sigmas(10, 80.0, 1.0), ValueError, "sigma_min"),
    ("karras-rho", lambda: S.karras_sigmas(10, rho=0.0), ValueError, "rho"),
    ("ict-total", lambda: S.ict_num_steps(0, 0), ValueError, "total_steps"),
    ("ict-step", lambda: S.ict_num_steps(-1, 10), ValueError, "training_step"),
    ("ict-s0", lambda: S.ict_num_steps(0, 10, s0=0), ValueError, "s0"),
    ("ict-s1", lambda: S.ict_num_steps(0, 10, s0=20, s1=10), ValueError, "s1"),
    ("table-type", lambda: S.alpha_sigma("table", torch.tensor([0])), TypeError, "alphas_cumprod"),
    ("table-2d", lambda: S.alpha_sigma(torch.ones(2, 3), torch.tensor([0])), ValueError, "alphas_cumprod"),
    ("table-int", lambda: S.alpha_sigma(torch.ones(3, dtype=torch.long), torch.tensor([0])), ValueError, "alphas_cumprod"),
    ("timesteps-float", lambda: S.alpha_sigma(torch.ones(3), torch.tensor([0.5])), TypeError, "timesteps"),
    ("timesteps-int", lambda: S.alpha_sigma(torch.ones(3), 1), TypeError, "timesteps"),
    ("timesteps-range", lambda: S.alpha_sigma(torch.ones(3), torch.tensor([3])), ValueError, "timesteps"),
    ("timesteps-negative", lambda: S.alpha_sigma(torch.ones(3), torch.tensor([-1])), ValueError, "timesteps"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
