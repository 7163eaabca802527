"""Triton noisy_input / q_sample against the torch reference and the float64 formula (interpreter on CPU)."""
import pytest
import torch

import fastat
import fastat._triton_utils as tu
from fastat import BackendUnavailableError
from utils import LAYOUTS, SHAPES, layout, tol

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [torch.float32, torch.float16]


def _inputs(shape, dtype, kind, coef, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x0, noise, delta = (layout(torch.randn(shape, generator=g).to(DEV, dtype), kind) for _ in range(3))
    if requires_grad:
        for t in (x0, noise, delta):
            t.requires_grad_(True)
    b = shape[0]
    if coef == "tensor":
        alpha, sigma = torch.rand(b, generator=g).to(DEV), torch.rand(b, generator=g).to(DEV) + 0.1
    else:
        alpha, sigma = 0.8, 0.6
    return x0, noise, delta, alpha, sigma


def _col(c, x):
    return c.double().reshape((-1,) + (1,) * (x.ndim - 1)) if isinstance(c, torch.Tensor) else c


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("coef", ["float", "tensor"])
def test_forward(shape, kind, dtype, coef):
    x0, noise, delta, alpha, sigma = _inputs(shape, dtype, kind, coef)
    for d in (delta, None):
        with fastat.use_backend("torch"):
            expect = fastat.noisy_input(x0, noise, alpha, sigma, d)
        with fastat.use_backend("triton"):
            got = fastat.noisy_input(x0, noise, alpha, sigma, d)
        assert got.dtype == expect.dtype and got.shape == expect.shape
        if kind != "noncontiguous":
            assert got.stride() == expect.stride()
        atol, rtol = tol(dtype)
        torch.testing.assert_close(got, expect, atol=atol, rtol=rtol)
        exact = _col(alpha, x0) * x0.double() + _col(sigma, x0) * noise.double() + (0 if d is None else d.double())
        torch.testing.assert_close(got.double(), exact, atol=2 * atol, rtol=2 * rtol)


@pytest.mark.parametrize("shape", [(7, 2), (1, 1), (2, 4, 3, 5, 6), (5, 3, 17, 9)])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_backward(shape, kind, dtype):
    x0, noise, delta, alpha, sigma = _inputs(shape, dtype, kind, "tensor", requires_grad=True)
    grad_out = layout(torch.randn(shape, device=DEV).to(dtype), "noncontiguous")
    with fastat.use_backend("torch"):
        expect = torch.autograd.grad(fastat.noisy_input(x0, noise, alpha, sigma, delta), (x0, noise, delta), grad_out)
    with fastat.use_backend("triton"):
        got = torch.autograd.grad(fastat.noisy_input(x0, noise, alpha, sigma, delta), (x0, noise, delta), grad_out)
    atol, rtol = tol(dtype)
    for e, g in zip(expect, got):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)


def test_backward_partial_requires_grad_and_expanded_grad():
    x0, noise, delta, alpha, sigma = _inputs((3, 4, 5), torch.float32, "contiguous", "float")
    delta.requires_grad_(True)
    with fastat.use_backend("triton"):
        out = fastat.noisy_input(x0, noise, alpha, sigma, delta)
        (g,) = torch.autograd.grad(out.sum(), delta)  # grad_output is an expanded (stride-0) tensor
    assert torch.equal(g, torch.ones_like(delta))
    x0.requires_grad_(True)
    with fastat.use_backend("triton"):
        (gx,) = torch.autograd.grad(fastat.noisy_input(x0, noise, alpha, sigma).sum(), x0)
    torch.testing.assert_close(gx, torch.full_like(x0, alpha))


def test_mixed_dtypes_promote():
    x0 = torch.randn(4, 6, device=DEV).half()
    noise = torch.randn(4, 6, device=DEV).half()
    delta = torch.randn(4, 6, device=DEV)
    with fastat.use_backend("triton"):
        got = fastat.noisy_input(x0, noise, 0.5, 0.5, delta)
    assert got.dtype == torch.float32
    with fastat.use_backend("torch"):
        torch.testing.assert_close(got, fastat.noisy_input(x0, noise, 0.5, 0.5, delta))


def test_rows_longer_than_a_tile():
    x0, noise, delta, alpha, sigma = _inputs((3, 5, 41), torch.float32, "contiguous", "tensor")
    with fastat.use_backend("triton"), tu.overrides(tile=64):
        got = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    with fastat.use_backend("torch"):
        torch.testing.assert_close(got, fastat.noisy_input(x0, noise, alpha, sigma, delta))


def test_q_sample():
    table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
    x0, noise, delta, _, _ = _inputs((4, 3, 5), torch.float32, "contiguous", "float")
    t = torch.tensor([0, 10, 500, 999], device=DEV)
    with fastat.use_backend("torch"):
        expect = fastat.q_sample(x0, noise, t, table, delta)
    with fastat.use_backend("triton"):
        got = fastat.q_sample(x0, noise, t, table, delta)
    torch.testing.assert_close(got, expect)


class _FunctionSpy(torch.overrides.TorchFunctionMode):
    """Names of the torch functions called meanwhile."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape,overrides", [((6, 2), {}), ((5, 3, 7), {}), ((3, 5, 41), {"tile": 64})])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_q_sample_gathers_in_kernel(shape, overrides, dtype):
    """The kernel gathers (sqrt(abar_t), sqrt(1 - abar_t)) at int64 timesteps (no gather op), forward and gradients
    as the float64 formula; int32 timesteps work the same."""
    table = fastat.schedules.ddpm_cosine_alphas_cumprod(1000)
    x0, noise, delta, _, _ = _inputs(shape, dtype, "contiguous", "float", requires_grad=True)
    t = torch.randint(0, 1000, (shape[0],), generator=torch.Generator().manual_seed(2)).to(DEV)
    t[0] = 999
    with fastat.use_backend("triton"), tu.overrides(**overrides):
        fastat.q_sample(x0, noise, t, table, delta)  # the first call caches the device-side table
        with _FunctionSpy() as spy:
            got = fastat.q_sample(x0, noise, t, table, delta)
        assert not [name for name in spy.calls if "index_select" in name]
        got_i32 = fastat.q_sample(x0, noise, t.int(), table, delta)
    abar = table.double()[t.cpu()].to(DEV)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    want = _col(alpha, x0) * x0.double() + _col(sigma, x0) * noise.double() + delta.double()
    atol, rtol = tol(dtype)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_i32, got)
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    gx, gn, gd = torch.autograd.grad(got, (x0, noise, delta), cot)
    torch.testing.assert_close(gx.double(), _col(alpha, x0) * cot.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gn.double(), _col(sigma, x0) * cot.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gd, cot)


def test_q_sample_kernel_out_of_range_timestep_gives_nan():
    """A device tensor's timesteps are not read on the host: the kernel makes an out-of-range one NaN, never a value
    from outside the table."""
    from fastat.ops.noisy_input import triton_kernels

    table = torch.tensor([[1.0, 0.5], [0.0, 0.75]], device=DEV)
    x0 = torch.ones(4, 3, device=DEV)
    t = torch.tensor([0, 1, 2, -1], device=DEV)
    out = triton_kernels.noisy_input(x0, x0, None, table[0], table[1], 0.0, 0.0, 0, 0, torch.float32, t)
    torch.testing.assert_close(out[:2], torch.tensor([[1.0] * 3, [1.25] * 3], device=DEV))
    assert torch.isnan(out[2:]).all()


def test_refusals():
    x0, noise, delta, _, _ = _inputs((2, 3), torch.float32, "contiguous", "float")
    alpha = torch.rand(2, device=DEV, requires_grad=True)
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="alpha/sigma"):
        fastat.noisy_input(x0, noise, alpha, 0.5, delta)
    with torch.no_grad(), fastat.use_backend("triton"):
        fastat.noisy_input(x0, noise, alpha, 0.5, delta)  # no gradient wanted: runs
    with fastat.use_backend("triton"), pytest.raises(BackendUnavailableError, match="float64"):
        fastat.noisy_input(x0.double(), noise, 0.5, 0.5)


def test_empty_batch():
    x0 = torch.randn(0, 3, device=DEV)
    with fastat.use_backend("triton"):
        assert fastat.noisy_input(x0, x0, 1.0, 1.0).shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_gpu_all_dtypes(dtype, kind):
    x0, noise, delta, alpha, sigma = _inputs((8, 3, 33, 31), dtype, kind, "tensor", requires_grad=True)
    with fastat.use_backend("torch"):
        expect = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    with fastat.use_backend("triton"):
        got = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    atol, rtol = tol(dtype)
    torch.testing.assert_close(got, expect, atol=atol, rtol=rtol)
    go = torch.randn_like(expect)
    for e, g in zip(torch.autograd.grad(expect, (x0, noise, delta), go), torch.autograd.grad(got, (x0, noise, delta), go)):
        torch.testing.assert_close(g, e, atol=atol, rtol=rtol)
