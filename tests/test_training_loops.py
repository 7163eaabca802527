"""Training loops as users write them, each against an explicit float64 loop written from the formulas (not
from fastat's internals), with image-shaped samples (D = 192 >= 32) so that `auto` runs the C++ kernels:

- diffusers: UNet2DModel + DDPMScheduler (epsilon, v_prediction, sample), x_t from scheduler.add_noise;
- AT_Diff's official Free-AT loop (guided-diffusion AdvTrainLoop): learn_sigma (2C channels, VB term), per-sample
  importance weights, class labels, micro-batches, dropout, AdamW, EMA, adv_* names, the 2^lg_loss_scale division
  (fp32: 2^20; fp16: the unscale itself);
- P2 in noise space for v- and x0-prediction with its radius-schedule parameters;
- consistency training with the iCT curriculum, lognormal indices and pseudo-Huber, draws from the global seed;
- BatchNorm running statistics (moved only by the passes that form the loss) and grad modes.
"""
import copy
import math

import pytest
import torch

import fastat
from fastat import schedules

B, C, H = 4, 3, 8


def col(v):
    return v.reshape(-1, 1, 1, 1)


def max_abs_diff(xs, ys):
    return max(float((x - y).detach().abs().max()) for x, y in zip(xs, ys))


class ConvNet(torch.nn.Module):
    """[B, C, H, W], t -> [B, out, H, W] (out = 2C: mean prediction, tanh variance values); optional class
    label y, dropout and BatchNorm."""

    def __init__(self, out=C, dropout=0.0, batch_norm=False, scale_t=1000.0):
        super().__init__()
        self.c1 = torch.nn.Conv2d(C + 1, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(8) if batch_norm else torch.nn.Identity()
        self.drop = torch.nn.Dropout(dropout)
        self.c2 = torch.nn.Conv2d(8, out, 3, padding=1)
        self.scale_t = scale_t

    def forward(self, x, t, y=None):
        tt = col(t.to(x.dtype) / self.scale_t).expand(-1, 1, *x.shape[2:])
        h = self.c2(self.drop(torch.tanh(self.norm(self.c1(torch.cat([x, tt], 1))))))
        if y is not None:
            h = h + col(y)
        if h.shape[1] == 2 * C:
            return torch.cat([h[:, :C], torch.tanh(h[:, C:])], 1)
        return h


def l2_step(delta, g, step, radius):
    """AT_Diff: delta + step g / max(||g||, 1e-8), then rescaled where ||delta|| > R (norms clamped at 1e-8)."""
    delta = delta + step * g / col(g.flatten(1).norm(dim=1).clamp(min=1e-8))
    norm = delta.flatten(1).norm(dim=1).clamp(min=1e-8)
    exceed = (norm > radius).to(delta)
    return delta * col(radius / norm * exceed + (1 - exceed))


# ----------------------------------------------------------------------------------------------- diffusers


def test_diffusers_unet_ddpm_scheduler_prediction_types():
    """(Most of this test's time is diffusers' import, shared with test_training_adapters in one process.)"""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    # One resolution: with a second one, fp64 on CPU costs 20x more (the strided convolutions' slow path).
    unet = diffusers.UNet2DModel(sample_size=H, in_channels=C, out_channels=C, layers_per_block=1,
                                 block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                 up_block_types=("UpBlock2D",), norm_num_groups=4).double()
    x0 = torch.randn(2, C, H, H, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (2,))
    radius = 0.1 * math.sqrt(x0[0].numel())
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        abar = col(scheduler.alphas_cumprod.double()[t])
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x_t = scheduler.add_noise(x0, noise, t)

        def target(delta):  # the noise implied by x_t + delta is noise + delta / s; x0 is unchanged
            if prediction_type == "epsilon":
                return noise + delta / s
            if prediction_type == "v_prediction":
                return scheduler.get_velocity(x0, noise, t) + a * delta / s
            return x0

        delta = torch.zeros_like(x0)
        for _ in range(2):
            d = delta.clone().requires_grad_(True)
            loss = ((unet(x_t + d, t).sample - target(d.detach())) ** 2).mean((1, 2, 3)).sum()
            delta = l2_step(delta, torch.autograd.grad(loss, d)[0], 0.1, radius)
        ref = ((unet(x_t + delta, t).sample - target(delta)) ** 2).mean()
        with fastat.use_backend("auto"):
            got = fastat.diffusion_adv_loss(unet, x0, t, noise, scheduler=scheduler, method="pgd", steps=2)
        params = list(unet.parameters())
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
        assert max_abs_diff(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)) < 1e-12


# ------------------------------------------------------------------------------- AT_Diff's official loop

T = 1000


def _cosine_betas():
    """guided-diffusion's cosine schedule (betas clipped at 0.999)."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)


BETAS = _cosine_betas()
ABAR = torch.cumprod(1 - BETAS, 0)


def _vb(x0, x_t, t, eps, v):
    """guided-diffusion's _vb_terms_bpd (LEARNED_RANGE, frozen mean) in bits per dim [B]."""
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ABAR[:-1]])
    post_var = BETAS * (1 - prev) / (1 - ABAR)
    post_log = col(torch.log(torch.cat([post_var[1:2], post_var[1:]]))[t])
    c1 = col((BETAS * prev.sqrt() / (1 - ABAR))[t])
    c2 = col(((1 - prev) * (1 - BETAS).sqrt() / (1 - ABAR))[t])
    true_mean = c1 * x0 + c2 * x_t
    x0_hat = col((1 / ABAR).sqrt()[t]) * x_t - col((1 / ABAR - 1).sqrt()[t]) * eps
    mean = c1 * x0_hat + c2 * x_t
    frac = (v + 1) / 2
    log_var = frac * col(BETAS.log()[t]) + (1 - frac) * post_log
    kl = 0.5 * (-1.0 + log_var - post_log + torch.exp(post_log - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))
    cdf = lambda u: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))  # noqa: E731
    inv_std = torch.exp(-0.5 * log_var)
    upper, lower = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
    log_prob = torch.where(x0 < -0.999, upper.clamp(min=1e-12).log(),
                           torch.where(x0 > 0.999, (1 - lower).clamp(min=1e-12).log(), (upper - lower).clamp(min=1e-12).log()))
    return torch.where(t == 0, (-log_prob).mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2.0)


def _training_losses(model, x0, t, y, noise, delta, target_type):
    """AdvGaussianDiffusion.training_losses (RESCALED_MSE, learn_sigma, eps-prediction): [B]."""
    s = col((1 - ABAR).sqrt()[t])
    x_t = col(ABAR.sqrt()[t]) * x0 + s * noise
    adv_x_t = x_t + delta
    out = model(adv_x_t, t, y)
    eps, v = out[:, :C], out[:, C:]
    vb_at = {"delta": adv_x_t, "delta_detach": adv_x_t.detach(), "original": x_t}[target_type]
    vb = _vb(x0, vb_at, t, eps.detach(), v) * (T / 1000.0)
    target = {"delta": noise + delta / s, "delta_detach": noise + delta.detach() / s, "original": noise}[target_type]
    return ((target - eps) ** 2).mean((1, 2, 3)) + vb


def _update_ema(ema_params, params, rate):
    with torch.no_grad():
        for e, p in zip(ema_params, params):
            e.mul_(rate).add_(p, alpha=1 - rate)


def _official_fast_loop(model, x0, t, y, w, noise, target_type, microbatch, lg_loss_scale, replays=3):
    """AdvTrainLoop.adv_forward_backward + run_step, adv_training_type='fast', l2, adv_lr=0.1, adv_max_norm=0.1:
    one optimizer step (and EMA update) per replay. Micro-batch losses are divided by their number (fastat's
    convention: the gradient of the whole batch's mean; AT_Diff's loop sums the micro-batch means)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    radius = math.sqrt(x0[0].numel()) * 0.1
    delta = torch.zeros_like(x0)
    parts = x0.shape[0] // microbatch
    for _ in range(replays):
        opt.zero_grad()
        delta.requires_grad_()
        for i in range(0, x0.shape[0], microbatch):
            sl = slice(i, i + microbatch)
            losses = _training_losses(model, x0[sl], t[sl], y[sl], noise[sl], delta[sl], target_type)
            ((losses * w[sl]).mean() / parts).backward()
        grad = delta.grad.detach() / 2**lg_loss_scale
        delta = l2_step(delta.detach(), grad, 0.1, radius)
        opt.step()
        _update_ema(ema, model.parameters(), 0.9)
    return ema


def _official_batch(seed=0):
    torch.manual_seed(seed)
    x0 = torch.rand(B, C, H, H, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = 1.0, -1.0  # the decoder NLL's open outer bins
    return x0, torch.tensor([0, 3, 500, 999]), torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=torch.float64), \
        torch.randn(B, C, H, H, dtype=torch.float64), torch.randn(B, dtype=torch.float64)


@pytest.mark.parametrize("target_type,microbatch,dropout", [("delta_detach", 4, 0.3), ("delta", 2, 0.0),
                                                            ("original", 2, 0.3)])
def test_official_at_diff_fast_loop_matches_free_replay(target_type, microbatch, dropout):
    x0, t, w, noise, y = _official_batch()
    torch.manual_seed(1)
    model = ConvNet(out=2 * C, dropout=dropout).double()
    ref = copy.deepcopy(model)
    torch.manual_seed(11)  # dropout masks: one fresh draw per replay in both loops
    ref_ema = _official_fast_loop(ref, x0, t, y, w, noise, target_type, microbatch, lg_loss_scale=20.0)
    ema = [p.detach().clone() for p in model.parameters()]
    fr = fastat.FreeReplay(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), adv_steps=3,
                           alphas_cumprod=ABAR, adv_lr=0.1, adv_max_norm=0.1, adv_target_type=target_type,
                           adv_norm_type="l2", learn_sigma=True, rescale_learned_sigmas=True,
                           at_diff_grad_scale=True, grad_accum_steps=B // microbatch,
                           ema=lambda m: _update_ema(ema, m.parameters(), 0.9))
    torch.manual_seed(11)
    with fastat.use_backend("auto"):
        fr.step(x0, t, noise, model_kwargs={"y": y}, weights=w)
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-12
    assert max_abs_diff(ema, ref_ema) < 1e-12


def test_at_diff_grad_scale_under_a_grad_scaler_is_the_unscale_only():
    """AT_Diff's fp16 run scales its loss by 2^lg_loss_scale and divides delta.grad by the same number: the
    plain gradient. With an enabled GradScaler, at_diff_grad_scale therefore adds no 2^20 division."""
    x0, t, w, noise, y = _official_batch(1)
    torch.manual_seed(2)
    model = ConvNet(out=2 * C).double()
    ref = copy.deepcopy(model)
    _official_fast_loop(ref, x0, t, y, w, noise, "delta_detach", B, lg_loss_scale=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with fastat.use_backend("auto"):
        fastat.FreeReplay(model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), 3,
                          alphas_cumprod=ABAR, learn_sigma=True, rescale_learned_sigmas=True, scaler=scaler,
                          at_diff_grad_scale=True).step(x0, t, noise, model_kwargs={"y": y}, weights=w)
    assert max_abs_diff(model.parameters(), ref.parameters()) < 1e-12


def test_fp64_l2_step_floor_is_exact_on_every_cpu_backend():
    """Under at_diff_grad_scale ||g|| sits below the 1e-8 floor; the kernels must divide by 1e-8 in fp64."""
    torch.manual_seed(3)
    delta = torch.randn(B, C, H, H, dtype=torch.float64) * 0.01
    grad = torch.randn(B, C, H, H, dtype=torch.float64) * 1e-11
    want = l2_step(delta, grad, 0.1, 1.0)
    for backend in ("torch", "auto", "cpp"):
        with fastat.use_backend(backend):
            got = fastat.pgd_step(delta, grad, 0.1, 1.0)
        torch.testing.assert_close(got, want, atol=1e-15, rtol=1e-13)


# ------------------------------------------------------------------------------------------------- P2


def _to_eps(pred, x, a, s, prediction_type):
    if prediction_type == "v_prediction":
        return s * x + a * pred
    return (x - a * pred) / s  # sample


@pytest.mark.parametrize("prediction_type,adversarial,extra", [("v_prediction", True, {"low_memory": True}),
                                                                ("sample", True, {"batch_branches": True}),
                                                                ("v_prediction", False, {})])
def test_p2_in_noise_space_matches_the_formula(prediction_type, adversarial, extra):
    table = schedules.ddpm_cosine_alphas_cumprod(1000)
    torch.manual_seed(4)
    model = ConvNet().double()
    x0, noise = torch.randn(B, C, H, H, dtype=torch.float64), torch.randn(B, C, H, H, dtype=torch.float64)
    t = torch.tensor([1, 100, 600, 999])
    eps, rho, r_min, lam, beta = 0.5, 1.5, 0.02, 0.2, 2.0
    abar = col(table[t])
    a, s = abar.sqrt(), (1 - abar).sqrt()
    r = (eps * s**rho).clamp(min=r_min)
    lam_t = lam * math.sqrt(3) / (beta * r)
    x_t = a * x0 + s * noise
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=torch.Generator().manual_seed(3)) * (s * r) / s
    clean = model(x_t, t)
    e_clean = _to_eps(clean, x_t, a, s, prediction_type)
    if adversarial:  # one FGSM step from the uniform start on J = ||e(x_t + s omega) - sg(e(x_t))||^2
        o = omega.clone().requires_grad_(True)
        x_p = x_t + s * o
        j = ((_to_eps(model(x_p, t), x_p, a, s, prediction_type) - e_clean.detach()) ** 2).mean((1, 2, 3)).sum()
        omega = torch.maximum(torch.minimum(omega + 1.25 * r * torch.autograd.grad(j, o)[0].sign(), r), -r)
    x_p = x_t + s * omega
    e_pert = _to_eps(model(x_p, t), x_p, a, s, prediction_type)
    target = a * noise - s * x0 if prediction_type == "v_prediction" else x0
    ref = (((clean - target) ** 2).mean((1, 2, 3)) + lam_t.flatten() * ((e_pert - e_clean - omega) ** 2).mean((1, 2, 3))).mean()
    with fastat.use_backend("auto"):
        got = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=table, prediction_type=prediction_type,
                                        method="equivariant_adversarial" if adversarial else "equivariant_random",
                                        eps=eps, rho=rho, r_min=r_min, lam=lam, beta=beta,
                                        generator=torch.Generator().manual_seed(3), **extra)
    params = list(model.parameters())
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert max_abs_diff(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)) < 1e-12


# ------------------------------------------------------------------------------------ consistency models


def test_ict_consistency_training_with_global_seed_draws():
    """iCT: N(k) from the curriculum, indices from the lognormal proposal (torch.multinomial), z ~ N(0, I), in
    that order from the global generator; pseudo-Huber with c = 0.00054 sqrt(D), weight 1/(s_{n+1} - s_n),
    consistency preconditioning, c_noise = ln(s)/4, the EMA target under no_grad, a 2-step L2 PGD on the input."""
    sd, smin = 0.5, 0.002
    torch.manual_seed(5)
    model = ConvNet(scale_t=1.0).double()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x0 = torch.randn(B, C, H, H, dtype=torch.float64)

    def f(net, x, sig):
        c_skip = sd**2 / ((sig - smin) ** 2 + sd**2)
        c_out = (sig - smin) * sd / (sig**2 + sd**2).sqrt()
        return col(c_skip) * x + col(c_out) * net(col(1 / (sig**2 + sd**2).sqrt()) * x, sig.log() / 4)

    def pseudo_huber(u, v):
        c = 0.00054 * math.sqrt(u[0].numel())
        return (((u - v) ** 2).flatten(1).sum(1) + c * c).sqrt() - c

    n = min(10 * 2 ** (300 // math.floor(1000 / (math.log2(1280 // 10) + 1))), 1280) + 1
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (smin ** (1 / 7) + ramp * (80 ** (1 / 7) - smin ** (1 / 7))) ** 7
    torch.manual_seed(6)
    cdf = torch.erf((sigmas.log() + 1.1) / (math.sqrt(2) * 2.0))
    idx = torch.multinomial((cdf[1:] - cdf[:-1]) / (cdf[1:] - cdf[:-1]).sum(), B, replacement=True)
    z = torch.randn_like(x0)
    s0, s1 = sigmas[idx], sigmas[idx + 1]
    x1 = x0 + col(s1) * z
    with torch.no_grad():
        target = f(ema, x0 + col(s0) * z, s0)
    delta = torch.zeros_like(x0)
    for _ in range(2):
        d = delta.clone().requires_grad_(True)
        delta = l2_step(delta, torch.autograd.grad(pseudo_huber(f(model, x1 + d, s1), target).sum(), d)[0], 0.1,
                        0.1 * math.sqrt(x0[0].numel()))
    ref = (pseudo_huber(f(model, x1 + delta, s1), target) / (s1 - s0)).mean()
    torch.manual_seed(6)
    with fastat.use_backend("auto"):
        got = fastat.consistency_adv_loss(model, ema, x0, discretisation="ict", training_step=300, total_steps=1000,
                                          metric="pseudo_huber", method="pgd", steps=2)
    params = list(model.parameters())
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert max_abs_diff(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)) < 1e-12


# ----------------------------------------------------------------------------- BatchNorm and grad modes


@pytest.mark.parametrize("method,extra,passes", [("pgd", {}, 1), ("equivariant_adversarial", {}, 2),
                                                 ("equivariant_adversarial", {"low_memory": True}, 2)])
def test_attack_passes_leave_batchnorm_running_stats_alone(method, extra, passes):
    table = schedules.ddpm_linear_alphas_cumprod(1000)
    torch.manual_seed(7)
    model = ConvNet(batch_norm=True).double()
    ref = copy.deepcopy(model)
    x0, noise = torch.randn(B, C, H, H, dtype=torch.float64), torch.randn(B, C, H, H, dtype=torch.float64)
    t = torch.tensor([1, 100, 600, 999])
    with fastat.use_backend("auto"):
        out = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=table, method=method, return_dict=True,
                                        generator=torch.Generator().manual_seed(0), **extra)
    out["loss"].backward()
    abar = col(table[t])
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():  # the passes that form the loss, in the order the loss makes them
        for x in ([x_t + out["delta"]] if method == "pgd" else [x_t, x_t + out["delta"]]):
            ref(x, t)
    assert int(model.norm.num_batches_tracked) == passes
    torch.testing.assert_close(model.norm.running_mean, ref.norm.running_mean, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(model.norm.running_var, ref.norm.running_var, atol=1e-14, rtol=1e-12)


def test_grad_modes():
    table = schedules.ddpm_linear_alphas_cumprod(1000)
    torch.manual_seed(8)
    model = ConvNet().double()
    x0, noise = torch.randn(B, C, H, H, dtype=torch.float64), torch.randn(B, C, H, H, dtype=torch.float64)
    t = torch.tensor([1, 100, 600, 999])
    kw = dict(alphas_cumprod=table, method="pgd")
    with torch.no_grad():  # evaluation: the attack still runs, the loss has no graph
        evaluated = fastat.diffusion_adv_loss(model, x0, t, noise, **kw)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, fastat.diffusion_adv_loss(model, x0, t, noise, **kw).detach())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        fastat.diffusion_adv_loss(model, x0, t, noise, **kw)
    trainer = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.1), 2, alphas_cumprod=table)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        trainer.step(x0, t, noise)


def test_channels_last_model_sees_channels_last_inputs_everywhere():
    seen = []
    net = ConvNet().to(memory_format=torch.channels_last)

    def model(x, t):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return net(x, t)

    x0 = torch.randn(B, C, H, H).contiguous(memory_format=torch.channels_last)
    table = schedules.ddpm_linear_alphas_cumprod(1000)
    with fastat.use_backend("auto"):
        fastat.diffusion_adv_loss(model, x0, alphas_cumprod=table, method="input_perturbation")
        fastat.consistency_adv_loss(model, None, x0, method="pgd", steps=1)
    assert seen and all(seen)


# ------------------------------------------------------------------------------------------------- EDM


def test_edm_loss_draws_in_edm_order_with_an_augmentation_pipe():
    """EDM's EDMLoss as published: ln(sigma)'s normal, then the augmentation pipe's draws, then the noise, all from
    the global generator; EDMAdvLoss(method="standard") must give the same per-element loss from the same seed."""

    def edm_loss(net, images, augment_pipe, p_mean=-1.2, p_std=1.2, sigma_data=0.5):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        sigma = (rnd_normal * p_std + p_mean).exp()
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        y, augment_labels = augment_pipe(images)
        n = torch.randn_like(y) * sigma
        return weight * ((net(y + n, sigma, None, augment_labels=augment_labels) - y) ** 2)

    def augment_pipe(images):  # a random flip: draws from the global generator, returns (y, augment_labels)
        flip = (torch.rand(images.shape[0], 1, 1, 1) < 0.5).to(images)
        return images * (1 - 2 * flip), flip.reshape(-1, 1)

    conv = torch.nn.Conv2d(C, C, 3, padding=1)

    def net(x, sigma, labels, augment_labels=None):
        return conv(x) * sigma.reshape(-1, 1, 1, 1) + col(augment_labels[:, 0])

    images = torch.randn(B, C, H, H)
    torch.manual_seed(9)
    want = edm_loss(net, images, augment_pipe)
    torch.manual_seed(9)
    got = fastat.EDMAdvLoss(method="standard")(net, images, augment_pipe=augment_pipe)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_free_replay_reports_per_sample_losses_for_a_loss_aware_sampler():
    """AT_Diff's loop feeds losses["loss"] (per sample, before the importance weights) of every replay to the
    loss-second-moment sampler: FreeReplay returns them with the timesteps."""
    x0, t, w, noise, y = _official_batch(2)
    torch.manual_seed(3)
    model = ConvNet(out=2 * C).double()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01)
    delta, want = torch.zeros_like(x0), []
    for _ in range(2):
        opt.zero_grad()
        d = delta.clone().requires_grad_(True)
        losses = _training_losses(ref, x0, t, y, noise, d, "delta_detach")
        want.append(losses.detach())
        (losses * w).mean().backward()
        opt.step()
        delta = l2_step(delta, d.grad, 0.1, 0.1 * math.sqrt(x0[0].numel()))
    out = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.01), 2, alphas_cumprod=ABAR,
                            learn_sigma=True, rescale_learned_sigmas=True, grad_accum_steps=2).step(
        x0, t, noise, model_kwargs={"y": y}, weights=w)
    assert torch.equal(out["timesteps"], t) and len(out["loss_per_sample"]) == 2
    for got, exp in zip(out["loss_per_sample"], want):
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-12)
