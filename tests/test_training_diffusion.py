"""diffusion_adv_loss: loss and parameter gradients of every method equal an explicit unfused loop
(plain autograd, float64, small MLP); aliases, errors, dropout-mask replay, AMP."""
import math

import pytest
import torch

import fastat
from training_utils import TABLE, ball_start, coefs, grads, l2_step, make, p2_coefs, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")


def fused(model, x0, noise, t, **kw):
    loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, **kw)
    return loss, grads(loss, model)


def assert_same(loss, g, ref_loss, ref_g, tol=1e-10):
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("target", ["delta_detach", "delta", "original"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pgd_l2_matches_explicit_loop(target, prediction_type):
    model, x0, noise, t = make()
    a, s = coefs(t)
    radius = 0.1 * math.sqrt(x0.shape[1])

    def tgt(d, detach):
        eps_ = noise + ((d.detach() if detach else d) / s if prediction_type != "sample" and target != "original" else 0)
        if prediction_type == "epsilon":
            return eps_
        if prediction_type == "v_prediction":
            return a * eps_ - s * x0
        return x0

    x_t = a * x0 + s * noise
    delta = torch.zeros_like(x0)
    for _ in range(3):
        d = delta.clone().requires_grad_(True)
        attack = ((model(x_t + d, t) - tgt(d, target == "delta_detach")) ** 2).mean(1).sum()
        (g,) = torch.autograd.grad(attack, d)
        delta = l2_step(d.detach(), g, 0.1, radius)
    ref = ((model(x_t + delta, t) - tgt(delta, True)) ** 2).mean(1).mean()
    loss, g = fused(model, x0, noise, t, method="pgd", target=target, prediction_type=prediction_type)
    assert_same(loss, g, ref, grads(ref, model))


def test_pgd_linf_random_start_and_alias_names():
    model, x0, noise, t = make(1)
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    gen = torch.Generator().manual_seed(5)
    r = 0.05
    delta = torch.empty_like(x0).uniform_(-1, 1, generator=gen) * r
    for _ in range(2):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean(1).sum(), d)
        delta = (d.detach() + 0.02 * g.sign()).clamp(-r, r)
    ref = ((model(x_t + delta, t) - noise - delta / s) ** 2).mean(1).mean()
    loss, g = fused(
        model, x0, noise, t, method="pgd", adv_steps=2, adv_lr=0.02, adv_max_norm=r, adv_norm_type="Linf",
        adv_target_type="delta_detach", random_start=True, generator=torch.Generator().manual_seed(5),
    )
    assert_same(loss, g, ref, grads(ref, model))


def test_fgsm_rs_matches_explicit_loop():
    model, x0, noise, t = make(2)
    a, s = coefs(t)
    x_t = a * x0 + s * noise
    radius = 0.1 * math.sqrt(2)
    d = ball_start(x0.shape, radius, torch.Generator().manual_seed(3)).requires_grad_(True)
    (g,) = torch.autograd.grad(((model(x_t + d, t) - noise - d.detach() / s) ** 2).mean(1).sum(), d)
    delta = l2_step(d.detach(), g, 1.25 * radius, radius)
    ref = ((model(x_t + delta, t) - noise - delta / s) ** 2).mean(1).mean()
    loss, g = fused(model, x0, noise, t, method="fgsm_rs", generator=torch.Generator().manual_seed(3))
    assert_same(loss, g, ref, grads(ref, model))


def test_input_perturbation_and_standard_match_explicit():
    model, x0, noise, t = make(3)
    a, s = coefs(t)
    xi = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    ref = ((model(a * x0 + s * (noise + 0.1 * xi), t) - noise) ** 2).mean(1).mean()
    loss, g = fused(model, x0, noise, t, method="input_perturbation", generator=torch.Generator().manual_seed(9))
    assert_same(loss, g, ref, grads(ref, model))
    ref = ((model(a * x0 + s * noise, t) - noise) ** 2).mean(1)
    loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="standard", reduction="none")
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)


def _p2_reference(model, x0, noise, t, adversarial, detach_anchor=False):
    a, s = coefs(t)
    r, lam_t = p2_coefs(s)
    x_t = a * x0 + s * noise
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=torch.Generator().manual_seed(4)) * r
    pc = model(x_t, t)
    if adversarial:
        o = omega.clone().requires_grad_(True)
        j = ((model(x_t + s * o, t) - pc.detach()) ** 2).mean(1).sum()
        (g,) = torch.autograd.grad(j, o)
        omega = torch.maximum(torch.minimum(omega + 1.25 * r * g.sign(), r), -r)
    pp = model(x_t + s * omega, t)
    anchor = pc.detach() if detach_anchor else pc
    per = ((pc - noise) ** 2).mean(1) + lam_t[:, 0] * ((pp - (anchor + omega)) ** 2).mean(1)
    return per.mean()


@pytest.mark.parametrize("batch_branches", [False, True])
@pytest.mark.parametrize("adversarial", [False, True])
def test_p2_matches_explicit_loop(adversarial, batch_branches):
    model, x0, noise, t = make(4)
    ref = _p2_reference(model, x0, noise, t, adversarial)
    method = "equivariant_adversarial" if adversarial else "equivariant_random"
    loss, g = fused(model, x0, noise, t, method=method, batch_branches=batch_branches,
                    generator=torch.Generator().manual_seed(4))
    assert_same(loss, g, ref, grads(ref, model))


def test_p2_detach_anchor():
    model, x0, noise, t = make(5)
    ref = _p2_reference(model, x0, noise, t, False, detach_anchor=True)
    loss, g = fused(model, x0, noise, t, method="equivariant_random", detach_anchor=True,
                    generator=torch.Generator().manual_seed(4))
    assert_same(loss, g, ref, grads(ref, model))


def test_return_dict_fields_and_reduction():
    model, x0, noise, t = make(6)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", return_dict=True)
    assert out["loss_per_sample"].shape == (6,) and out["delta_norm"].shape == (6,) and out["grad_norm"].shape == (6,)
    torch.testing.assert_close(out["loss"], out["loss_per_sample"].mean())
    assert torch.all(out["delta_norm"] <= 0.1 * math.sqrt(2) + 1e-9) and torch.all(out["grad_norm"] > 0)
    torch.testing.assert_close(out["delta_norm"], out["delta"].norm(dim=1))


def test_diffusers_style_output_and_kwargs_are_unwrapped():
    model, x0, noise, t = make(7)

    class Out:
        def __init__(self, sample):
            self.sample = sample

    calls = []

    def wrapped(x, ts, scale=1.0):
        calls.append(scale)
        return Out(model(x, ts) * scale)

    loss = fastat.diffusion_adv_loss(wrapped, x0, t, noise, alphas_cumprod=TABLE, method="fgsm_rs",
                                     model_kwargs={"scale": 2.0})
    assert torch.isfinite(loss) and calls == [2.0, 2.0]


def test_errors_name_the_argument():
    model, x0, noise, t = make()
    with pytest.raises(ValueError, match="steps=3 and its alias adv_steps=5 disagree"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, steps=3, adv_steps=5)
    fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, steps=2, adv_steps=2)  # same value: fine
    with pytest.raises(TypeError, match="adv_bogus"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, adv_bogus=1)
    with pytest.raises(ValueError, match="method"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="trades")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fastat.diffusion_adv_loss(model, x0, t, noise)
    with pytest.raises(ValueError, match="fgsm_rs"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="fgsm_rs", steps=3)
    with pytest.raises(ValueError, match="prediction_type"):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, prediction_type="x0")


def test_compared_passes_share_the_dropout_mask():
    """With dropout, P2's clean and perturbed branches (and each attack pass) see the same mask, so a
    zero-radius perturbation gives a zero regulariser exactly."""
    model, x0, noise, t = make(8, dropout=0.5)
    model.train()
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="equivariant_random",
                                    radius_fn=lambda s: torch.full_like(s, 1e-300), return_dict=True)
    assert float(out["reg"].detach().abs().max()) < 1e-12
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="equivariant_random",
                                    radius_fn=lambda s: torch.full_like(s, 1e-300), return_dict=True,
                                    same_dropout=False)
    assert float(out["reg"].detach().abs().max()) > 1e-6


def test_bf16_autocast_keeps_fp32_perturbation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    net = lambda x, t: model(x)  # noqa: E731
    x0, noise, t = torch.randn(16, 2), torch.randn(16, 2), torch.randint(0, 1000, (16,))
    ref = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, method="pgd", return_dict=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, method="pgd", return_dict=True)
    assert out["delta"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref["loss"], atol=0.05, rtol=0.05)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_scaler_scales_the_attack_and_unscales_the_delta_gradient():
    model, x0, noise, t = make(9)
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, return_dict=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, return_dict=True, scaler=scaler)
    torch.testing.assert_close(out["grad_norm"], ref["grad_norm"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out["delta"], ref["delta"], atol=1e-12, rtol=1e-12)


def test_channels_last_images_and_scheduler_prediction_type():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    net = lambda x, t: conv(x)  # noqa: E731
    x0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 900])
    # zero start: random draws fill memory in layout order, so a random start differs per layout
    ref = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, method="pgd")
    cl = fastat.diffusion_adv_loss(net, x0.contiguous(memory_format=torch.channels_last), t,
                                   noise.contiguous(memory_format=torch.channels_last), alphas_cumprod=TABLE,
                                   method="pgd")
    torch.testing.assert_close(cl, ref, atol=1e-10, rtol=1e-10)

    class Sched:
        alphas_cumprod = TABLE

        class config:
            prediction_type = "v_prediction"

    v = fastat.diffusion_adv_loss(net, x0, t, noise, scheduler=Sched(), method="standard")
    v_ref = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, method="standard",
                                      prediction_type="v_prediction")
    torch.testing.assert_close(v, v_ref)
