"""pgd_step, random_perturbation, per_sample_norm, rms_radius (reference backend): hand formulas,
gradients, invariants, statistics, the non-finite policy and error paths."""
import math

import pytest
import torch
from utils import DTYPES, LAYOUTS, SHAPES, as64, coefficient, hand_pgd_step, make, rows, runnable_backends, seed_of, tol

import fastat

@pytest.fixture(autouse=True)
def _reference_backend():
    with fastat.use_backend("torch"):
        yield


def l2(x):
    return torch.linalg.vector_norm(rows(x.double()), dim=1)


def ks_uniform(u):
    """Kolmogorov-Smirnov statistic sqrt(n) * sup|F_n - F| of a sample against U(0, 1). Under the null it
    exceeds 1.95 with probability 0.001 (Kolmogorov distribution)."""
    u, n = torch.sort(u.flatten().double()).values, u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return math.sqrt(n) * max((i / n - u).max().item(), (u - (i - 1) / n).max().item())


# ------------------------------------------------------------------------------------------ pgd_step


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_step_matches_hand_formula(shape, kind, norm):
    gen = torch.Generator().manual_seed(seed_of(shape, kind, norm))
    B, D = shape[0], math.prod(shape[1:])
    for dtype in DTYPES + (torch.float64,):
        for coef_kind in ("float", "tensor"):
            for normalize in (True, False):
                delta = make(shape, dtype, kind, gen, scale=0.3)
                grad = make(shape, dtype, kind, gen)
                step = coefficient(coef_kind, B, 0.05, 0.5, gen)
                # radii around the post-step norm so that some samples are projected and some are not
                scale = math.sqrt(D) * 0.3 if norm == "l2" else 0.4
                radius = coefficient(coef_kind, B, 0.3 * scale, 1.5 * scale, gen)
                out = fastat.pgd_step(delta, grad, step, radius, norm, normalize)
                want = hand_pgd_step(delta.double(), grad.double(), as64(step), as64(radius), norm, normalize)
                assert out.dtype == dtype and out.shape == shape
                atol, rtol = tol(dtype)
                torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def test_pgd_step_layout_preserved():
    delta = make((2, 3, 4, 5), torch.float32, "channels_last")
    out = fastat.pgd_step(delta, make((2, 3, 4, 5), torch.float32, "channels_last"), 0.1, 1.0)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,kind", [((3, 4), "contiguous"), ((3, 2, 2, 2), "channels_last"), ((2, 2, 1, 2, 3), "noncontiguous")])
def test_pgd_step_l2_gradcheck(shape, kind):
    gen = torch.Generator().manual_seed(seed_of(shape))
    B, D = shape[0], math.prod(shape[1:])
    delta = make(shape, torch.float64, kind, gen).requires_grad_()
    grad = make(shape, torch.float64, kind, gen).requires_grad_()
    step = torch.full((B,), 0.5, dtype=torch.float64, requires_grad=True)
    # first sample projected (small radius), the others inside the ball
    radius = torch.tensor([0.2] + [10.0 * math.sqrt(D)] * (B - 1), dtype=torch.float64, requires_grad=True)
    for normalize in (True, False):
        f = lambda d, g, s, r: fastat.pgd_step(d, g, s, r, "l2", normalize)  # noqa: E731
        assert torch.autograd.gradcheck(f, (delta, grad, step, radius))
    assert torch.autograd.gradcheck(lambda d, g: fastat.pgd_step(d, g, 0.3, 0.5, "l2"), (delta, grad))


def test_pgd_step_linf_gradient_is_box_indicator():
    delta = torch.tensor([[0.0, 0.9, -0.9, 0.2]], dtype=torch.float64, requires_grad=True)
    grad = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    out = fastat.pgd_step(delta, grad, 0.25, 1.0, "linf")
    torch.testing.assert_close(out.detach(), torch.tensor([[0.25, 1.0, -1.0, -0.05]], dtype=torch.float64))
    (g,) = torch.autograd.grad(out.sum(), delta)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(16, 3, 4, 4), (16, 2), (8, 2, 2, 3, 3)], ids=str)
def test_pgd_step_stays_in_ball_and_box(shape):
    gen = torch.Generator().manual_seed(seed_of(shape))
    B = shape[0]
    radius = torch.rand(B, generator=gen) * 2
    radius[0] = 0.0
    for dtype in (torch.float32, torch.float64):
        delta, grad = make(shape, dtype, "contiguous", gen, scale=3.0), make(shape, dtype, "contiguous", gen)
        out = fastat.pgd_step(delta, grad, 5.0, radius, "l2")
        assert (l2(out) <= radius.double() * (1 + 1e-6)).all()
        assert l2(out)[0] == 0
        out = fastat.pgd_step(delta, grad, 5.0, radius, "linf")
        assert (rows(out).abs().amax(dim=1) <= radius.to(dtype)).all()
        assert (out[0] == 0).all()
        # scalar radius
        assert (l2(fastat.pgd_step(delta, grad, 5.0, 0.7, "l2")) <= 0.7 * (1 + 1e-6)).all()
        assert (fastat.pgd_step(delta, grad, 5.0, 0.7, "linf").abs() <= 0.7).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_ascent_step_increases_linear_model_loss(norm):
    gen = torch.Generator().manual_seed(3)
    B, d_in, d_out = 8, 6, 3
    W = torch.randn(d_in, d_out, generator=gen, dtype=torch.float64)
    x, y = torch.randn(B, d_in, generator=gen, dtype=torch.float64), torch.randn(B, d_out, generator=gen, dtype=torch.float64)

    def per_sample_loss(delta):
        return (((x + delta) @ W - y) ** 2).sum(dim=1)

    delta = torch.zeros(B, d_in, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(per_sample_loss(delta).sum(), delta)
    for steps in range(3):
        new = fastat.pgd_step(delta.detach(), g, 1e-2, 1.0, norm)
        assert (per_sample_loss(new) > per_sample_loss(delta.detach())).all()
        delta = new.requires_grad_()
        (g,) = torch.autograd.grad(per_sample_loss(delta).sum(), delta)


def test_pgd_step_radius_modes():
    gen = torch.Generator().manual_seed(4)
    delta, grad = make((4, 3, 5, 5), torch.float32, "contiguous", gen), make((4, 3, 5, 5), torch.float32, "contiguous", gen)
    r = torch.tensor([0.01, 0.05, 0.1, 0.5])
    by_hand = r * math.sqrt(75)
    torch.testing.assert_close(fastat.rms_radius(r, delta), by_hand)
    assert fastat.rms_radius(0.1, delta) == pytest.approx(0.1 * math.sqrt(75))
    torch.testing.assert_close(
        fastat.pgd_step(delta, grad, 0.3, r, "l2", radius_mode="rms"), fastat.pgd_step(delta, grad, 0.3, by_hand, "l2")
    )
    # Linf radii are per-coordinate already: "rms" leaves them unchanged
    torch.testing.assert_close(
        fastat.pgd_step(delta, grad, 0.3, r, "linf", radius_mode="rms"), fastat.pgd_step(delta, grad, 0.3, r, "linf")
    )


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pgd_step_nonfinite_gradient_keeps_sample(norm, dtype):
    gen = torch.Generator().manual_seed(5)
    delta, grad = make((5, 2, 3, 3), dtype, "channels_last", gen), make((5, 2, 3, 3), dtype, "channels_last", gen)
    grad[1, 0, 0, 0] = float("nan")
    grad[3, 1, 2, 1] = float("inf")
    grad[4] = float("-inf")
    out = fastat.pgd_step(delta, grad, 0.3, 2.0, norm)
    for i in (1, 3, 4):
        assert torch.equal(out[i], delta[i])
    ok = [0, 2]
    want = hand_pgd_step(delta[ok].double(), grad[ok].double(), 0.3, 2.0, norm)
    torch.testing.assert_close(out[ok].double(), want, atol=tol(dtype)[0], rtol=tol(dtype)[1])
    assert not torch.equal(out[ok], delta[ok])
    assert torch.isfinite(out).all()


def test_pgd_step_zero_gradient_and_edge_sizes():
    delta = torch.randn(3, 4, dtype=torch.float64)
    # zero gradient: no step, then the projection still applies
    torch.testing.assert_close(fastat.pgd_step(delta, torch.zeros_like(delta), 0.5, 1e6), delta)
    torch.testing.assert_close(fastat.pgd_step(delta, torch.zeros_like(delta), 0.5, 0.0), torch.zeros_like(delta))
    # B = 1, D = 1: L2 normalised step is a sign step
    d1, g1 = torch.tensor([[0.2]], dtype=torch.float64), torch.tensor([[-3.0]], dtype=torch.float64)
    torch.testing.assert_close(fastat.pgd_step(d1, g1, 0.1, 5.0), torch.tensor([[0.1]], dtype=torch.float64))
    torch.testing.assert_close(fastat.pgd_step(d1, g1, 0.5, 0.25), torch.tensor([[-0.25]], dtype=torch.float64))
    # empty batch
    e = torch.randn(0, 3, 4)
    for norm in ("l2", "linf"):
        assert fastat.pgd_step(e, e, 0.1, 1.0, norm).shape == (0, 3, 4)
        assert fastat.pgd_step(e, e, torch.empty(0), torch.empty(0), norm).shape == (0, 3, 4)


# ------------------------------------------------------------------------------ random_perturbation


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_random_perturbation_invariants(norm, init, kind):
    gen = torch.Generator().manual_seed(seed_of(norm, init, kind))
    for shape in [(6, 3, 4, 5), (5, 2), (3, 2, 3, 2, 2), (1, 1)]:
        like = make(shape, torch.float16, kind)
        B = shape[0]
        for radius in (0.7, torch.rand(B, generator=gen) + 0.1):
            for dtype in (None, torch.float32, torch.bfloat16, torch.float64):
                out = fastat.random_perturbation(like, radius, norm, init, generator=gen, dtype=dtype)
                assert out.shape == like.shape and out.dtype == (dtype or like.dtype)
                if kind == "channels_last" and like.ndim in (4, 5):
                    fmt = torch.channels_last if like.ndim == 4 else torch.channels_last_3d
                    assert out.is_contiguous(memory_format=fmt)
                r = torch.as_tensor(radius, dtype=torch.float64).expand(B)
                eps = torch.finfo(out.dtype).eps
                if init == "zero":
                    assert (out == 0).all()
                elif norm == "l2":
                    assert (l2(out) <= r * (1 + 2 * eps)).all()
                    assert (l2(out) > 0).all()
                else:
                    assert (rows(out.double()).abs().amax(dim=1) <= r * (1 + eps)).all()
                    assert (rows(out).abs().amax(dim=1) > 0).all()
                # radius 0 gives exactly zero
                assert (fastat.random_perturbation(like, 0.0, norm, init, generator=gen, dtype=dtype) == 0).all()


def test_uniform_l2_ball_radius_distribution():
    # Uniform in the ball: (||delta|| / R)^D ~ U(0, 1). A uniform-radius sampler (torchattacks) gives
    # mean 1/(D+1) instead of 1/2, far outside the tolerance.
    gen = torch.Generator().manual_seed(6)
    for shape in [(4000, 3), (4000, 2, 2, 3)]:
        D = math.prod(shape[1:])
        radius = torch.rand(shape[0], generator=gen, dtype=torch.float64) * 3 + 0.5
        out = fastat.random_perturbation(torch.empty(shape, dtype=torch.float64), radius, "l2", "uniform", generator=gen)
        u = (l2(out) / radius) ** D
        assert abs(u.mean().item() - 0.5) < 0.02
        assert abs(u.var().item() - 1 / 12) < 0.01
        assert ks_uniform(u) < 1.95
        # direction uniform: each coordinate has mean 0 and the same second moment
        unit = rows(out) / l2(out)[:, None]
        assert unit.mean(dim=0).abs().max() < 0.06
        torch.testing.assert_close((unit**2).mean(dim=0), torch.full((D,), 1 / D, dtype=torch.float64), atol=0.03, rtol=0)


def test_uniform_box_distribution():
    gen = torch.Generator().manual_seed(7)
    r = torch.tensor([0.5, 2.0]).repeat_interleave(1000)
    out = fastat.random_perturbation(torch.empty(2000, 3, 2, 2, dtype=torch.float64), r.double(), "linf", "uniform", generator=gen)
    v = (rows(out) / r.double()[:, None]).flatten()
    assert v.abs().max() <= 1
    assert abs(v.mean().item()) < 0.02 and abs(v.var().item() - 1 / 3) < 0.01
    assert ks_uniform((v + 1) / 2) < 1.95


def test_normal_init_moments():
    gen = torch.Generator().manual_seed(8)
    # L2: N(0, (R/sqrt(D))^2) then projected: norms concentrate just under R for large D
    out = fastat.random_perturbation(torch.empty(500, 3, 8, 8, dtype=torch.float64), 2.0, "l2", "normal", generator=gen)
    n = l2(out)
    assert (n <= 2.0 * (1 + 1e-9)).all() and n.mean() > 0.95 * 2.0
    # Linf: N(0, R^2) clamped to the box: P(|z| > 1) = 0.3173 of the coordinates sit on the boundary
    out = fastat.random_perturbation(torch.empty(200, 50, dtype=torch.float64), 0.3, "linf", "normal", generator=gen)
    assert out.abs().max() <= 0.3
    assert abs((out.abs() == 0.3).double().mean().item() - 0.3173) < 0.02


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("init", ["uniform", "normal"])
def test_random_perturbation_generator_reproducible(norm, init):
    like = torch.empty(4, 3, 5)
    a = fastat.random_perturbation(like, 1.0, norm, init, generator=torch.Generator().manual_seed(11))
    b = fastat.random_perturbation(like, 1.0, norm, init, generator=torch.Generator().manual_seed(11))
    c = fastat.random_perturbation(like, 1.0, norm, init, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(13)
    d = fastat.random_perturbation(like, 1.0, norm, init)
    torch.manual_seed(13)
    assert torch.equal(d, fastat.random_perturbation(like, 1.0, norm, init))


def test_random_perturbation_rms_radius_mode():
    like = torch.empty(3, 4, 4, dtype=torch.float64)
    a = fastat.random_perturbation(like, 0.1, "l2", generator=torch.Generator().manual_seed(1), radius_mode="rms")
    b = fastat.random_perturbation(like, 0.1 * 4.0, "l2", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    a = fastat.random_perturbation(like, 0.1, "linf", generator=torch.Generator().manual_seed(1), radius_mode="rms")
    assert a.abs().max() <= 0.1


@pytest.mark.parametrize("backend", runnable_backends("cpu"))
def test_random_perturbation_empty_batch(backend):
    """Nothing to draw: an empty result, and the caller's generator is not advanced (on every backend)."""
    e = torch.empty(0, 3, 4)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with fastat.use_backend(backend):
        for norm in ("l2", "linf"):
            for init in ("uniform", "normal", "zero"):
                assert fastat.random_perturbation(e, 1.0, norm, init, generator=gen).shape == (0, 3, 4)
                assert fastat.random_perturbation(e, torch.empty(0), norm, init, generator=gen).shape == (0, 3, 4)
    assert torch.equal(gen.get_state(), state)


# ---------------------------------------------------------------------------------- per_sample_norm


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_per_sample_norm_matches_hand_formula(shape, kind):
    gen = torch.Generator().manual_seed(seed_of(shape, kind))
    for dtype in DTYPES + (torch.float64,):
        x = make(shape, dtype, kind, gen).requires_grad_()
        flat = x.detach().double().reshape(shape[0], -1)
        n2, ninf = fastat.per_sample_norm(x), fastat.per_sample_norm(x, "linf")
        want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert n2.dtype == ninf.dtype == want_dtype and n2.shape == ninf.shape == (shape[0],)
        assert not n2.requires_grad and not ninf.requires_grad
        torch.testing.assert_close(n2.double(), flat.pow(2).sum(1).sqrt(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ninf.double(), flat.abs().max(1).values, atol=0, rtol=0)
    e = torch.empty(0, 3)
    assert fastat.per_sample_norm(e).shape == (0,) and fastat.per_sample_norm(e, "linf").shape == (0,)


# ------------------------------------------------------------------------------------------- errors

X = torch.randn(2, 3)
META = torch.empty(2, 3, device="meta")
NAN, INF = float("nan"), float("inf")

ERRORS = [
    ("delta-not-tensor", lambda: fastat.pgd_step(X.tolist(), X, 0.1, 1.0), TypeError, "delta"),
    ("delta-integer", lambda: fastat.pgd_step(X.long(), X, 0.1, 1.0), TypeError, "delta"),
    ("delta-0d", lambda: fastat.pgd_step(torch.tensor(1.0), torch.tensor(1.0), 0.1, 1.0), ValueError, "delta"),
    ("grad-shape", lambda: fastat.pgd_step(X, torch.randn(2, 4), 0.1, 1.0), ValueError, "grad"),
    ("grad-integer", lambda: fastat.pgd_step(X, X.int(), 0.1, 1.0), TypeError, "grad"),
    ("grad-device", lambda: fastat.pgd_step(X, META, 0.1, 1.0), ValueError, "grad"),
    ("norm", lambda: fastat.pgd_step(X, X, 0.1, 1.0, "l3"), ValueError, "norm"),
    ("norm-case", lambda: fastat.pgd_step(X, X, 0.1, 1.0, "L2"), ValueError, "norm"),
    ("radius_mode", lambda: fastat.pgd_step(X, X, 0.1, 1.0, radius_mode="per_coord"), ValueError, "radius_mode"),
    ("radius-negative", lambda: fastat.pgd_step(X, X, 0.1, -1.0), ValueError, "radius"),
    ("radius-nan", lambda: fastat.pgd_step(X, X, 0.1, NAN), ValueError, "radius"),
    ("radius-inf", lambda: fastat.pgd_step(X, X, 0.1, INF), ValueError, "radius"),
    ("radius-negative-tensor", lambda: fastat.pgd_step(X, X, 0.1, torch.tensor([1.0, -0.1])), ValueError, "radius"),
    ("radius-nan-tensor", lambda: fastat.pgd_step(X, X, 0.1, torch.tensor([NAN, 1.0])), ValueError, "radius"),
    ("radius-inf-tensor", lambda: fastat.pgd_step(X, X, 0.1, torch.tensor([1.0, INF])), ValueError, "radius"),
    ("radius-batch", lambda: fastat.pgd_step(X, X, 0.1, torch.ones(3)), ValueError, "radius"),
    ("radius-integer-tensor", lambda: fastat.pgd_step(X, X, 0.1, torch.ones(2, dtype=torch.long)), TypeError, "radius"),
    ("radius-device", lambda: fastat.pgd_step(X, X, 0.1, torch.ones(2, device="meta")), ValueError, "radius"),
    ("radius-string", lambda: fastat.pgd_step(X, X, 0.1, "1"), TypeError, "radius"),
    ("step-negative", lambda: fastat.pgd_step(X, X, -0.1, 1.0), ValueError, "step_size"),
    ("step-nan", lambda: fastat.pgd_step(X, X, NAN, 1.0), ValueError, "step_size"),
    ("step-inf", lambda: fastat.pgd_step(X, X, INF, 1.0), ValueError, "step_size"),
    ("step-negative-tensor", lambda: fastat.pgd_step(X, X, torch.tensor([0.1, -0.1]), 1.0), ValueError, "step_size"),
    ("step-nan-tensor", lambda: fastat.pgd_step(X, X, torch.tensor([NAN, 0.1]), 1.0), ValueError, "step_size"),
    ("step-inf-tensor", lambda: fastat.pgd_step(X, X, torch.tensor([INF, 0.1]), 1.0), ValueError, "step_size"),
    ("step-batch", lambda: fastat.pgd_step(X, X, torch.ones(1, 2), 1.0), ValueError, "step_size"),
    ("like-not-tensor", lambda: fastat.random_perturbation((2, 3), 1.0), TypeError, "like"),
    ("like-integer", lambda: fastat.random_perturbation(X.long(), 1.0), TypeError, "like"),
    ("like-0d", lambda: fastat.random_perturbation(torch.tensor(1.0), 1.0), ValueError, "like"),
    ("rp-norm", lambda: fastat.random_perturbation(X, 1.0, "l1"), ValueError, "norm"),
    ("rp-init", lambda: fastat.random_perturbation(X, 1.0, init="gaussian"), ValueError, "init"),
    ("rp-dtype", lambda: fastat.random_perturbation(X, 1.0, dtype=torch.int32), TypeError, "dtype"),
    ("rp-radius_mode", lambda: fastat.random_perturbation(X, 1.0, radius_mode="RMS"), ValueError, "radius_mode"),
    ("rp-radius-negative", lambda: fastat.random_perturbation(X, -1.0), ValueError, "radius"),
    ("rp-radius-nan", lambda: fastat.random_perturbation(X, NAN), ValueError, "radius"),
    ("rp-radius-inf-tensor", lambda: fastat.random_perturbation(X, torch.tensor([1.0, INF])), ValueError, "radius"),
    ("rp-radius-batch", lambda: fastat.random_perturbation(X, torch.ones(4)), ValueError, "radius"),
    ("rp-radius-device", lambda: fastat.random_perturbation(X, torch.ones(2, device="meta")), ValueError, "radius"),
    ("norm-x-not-tensor", lambda: fastat.per_sample_norm(1.0), TypeError, "x"),
    ("norm-x-integer", lambda: fastat.per_sample_norm(X.long()), TypeError, "x"),
    ("norm-kind", lambda: fastat.per_sample_norm(X, "l1"), ValueError, "norm"),
]


@pytest.mark.parametrize("call,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------ backends agree (issue 11)


def _cpu_backends():
    return [b for b in runnable_backends("cpu") if b in ("torch", "cpp", "triton")]


@pytest.mark.parametrize("radius", [7e4, 1e39], ids=["beyond-fp16", "beyond-fp32"])
def test_linf_with_a_huge_radius_agrees_on_every_backend(radius):
    """A radius beyond the data dtype's range is an unbounded box on every backend (the reference raised
    'value cannot be converted' for a float radius beyond fp32 while the C++ kernels worked)."""
    gen = torch.Generator().manual_seed(11)
    delta = (torch.randn(4, 3, 5, 5, generator=gen) * 0.1).half()
    grad = torch.randn(4, 3, 5, 5, generator=gen).half()
    results = {}
    for backend in _cpu_backends():
        with fastat.use_backend(backend):
            results[backend] = fastat.pgd_step(delta, grad, 0.25, radius, "linf")
            start = fastat.random_perturbation(delta, radius, "linf", "normal", generator=torch.Generator().manual_seed(2))
        assert start.dtype == torch.float16 and not torch.isnan(start).any(), backend
    want = (delta.float() + 0.25 * grad.float().sign()).half()  # the clamp never binds
    for backend, got in results.items():
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=backend)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_every_cpu_backend_has_random_starts(norm, init):
    """Each backend draws random starts itself (cpp too: issue 11 item 4) within the radius."""
    like = torch.randn(3, 4, 6)
    for backend in _cpu_backends():
        with fastat.use_backend(backend):
            out = fastat.random_perturbation(like, 0.5, norm, init, generator=torch.Generator().manual_seed(0))
        flat = out.reshape(3, -1)
        size = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
        assert out.shape == like.shape and bool((size <= 0.5 * (1 + 1e-6)).all()), backend
        assert (init == "zero") == bool((out == 0).all()), backend
