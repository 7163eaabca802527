"""The CUDA backend's ops against the float64 reference.

On a GPU with fastat._C_cuda built: the real kernels (tests marked `gpu`; plus bf16/fp16, triton-vs-cuda agreement,
determinism, CUDA-graph capture and a >2^31-element tensor). On CPU: the CUDA kernels' C++ is compiled by nvcc
(tools/check_cuda_compile.py), their per-element functors run on the host (test_cuda_build.py, which also checks
their signatures against the op schemas), and here the claim that a compiled backend is its kernels and nothing
else: with CPU stand-ins registered for torch.ops.fastat_cuda.* (the cpp kernels, which take the same schema), the
public API on backend "cuda" runs through the same selector, autograd Functions and fakes as every other backend.
"""
from __future__ import annotations

import importlib
import math
import types

import pytest
import torch

import fastat
from fastat import SeededNoise, _backend, _dispatch, _ext
from fastat.ops.noise import reference as noise_ref
from utils import layout

KINDS = ("contiguous", "channels_last", "noncontiguous")


def _cuda_built() -> bool:
    return importlib.util.find_spec("fastat._C_cuda") is not None


def on(backend, fn, *args, **kwargs):
    with fastat.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.fixture
def cuda_as_cpp(monkeypatch):
    """torch.ops.fastat_cuda.<op> on CPU tensors = the cpp kernel of the same schema; backend "cuda" available."""
    if _cuda_built() or torch.cuda.is_available():
        pytest.skip("the real fastat_cuda library may load here; the gpu tests cover it")
    if _ext._toolchain_problem() is not None and not _ext.is_built("cpp"):
        pytest.skip("needs the cpp kernels as stand-ins")
    cpp = _ext.load("cpp")
    library = torch.library.Library("fastat_cuda", "IMPL")
    for name in _dispatch.registered_ops():
        library.impl(name, getattr(cpp, name).default, "CPU")
    # the library's direct entries (what the eager route calls) are here the stand-in operators themselves
    entries = types.SimpleNamespace(**{name: getattr(torch.ops.fastat_cuda, name).default for name in _dispatch.registered_ops()})
    # and the autograd kernels: the shared C++ template (csrc/cuda/loss_autograd.h) as the cpp library instantiates it
    entries.residual_loss_autograd = _ext.module("cpp").residual_loss_autograd
    saved_module = _ext.module
    monkeypatch.setattr(_ext, "module", lambda kind: entries if kind == "cuda" else saved_module(kind))
    status = _backend.backend_status
    monkeypatch.setattr(_backend, "backend_status", lambda name: (True, "stand-in") if name == "cuda" else status(name))
    monkeypatch.setattr(_backend, "device_refusal", lambda backend, device: None)
    for op in _dispatch.OPS.values():
        monkeypatch.setitem(op.support, "cuda", _dispatch.dataclasses.replace(op.support["cuda"], devices=("cpu",)))
    _backend.forget()
    yield
    library._destroy()
    _backend.forget()


def _make(shape, dtype, kind, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), kind)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_a_compiled_backend_is_its_kernels_only(cuda_as_cpp, kind):
    """Backend "cuda" with nothing but kernels registered for its namespace: values, gradients (incl. double
    backward of the noisy input), seeded noise, random starts and refusals all come from the shared layer."""
    shape = (4, 3, 5, 6)
    x0, noise, delta, pred = (_make(shape, torch.float32, kind, s, True) for s in range(4))
    alpha, sigma = torch.rand(4) + 0.1, torch.rand(4) + 0.2
    outs = {}
    for backend in ("cuda", "torch"):
        with fastat.use_backend(backend):
            x_t = fastat.noisy_input(x0, noise, alpha, sigma, delta)
            (g,) = torch.autograd.grad((x_t * x_t).sum(), x0, create_graph=True)  # 2 alpha x_t
            (gg,) = torch.autograd.grad(g.sum(), noise)  # double backward: 2 alpha sigma
            loss = fastat.equivariant_mse(pred, SeededNoise(3, 4), delta, sigma, "delta", weight=alpha)
            if backend == "cuda":  # the loss's autograd node is the shared C++ one (csrc/cuda/loss_autograd.h)
                assert loss.grad_fn.name() == "fastat::residual_loss_backward"
            grads = torch.autograd.grad(loss, (pred, delta))
            step, x_next = fastat.pgd_step(delta.detach(), grads[1], 0.1, 1.0, "l2", model_input_base=x_t.detach())
            start = fastat.random_perturbation(x0, 0.5, "linf", generator=torch.Generator().manual_seed(1))
            outs[backend] = (x_t, g, gg, loss, *grads, step, x_next, start)
    for a, b in list(zip(outs["cuda"], outs["torch"]))[:-1]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool((outs["cuda"][-1].abs() <= 0.5).all())
    with fastat.use_backend("cuda"), pytest.raises(fastat.BackendUnavailableError, match="tensor-valued alpha"):
        fastat.noisy_input(x0, noise, alpha.clone().requires_grad_(), sigma)


def test_q_sample_gathers_in_the_compiled_kernel(cuda_as_cpp):
    """q_sample on a compiled backend: the op receives the per-timestep tables and the int64 timesteps (the kernel's
    Coef gathers them), no gather op runs in Python; values and gradients as the reference."""
    x0, noise = (_make((4, 3, 5, 6), torch.float32, "contiguous", s, True) for s in range(2))
    table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
    t = torch.tensor([999, 0, 417, 3])
    outs = {}
    for backend in ("cuda", "torch"):
        with fastat.use_backend(backend):
            x_t = fastat.q_sample(x0, noise, t, table)
            outs[backend] = (x_t, *torch.autograd.grad((x_t * x_t).sum(), (x0, noise)))
    for a, b in zip(outs["cuda"], outs["torch"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# GPU: the real kernels.

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOW_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float64: (1e-10, 1e-10)}


@pytest.fixture()
def cuda_backend():
    if not _cuda_built():
        pytest.skip("fastat._C_cuda is not built (pip install --no-build-isolation -e . on a CUDA machine)")
    fastat.set_backend("cuda")
    yield
    fastat.set_backend("auto")


def _gpu(shape, dtype, kind, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda()
    return layout(x, kind).requires_grad_(requires_grad)  # the layout made on the GPU (.cuda() densifies)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES + [torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 2), (1, 1), (3, 3, 64, 64), (2, 3, 257, 255)])
def test_gpu_ops_vs_float64_reference(cuda_backend, dtype, kind, shape):
    atol, rtol = LOW_TOL[dtype]
    x0, noise, delta, grad = (_gpu(shape, dtype, kind, s) for s in (1, 2, 3, 4))
    alpha = torch.rand(shape[0], device="cuda") + 0.1
    out = fastat.noisy_input(x0, noise, alpha, 0.3, delta)
    ref = on("torch", fastat.noisy_input, x0.double(), noise.double(), alpha.double(), 0.3, delta.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for norm in ("l2", "linf"):
        new = fastat.pgd_step(delta, grad, 0.1, 0.5, norm)
        ref = on("torch", fastat.pgd_step, delta.double(), grad.double(), 0.1, 0.5, norm)
        torch.testing.assert_close(new.double(), ref, atol=atol * 2, rtol=rtol * 2)
    pred = _gpu(shape, dtype, kind, 5, True)
    loss = fastat.equivariant_mse(pred, noise, delta, 0.5, "delta_detach", reduction="none")
    p64 = pred.detach().double().requires_grad_()
    ref = on("torch", fastat.equivariant_mse, p64, noise.double(), delta.double(), 0.5, "delta_detach", reduction="none")
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    (g,) = torch.autograd.grad(loss.sum(), pred)
    (g_ref,) = torch.autograd.grad(ref.sum(), p64)
    torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol)
    for metric in ("l2", "l1", "pseudo_huber"):
        d = fastat.consistency_distance(pred.detach(), noise, metric, reduction="none")
        want = on("torch", fastat.consistency_distance, pred.double(), noise.double(), metric, reduction="none")
        torch.testing.assert_close(d.double(), want, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_seeded_noise_matches_reference_stream(cuda_backend):
    like = torch.empty(3, 5, 17, 9, device="cuda")
    got = fastat.gaussian_noise(like, 123, 456)
    exp = noise_ref.gaussian_noise(like.cpu(), 123, 456, torch.float32)
    torch.testing.assert_close(got.cpu(), exp, atol=2e-6, rtol=2e-6)
    from fastat.ops.perturbation import reference as pert_ref

    seed = torch.tensor([77], device="cuda")
    for l2, normal in ((True, False), (True, True), (False, False), (False, True)):
        start = torch.ops.fastat_cuda.random_perturbation(like, seed, None, 0.5, l2, normal, torch.float32)
        want = pert_ref.random_perturbation(like.cpu(), seed.cpu(), None, 0.5, l2, normal, torch.float32)
        torch.testing.assert_close(start.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_triton_vs_cuda_agree(dtype):
    if not _cuda_built():
        pytest.skip("fastat._C_cuda is not built")
    pytest.importorskip("triton")
    shape = (16, 3, 64, 64)
    x0, noise, delta, grad, pred = (_gpu(shape, dtype, "contiguous", s) for s in range(5))
    results = {}
    for backend in ("triton", "cuda"):
        with fastat.use_backend(backend):
            results[backend] = (
                fastat.noisy_input(x0, SeededNoise(9, 3), 0.6, 0.8, delta),
                fastat.pgd_step(delta, grad, 0.1, 1.0, "l2"),
                fastat.pgd_step(delta, grad, 0.01, 0.03, "linf"),
                fastat.equivariant_mse(pred, SeededNoise(9, 3), delta, 0.8, reduction="none"),
            )
    atol, rtol = LOW_TOL[dtype]
    for a, b in zip(results["triton"], results["cuda"]):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_deterministic_and_graph_capturable(cuda_backend):
    shape = (8, 3, 32, 32)
    delta, grad, pred, noise = (_gpu(shape, torch.float32, "contiguous", s) for s in range(4))
    first = fastat.pgd_step(delta, grad, 0.1, 1.0, "l2")
    assert torch.equal(first, fastat.pgd_step(delta, grad, 0.1, 1.0, "l2"))  # fixed-order reductions

    def step():
        loss = fastat.equivariant_mse(pred, noise, delta, 0.5, reduction="none")
        return loss, fastat.pgd_step(delta, grad, 0.1, 1.0, "l2"), fastat.noisy_input(pred, SeededNoise(1), 0.5, 0.5, delta)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_more_than_2_31_elements(backend):
    n = 2**31 + 2**20 + 3  # int64 indexing: not a multiple of the pack, several samples straddle 2^31
    free, _ = torch.cuda.mem_get_info()
    if free < 6 * n * 2 + (1 << 30):
        pytest.skip("needs ~30 GB of free GPU memory")
    if backend == "cuda" and not _cuda_built():
        pytest.skip("fastat._C_cuda is not built")
    if backend == "triton":
        pytest.importorskip("triton")
    fastat.set_backend(backend)
    batch = 3
    d = n // batch
    delta = torch.zeros(batch, d, device="cuda", dtype=torch.float16)
    grad = torch.ones(batch, d, device="cuda", dtype=torch.float16)
    grad[-1, -1] = 2.0
    new = fastat.pgd_step(delta, grad, 1.0, 10.0, "linf")
    assert new[-1, -1].item() == 1.0 and new[0, 0].item() == 1.0
    new = fastat.pgd_step(delta, grad, 2.0, 10.0, "l2")
    norms = new.float().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2.0), atol=2e-2, rtol=2e-2)
    del new
    loss = fastat.consistency_distance(grad, delta, "l2", reduction="none")
    # Per-lane fp32 sums of <= 2^24 ones are exact and the per-sample finalize adds the partials in fp64.
    torch.testing.assert_close(loss, torch.ones(3, device="cuda"), atol=1e-6, rtol=1e-6)
