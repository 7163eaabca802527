"""consistency_adv_loss (CT, CD with Euler/Heun, Karras/iCT grids, l2/l1/pseudo-Huber) equals an explicit
unfused loop; the target is no-grad and detached; compared passes share the dropout mask; Free-AT for CM."""
import math

import pytest
import torch

import fastat
from fastat import schedules
from training_utils import TinyDenoiser, clone, grads, l2_step, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")

SD, SMIN = 0.5, 0.002


def f(model, x, s):
    s = s[:, None]
    c_skip = SD**2 / ((s - SMIN) ** 2 + SD**2)
    c_out = (s - SMIN) * SD / (s**2 + SD**2).sqrt()
    c_in = 1 / (s**2 + SD**2).sqrt()
    return c_skip * x + c_out * model(c_in * x, s[:, 0].log() / 4)


def teacher(x, s):
    return x / (1 + s[:, None] ** 2) + 0.1 * torch.tanh(x)


def setup(seed=0, batch=5):
    torch.manual_seed(seed)
    model = TinyDenoiser(2).double()
    ema = clone(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x0 = torch.randn(batch, 2, dtype=torch.float64)
    z = torch.randn(batch, 2, dtype=torch.float64)
    return model, ema, x0, z


def distance(a, b, metric, c):
    d = a - b
    if metric == "l2":
        return (d**2).mean(1)
    if metric == "l1":
        return d.abs().mean(1)
    return ((d**2).sum(1) + c * c).sqrt() - c


@pytest.mark.parametrize(
    "mode,solver,disc,metric",
    [("ct", "euler", "karras", "l2"), ("cd", "heun", "karras", "pseudo_huber"), ("cd", "euler", "ict", "l1")],
)
def test_matches_explicit_loop(mode, solver, disc, metric):
    model, ema, x0, z = setup()
    if disc == "ict":
        sigmas = schedules.karras_sigmas(schedules.ict_num_steps(3, 100))
    else:
        sigmas = schedules.karras_sigmas(18)
    idx = torch.tensor([0, 3, 7, 1, 5])
    s0, s1 = sigmas[idx], sigmas[idx + 1]
    x1 = x0 + s1[:, None] * z
    with torch.no_grad():
        if mode == "ct":
            xn = x0 + s0[:, None] * z
        else:
            d1 = (x1 - teacher(x1, s1)) / s1[:, None]
            xe = x1 + (s0 - s1)[:, None] * d1
            if solver == "euler":
                xn = xe
            else:
                d2 = (xe - teacher(xe, s0)) / s0[:, None]
                xn = x1 + (s0 - s1)[:, None] * (d1 + d2) / 2
        tgt = f(ema, xn, s0)
    c = 0.00054 * math.sqrt(2)
    radius = 0.1 * math.sqrt(2)
    delta = torch.zeros_like(x0)
    for _ in range(2):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(distance(f(model, x1 + d, s1), tgt, metric, c).sum(), d)
        delta = l2_step(d.detach(), g, 0.1, radius)
    w = 1 / (s1 - s0) if disc == "ict" else torch.ones_like(s0)
    ref = (w * distance(f(model, x1 + delta, s1), tgt, metric, c)).mean()
    loss = fastat.consistency_adv_loss(
        model, ema, x0, mode=mode, teacher=teacher, solver=solver, discretisation=disc, training_step=3,
        total_steps=100, indices=idx, noise=z, metric=metric, method="pgd", steps=2,
    )
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(loss, model), grads(ref, model)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert all(p.grad is None for p in ema.parameters())


def test_self_target_is_no_grad_and_fgsm_runs():
    model, _, x0, z = setup(1)
    idx = torch.tensor([2, 2, 4, 0, 9])
    a = fastat.consistency_adv_loss(model, None, x0, indices=idx, noise=z, method="none")
    b = fastat.consistency_adv_loss(model, clone(model), x0, indices=idx, noise=z, method="none")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # gradient only through the student: equals the gradient with a frozen copy as target
    for ga, gb in zip(grads(a, model), grads(b, model)):
        torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)
    out = fastat.consistency_adv_loss(model, None, x0, method="fgsm_rs", return_dict=True,
                                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and torch.all(out["delta_norm"] <= 0.1 * math.sqrt(2) + 1e-9)


def test_student_and_target_share_the_dropout_mask():
    torch.manual_seed(0)
    model = TinyDenoiser(2, dropout=0.5).double().train()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    sig = torch.tensor([0.5, 0.5], dtype=torch.float64)  # x_n == x_{n+1}: equal masks give a zero loss
    loss = fastat.consistency_adv_loss(model, None, x0, sigmas=sig, method="none")
    assert float(loss.detach()) == 0.0
    loss = fastat.consistency_adv_loss(model, None, x0, sigmas=sig, method="none", same_dropout=False)
    assert float(loss.detach()) > 0.0


def test_free_replay_cm_matches_explicit_loop():
    model, ema, x0, z = setup(2)
    ref_model = clone(model)
    idx = torch.tensor([1, 4, 6, 2, 0])
    sigmas = schedules.karras_sigmas(18)
    s0, s1 = sigmas[idx], sigmas[idx + 1]
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    radius = 0.1 * math.sqrt(2)
    delta = torch.zeros_like(x0)
    for _ in range(3):
        opt.zero_grad()
        with torch.no_grad():
            tgt = f(ema, x0 + s0[:, None] * z, s0)
        d = delta.clone().requires_grad_(True)
        loss = ((f(ref_model, x0 + s1[:, None] * z + d, s1) - tgt) ** 2).mean(1).mean()
        loss.backward()
        opt.step()
        delta = l2_step(d.detach(), d.grad, 0.1, radius)
    fr = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, method="cm",
                           loss_kwargs={"target_model": ema, "indices": idx})
    fr.step(x0, noise=z)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_errors():
    model, ema, x0, _ = setup()
    with pytest.raises(ValueError, match="teacher"):
        fastat.consistency_adv_loss(model, ema, x0, mode="cd")
    with pytest.raises(ValueError, match="training_step"):
        fastat.consistency_adv_loss(model, ema, x0, discretisation="ict")
    with pytest.raises(ValueError, match="indices"):
        fastat.consistency_adv_loss(model, ema, x0, indices=torch.tensor([0, 1, 2, 3, 17]))
