"""FreeReplay: the parameter trajectory equals an explicit Free-AT loop (P1, P2, gradient accumulation),
hooks run once per replay, GradScaler unscales the delta gradient and skips non-finite steps."""
import math

import pytest
import torch

import fastat
from training_utils import TABLE, clone, coefs, l2_step, make, p2_coefs, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")


def explicit_p1(model, x0, noise, t, replays, chunks=1, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    a, s = coefs(t)
    radius = 0.1 * math.sqrt(x0.shape[1])
    parts = list(zip(x0.chunk(chunks), noise.chunk(chunks), a.chunk(chunks), s.chunk(chunks), t.chunk(chunks)))
    deltas = [torch.zeros_like(p[0]) for p in parts]
    for _ in range(replays):
        opt.zero_grad()
        gs = []
        for (xc, nc, ac, sc, tc), delta in zip(parts, deltas):
            d = delta.clone().requires_grad_(True)
            loss = ((model(ac * xc + sc * nc + d, tc) - nc - d.detach() / sc) ** 2).mean(1).mean() / chunks
            loss.backward()
            gs.append(d.grad)
        opt.step()
        deltas = [l2_step(d, g, 0.1, radius) for d, g in zip(deltas, gs)]
    return deltas


@pytest.mark.parametrize("chunks", [1, 2])
def test_p1_trajectory_matches_explicit_loop(chunks):
    model, x0, noise, t = make(10)
    ref_model = clone(model)
    ref_deltas = explicit_p1(ref_model, x0, noise, t, 3, chunks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = fastat.FreeReplay(model, opt, 3, alphas_cumprod=TABLE, grad_accum_steps=chunks).step(x0, t, noise)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    for d, r in zip(out["delta"], ref_deltas):
        torch.testing.assert_close(d, r, atol=1e-12, rtol=1e-12)
    assert len(out["losses"]) == 3


def test_p2_free_trajectory_matches_explicit_loop():
    model, x0, noise, t = make(11)
    ref_model = clone(model)
    a, s = coefs(t)
    r, lam_t = p2_coefs(s)
    omega = torch.empty_like(x0).uniform_(-1, 1, generator=torch.Generator().manual_seed(2)) * r
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    x_t = a * x0 + s * noise
    for _ in range(2):
        opt.zero_grad()
        o = omega.clone().requires_grad_(True)
        pc, pp = ref_model(x_t, t), ref_model(x_t + s * o, t)
        loss = (((pc - noise) ** 2).mean(1) + lam_t[:, 0] * ((pp - pc - o) ** 2).mean(1)).mean()
        loss.backward()
        opt.step()
        omega = torch.maximum(torch.minimum(omega + 1.25 * r * o.grad.sign(), r), -r)
    fr = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 2, method="p2", alphas_cumprod=TABLE)
    out = fr.step(x0, t, noise, generator=torch.Generator().manual_seed(2))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out["delta"][0], omega, atol=1e-12, rtol=1e-12)


def test_hooks_run_once_per_replay_and_ema_tracks():
    model, x0, noise, t = make(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    calls = []
    fastat.FreeReplay(model, opt, 3, alphas_cumprod=TABLE, lr_scheduler=sched, ema=ema, max_grad_norm=1.0).step(x0, t, noise)
    assert sched.last_epoch == 3 and math.isclose(opt.param_groups[0]["lr"], 0.1 * 0.5**3)
    assert int(ema.n_averaged) == 3
    fastat.FreeReplay(model, opt, 2, alphas_cumprod=TABLE, ema=lambda m: calls.append(m)).step(x0, t, noise)
    assert len(calls) == 2


def test_grad_scaler_matches_unscaled_and_skips_overflow():
    model, x0, noise, t = make(13)
    ref_model = clone(model)
    fastat.FreeReplay(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.05), 3, alphas_cumprod=TABLE).step(x0, t, noise)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    out = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, alphas_cumprod=TABLE,
                            scaler=scaler).step(x0, t, noise)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    # A scale that overflows every gradient (fp32 model, loss x 2^127): no optimizer step, delta unchanged.
    model32 = model.float()
    net = lambda x, ts: model32(x, ts) * 1e3  # noqa: E731
    before = [p.detach().clone() for p in model32.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    fr = fastat.FreeReplay(net, torch.optim.SGD(model32.parameters(), lr=0.05), 1, alphas_cumprod=TABLE, scaler=scaler)
    out = fr.step(x0.float(), t, noise.float())
    for p, q in zip(model32.parameters(), before):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert float(out["delta"][0].abs().max()) == 0.0
    assert scaler.get_scale() < 2.0**127


def test_errors():
    model, x0, noise, t = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="replays"):
        fastat.FreeReplay(model, opt, 0, alphas_cumprod=TABLE)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        fastat.FreeReplay(model, opt, 2, alphas_cumprod=TABLE, grad_accum_steps=4).step(x0, t, noise)
    with pytest.raises(ValueError, match="adv_steps"):
        fastat.FreeReplay(model, opt, 2, alphas_cumprod=TABLE, adv_steps=5)


def test_bf16_autocast_free_replay_keeps_fp32_perturbation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    net = lambda x, t: model(x)  # noqa: E731
    x0, noise, t = torch.randn(8, 2), torch.randn(8, 2), torch.randint(0, 1000, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastat.FreeReplay(net, torch.optim.SGD(model.parameters(), lr=0.1), 2, method="p2",
                                alphas_cumprod=TABLE).step(x0, t, noise)
    assert out["delta"][0].dtype == torch.float32 and all(torch.isfinite(v) for v in out["losses"])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
