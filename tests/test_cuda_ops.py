"""The CUDA backend's ops against the float64 reference.

Two ways of running the same checks:
  * on a GPU with fastat._C_cuda built: the real kernels (tests marked `gpu`; plus bf16/fp16, triton-vs-cuda
    agreement, determinism, CUDA-graph capture, torch.compile and a >2^31-element tensor);
  * on CPU (no extension): the Python glue (autograd Functions, fake kernels, argument order against the C++
    schemas) runs against a pure-torch stand-in of every fastat_cuda op, registered from the schema strings of
    csrc/cuda/bindings.cpp. The stand-in follows the kernels' algorithms (e.g. the L2 projection from the three
    per-sample dot products, the per-sample Philox uniform of the L2-ball start), so it also checks the maths.
"""
from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import fastat
from fastat.ops.losses import reference as loss_ref
from fastat.ops.noise import SeededNoise
from fastat.ops.noise import reference as noise_ref
from fastat.ops.noisy_input import reference as ni_ref
from fastat.ops.perturbation import reference as pert_ref
from utils import layout

ROOT = Path(__file__).resolve().parent.parent
GLUE = ("fastat.ops.noisy_input.cuda_kernels", "fastat.ops.perturbation.cuda_kernels", "fastat.ops.losses.cuda_kernels")


def _cuda_built() -> bool:
    return importlib.util.find_spec("fastat._C_cuda") is not None


# ---------------------------------------------------------------------------------------------------------------
# Pure-torch stand-in of the fastat_cuda ops (CPU), following csrc/cuda/*.cu.


def _schemas():
    text = (ROOT / "csrc" / "cuda" / "bindings.cpp").read_text()
    out = []
    for call in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        out.append("".join(re.findall(r"\"([^\"]*)\"", call)))
    return out


def _col(coef, coef_s, like):
    if coef is None:
        return coef_s
    return coef.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _out_like(*tensors, dtype=None):
    from fastat import _ext

    return _ext.empty_like_kernel(*[t for t in tensors if t is not None], dtype=dtype)


def _seeded(like, seed, offset):
    return noise_ref.randn_flat(seed, offset, like.numel(), like.device).view(like.shape)


def _sum(x):
    return x.reshape(x.shape[0], -1).sum(1)


def _noisy_input(x0, noise, alpha, sigma, alpha_s, sigma_s, delta):
    acc = _acc(x0)
    v = _col(alpha, alpha_s, x0.to(acc)) * x0.to(acc) + _col(sigma, sigma_s, x0.to(acc)) * noise.to(acc)
    if delta is not None:
        v = v + delta.to(acc)
    return _out_like(x0, noise, delta).copy_(v)


def _noisy_input_seeded(x0, seed, offset, alpha, sigma, alpha_s, sigma_s, delta):
    x0 = x0.contiguous()
    return _noisy_input(x0, _seeded(x0, seed, offset).to(_acc(x0)), alpha, sigma, alpha_s, sigma_s,
                        None if delta is None else delta.contiguous()).contiguous()


def _gaussian_noise(like, seed, offset, dtype):
    return _seeded(like, seed, offset).to(dtype).contiguous()


def _scale(grad, coef, coef_s):
    acc = _acc(grad)
    return _out_like(grad).copy_(_col(coef, coef_s, grad.to(acc)) * grad.to(acc))


def _pgd_step(delta, grad, base, step, radius, step_s, radius_s, l2, normalize):
    acc = _acc(delta)
    d, g = delta.to(acc), grad.to(acc)
    bad = (~torch.isfinite(g)).reshape(g.shape[0], -1).sum(1) > 0
    s = _col(step, step_s, d)
    if l2:
        # The kernel's finalize: ||v||^2 from the three per-sample sums, never from v itself.
        gg, dg, dd = _sum(g * g), _sum(d * g), _sum(d * d)
        c = (step if step is not None else torch.full_like(gg, step_s)).to(acc)
        if normalize:
            c = c / gg.sqrt().clamp_min(1e-8)
        vv = torch.where(c != 0, dd + 2 * c * dg + c * c * gg, dd).clamp_min(0)
        r = (radius if radius is not None else torch.full_like(gg, radius_s)).to(acc)
        scale = torch.clamp(r / vv.sqrt().clamp_min(1e-8), max=1.0)
        cd, cg = torch.where(bad, 1.0, scale), torch.where(bad, 0.0, scale * c)
        shape = (-1,) + (1,) * (d.ndim - 1)
        new = cd.reshape(shape) * d + torch.where(cg.reshape(shape) != 0, cg.reshape(shape) * g, 0.0)
    else:
        r = _col(radius, radius_s, d)
        direction = torch.sign(g) if normalize else g
        new = torch.maximum(torch.minimum(d + s * direction, torch.as_tensor(r, dtype=acc)), -torch.as_tensor(r, dtype=acc))
        new = torch.where(bad.reshape((-1,) + (1,) * (d.ndim - 1)), d, new)
    out = _out_like(delta, grad, base).copy_(new)
    if base is None:
        return out, delta.new_empty(0)
    return out, torch.empty_like(out).copy_(base.to(acc) + out.to(acc))


def _random(like, seed, radius, radius_s, l2, normal, dtype):
    sd = int(seed.item())
    out = _out_like(like, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, b, d = out.numel(), out.shape[0], out[0].numel()
    r = radius.to(acc) if radius is not None else torch.full((b,), radius_s, dtype=acc)
    idx = torch.arange(n, dtype=torch.int64)
    zero = torch.zeros_like(idx)
    if not l2 and not normal:
        c0, _, _, _ = noise_ref.philox(sd, idx & noise_ref.M32, (idx >> 32) & noise_ref.M32, zero, zero)
        v = (2 * noise_ref.uint_to_uniform(c0).to(acc) - 1).view(out.shape) * r.reshape((-1,) + (1,) * (out.ndim - 1))
        return out.copy_(v)
    v = noise_ref.randn_flat(sd, 0, n, "cpu").to(acc).view(out.shape)
    rc = r.reshape((-1,) + (1,) * (out.ndim - 1))
    if not l2:
        return out.copy_(torch.maximum(torch.minimum(v * rc, rc), -rc))
    norm = _sum(v * v).sqrt()
    if normal:
        scale = r / math.sqrt(max(d, 1))
        c = scale * torch.clamp(r / (norm * scale).clamp_min(1e-8), max=1.0)
    else:
        bi = torch.arange(b, dtype=torch.int64)
        zb = torch.zeros_like(bi)
        u0, _, _, _ = noise_ref.philox(sd, bi, zb, zb + 1, zb)  # subsequence 1: the per-sample uniform
        u = noise_ref.uint_to_uniform(u0).double().pow(1.0 / max(d, 1)).to(acc)
        c = u * r / norm.clamp_min(1e-8)
    return out.copy_(v * c.reshape((-1,) + (1,) * (out.ndim - 1)))


def _residual_loss(a, b, c, k, k_s, metric, huber_c, save, seed, offset):
    acc = _acc(a)
    if seed >= 0:
        a, c = a.contiguous(), None if c is None else c.contiguous()
        bv = _seeded(a, seed, offset).to(acc)
    else:
        bv = b.to(acc)
    r = a.to(acc) - bv
    if c is not None:
        r = r - c.to(acc) / _col(k, k_s, r)
    d = max(a[0].numel(), 1) if a.shape[0] else 1
    s = _sum(r.abs() if metric == 1 else r * r)
    loss = (s + huber_c**2).sqrt() - huber_c if metric == 2 else s / d
    if not save:
        return loss, a.new_empty(0)
    res = a.new_empty(a.shape) if seed >= 0 else _out_like(a, b, c)
    return loss, res.copy_(r)


def _residual_backward(grad_loss, residual, loss, k, k_s, metric, huber_c, need_a, need_b, need_c):
    acc = _acc(residual)
    r = residual.to(acc)
    d = r[0].numel()
    shape = (-1,) + (1,) * (r.ndim - 1)
    g = grad_loss.to(acc).reshape(shape)
    if metric == 0:
        ga = 2 * g / d * r
    elif metric == 1:
        ga = g / d * torch.sign(r)
    else:
        ga = g / (loss.to(acc).reshape(shape) + huber_c) * r
    outs = []
    if need_a:
        outs.append(torch.empty_like(residual).copy_(ga))
    if need_b:
        outs.append(torch.empty_like(residual).copy_(-ga))
    if need_c:
        outs.append(torch.empty_like(residual).copy_(-ga / _col(k, k_s, r)))
    return outs


STAND_INS = {
    "noisy_input": _noisy_input,
    "noisy_input_seeded": _noisy_input_seeded,
    "gaussian_noise": _gaussian_noise,
    "scale_per_sample": _scale,
    "pgd_step": _pgd_step,
    "random_perturbation": _random,
    "residual_loss": _residual_loss,
    "residual_loss_backward": _residual_backward,
}


@pytest.fixture(scope="module")
def glue():
    """(noisy_input, perturbation, losses) glue modules on the pure-torch stand-in ops (CPU)."""
    if _cuda_built() or hasattr(torch.ops.fastat_cuda, "noisy_input"):
        pytest.skip("the real fastat_cuda library is loaded here; the gpu tests cover it")
    from fastat import _ext

    lib = torch.library.Library("fastat_cuda", "DEF")
    schemas = _schemas()
    assert {s.split("(")[0] for s in schemas} == set(STAND_INS), "bindings.cpp and the stand-ins disagree"
    for schema in schemas:
        lib.define(schema)
        lib.impl(schema.split("(")[0], STAND_INS[schema.split("(")[0]], "CPU")
    saved = _ext.load
    _ext.load = lambda kind: torch.ops.fastat_cuda if kind == "cuda" else saved(kind)
    try:
        modules = tuple(importlib.import_module(name) for name in GLUE)
    finally:
        _ext.load = saved
    yield modules
    for name in GLUE:
        sys.modules.pop(name, None)
    lib._destroy()


def _make(shape, dtype, kind, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = layout(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), kind)
    return x.requires_grad_(requires_grad)


SHAPES = [(4, 3, 5, 6), (7, 2), (1, 1), (3, 2, 4, 5, 3)]
KINDS = ("contiguous", "channels_last", "noncontiguous")


def _tol(dtype):
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coef", ["float", "tensor"])
def test_noisy_input_glue(glue, shape, kind, coef):
    ni, _, _ = glue
    x0, noise, delta = (_make(shape, torch.float32, kind, s, True) for s in (1, 2, 3))
    alpha = 0.7 if coef == "float" else torch.rand(shape[0], dtype=torch.float64) + 0.1
    sigma = 0.4 if coef == "float" else torch.rand(shape[0], dtype=torch.float64) + 0.1
    out = ni.noisy_input(x0, noise, alpha, sigma, delta)
    ref = ni_ref.noisy_input(*(t.detach().double().requires_grad_() for t in (x0, noise)), alpha, sigma,
                             delta.detach().double().requires_grad_())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x0, noise, delta), g)
    col = (lambda c: c if isinstance(c, float) else c.reshape((-1,) + (1,) * (len(shape) - 1)))
    torch.testing.assert_close(grads[0].double(), col(alpha) * g.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1].double(), col(sigma) * g.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[2], g)


def test_noisy_input_seeded_and_mixed_dtypes(glue):
    ni, _, _ = glue
    x0 = _make((3, 4, 5), torch.float16, "contiguous", 4)
    delta = _make((3, 4, 5), torch.float32, "contiguous", 5, True)
    out = ni.noisy_input(x0, SeededNoise(11, 100), 0.8, 0.6, delta)
    assert out.dtype == torch.float32
    ref = ni_ref.noisy_input(x0, noise_ref.gaussian_noise(x0, 11, 100, torch.float32), 0.8, 0.6, delta.detach())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), delta)
    torch.testing.assert_close(g, torch.ones_like(delta))
    noise = ni.gaussian_noise(layout(x0.float().reshape(3, 4, 5, 1), "channels_last"), 11, 100, torch.float16)
    assert torch.equal(noise.reshape(3, 4, 5).float(), noise_ref.gaussian_noise(x0, 11, 100, torch.float16).float())


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pgd_step_glue(glue, norm, normalize, kind, dtype):
    _, pert, _ = glue
    shape = (5, 3, 4, 6)
    delta = _make(shape, dtype, kind, 6) * 0.3
    grad = _make(shape, dtype, kind, 7)
    grad[1, 0, 0, 0] = float("nan")  # non-finite policy: sample 1 keeps its delta
    step = torch.rand(5, dtype=torch.float64) + 0.2
    radius = torch.tensor([0.5, 1.0, 100.0, 2.0, 0.05], dtype=torch.float64)
    if norm == "linf":
        radius = radius / 10
    base = _make(shape, dtype, kind, 8)
    new, x = pert.pgd_step(delta, grad, step, radius, norm, normalize, model_input_base=base)
    ref_new, ref_x = pert_ref.pgd_step(delta.double(), grad.double(), step, radius, norm, normalize, model_input_base=base.double())
    atol, rtol = _tol(dtype)
    torch.testing.assert_close(new.double(), ref_new, atol=atol * 10, rtol=rtol * 10)
    torch.testing.assert_close(x.double(), ref_x, atol=atol * 10, rtol=rtol * 10)
    assert torch.equal(new[1], delta[1])
    assert pert.pgd_step(delta, grad, 0.1, 1.0, norm, normalize).shape == shape


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_random_perturbation_glue(glue, norm, init):
    _, pert, _ = glue
    like = torch.empty(64, 3, 4, 4)
    radius = torch.linspace(0.5, 2.0, 64)
    gen = torch.Generator().manual_seed(3)
    out = pert.random_perturbation(like, radius, norm, init, gen, torch.float32)
    assert out.shape == like.shape and out.dtype == torch.float32
    flat = out.reshape(64, -1)
    if init == "zero":
        assert not out.any()
        return
    if norm == "l2":
        norms = flat.norm(dim=1)
        assert bool((norms <= radius * (1 + 1e-5)).all())
        if init == "uniform":  # ||delta|| = R U^(1/D), D = 48: close to R
            assert bool((norms >= radius * 0.8).all())
    else:
        assert bool((flat.abs() <= radius[:, None] * (1 + 1e-6)).all())
        if init == "uniform":
            u = flat / radius[:, None]
            assert abs(u.mean().item()) < 0.05 and abs(u.var().item() - 1 / 3) < 0.03
    again = pert.random_perturbation(like, radius, norm, init, torch.Generator().manual_seed(3), torch.float32)
    assert torch.equal(out, again)


@pytest.mark.parametrize("target", ["delta_detach", "delta", "original"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seeded", [False, True])
def test_equivariant_mse_glue(glue, target, kind, seeded):
    _, _, losses = glue
    shape = (4, 3, 5, 6)
    pred, noise, delta = (_make(shape, torch.float32, kind, s, True) for s in (9, 10, 11))
    sigma = torch.rand(4, dtype=torch.float64) + 0.2
    noise_arg = SeededNoise(5, 17) if seeded else noise
    loss = losses.equivariant_mse(pred, noise_arg, delta, sigma, target)
    p64, d64 = (t.detach().double().requires_grad_() for t in (pred, delta))
    n64 = noise_ref.gaussian_noise(pred, 5, 17, torch.float64) if seeded else noise.detach().double().requires_grad_()
    ref = loss_ref.equivariant_mse(p64, n64, d64, sigma, target)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.rand(4)
    inputs = [pred] + ([] if seeded else [noise]) + ([delta] if target == "delta" else [])
    ref_inputs = [p64] + ([] if seeded else [n64]) + ([d64] if target == "delta" else [])
    got = torch.autograd.grad((loss * w).sum(), inputs)
    exp = torch.autograd.grad((ref * w.double()).sum(), ref_inputs)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "l1", "pseudo_huber"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_consistency_distance_and_regularizer_glue(glue, metric, dtype):
    _, _, losses = glue
    shape = (6, 2, 7)
    pred, target, omega = (_make(shape, dtype, "noncontiguous", s, True) for s in (12, 13, 14))
    loss = losses.consistency_distance(pred, target, metric, 0.03)
    p64, t64, o64 = (t.detach().double().requires_grad_() for t in (pred, target, omega))
    ref = loss_ref.consistency_distance(p64, t64, metric, 0.03)
    atol, rtol = _tol(dtype)
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    for a, b in zip(torch.autograd.grad(loss.sum(), (pred, target)), torch.autograd.grad(ref.sum(), (p64, t64))):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)
    for mode, detach in (("equivariant", False), ("equivariant", True), ("invariant", False)):
        reg = losses.equivariance_regularizer(pred, target, omega, detach, mode)
        ref = loss_ref.equivariance_regularizer(p64, t64, o64, detach, mode)
        torch.testing.assert_close(reg.double(), ref, atol=atol, rtol=rtol)
        ins = [pred] + ([] if detach else [target]) + ([omega] if mode == "equivariant" else [])
        rins = [p64] + ([] if detach else [t64]) + ([o64] if mode == "equivariant" else [])
        for a, b in zip(torch.autograd.grad(reg.sum(), ins), torch.autograd.grad(ref.sum(), rins)):
            torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


def test_fakes_trace_under_torch_compile(glue):
    _, pert, losses = glue

    def chain(pred, noise, delta, grad):
        loss = losses.equivariant_mse(pred, noise, delta, 0.5, "delta_detach").mean()
        return loss, pert.pgd_step(delta, grad, 0.1, 1.0, "l2", True)

    args = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    args[0].requires_grad_()
    compiled = torch.compile(chain, backend="aot_eager", fullgraph=True)
    loss, new = compiled(*args)
    ref_loss, ref_new = chain(*args)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(new, ref_new)
    loss.backward()
    assert args[0].grad is not None and args[0].grad.shape == args[0].shape


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
    ref = ni_ref.noisy_input(x0.double(), noise.double(), alpha.double(), 0.3, delta.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for norm in ("l2", "linf"):
        new = fastat.pgd_step(delta, grad, 0.1, 0.5, norm)
        ref = pert_ref.pgd_step(delta.double(), grad.double(), 0.1, 0.5, norm)
        torch.testing.assert_close(new.double(), ref, atol=atol * 2, rtol=rtol * 2)
    pred = _gpu(shape, dtype, kind, 5, True)
    loss = fastat.equivariant_mse(pred, noise, delta, 0.5, "delta_detach", reduction="none")
    p64 = pred.detach().double().requires_grad_()
    ref = loss_ref.equivariant_mse(p64, noise.double(), delta.double(), 0.5, "delta_detach")
    torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
    (g,) = torch.autograd.grad(loss.sum(), pred)
    (g_ref,) = torch.autograd.grad(ref.sum(), p64)
    torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol)
    for metric in ("l2", "l1", "pseudo_huber"):
        d = fastat.consistency_distance(pred.detach(), noise, metric, reduction="none")
        torch.testing.assert_close(d.double(), loss_ref.consistency_distance(pred.double(), noise.double(), metric,
                                                                           0.00054 * math.sqrt(pred[0].numel())),
                                   atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_seeded_noise_matches_reference_stream(cuda_backend):
    like = torch.empty(3, 5, 17, 9, device="cuda")
    got = fastat.gaussian_noise(like, 123, 456)
    exp = noise_ref.gaussian_noise(like.cpu(), 123, 456, torch.float32)
    torch.testing.assert_close(got.cpu(), exp, atol=2e-6, rtol=2e-6)


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
