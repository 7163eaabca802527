"""fastat demo: the mixtures (2-D and embedded), corruptions and their oracle, the plan of models, EMA, the
paired summary, and --quick smoke runs through the CLI."""
import json
import math

import pytest
import torch

import fastat
from fastat.cli import main
from fastat.demo import plan, run_demo
from fastat.demo.mixture import GaussianMixture, corrupt, noisy_mixture, ring_mixture
from fastat.demo.models import MLPDenoiser, sinusoidal_embedding
from fastat.demo.report import summarize_runs
from fastat.demo.train import EMA, METHODS, TrainConfig, make_model, train_method
from fastat.schedules import ddpm_linear_alphas_cumprod


def test_mixture_samples_have_the_mixture_mean_and_corruptions_touch_the_right_share():
    mix = ring_mixture()
    x = mix.sample(20000, torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (mix.weights[:, None] * mix.means).sum(0)
    torch.testing.assert_close(x.mean(0), expected, atol=0.03, rtol=0)
    x = x[:1000]
    g = torch.Generator().manual_seed(1)
    assert torch.equal(corrupt(x, "clean"), x)
    noisy = corrupt(x, "noisy", generator=g)
    assert int((noisy != x).any(dim=1).sum()) == 900
    out = corrupt(x, "outliers", generator=g)
    changed = (out != x).any(dim=1)
    assert int(changed.sum()) == 100 and float(out[changed].abs().max()) <= 4.0
    with pytest.raises(ValueError, match="kind"):
        corrupt(x, "rotated")
    with pytest.raises(ValueError, match="fraction"):
        corrupt(x, "noisy", fraction=1.5)


@pytest.mark.parametrize("dim", [2, 16])
def test_score_is_the_gradient_of_the_log_density_for_clean_and_corrupted_mixtures(dim):
    clean = ring_mixture(dim=dim)
    for mix in (clean, noisy_mixture(clean, 0.7, 0.3)):
        x = mix.sample(40, torch.Generator().manual_seed(2), dtype=torch.float64)
        a, s = 0.6, 0.8
        x_t = (a * x + s * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
        x_t.requires_grad_(True)
        (grad,) = torch.autograd.grad(mix.log_prob(x_t, a, s).sum(), x_t)
        torch.testing.assert_close(mix.score(x_t.detach(), a, s), grad, atol=1e-10, rtol=1e-10)
        # normalised: a 1-D slice of the density integrates like a Gaussian would (checked in 2-D only)
    if dim == 16:
        x = clean.sample(500, torch.Generator().manual_seed(4), dtype=torch.float64)
        assert float(clean.off_subspace(x).abs().max()) < 1e-12 and clean.basis.shape == (16, 2)


def test_noisy_mixture_matches_the_corrupted_samples_second_moments():
    clean = ring_mixture(dim=8)
    x = clean.sample(40000, torch.Generator().manual_seed(5), dtype=torch.float64)
    corrupted = corrupt(x, "noisy", fraction=0.9, noise_std=0.2, generator=torch.Generator().manual_seed(6))
    model = noisy_mixture(clean, 0.9, 0.2).sample(40000, torch.Generator().manual_seed(7), dtype=torch.float64)
    cov = lambda z: (z - z.mean(0)).T @ (z - z.mean(0)) / z.shape[0]  # noqa: E731
    torch.testing.assert_close(cov(model), cov(corrupted), atol=0.02, rtol=0)
    off = lambda z: clean.off_subspace(z).pow(2).sum(1).mean()  # noqa: E731
    assert float(off(model)) == pytest.approx(0.9 * 6 * 0.04, rel=0.05)
    with pytest.raises(ValueError, match="basis"):
        GaussianMixture(torch.zeros(2, 3), 1.0, 1.0, basis=torch.ones(3, 1))
    with pytest.raises(ValueError, match="off_stds"):
        GaussianMixture(torch.zeros(2, 3), 1.0, 1.0, off_stds=0.1)


@pytest.mark.parametrize("dim", [2, 16])
def test_projected_quantiles_match_the_normal_quantiles_and_a_large_sample(dim):
    # One component: <theta, x> ~ N(<theta, mu>, s^2 |P theta|^2), quantiles known in closed form.
    single = GaussianMixture(torch.tensor([[0.7, -0.2]]), torch.tensor([0.3]), torch.tensor([1.0]))
    theta = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = theta / theta.norm(dim=0)
    levels = torch.tensor([0.001, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    z = torch.distributions.Normal(0.0, 1.0).icdf(levels)[:, None]
    expected = single.means @ theta + 0.3 * z
    torch.testing.assert_close(single.projected_quantiles(theta, levels), expected, atol=2e-4, rtol=0)
    # The ring (2-D or embedded): empirical quantiles of 200000 draws agree with the tabulated ones.
    mix = ring_mixture(dim=dim)
    theta = torch.randn(dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theta = theta / theta.norm(dim=0)
    x = mix.sample(200000, torch.Generator().manual_seed(2), dtype=torch.float64)
    levels = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    empirical = torch.quantile(x @ theta, levels, dim=0)
    torch.testing.assert_close(mix.projected_quantiles(theta, levels), empirical, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="levels"):
        mix.projected_quantiles(theta, torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="directions"):
        mix.projected_quantiles(theta[:1], levels)


def test_demo_sw2_is_deterministic_shrinks_with_samples_and_sees_a_shift():
    from fastat.demo.evaluate import make_eval_set

    mix = ring_mixture()
    ab = ddpm_linear_alphas_cumprod(1000)
    es = make_eval_set(mix, ab, n_eval=10, n_samples=100, seed=0, device="cpu", few_steps=(), n_swd=100, projections=64)
    again = make_eval_set(mix, ab, n_eval=10, n_samples=100, seed=0, device="cpu", few_steps=(), n_swd=100,
                          projections=64)
    torch.testing.assert_close(es.projections, again.projections, rtol=0, atol=0)
    x = mix.sample(20000, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert es.swd(x) == again.swd(x)
    # Sampling noise only: a clean sample's SW2 to the exact distribution falls as n grows (no reference noise).
    small = [es.swd(mix.sample(1000, torch.Generator().manual_seed(k), dtype=torch.float64)) for k in range(3)]
    assert es.swd(x) < 0.5 * min(small)
    # A translation by m adds about ||m|| / sqrt(D) (SW2 of y = x + m).
    shifted = es.swd(x + torch.tensor([0.3, 0.0], dtype=torch.float64))
    assert shifted == pytest.approx(0.3 / math.sqrt(2), rel=0.1)


def test_mlp_denoiser_shapes_and_embedding():
    emb = sinusoidal_embedding(torch.tensor([0, 5, 999]), 7)
    assert emb.shape == (3, 7) and torch.equal(emb[0, :3], torch.ones(3))
    model = MLPDenoiser(dim=2, hidden=16, depth=2)
    out = model(torch.randn(5, 2), torch.randint(0, 1000, (5,)))
    assert out.shape == (5, 2)
    assert model(torch.randn(4, 2), torch.tensor([3])).shape == (4, 2)


def test_v_parameterised_mlp_returns_eps_from_v():
    """With alphas_cumprod the network's output F is v = a eps - s x0 and the model returns a F + s x_t = eps."""
    ab = ddpm_linear_alphas_cumprod(1000)
    model = MLPDenoiser(dim=3, hidden=8, depth=1, alphas_cumprod=ab)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    a, s = ab[t].double().sqrt()[:, None].float(), (1 - ab[t].double()).sqrt()[:, None].float()
    x_t = a * x0 + s * eps
    v = a * eps - s * x0

    class TrueV(torch.nn.Module):
        def forward(self, h):  # h = concat(x_t, emb): answer the v that matches each row of x_t
            return v
    model.net = TrueV()
    torch.testing.assert_close(model(x_t, t), eps, rtol=1e-5, atol=1e-5)
    assert not any(k in model.state_dict() for k in ("signal", "noise"))  # derived from the schedule, not saved
    with pytest.raises(ValueError, match="alphas_cumprod"):
        MLPDenoiser(alphas_cumprod=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        make_model(TrainConfig(hidden=4, depth=1), 2, "cpu")


def test_plan_defaults_control_and_errors():
    assert plan(None, None) == {"clean": ["standard", "ft_replay", "ft_p1_free"],
                                "noisy16": ["standard", "p2_adversarial"]}
    assert plan("ft_p1_pgd", "noisy") == {"noisy": ["standard", "ft_p1_pgd", "ft_replay"]}
    assert plan("all", "outliers")["outliers"] == list(METHODS)
    with pytest.raises(ValueError, match="methods"):
        plan("standard,fgsm", None)
    with pytest.raises(ValueError, match="settings"):
        plan(None, ["dirty"])


def test_ema_warmup_and_finetune_needs_a_start():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema(model)  # first update: d = min(0.9, 1/10) = 0.1
    assert float(ema.model.weight) == pytest.approx(0.9)
    data = torch.randn(32, 2)
    with pytest.raises(ValueError, match="init_state"):
        train_method("ft_p1_free", data, ddpm_linear_alphas_cumprod(1000), TrainConfig(steps=1, batch=4, hidden=8, depth=1))
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_run_demo_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        run_demo(methods="standard,fgsm", quick=True, out=str(tmp_path))
    with pytest.raises(ValueError, match="p2_bias"):
        run_demo(quick=True, p2_bias="gaussian", out=str(tmp_path))
    assert main(["demo", "--quick", "--methods", "fgsm", "--out", str(tmp_path)]) == 2


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        elif isinstance(v, list):
            yield from (x for x in v if not isinstance(x, (dict, list)))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield v


def test_demo_quick_default_plan_writes_files_with_finite_numbers(tmp_path, capsys):
    out = tmp_path / "demo"
    with fastat.use_backend("torch"):
        rc = main(["demo", "--quick", "--out", str(out), "--seed", "3", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "setting: noisy16" in printed and "oracle_corrupted" in printed and "claims (method vs baseline" in printed
    data = json.loads((out / "demo.json").read_text())
    assert set(data["results"]) == {"clean", "noisy16"}
    assert set(data["results"]["clean"]) == {"standard", "ft_replay", "ft_p1_free", "exact"}
    assert set(data["results"]["noisy16"]) == {"standard", "p2_adversarial", "exact", "oracle_corrupted"}
    assert (out / "demo.png").stat().st_size > 10000 and (out / "demo.md").read_text().count("| standard |") == 2
    for setting, rows in data["results"].items():
        for method, row in rows.items():
            values = list(_leaves(row))
            assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (setting, method)
            assert set(row["few_step"]) == {"5", "10", "20"}
            assert ("off_rms" in row["samples"]) == (setting == "noisy16")
            if method in METHODS:
                assert row["time"]["ms_per_step"] > 0
                assert row["train"]["optimizer_steps"] >= (30 if method.startswith("ft_") else data["scratch_steps"][setting])
    assert data["scratch_steps"] == {"clean": 60, "noisy16": 24}  # 16-D settings: step_scale 0.4
    assert data["results"]["noisy16"]["exact"]["samples"]["off_rms"] < 1e-3
    claims = data["claims"]
    assert {"P1 clean ft_p1_free vs ft_replay: few-step SW2 and traj lower",
            "P2 noisy16 p2_adversarial vs standard: err_clean, SW2, off_rms lower"} <= set(claims)
    assert all(isinstance(c["holds"], bool) and len(c["method"]) == len(c["metrics"]) for c in claims.values())
    summary = summarize_runs([str(out / "demo.json")] * 3)
    assert summary.count("| p2_adversarial |") == 1 and "| claim | held in runs |" in summary
    # three identical runs: every paired difference is a constant, so each interval collapses onto its mean
    line = next(l for l in summary.splitlines() if l.startswith("| P2 noisy16 p2_adversarial"))
    for part in line.split("|")[-2].split(";"):
        mean, interval = part.split(": ")[1].split(" [")
        assert interval.split("]")[0] == f"{mean}, {mean}"


def test_paired_difference_interval():
    from fastat.experiments.stats import paired_difference, verdict

    d = paired_difference([1.0, 2.0, 3.0], [1.5, 2.0, 4.5])  # differences -0.5, 0, -1.5
    sd = math.sqrt(((0.1666667) ** 2 + (0.6666667) ** 2 + (0.8333333) ** 2) / 2)
    assert d["mean"] == pytest.approx(-2 / 3) and d["sd"] == pytest.approx(sd, rel=1e-6)
    assert d["hi"] - d["mean"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)
    assert d["lower_in"] == 2 and verdict(d) == "no difference"
    assert verdict(paired_difference([1.0, 1.1, 0.9], [2.0, 2.0, 2.0])) == "lower"
    assert verdict(paired_difference([1.0], [2.0])) == "1 run"
    with pytest.raises(ValueError, match="equally many"):
        paired_difference([1.0], [])


def test_demo_quick_other_methods_and_settings(tmp_path):
    out = tmp_path / "other"
    result = run_demo(methods="ddpm_ip,p1_pgd,p1_free,ft_p1_pgd", settings="noisy,outliers", quick=True, steps=20,
                      ft_steps=6, p2_bias="random", p1_alpha_mode="abs", out=str(out), progress=False)
    assert set(result["results"]["noisy"]) == {"standard", "ddpm_ip", "p1_pgd", "p1_free", "ft_p1_pgd", "ft_replay",
                                               "exact", "oracle_corrupted"}
    assert "oracle_corrupted" not in result["results"]["outliers"]
    assert result["config"]["p1_alpha_mode"] == "abs" and result["config"]["p2_bias"] == "random"
    assert any(k.startswith("P1 outliers ft_p1_pgd vs ft_replay") for k in result["claims"])
    assert all(math.isfinite(v) for v in _leaves(result["results"]))
