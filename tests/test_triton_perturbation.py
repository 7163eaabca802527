"""Triton pgd_step and random_perturbation against the torch reference (interpreter on CPU)."""
import math

import pytest
import torch

import fastat
import fastat._triton_utils as tu
from fastat import BackendUnavailableError
from utils import LAYOUTS, SHAPES, layout, tol

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# no override: one fused kernel (whole rows in a tile, flat tiles for D <= 16); tile=64: rows over several column
# blocks, one sweep kernel (statistics, then the update, per sample); split=3: a statistics kernel split over 3
# programs per row (summed in fixed order) and an update kernel.
PATHS = {"fused": {}, "sweep": {"tile": 64}, "split": {"tile": 64, "split": 3}}


def _inputs(shape, dtype=torch.float32, kind="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = layout((0.3 * torch.randn(shape, generator=g)).to(DEV, dtype), kind)
    grad = layout(torch.randn(shape, generator=g).to(DEV, dtype), kind)
    step = (torch.rand(shape[0], generator=g) + 0.05).to(DEV)
    radius = (2 * torch.rand(shape[0], generator=g)).to(DEV)
    return delta, grad, step, radius


def _both(*args, path="fused", **kw):
    with fastat.use_backend("torch"):
        expect = fastat.pgd_step(*args, **kw)
    with fastat.use_backend("triton"), tu.overrides(**PATHS[path]):
        got = fastat.pgd_step(*args, **kw)
    return expect, got


def _l2_formula(delta, grad, step, radius, normalize):
    d, g = delta.double().flatten(1), grad.double().flatten(1)
    if normalize:
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-8)
    v = d + step.double()[:, None] * g
    return (v * (radius.double()[:, None] / v.norm(dim=1, keepdim=True).clamp_min(1e-8)).clamp(max=1)).view(delta.shape)


SMALL_SHAPES = [(3, 5), (1, 1), (2, 3, 7, 5)]  # interpreter time grows with programs: few rows for tiled paths
CASES = [(shape, "fused") for shape in SHAPES] + [(shape, p) for shape in SMALL_SHAPES for p in ("sweep", "split")]


@pytest.mark.parametrize("shape,path", CASES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pgd_step_matches_reference(shape, path, norm, normalize):
    delta, grad, step, radius = _inputs(shape)
    expect, got = _both(delta, grad, step, radius, norm, normalize, path=path)
    assert got.dtype == delta.dtype and got.stride() == expect.stride()
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    if norm == "l2":
        torch.testing.assert_close(got.double(), _l2_formula(delta, grad, step, radius, normalize), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_step_layouts_dtypes_and_model_input(kind, dtype, norm):
    delta, grad, step, radius = _inputs((4, 3, 5, 6), dtype, kind)
    base = layout(torch.randn(4, 3, 5, 6, device=DEV), kind)  # fp32 x_t with an fp16 delta -> fp32 input
    (e_delta, e_x), (g_delta, g_x) = _both(delta, grad, 0.2, radius, norm, model_input_base=base, path="sweep")
    atol, rtol = tol(dtype)
    torch.testing.assert_close(g_delta, e_delta, atol=atol, rtol=rtol)
    assert g_x.dtype == e_x.dtype == torch.float32
    torch.testing.assert_close(g_x, base + g_delta.float())
    torch.testing.assert_close(g_x, e_x, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_nonfinite_zero_grad_and_zero_radius(path, norm):
    delta, grad, step, radius = _inputs((5, 2, 3, 4))
    grad[1, 1, 2, 3] = float("nan")
    grad[2, 0, 0, 0] = float("inf")
    grad[3] = 0.0
    radius[4] = 0.0
    expect, got = _both(delta, grad, step, radius, norm, path=path)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[1], delta[1]) and torch.equal(got[2], delta[2])  # non-finite: unchanged
    assert torch.isfinite(got).all()
    assert torch.equal(got[4], torch.zeros_like(got[4]))  # radius 0
    if norm == "l2":
        torch.testing.assert_close(got[3], (delta[3] * min(1.0, radius[3].item() / delta[3].norm().item())))


@pytest.mark.parametrize("parts", [1, 3])
def test_linf_nonfinite_over_several_tiles(parts):
    """Linf over samples of several tiles: one pass flags the tiles with a non-finite gradient, the restore pass gives
    every tile of a flagged sample its delta back (and x' = base + delta), clean samples keep their step."""
    delta, grad, step, radius = _inputs((4, 2, 100))
    base = torch.randn(4, 2, 100, device=DEV)
    grad[1, 1, 90] = float("nan")  # the last of the sample's four 64-column tiles
    grad[3, 0, 0] = -float("inf")  # the first
    expect_delta, expect_x = _both(delta, grad, step, radius, "linf", model_input_base=base)[0]
    with fastat.use_backend("triton"), tu.overrides(tile=64, split=parts):
        got_delta, got_x = fastat.pgd_step(delta, grad, step, radius, "linf", model_input_base=base)
    assert torch.equal(got_delta[1], delta[1]) and torch.equal(got_delta[3], delta[3])
    assert torch.equal(got_x[1], base[1] + delta[1]) and torch.equal(got_x[3], base[3] + delta[3])
    torch.testing.assert_close(got_delta, expect_delta, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_x, expect_x, atol=1e-6, rtol=1e-5)
    assert not torch.equal(got_delta[0], delta[0])


def test_split_reduction_is_deterministic():
    delta, grad, step, radius = _inputs((2, 4, 30))
    with fastat.use_backend("triton"), tu.overrides(tile=32, split=4):
        first = fastat.pgd_step(delta, grad, step, radius * 0.1)
        second = fastat.pgd_step(delta, grad, step, radius * 0.1)
    assert torch.equal(first, second)


def test_refuses_autograd_and_float64():
    delta, grad, step, radius = _inputs((2, 5))
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="not differentiable"):
        fastat.pgd_step(delta.requires_grad_(), grad, step, radius)
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        fastat.pgd_step(delta.detach().double(), grad.double(), step, radius)


def test_model_input_base_validation():
    delta, grad, step, radius = _inputs((2, 5))
    with pytest.raises(ValueError, match="model_input_base"):
        fastat.pgd_step(delta, grad, step, radius, model_input_base=torch.zeros(2, 4, device=DEV))


# ---------------------------------------------------------------------------------------------------
# Random starts: the values come from tl.rand/tl.randn, so only the distributions are compared.


def _random(*args, path="fused", **kw):
    with fastat.use_backend("triton"), tu.overrides(**PATHS[path]):
        return fastat.random_perturbation(*args, **kw)


def test_uniform_l2_ball():
    like = torch.empty(4000, 2, device=DEV)
    radius = torch.full((4000,), 2.0, device=DEV)
    radius[:10] = 0.0
    out = _random(like, radius, "l2", "uniform")
    norms = out.norm(dim=1)
    assert torch.all(norms <= radius * (1 + 1e-5))
    assert torch.equal(out[:10], torch.zeros_like(out[:10]))
    # uniform in the disc: (||x|| / R)^D ~ U(0, 1); the angle is uniform
    u = (norms[10:] / 2.0) ** 2
    assert abs(u.mean().item() - 0.5) < 0.03 and abs(u.var().item() - 1 / 12) < 0.01
    assert abs(torch.atan2(out[10:, 1], out[10:, 0]).mean().item()) < 0.1


def test_normal_l2():
    like = torch.empty(500, 3, 4, 5, device=DEV)
    out = _random(like, 3.0, "l2", "normal")
    norms = out.flatten(1).norm(dim=1)
    assert torch.all(norms <= 3.0 * (1 + 1e-5))
    assert abs(out.std().item() - 3.0 / math.sqrt(60)) < 0.02  # projection rarely binds at D = 60


@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_l2_split_reduction_paths(init):
    like = torch.empty(2, 3, 50, device=DEV)
    with fastat.use_backend("triton"), tu.overrides(tile=64, split=3):
        out = fastat.random_perturbation(like, torch.tensor([0.5, 4.0], device=DEV), "l2", init)
        again = fastat.random_perturbation(like, torch.tensor([0.5, 4.0], device=DEV), "l2", init,
                                           generator=torch.Generator(DEV).manual_seed(3))
    norms = out.flatten(1).norm(dim=1)
    assert norms[0] <= 0.5 * (1 + 1e-5) and norms[1] <= 4.0 * (1 + 1e-5)
    if init == "uniform":  # ||x|| = R * U^(1/150): essentially on the sphere
        assert norms[0] > 0.45 and norms[1] > 3.6
    assert not torch.equal(out, again)


@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_linf_box(init):
    like = torch.empty(200, 50, device=DEV)
    radius = torch.linspace(0, 1, 200, device=DEV)
    out = _random(like, radius, "linf", init)
    assert torch.all(out.abs() <= radius[:, None])
    if init == "uniform":  # U(-R, R): var = R^2 / 3
        assert abs(out[100:].div(radius[100:, None]).var().item() - 1 / 3) < 0.02


def test_random_generator_layout_dtype_and_zero():
    like = torch.empty(3, 4, 5, 6, device=DEV).contiguous(memory_format=torch.channels_last)
    g1, g2 = torch.Generator(DEV).manual_seed(1), torch.Generator(DEV).manual_seed(1)
    a = _random(like, 1.0, "l2", "uniform", generator=g1, dtype=torch.float16)
    b = _random(like, 1.0, "l2", "uniform", generator=g2, dtype=torch.float16)
    c = _random(like, 1.0, "l2", "uniform", generator=g1, dtype=torch.float16)
    assert a.dtype == torch.float16 and a.stride() == like.stride()
    assert torch.equal(a, b) and not torch.equal(a, c)
    z = _random(like, 1.0, "linf", "zero")
    assert torch.equal(z, torch.zeros_like(like))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("shape", [(128, 3, 32, 32), (4, 3, 256, 256), (65536, 2)])
def test_gpu_pgd_all_dtypes(dtype, norm, shape):
    delta, grad, step, radius = _inputs(shape, dtype)
    grad[0].view(-1)[-1] = float("nan")  # one non-finite gradient entry: that sample keeps its delta
    base = torch.randn(shape, device="cuda", dtype=dtype)
    (e_delta, e_x), (g_delta, g_x) = _both(delta, grad, step, radius, norm, model_input_base=base)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(g_delta, e_delta, atol=atol, rtol=rtol)
    torch.testing.assert_close(g_x, e_x, atol=atol, rtol=rtol)
    with fastat.use_backend("triton"):
        again = fastat.pgd_step(delta, grad, step, radius, norm)
    assert torch.equal(again, g_delta)  # deterministic on the device too
