"""noisy_input and q_sample (reference backend) against float64 hand formulas, gradients, errors."""
import math

import pytest
import torch
from utils import DTYPES, LAYOUTS, SHAPES, as64, coefficient, hand_noisy_input, make, seed_of, tol

import fastat
from fastat.schedules import ddpm_cosine_alphas_cumprod, ddpm_linear_alphas_cumprod


@pytest.fixture(autouse=True)
def _reference_backend():
    with fastat.use_backend("torch"):
        yield


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_noisy_input_matches_hand_formula(shape, kind):
    gen = torch.Generator().manual_seed(seed_of(shape, kind))
    B = shape[0]
    for dtype in DTYPES + (torch.float64,):
        for coef_kind in ("float", "tensor"):
            for with_delta in (False, True):
                x0, noise = make(shape, dtype, kind, gen), make(shape, dtype, kind, gen)
                delta = make(shape, dtype, kind, gen, scale=0.1) if with_delta else None
                alpha = coefficient(coef_kind, B, 0.05, 1.0, gen)
                sigma = coefficient(coef_kind, B, 0.05, 1.0, gen)
                out = fastat.noisy_input(x0, noise, alpha, sigma, delta)
                want = hand_noisy_input(x0.double(), noise.double(), as64(alpha), as64(sigma),
                                        None if delta is None else delta.double())
                assert out.dtype == dtype and out.shape == x0.shape
                atol, rtol = tol(dtype)
                torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def test_noisy_input_layout_and_promotion():
    x0 = make((2, 3, 4, 5), torch.bfloat16, "channels_last")
    noise = make((2, 3, 4, 5), torch.bfloat16, "channels_last")
    delta = make((2, 3, 4, 5), torch.float32, "channels_last", scale=1e-3)
    out = fastat.noisy_input(x0, noise, 0.6, 0.8, delta)
    # a bf16 x0 with an fp32 delta gives fp32, so the small perturbation is not rounded away
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = hand_noisy_input(x0.double(), noise.double(), 0.6, 0.8, delta.double())
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)


def test_noisy_input_zero_dim_coefficient_expands():
    x0, noise = make((3, 4)), make((3, 4))
    out = fastat.noisy_input(x0, noise, torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.1, 0.2, 0.4]))
    want = hand_noisy_input(x0, noise, 0.3, torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64))
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("shape,kind", [((3, 4), "contiguous"), ((2, 2, 2, 3), "channels_last"), ((2, 2, 1, 2, 2), "noncontiguous")])
def test_noisy_input_gradcheck(shape, kind):
    gen = torch.Generator().manual_seed(0)
    B = shape[0]
    x0, noise, delta = (make(shape, torch.float64, kind, gen).requires_grad_() for _ in range(3))
    alpha = torch.rand(B, generator=gen, dtype=torch.float64).requires_grad_()
    sigma = torch.rand(B, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fastat.noisy_input, (x0, noise, alpha, sigma, delta))
    assert torch.autograd.gradgradcheck(fastat.noisy_input, (x0, noise, alpha, sigma, delta))
    # float coefficients, no delta
    assert torch.autograd.gradcheck(lambda a, b: fastat.noisy_input(a, b, 0.7, 0.3), (x0, noise))


def test_noisy_input_grad_values():
    x0, noise, delta = (make((3, 2, 2)).requires_grad_() for _ in range(3))
    alpha = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64, requires_grad=True)
    out = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    cot = make((3, 2, 2))
    gx, gn, gd, ga, gs = torch.autograd.grad(out, (x0, noise, delta, alpha, sigma), cot)
    torch.testing.assert_close(gx, cot * alpha.detach()[:, None, None])
    torch.testing.assert_close(gn, cot * sigma.detach()[:, None, None])
    torch.testing.assert_close(gd, cot)
    torch.testing.assert_close(ga, (cot * x0.detach()).sum(dim=(1, 2)))
    torch.testing.assert_close(gs, (cot * noise.detach()).sum(dim=(1, 2)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_hand_formula(schedule):
    table = ddpm_linear_alphas_cumprod() if schedule == "linear" else ddpm_cosine_alphas_cumprod()
    gen = torch.Generator().manual_seed(1)
    x0, noise, delta = make((6, 3, 4, 4), torch.float32, "channels_last", gen), make((6, 3, 4, 4), torch.float32), make((6, 3, 4, 4), torch.float32)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    out = fastat.q_sample(x0, noise, t, table, delta)
    abar = [float(table[i]) for i in t]
    alpha = torch.tensor([math.sqrt(a) for a in abar], dtype=torch.float64)
    sigma = torch.tensor([math.sqrt(1 - a) for a in abar], dtype=torch.float64)
    want = hand_noisy_input(x0.double(), noise.double(), alpha, sigma, delta.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # a scheduler-like object with `.alphas_cumprod` works the same
    from types import SimpleNamespace

    torch.testing.assert_close(fastat.q_sample(x0, noise, t, SimpleNamespace(alphas_cumprod=table), delta), out)
    assert fastat.q_sample(x0, noise, t, table).dtype == torch.float32
    # float64 data: float64 coefficients (a float64 loop written from the formula agrees to rounding)
    out64 = fastat.q_sample(x0.double(), noise.double(), t, table, delta.double())
    torch.testing.assert_close(out64, hand_noisy_input(x0.double(), noise.double(), alpha, sigma, delta.double()),
                               atol=1e-14, rtol=1e-14)


def test_empty_batch_and_tiny_shapes():
    e = torch.randn(0, 3, 4)
    assert fastat.noisy_input(e, e, 0.5, 0.5, e).shape == (0, 3, 4)
    assert fastat.noisy_input(e, e, torch.empty(0), torch.empty(0)).shape == (0, 3, 4)
    assert fastat.q_sample(e, e, torch.zeros(0, dtype=torch.long), ddpm_linear_alphas_cumprod()).shape == (0, 3, 4)
    one = torch.randn(1, 1, dtype=torch.float64)
    torch.testing.assert_close(fastat.noisy_input(one, one, 0.25, 0.5), 0.75 * one)


T = ddpm_linear_alphas_cumprod(10)
X = torch.randn(2, 3)
META = torch.empty(2, 3, device="meta")

ERRORS = [
    ("x0-not-tensor", lambda: fastat.noisy_input([1.0, 2.0], X, 1.0, 1.0), TypeError, "x0"),
    ("x0-integer", lambda: fastat.noisy_input(torch.ones(2, 3, dtype=torch.int64), X, 1.0, 1.0), TypeError, "x0"),
    ("x0-0d", lambda: fastat.noisy_input(torch.tensor(1.0), torch.tensor(1.0), 1.0, 1.0), ValueError, "x0"),
    ("noise-shape", lambda: fastat.noisy_input(X, torch.randn(2, 4), 1.0, 1.0), ValueError, "noise"),
    ("noise-integer", lambda: fastat.noisy_input(X, torch.ones(2, 3, dtype=torch.int32), 1.0, 1.0), TypeError, "noise"),
    ("delta-shape", lambda: fastat.noisy_input(X, X, 1.0, 1.0, torch.randn(3, 3)), ValueError, "delta"),
    ("noise-device", lambda: fastat.noisy_input(X, META, 1.0, 1.0), ValueError, "noise"),
    ("delta-device", lambda: fastat.noisy_input(X, X, 1.0, 1.0, META), ValueError, "delta"),
    ("alpha-batch", lambda: fastat.noisy_input(X, X, torch.ones(3), 1.0), ValueError, "alpha"),
    ("alpha-2d", lambda: fastat.noisy_input(X, X, torch.ones(2, 2), 1.0), ValueError, "alpha"),
    ("sigma-type", lambda: fastat.noisy_input(X, X, 1.0, "0.5"), TypeError, "sigma"),
    ("sigma-bool", lambda: fastat.noisy_input(X, X, 1.0, True), TypeError, "sigma"),
    ("alpha-integer-tensor", lambda: fastat.noisy_input(X, X, torch.ones(2, dtype=torch.long), 1.0), TypeError, "alpha"),
    ("alpha-device", lambda: fastat.noisy_input(X, X, torch.ones(2, device="meta"), 1.0), ValueError, "alpha"),
    ("alpha-nan", lambda: fastat.noisy_input(X, X, float("nan"), 1.0), ValueError, "alpha"),
    ("sigma-inf-tensor", lambda: fastat.noisy_input(X, X, 1.0, torch.tensor([1.0, float("inf")])), ValueError, "sigma"),
    ("timesteps-float", lambda: fastat.q_sample(X, X, torch.zeros(2), T), TypeError, "timesteps"),
    ("timesteps-bool", lambda: fastat.q_sample(X, X, torch.zeros(2, dtype=torch.bool), T), TypeError, "timesteps"),
    ("timesteps-list", lambda: fastat.q_sample(X, X, [0, 1], T), TypeError, "timesteps"),
    ("timesteps-negative", lambda: fastat.q_sample(X, X, torch.tensor([-1, 0]), T), ValueError, "timesteps"),
    ("timesteps-too-big", lambda: fastat.q_sample(X, X, torch.tensor([0, 10]), T), ValueError, "timesteps"),
    ("timesteps-batch", lambda: fastat.q_sample(X, X, torch.tensor([0, 1, 2]), T), ValueError, "timesteps"),
    ("timesteps-device", lambda: fastat.q_sample(X, X, torch.zeros(2, dtype=torch.long, device="meta"), T), ValueError, "timesteps"),
    ("table-2d", lambda: fastat.q_sample(X, X, torch.tensor([0, 1]), T[None]), ValueError, "alphas_cumprod"),
    ("table-object", lambda: fastat.q_sample(X, X, torch.tensor([0, 1]), object()), TypeError, "alphas_cumprod"),
    ("q-noise-shape", lambda: fastat.q_sample(X, torch.randn(2, 2), torch.tensor([0, 1]), T), ValueError, "noise"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
