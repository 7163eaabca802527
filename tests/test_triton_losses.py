"""Triton loss kernels (forward + backward) against the torch reference and float64 formulas."""
import pytest
import torch

import fastat
import fastat._triton_utils as tu
from fastat import BackendUnavailableError, SeededNoise
from utils import LAYOUTS, SHAPES, layout, tol

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tensors(shape, dtype, kind, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [layout(torch.randn(shape, generator=g).to(DEV, dtype), kind).requires_grad_(True) for _ in range(n)]


def _sigma(b):
    return torch.rand(b, generator=torch.Generator().manual_seed(1)).to(DEV) + 0.3


# name -> (fn(a, b, c, sigma, weight), float64 formula of the per-sample loss, which inputs get gradients)
CASES = {
    "mse_delta": (lambda a, b, c, s, w: fastat.equivariant_mse(a, b, c, s, "delta", weight=w, reduction="none"),
                  lambda a, b, c, s: ((a - b - c / s) ** 2), (True, True, True)),
    "mse_delta_detach": (lambda a, b, c, s, w: fastat.equivariant_mse(a, b, c, s, "delta_detach", weight=w, reduction="none"),
                         lambda a, b, c, s: ((a - b - c / s) ** 2), (True, True, False)),
    "mse_original": (lambda a, b, c, s, w: fastat.equivariant_mse(a, b, None, s, "original", weight=w, reduction="none"),
                     lambda a, b, c, s: ((a - b) ** 2), (True, True, False)),
    "reg_equivariant": (lambda a, b, c, s, w: fastat.equivariance_regularizer(a, b, c, weight=w, reduction="none"),
                        lambda a, b, c, s: ((a - b - c) ** 2), (True, True, True)),
    "reg_detach_anchor": (lambda a, b, c, s, w: fastat.equivariance_regularizer(a, b, c, w, detach_anchor=True, reduction="none"),
                          lambda a, b, c, s: ((a - b - c) ** 2), (True, False, True)),
    "reg_invariant": (lambda a, b, c, s, w: fastat.equivariance_regularizer(a, b, None, w, mode="invariant", reduction="none"),
                      lambda a, b, c, s: ((a - b) ** 2), (True, True, False)),
    "cm_l2": (lambda a, b, c, s, w: fastat.consistency_distance(a, b, "l2", weight=w, reduction="none"),
              lambda a, b, c, s: ((a - b) ** 2), (True, True, False)),
    "cm_l1": (lambda a, b, c, s, w: fastat.consistency_distance(a, b, "l1", weight=w, reduction="none"),
              lambda a, b, c, s: (a - b).abs(), (True, True, False)),
    "cm_pseudo_huber": (lambda a, b, c, s, w: fastat.consistency_distance(a, b, "pseudo_huber", weight=w, reduction="none"),
                        None, (True, True, False)),
}


def _col(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _exact(name, a, b, c, s):
    a, b, c, s = a.detach().double(), b.detach().double(), c.detach().double(), _col(s.double(), a)
    if name == "cm_pseudo_huber":
        ch = 0.00054 * (a[0].numel() ** 0.5)
        return ((a - b) ** 2).flatten(1).sum(1).add(ch * ch).sqrt() - ch
    return CASES[name][1](a, b, c, s).flatten(1).mean(1)


def _run(name, tensors, sigma, weight, backend, overrides=None):
    fn, _, wants = CASES[name]
    with fastat.use_backend(backend), tu.overrides(**(overrides or {})):
        loss = fn(*tensors, sigma, weight)
    go = torch.linspace(0.5, 1.5, loss.shape[0], device=loss.device)
    grads = torch.autograd.grad(loss, tensors, go, allow_unused=True)
    return loss, grads, wants


def _compare(name, shape, dtype, kind, overrides=None):
    tensors = _tensors(shape, dtype, kind)
    sigma = _sigma(shape[0])
    weight = torch.rand(shape[0], device=DEV)
    e_loss, e_grads, wants = _run(name, tensors, sigma, weight, "torch")
    g_loss, g_grads, _ = _run(name, tensors, sigma, weight, "triton", overrides)
    atol, rtol = tol(dtype)
    assert g_loss.dtype == torch.float32
    torch.testing.assert_close(g_loss, e_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_loss.double(), _exact(name, *tensors, sigma) * weight.double(), atol=2 * atol, rtol=2 * rtol)
    for want, e, g, t in zip(wants, e_grads, g_grads, tensors):
        if not want:
            assert g is None and e is None
            continue
        assert g.dtype == t.dtype and g.shape == t.shape
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("shape", SHAPES)
def test_losses_fp32(name, shape):
    _compare(name, shape, torch.float32, "contiguous")


@pytest.mark.parametrize("name", ["mse_delta", "reg_detach_anchor", "cm_l1", "cm_pseudo_huber"])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_losses_layouts_and_fp16(name, kind, dtype):
    _compare(name, (3, 4, 5, 6), dtype, kind)


@pytest.mark.parametrize("name", ["mse_delta", "cm_l1", "cm_pseudo_huber"])
@pytest.mark.parametrize("overrides", [{"tile": 64}, {"tile": 64, "split": 3}])
def test_losses_multi_block_and_split(name, overrides):
    _compare(name, (2, 3, 7, 5), torch.float32, "contiguous", overrides)


def test_mixed_layouts_are_copied_not_misread():
    a = torch.randn(2, 3, 4, 5, device=DEV).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(2, 3, 4, 5, device=DEV)
    with fastat.use_backend("torch"):
        expect = fastat.consistency_distance(a, b, "l2", reduction="none")
    with fastat.use_backend("triton"):
        got = fastat.consistency_distance(a, b, "l2", reduction="none")
    torch.testing.assert_close(got, expect)


def test_seeded_noise_target_gradients():
    pred, delta = _tensors((3, 2, 5, 4), torch.float32, "channels_last", n=2)
    sigma = _sigma(3)
    noise = SeededNoise(5, 17)
    with fastat.use_backend("torch"):
        expect = fastat.equivariant_mse(pred, noise, delta, sigma, "delta")
    e_grads = torch.autograd.grad(expect, (pred, delta))
    with fastat.use_backend("triton"):
        got = fastat.equivariant_mse(pred, noise, delta, sigma, "delta")
    g_grads = torch.autograd.grad(got, (pred, delta))
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    for e, g in zip(e_grads, g_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_no_residual_saved_without_grad():
    a, b = (torch.randn(2, 9, device=DEV) for _ in range(2))
    from fastat.ops.losses.triton_kernels import residual_loss

    loss, per_sample, res = residual_loss(a, b, None, None, None, 1.0, 1.0, 0, 0.0, 0, 0, 0, False)
    assert res.numel() == 0
    torch.testing.assert_close(loss, ((a - b) ** 2).mean(1))
    torch.testing.assert_close(per_sample, loss)


def test_pseudo_huber_zero_c_zero_residual_has_zero_gradient():
    a = torch.randn(2, 6, device=DEV, requires_grad=True)
    with fastat.use_backend("triton"):
        loss = fastat.consistency_distance(a, a.detach().clone(), "pseudo_huber", c=0.0)
    (g,) = torch.autograd.grad(loss, a)
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


def test_refusals_and_empty_batch():
    pred, noise, delta = _tensors((2, 5), torch.float32, "contiguous")
    sigma = _sigma(2).requires_grad_(True)
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="sigma"):
        fastat.equivariant_mse(pred, noise, delta, sigma, "delta")
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        fastat.consistency_distance(pred.double(), noise.double())
    empty = torch.randn(0, 3, device=DEV, requires_grad=True)
    with fastat.use_backend("triton"):
        loss = fastat.consistency_distance(empty, empty.detach(), reduction="none")
    assert loss.shape == (0,)


def test_reduction_is_deterministic():
    a, b, c = _tensors((2, 3, 40), torch.float32, "contiguous")
    with fastat.use_backend("triton"), tu.overrides(tile=32, split=4):
        first = fastat.equivariance_regularizer(a, b, c, reduction="none")
        second = fastat.equivariance_regularizer(a, b, c, reduction="none")
    assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (2, 3, 512, 512), (65536, 2)])
def test_gpu_losses_all_dtypes(name, dtype, shape):
    _compare(name, shape, dtype, "contiguous")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gpu_one_launch_loss_finishes_in_its_last_program(reduction):
    """The forward is one launch: the last program (a ticket counter, reset by it) sums the partials in a fixed
    order. Many programs, many repetitions, split rows, and two streams: the same bits every time, the
    reference's value."""
    torch.manual_seed(0)
    p, n, d = (torch.randn(512, 3, 96, 96, device="cuda") for _ in range(3))
    w = torch.rand(512, device="cuda")
    with fastat.use_backend("torch"):
        want = fastat.equivariant_mse(p, n, d, 0.5, weight=w, reduction=reduction)
    side = torch.cuda.Stream()
    with fastat.use_backend("triton"):
        first = fastat.equivariant_mse(p, n, d, 0.5, weight=w, reduction=reduction)
        for _ in range(200):
            assert torch.equal(fastat.equivariant_mse(p, n, d, 0.5, weight=w, reduction=reduction), first)
        with torch.cuda.stream(side):
            other = fastat.equivariant_mse(p, n, d, 0.5, weight=w, reduction=reduction)
        torch.cuda.synchronize()
        assert torch.equal(other, first)
        with tu.overrides(split=7):
            split = fastat.equivariant_mse(p, n, d, 0.5, weight=w, reduction=reduction)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-6)
