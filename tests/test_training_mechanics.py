"""Mechanics: torch.compile'd models (attack loop eager), CUDA-graph capture, FSDP2, the step-benchmark
cases (CPU smoke; the GPU cases and everything CUDA-only are marked gpu). The loops on every CPU kernel
backend: test_training_backends.py."""
import math
import os

import pytest
import torch

import fastat
from fastat.bench import steps
from fastat.bench.models import DDPMUNet, ToyMLP, num_params
from fastat.training import GraphedStep
from training_utils import TABLE, make, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_compiled_model_matches_eager():
    """A torch.compile'd model works inside the (eager) attack loop; aot_eager keeps the CPU test fast."""
    model, x0, noise, t = make(30, batch=4)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    kw = dict(alphas_cumprod=TABLE, method="pgd", steps=1)
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, **kw)
    got = fastat.diffusion_adv_loss(compiled, x0, t, noise, **kw)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    g_got = torch.autograd.grad(got, list(model.parameters()))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_graphed_step_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="CUDA"):
        GraphedStep(lambda x: x, [torch.zeros(1)])


def test_bench_models_parameter_count():
    assert round(num_params(DDPMUNet()) / 1e6, 1) == 35.7  # Ho et al. CIFAR-10 config
    assert num_params(ToyMLP()) == (66 * 256 + 256) + 2 * (256 * 256 + 256) + (256 * 2 + 2)


def test_step_benchmark_rows_cpu_smoke():
    spec = dict(case="toy_mlp_2d", model=lambda: ToyMLP(width=32), shape=(8, 2), amp=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add contention on a shared box
    try:
        rows = steps.run_case(spec, torch.device("cpu"), quick=True, reps=2)
    finally:
        torch.set_num_threads(threads)
    names = {(r["provider"], r["method"]) for r in rows}
    assert ("eager", "standard") in names and ("fastat", "free_p1") in names and ("fastat", "p2_adversarial") in names
    for r in rows:
        assert r["suite"] == "steps" and r["median_ms"] > 0 and r["q10_ms"] <= r["median_ms"] <= r["q90_ms"]
        assert math.isnan(r["peak_mem_mb"]) and r["ratio_vs_standard"] > 0
    base = next(r for r in rows if r["provider"] == "eager" and r["method"] == "standard")
    assert base["ratio_vs_standard"] == 1.0


@pytest.mark.gpu
def test_graphed_pgd_step_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = ToyMLP().cuda()
    eager_model = ToyMLP().cuda()
    eager_model.load_state_dict(model.state_dict())
    x0 = torch.randn(256, 2, device="cuda")
    table = TABLE.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    t = torch.randint(0, 1000, (256,), device="cuda")
    noise = torch.randn_like(x0)

    def step(x, tt, nn_):
        loss = fastat.diffusion_adv_loss(model, x, tt, nn_, alphas_cumprod=table, method="pgd", same_dropout=False)
        loss.backward()
        opt.step()
        return loss.detach()

    graphed = GraphedStep(step, [x0, t, noise], optimizer=opt)  # warm-up + capture run 3 + 0 steps
    # the eager copy replays the same number of optimizer steps (3 warm-up steps) before comparing
    eopt = torch.optim.SGD(eager_model.parameters(), lr=1e-2)
    for _ in range(4):
        eopt.zero_grad(set_to_none=True)
        loss = fastat.diffusion_adv_loss(eager_model, x0, t, noise, alphas_cumprod=table, method="pgd")
        loss.backward()
        eopt.step()
    got = graphed(x0, t, noise)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, loss.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_fsdp2_fully_shard_single_process():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    ref = ToyMLP(width=64).cuda()
    model = ToyMLP(width=64).cuda()
    model.load_state_dict(ref.state_dict())
    fully_shard(model)
    x0 = torch.randn(32, 2, device="cuda")
    t = torch.randint(0, 1000, (32,), device="cuda")
    noise = torch.randn_like(x0)
    kw = dict(alphas_cumprod=TABLE.cuda(), method="equivariant_adversarial", generator=None)
    torch.manual_seed(1)
    fastat.diffusion_adv_loss(model, x0, t, noise, **kw).backward()
    torch.manual_seed(1)
    fastat.diffusion_adv_loss(ref, x0, t, noise, **kw).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, atol=1e-5, rtol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fastat.FreeReplay(model, opt, 2, alphas_cumprod=TABLE.cuda(), grad_accum_steps=2).step(x0, t, noise)


@pytest.mark.gpu
def test_compiled_inductor_model_on_cuda():
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16).cuda()
    compiled = torch.compile(model)
    x0 = torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (4,), device="cuda")
    noise = torch.randn_like(x0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = fastat.diffusion_adv_loss(compiled, x0, t, noise, alphas_cumprod=TABLE.cuda(), method="pgd")
        b = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE.cuda(), method="pgd")
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_step_benchmarks_quick_on_cuda():
    rows = steps.run_step_benchmarks("cuda", quick=True)
    cases = {r["case"] for r in rows}
    assert {"toy_mlp_2d", "ddpm_cifar10_unet"} <= cases
    assert all(r["peak_mem_mb"] > 0 for r in rows)


# ------------------------------------------------------------------ the attack step's cached autograd seed


def _attack(model, x0, noise, t, grad_fn, monkeypatch, steps):
    """diffusion_adv_loss's attack with the loop's gradient call replaced by grad_fn."""
    from fastat.training import _common

    monkeypatch.setattr(_common, "loss_grads", grad_fn)
    return fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method="pgd", steps=steps,
                                     return_dict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_seed_gives_the_default_gradients_and_stays_one(dtype, monkeypatch):
    """Many attack steps through the cached seed: the same bits as torch.autograd.grad's own ones_like seed, and
    the seed is still a ones scalar afterwards (nothing in autograd wrote to it or took it over)."""
    from fastat import _autograd

    model, x0, noise, t = make(41, batch=5)
    model, x0, noise = model.to(dtype), x0.to(dtype), noise.to(dtype)
    default = lambda loss, inputs: torch.autograd.grad(loss, tuple(inputs), allow_unused=True)  # noqa: E731
    ref = _attack(model, x0, noise, t, default, monkeypatch, steps=25)
    got = _attack(model, x0, noise, t, _autograd.loss_grads, monkeypatch, steps=25)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    seed = _autograd._SEEDS[(torch.device("cpu"), dtype)]
    assert seed.shape == () and seed.dtype == dtype and seed.item() == 1.0 and seed._version == 0
    again = _attack(model, x0, noise, t, _autograd.loss_grads, monkeypatch, steps=3)
    assert _autograd._SEEDS[(torch.device("cpu"), dtype)] is seed and torch.equal(again["loss"], _attack(
        model, x0, noise, t, default, monkeypatch, steps=3)["loss"])


def test_cached_seed_never_reaches_the_caller():
    """A gradient that is the seed or a view of it (a loss among the inputs; a plain sum) comes back as a copy, so
    writing to it leaves the seed alone; other cases take torch.autograd.grad's own path and errors."""
    from fastat import _autograd

    x = torch.randn(3, requires_grad=True)
    for _ in range(2):
        loss = (x * 2).sum()
        (g_loss, g_x) = _autograd.loss_grads(loss, (loss, x))
        g_loss.add_(5.0)
        (g_sum,) = _autograd.loss_grads(x.sum(), (x,))
        g_sum.mul_(3.0)
        torch.testing.assert_close(g_x, torch.full((3,), 2.0))
    seed = _autograd._SEEDS[(torch.device("cpu"), torch.float32)]
    assert seed.item() == 1.0 and seed._version == 0
    y = torch.randn(2, requires_grad=True)
    assert _autograd.loss_grads((y * y).sum(), (y, x)) [1] is None
    with pytest.raises(RuntimeError, match="implicitly created only for scalar"):
        _autograd.loss_grads(y * 2, (y,))
