"""Adapters: guided-diffusion's training_losses dict, EDM's per-element loss, the diffusers drop-in."""
import importlib.util
import math
import pathlib

import pytest
import torch

import fastat
from training_utils import TABLE, grads, l2_step, make, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_guided_diffusion_training_losses_dict():
    model, x0, noise, t = make(20)
    gd = fastat.GuidedDiffusionAdvLosses(TABLE, method="pgd", adv_steps=2)
    terms = gd.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (x0.shape[0],)
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, steps=2, reduction="none")
    torch.testing.assert_close(terms["loss"], ref)
    torch.testing.assert_close(terms["mse"], ref)
    p2 = fastat.GuidedDiffusionAdvLosses(TABLE, method="equivariant_random").training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(p2["loss"], p2["mse"] + p2["reg"])

    # learned variance: 2C output channels, the first C are the noise prediction; the VB term is added
    # (its values are checked in test_training_vb.py)
    def two_c(x, ts):
        out = model(x, ts)
        return torch.cat([out, torch.full_like(out, 0.3)], dim=1)

    lv = fastat.GuidedDiffusionAdvLosses(TABLE, learn_sigma=True, method="pgd", adv_steps=2)
    lv_terms = lv.training_losses(two_c, x0, t, noise=noise)
    torch.testing.assert_close(lv_terms["mse"], ref)
    torch.testing.assert_close(lv_terms["loss"], ref + lv_terms["vb"])


def test_edm_loss_matches_explicit_loop():
    torch.manual_seed(0)
    net_core = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def net(x, sigma, labels):
        return net_core(torch.cat([x, sigma.reshape(-1, 1).log()], 1))

    y = torch.randn(5, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    rnd = torch.randn(5, generator=gen).double()  # EDM draws ln(sigma)'s normal in the default dtype
    z = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    sigma = (rnd * 1.2 - 1.2).exp()[:, None]
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    radius = 0.1 * math.sqrt(2)
    delta = torch.zeros_like(y)
    for _ in range(3):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((weight * (net(y + sigma * z + d, sigma, None) - y) ** 2).mean(1).sum(), d)
        delta = l2_step(d.detach(), g, 0.1, radius)
    ref = weight * (net(y + sigma * z + delta, sigma, None) - y) ** 2
    out = fastat.EDMAdvLoss(method="pgd")(net, y, generator=torch.Generator().manual_seed(3))
    assert out.shape == y.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(out.sum(), net_core), grads(ref.sum(), net_core)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


diffusers = pytest.importorskip("diffusers")


def _example():
    spec = importlib.util.spec_from_file_location("diffusers_unet_example", ROOT / "examples" / "diffusers_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diffusers_unet_drop_in_and_example():
    """method="standard" is exactly diffusers' own loss; the example trains one P2 step (one test: the
    diffusers import and the UNet's first calls cost seconds)."""
    ex = _example()
    torch.manual_seed(0)
    unet = ex.tiny_unet()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    x0 = ex.toy_images(2, 8, torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 700])
    noisy = scheduler.add_noise(x0, noise, t)
    ref = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
    loss = fastat.diffusion_adv_loss(unet, x0, t, noise, scheduler=scheduler, method="standard")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    losses = ex.main(steps=1, batch=2, method="equivariant_adversarial")
    assert len(losses) == 1 and math.isfinite(losses[0])
