"""The training API's contracts (issue 11): the caller's generator is advanced, never rewound; pure
low-precision models train; empty batches give a zero loss; AT_Diff's adv_max_norm=0 / 2^20 gradient
scale / adv_init_mag; per-sample loss weights; the loops go through the fused entry points."""
import importlib
import math

import pytest
import torch

import fastat
import fastat.eval
from fastat.training import diffusion as diffusion_module
from training_utils import TABLE, ball_start, clone, coefs, l2_step, make, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")

R2 = 0.1 * math.sqrt(2)  # the default L2 radius for D = 2 (eps = 0.1, rms)


# ----------------------------------------------------------------------------------- 1. the generator


def _documented_draws(method, x0, t_given, generator=None):
    """The draws fastat documents for one diffusion_adv_loss call, in order, made with plain torch or the
    public ops: timesteps and noise (when not given), then DDPM-IP's xi / the random start / P2's omega."""
    if not t_given:
        torch.randint(0, 1000, (x0.shape[0],), generator=generator)
        torch.randn(x0.shape, dtype=x0.dtype, generator=generator)
    if method == "input_perturbation":
        torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    elif method in ("pgd", "fgsm_rs"):
        fastat.random_perturbation(x0, R2, "l2", "uniform", generator, dtype=torch.float64)
    elif method.startswith("equivariant"):
        fastat.random_perturbation(x0, 0.05, "linf", "uniform", generator, dtype=torch.float64)


METHODS_THAT_DRAW = [
    ("input_perturbation", {}),
    ("pgd", {"random_start": True}),
    ("fgsm_rs", {}),
    ("equivariant_random", {}),
    ("equivariant_adversarial", {}),
]


@pytest.mark.parametrize("t_given", [True, False])
@pytest.mark.parametrize("method,kw", METHODS_THAT_DRAW, ids=[m for m, _ in METHODS_THAT_DRAW])
def test_loss_call_advances_the_global_generator_and_never_rewinds_it(method, kw, t_given):
    """generator=None (a diffusers-style loop): after the call the global generator stands where fastat's
    documented draws and then one model pass (its dropout) leave it, so the next randn_like differs."""
    model, x0, noise, t = make(40, dropout=0.3)
    model.train()
    torch.manual_seed(123)
    args = (t, noise) if t_given else (None, None)
    out = fastat.diffusion_adv_loss(model, x0, *args, alphas_cumprod=TABLE, method=method, return_dict=True, **kw)
    after = torch.get_rng_state()
    following = torch.randn(x0.shape, dtype=torch.float64)
    torch.manual_seed(123)
    _documented_draws(method, x0, t_given)
    model(x0, torch.zeros(x0.shape[0], dtype=torch.long))  # one pass's dropout draws
    assert torch.equal(after, torch.get_rng_state()), "the call rewound or over-advanced the global generator"
    if method == "input_perturbation":  # the symptom users saw: the next batch's noise was this batch's xi
        xi = out["delta"] / (0.1 * coefs(out["timesteps"])[1])
        assert not torch.allclose(following, xi)


@pytest.mark.parametrize("method,kw", METHODS_THAT_DRAW, ids=[m for m, _ in METHODS_THAT_DRAW])
def test_explicit_generator_takes_the_draws_and_the_global_one_only_the_dropout(method, kw):
    model, x0, noise, t = make(41, dropout=0.3)
    model.train()
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(9)
    fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method=method, generator=gen, **kw)
    global_after, gen_after = torch.get_rng_state(), gen.get_state()
    torch.manual_seed(9)
    model(x0, t)
    ref_gen = torch.Generator().manual_seed(5)
    _documented_draws(method, x0, True, ref_gen)
    assert torch.equal(global_after, torch.get_rng_state())
    assert torch.equal(gen_after, ref_gen.get_state())


def test_consistency_loss_advances_the_generator():
    from training_utils import TinyDenoiser

    torch.manual_seed(0)
    model = TinyDenoiser(2, dropout=0.3).double().train()
    x0 = torch.randn(5, 2, dtype=torch.float64)
    torch.manual_seed(77)
    fastat.consistency_adv_loss(model, None, x0, method="fgsm_rs")
    after = torch.get_rng_state()
    torch.manual_seed(77)
    torch.randint(0, 17, (5,))
    torch.randn(x0.shape, dtype=x0.dtype)
    fastat.random_perturbation(x0, R2, "l2", "uniform", dtype=torch.float64)
    model(x0, torch.zeros(5))
    assert torch.equal(after, torch.get_rng_state())


def test_free_replay_advances_the_generator_once_per_replay():
    model, x0, noise, t = make(42, dropout=0.3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(3)
    fastat.FreeReplay(model, opt, 2, method="p2", alphas_cumprod=TABLE).step(x0, t, noise)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    fastat.random_perturbation(x0, 0.05, "linf", "uniform", dtype=torch.float64)
    for _ in range(2):  # one shared dropout state per replay (both P2 branches see it)
        model(x0, t)
    assert torch.equal(after, torch.get_rng_state())


# ------------------------------------------------------------------------------- 2. low precision


LOW_PRECISION_CASES = ["standard", "input_perturbation", "pgd", "fgsm_rs", "equivariant_random",
                       "equivariant_adversarial"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", LOW_PRECISION_CASES)
def test_pure_low_precision_model_trains(method, dtype):
    """Weights and data in bf16/fp16, no autocast: the model is fed its own dtype, the perturbation stays
    fp32, and the loss is close to the fp32 model's."""
    torch.manual_seed(0)
    net32 = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    net_lp = clone(net32).to(dtype)
    x0, noise, t = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 1000, (6,))
    seen = []

    def model_lp(x, ts):
        seen.append(x.dtype)
        return net_lp(x)

    kw = dict(alphas_cumprod=TABLE, method=method, return_dict=True)
    ref = fastat.diffusion_adv_loss(lambda x, ts: net32(x), x0, t, noise, generator=torch.Generator().manual_seed(1), **kw)
    out = fastat.diffusion_adv_loss(model_lp, x0.to(dtype), t, noise.to(dtype), generator=torch.Generator().manual_seed(1), **kw)
    assert set(seen) == {dtype}
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    if out["delta"] is not None:
        assert out["delta"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"], atol=0.05, rtol=0.05)
    out["loss"].backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in net_lp.parameters())


@pytest.mark.parametrize("method", ["p1", "p2"])
def test_pure_bf16_model_free_replay(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).bfloat16()
    x0 = torch.randn(6, 8).bfloat16()
    out = fastat.FreeReplay(lambda x, t: net(x), torch.optim.SGD(net.parameters(), lr=0.1), 2, method=method,
                            alphas_cumprod=TABLE).step(x0)
    assert out["delta"][0].dtype == torch.float32 and all(torch.isfinite(v) for v in out["losses"])


def test_pure_bf16_consistency_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).bfloat16()
    x0 = torch.randn(6, 8).bfloat16()
    loss = fastat.consistency_adv_loss(lambda x, s: net(x), None, x0, method="pgd", steps=2)
    assert torch.isfinite(loss)
    loss.backward()


# ------------------------------------------------------------------------------------ 3. empty batch


@pytest.mark.parametrize("kw", [
    {"method": "standard"}, {"method": "input_perturbation"}, {"method": "pgd", "random_start": True},
    {"method": "fgsm_rs"}, {"method": "equivariant_random"}, {"method": "equivariant_adversarial"},
    {"method": "equivariant_adversarial", "batch_branches": True},
    {"method": "equivariant_random", "low_memory": True}, {"method": "pgd", "learn_sigma": True},
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_empty_batch_diffusion_loss_is_zero(kw):
    model, _, _, _ = make(43)
    net = (lambda x, t: torch.cat([model(x, t)] * 2, 1)) if kw.get("learn_sigma") else model
    x0 = torch.empty(0, 2, dtype=torch.float64)
    loss = fastat.diffusion_adv_loss(net, x0, alphas_cumprod=TABLE, **kw)
    assert loss.item() == 0.0
    loss.backward()
    per = fastat.diffusion_adv_loss(net, x0, alphas_cumprod=TABLE, reduction="none", **kw)
    assert per.shape == (0,)


@pytest.mark.parametrize("method", ["p1", "p2"])
def test_empty_batch_free_replay(method):
    model, _, _, _ = make(44)
    out = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, method=method,
                            alphas_cumprod=TABLE).step(torch.empty(0, 2, dtype=torch.float64))
    assert [float(v) for v in out["losses"]] == [0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", ["none", "pgd", "fgsm_rs"])
def test_empty_batch_consistency_and_adapters(method):
    model, _, _, _ = make(45)
    x0 = torch.empty(0, 2, dtype=torch.float64)
    assert fastat.consistency_adv_loss(model, None, x0, method=method).item() == 0.0
    fr = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, method="cm")
    assert [float(v) for v in fr.step(x0)["losses"]] == [0.0, 0.0]
    terms = fastat.GuidedDiffusionAdvLosses(TABLE, method="pgd").training_losses(model, x0, torch.zeros(0, dtype=torch.long))
    assert terms["loss"].shape == (0,)
    edm = fastat.EDMAdvLoss(method="pgd")(lambda x, s, labels: x, x0)
    assert edm.shape == (0, 2)


# -------------------------------------------------------------------------- 6. AT_Diff's conventions


def _explicit_pgd(model, x0, noise, t, steps, step, radius, grad_divisor=1.0, delta=None):
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    delta = torch.zeros_like(x0) if delta is None else delta
    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean(1).sum(), d)
        g = g / grad_divisor
        new = d.detach() + step * g / g.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if radius is not None:
            new = new * (radius / new.norm(dim=1, keepdim=True).clamp_min(1e-8)).clamp(max=1.0)
        delta = new
    return ((model(x_t + delta, t) - noise - delta / s) ** 2).mean(1).mean(), delta


def test_adv_max_norm_zero_means_no_projection():
    """AT_Diff projects only `if adv_max_norm > 0`; fastat's alias follows (eps = math.inf)."""
    model, x0, noise, t = make(46)
    ref, ref_delta = _explicit_pgd(model, x0, noise, t, 3, 0.5, None)
    assert float(ref_delta.norm(dim=1).min()) > 3 * R2  # far outside the default radius: the test has teeth
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", adv_max_norm=0,
                                    adv_lr=0.5, adv_steps=3, return_dict=True)
    torch.testing.assert_close(out["loss"], ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["delta"], ref_delta, atol=1e-10, rtol=1e-10)
    inf = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", eps=math.inf,
                                    alpha=0.5, steps=3)
    torch.testing.assert_close(inf, ref, atol=1e-10, rtol=1e-10)


def test_eps_zero_is_a_zero_radius_and_conflicts_with_adv_max_norm_zero():
    model, x0, noise, t = make(47)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", eps=0.0, return_dict=True)
    std = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="standard")
    assert float(out["delta_norm"].max()) == 0.0
    torch.testing.assert_close(out["loss"], std)
    with pytest.raises(ValueError, match="adv_max_norm=0"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, eps=0.0, adv_max_norm=0)


def _small_gradient_model(seed):
    model, x0, noise, t = make(seed)
    with torch.no_grad():
        model.l2.weight.mul_(1e-3)  # ||g|| ~ 1e-3, below AT_Diff's effective floor 2^20 * 1e-8 ~ 0.0105
    return model, x0, noise, t


def test_at_diff_grad_scale_matches_the_official_division_by_2_to_the_20():
    model, x0, noise, t = _small_gradient_model(48)
    radius = 10.0
    official, d_official = _explicit_pgd(model, x0, noise, t, 2, 0.1, radius, grad_divisor=2.0**20)
    plain, d_plain = _explicit_pgd(model, x0, noise, t, 2, 0.1, radius)
    assert not torch.allclose(d_official, d_plain, atol=1e-3)  # the 2^20 division shortens these steps
    kw = dict(alphas_cumprod=TABLE, method="pgd", steps=2, eps=radius, eps_mode="abs", return_dict=True)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, at_diff_grad_scale=True, **kw)
    torch.testing.assert_close(out["delta"], d_official, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["loss"], official, atol=1e-10, rtol=1e-10)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, **kw)
    torch.testing.assert_close(out["delta"], d_plain, atol=1e-10, rtol=1e-10)


def test_at_diff_grad_scale_in_free_replay():
    model, x0, noise, t = _small_gradient_model(49)
    ref_model = clone(model)
    a, s = coefs(t)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    delta = torch.zeros_like(x0)
    for _ in range(3):
        opt.zero_grad()
        d = delta.clone().requires_grad_(True)
        ((ref_model(a * x0 + s * noise + d, t) - noise - d.detach() / s) ** 2).mean(1).mean().backward()
        opt.step()
        delta = l2_step(d.detach(), d.grad / 2.0**20, 0.1, R2)
    out = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, alphas_cumprod=TABLE,
                            at_diff_grad_scale=True).step(x0, t, noise)
    torch.testing.assert_close(out["delta"][0], delta, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------ 11. adv_init_mag


def test_adv_init_mag_is_the_random_start_radius():
    model, x0, noise, t = make(50)
    start = ball_start(x0.shape, 0.03 * math.sqrt(2), torch.Generator().manual_seed(8))
    ref, ref_delta = _explicit_pgd(model, x0, noise, t, 2, 0.1, R2, delta=start)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", adv_steps=2,
                                    adv_init_mag=0.03, generator=torch.Generator().manual_seed(8), return_dict=True)
    torch.testing.assert_close(out["delta"], ref_delta, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out["loss"], ref, atol=1e-10, rtol=1e-10)
    zero = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", adv_init_mag=0.0)
    torch.testing.assert_close(zero, fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd"))
    with pytest.raises(ValueError, match="init_mag"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, adv_init_mag=0.03, random_start=False)


def test_free_replay_adv_init_mag():
    model, x0, noise, t = make(51)
    ref_model = clone(model)
    a, s = coefs(t)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    delta = ball_start(x0.shape, 0.02 * math.sqrt(2), torch.Generator().manual_seed(2))
    for _ in range(2):
        opt.zero_grad()
        d = delta.clone().requires_grad_(True)
        ((ref_model(a * x0 + s * noise + d, t) - noise - d.detach() / s) ** 2).mean(1).mean().backward()
        opt.step()
        delta = l2_step(d.detach(), d.grad, 0.1, R2)
    out = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 2, alphas_cumprod=TABLE,
                            adv_init_mag=0.02).step(x0, t, noise, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out["delta"][0], delta, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------ 10. per-sample weights


def test_weights_scale_the_whole_per_sample_loss():
    model, x0, noise, t = make(52)
    w = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0, 1.5], dtype=torch.float64)
    for method in ("pgd", "equivariant_random"):
        kw = dict(alphas_cumprod=TABLE, method=method, generator=torch.Generator().manual_seed(4))
        per = fastat.diffusion_adv_loss(model, x0, t, noise, reduction="none", **kw)
        kw["generator"] = torch.Generator().manual_seed(4)
        out = fastat.diffusion_adv_loss(model, x0, t, noise, weights=w, return_dict=True, **kw)
        torch.testing.assert_close(out["loss_per_sample"], w * per, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(out["loss"], (w * per).mean(), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="weights"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, weights=torch.ones(5, dtype=torch.float64))


def test_weights_in_free_replay_match_the_weighted_explicit_loop():
    """guided-diffusion's importance sampling: the replayed loss is (loss_i * w_i).mean()."""
    model, x0, noise, t = make(53)
    w = torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 1.5], dtype=torch.float64)
    ref_model = clone(model)
    a, s = coefs(t)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    delta = torch.zeros_like(x0)
    for _ in range(3):
        opt.zero_grad()
        d = delta.clone().requires_grad_(True)
        (w * ((ref_model(a * x0 + s * noise + d, t) - noise - d.detach() / s) ** 2).mean(1)).mean().backward()
        opt.step()
        delta = l2_step(d.detach(), d.grad, 0.1, R2)
    fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, alphas_cumprod=TABLE).step(
        x0, t, noise, weights=w)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_weights_in_consistency_loss():
    model, _, _, _ = make(54)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    idx, z = torch.tensor([0, 3, 7, 1, 5]), torch.randn(5, 2, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    per = fastat.consistency_adv_loss(model, None, x0, indices=idx, noise=z, reduction="none")
    got = fastat.consistency_adv_loss(model, None, x0, indices=idx, noise=z, weights=w)
    torch.testing.assert_close(got, (w * per).mean(), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------- issue 9 item 5: fused entry points


def test_pgd_forms_x_t_once_and_feeds_the_model_pgd_steps_fused_output(monkeypatch):
    """x_t is formed once per call (not per attack step), and every later model input is the second output
    of pgd_step(..., model_input_base=x_t)."""
    attack_module = importlib.import_module("fastat.training.attack")
    model, x0, noise, t = make(55)
    noisy_calls, fused_outputs, seen = [], [], []
    real_noisy, real_step = diffusion_module.noisy_input, attack_module.pgd_step

    def counting_noisy(*args, **kwargs):
        noisy_calls.append(1)
        return real_noisy(*args, **kwargs)

    def recording_step(*args, **kwargs):
        assert kwargs.get("model_input_base") is not None
        delta, x_in = real_step(*args, **kwargs)
        fused_outputs.append(x_in)
        return delta, x_in

    def net(x, ts):
        seen.append(x)
        return model(x, ts)

    monkeypatch.setattr(diffusion_module, "noisy_input", counting_noisy)
    monkeypatch.setattr(attack_module, "pgd_step", recording_step)
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", steps=3)
    fused_outputs.clear()
    got = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, method="pgd", steps=3)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert len(noisy_calls) == 2  # one x_t per call
    assert len(fused_outputs) == 3 and len(seen) == 4
    for x_in, fused in zip(seen[1:], fused_outputs):
        assert x_in.data_ptr() == fused.data_ptr()


def test_consistency_and_eval_share_the_attack_loop(monkeypatch):
    attack_module = importlib.import_module("fastat.training.attack")
    calls = []
    real_step = attack_module.pgd_step

    def recording_step(*args, **kwargs):
        calls.append(kwargs.get("model_input_base") is not None)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(attack_module, "pgd_step", recording_step)
    model, x0, noise, t = make(56)
    fastat.consistency_adv_loss(model, None, x0, method="pgd", steps=2)
    fastat.eval.denoiser_error(model, x0, TABLE, t, noise, perturbation="pgd", steps=2)
    fastat.EDMAdvLoss(method="pgd", steps=2)(lambda x, s, labels: model(x, s.reshape(-1)), x0)
    assert calls == [True] * 6


def test_seeded_noise_is_accepted_and_equals_its_tensor():
    """noise=fastat.SeededNoise(seed): the loss equals the one with the materialised noise tensor."""
    model, x0, _, t = make(57)
    seeded = fastat.SeededNoise(11, 0)
    tensor = seeded.materialize(x0, torch.float64)
    for method in ("pgd", "equivariant_random"):
        kw = dict(alphas_cumprod=TABLE, method=method)
        a = fastat.diffusion_adv_loss(model, x0, t, seeded, generator=torch.Generator().manual_seed(1), **kw)
        b = fastat.diffusion_adv_loss(model, x0, t, tensor, generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # Free-AT with gradient accumulation: each micro-batch gets the stream of its own rows
    runs = []
    for noise in (seeded, tensor):
        m = clone(model)
        out = fastat.FreeReplay(m, torch.optim.SGD(m.parameters(), lr=0.05), 2, alphas_cumprod=TABLE,
                                grad_accum_steps=3).step(x0, t, noise)
        runs.append(torch.stack(out["losses"]))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=1e-6)
