"""The cross-backend harness: every backend this machine can run, on every op, against the float64 hand
formula and against the torch reference, forward and gradients, over random ranks (2..5), shapes,
layouts, dtypes and per-sample coefficients (floats or [B] tensors).

Backends join automatically: the parameter list is every backend in `runnable_backends(device)` with a
kernel registered for the op (CPU always; CUDA tensors when a GPU is visible). The torch reference is
checked too, so the harness is never empty.

Rules (per output and per gradient, norm-wise over the whole tensor):
  * flash-attention rule against the fp64 hand formula on the same (rounded) inputs:
        err(backend)  <=  2 * err(plain torch computation in the low dtype) + floor,
        floor = (0.5 for fp16/bf16 results, 4 for fp32 results) * eps(output dtype) * max|oracle|
  * a kernel backend matches the torch reference within utils.TOLERANCES of the output dtype.
A kernel may decline a call its support data excludes (BackendUnavailableError); the example is then discarded
(forward) or its gradients are skipped, and both are counted: a test whose every example was declined, or whose
every gradient check was, fails (`counted`), so a refusal cannot hide a missing kernel.
random_perturbation: the kernels draw from a seed the generator supplies, the reference from the generator
itself, so values cannot match across them; its invariants are checked.

Hypothesis runs derandomised by default (the same examples on every run, so CI is reproducible). A deep,
randomised run: FASTAT_CROSS_EXAMPLES=500 pytest tests/test_cross_backend.py.
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from utils import (
    LAYOUTS,
    col,
    hand_consistency_distance,
    hand_equivariance_regularizer,
    hand_equivariant_mse,
    hand_noisy_input,
    hand_pgd_step,
    layout,
    rows,
    runnable_backends,
    tol,
)

import fastat
from fastat import _dispatch
from fastat._backend import BackendUnavailableError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = (torch.float32, torch.float16, torch.bfloat16)
# Default: 15 derandomised examples per test (reproducible CI). FASTAT_CROSS_EXAMPLES=N: a randomised deep run.
DEEP = os.environ.get("FASTAT_CROSS_EXAMPLES")
SETTINGS = settings(
    max_examples=int(DEEP or "15"), deadline=None, derandomize=DEEP is None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# What `compare` saw in the running test: examples tried and declined, gradient checks tried and declined.
_counts: Counter = Counter()


def counted(test):
    """Run a hypothesis test and fail it when its backend declined every example, or every gradient check."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        _counts.clear()
        test(*args, **kwargs)
        counts = dict(_counts)
        if counts.get("forward", 0) and counts.get("forward_refused", 0) == counts["forward"]:
            raise AssertionError(f"every example ({counts['forward']}) was declined: {_counts.get('reason', '')}")
        if counts.get("grad", 0) and counts.get("grad_refused", 0) == counts["grad"]:
            raise AssertionError(f"every gradient check ({counts['grad']}) was declined: {_counts.get('reason', '')}")

    return wrapper


def params(op):
    """(backend, device) pairs that can run `op` here; torch first, so the list is never empty."""
    out = []
    for device in DEVICES:
        for backend in runnable_backends(device):
            if backend in _dispatch.registered_backends(op):
                out.append(pytest.param(backend, device, id=f"{backend}-{device}"))
    return out


def dtypes_for(backend, device):
    # The Triton interpreter gets bf16 arithmetic wrong (docs/design.md, testing without a GPU): bf16 Triton runs on GPUs only.
    if backend == "triton" and device == "cpu":
        return (torch.float32, torch.float16)
    return LOW


# ------------------------------------------------------------------------------------ input drawing


def draw_case(data, backend, device):
    rank = data.draw(st.integers(2, 5), label="rank")
    batch = data.draw(st.integers(1, 5), label="B")
    hi = {2: 40, 3: 9, 4: 6, 5: 4}[rank]
    shape = (batch,) + tuple(data.draw(st.lists(st.integers(1, hi), min_size=rank - 1, max_size=rank - 1), label="dims"))
    kind = data.draw(st.sampled_from(LAYOUTS), label="layout")
    dtype = data.draw(st.sampled_from(dtypes_for(backend, device)), label="dtype")
    coef = data.draw(st.sampled_from(["float", "tensor"]), label="coefficients")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    return shape, kind, dtype, coef, torch.Generator().manual_seed(seed)


def tensor(shape, dtype, kind, gen, device, scale=1.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return layout(x.to(dtype).to(device), kind)


def coefficient(kind, batch, low, high, gen, device):
    v = low + (high - low) * torch.rand(batch, generator=gen, dtype=torch.float64)
    return float(v[0]) if kind == "float" else v.float().to(device)


# --------------------------------------------------------------------------------------- comparison


def max_abs(x):
    return x.detach().double().abs().max().item() if x.numel() else 0.0


def err(x, ref):
    return max_abs(x.detach().double() - ref.detach().double()) if x.numel() else 0.0


def check_rule(name, got, naive, oracle, scale=0.0):
    """flash-attention rule: err(got) <= 2 err(naive) + floor (errors against the fp64 oracle).

    floor: half an ulp of the largest output for fp16/bf16 results (one final rounding, the plain torch
    result can be exact by luck), four ulps for fp32 results (summation order in the reductions).
    `scale` raises the magnitude the ulps refer to: a gradient that is exactly 0 by cancellation (d/dg of
    g/||g|| for D = 1) carries rounding noise of the size of the op's other gradients."""
    ulps = 0.5 if torch.finfo(got.dtype).bits <= 16 else 4.0
    floor = ulps * torch.finfo(got.dtype).eps * max(max_abs(oracle), scale) + 1e-30
    e_got, e_naive = err(got, oracle), err(naive, oracle)
    note(f"{name}: err {e_got:.3g}, plain-torch err {e_naive:.3g}, floor {floor:.3g}")
    assert e_got <= 2 * e_naive + floor, f"{name}: error {e_got:.3g} > 2 x plain-torch error {e_naive:.3g} + floor {floor:.3g}"


def check_reference(name, got, ref):
    """A kernel's result against the torch reference, norm-wise within TOLERANCES of the output dtype."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{name}: {got.shape} {got.dtype} vs {ref.shape} {ref.dtype}"
    atol, rtol = tol(ref.dtype)
    bound = atol * max(max_abs(ref), 1.0) + rtol * max_abs(ref)
    assert err(got, ref) <= bound, f"{name}: differs from the torch reference by {err(got, ref):.3g} > {bound:.3g}"


def low_copy(inputs, grads, requires):
    """Fresh leaves (same values) so that every run gets its own autograd graph."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if requires and k in grads:
                v.requires_grad_()
        out[k] = v
    return out


def cast(inputs, dtype, grads):
    """The inputs in `dtype` (coefficient tensors too), for the oracle (fp64) and the plain-torch baseline."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to(dtype)
            if k in grads:
                v.requires_grad_()
        out[k] = v
    return out


def run_backend(backend, fn, inputs):
    with fastat.use_backend(backend):
        return fn(**inputs)


def compare(backend, name, fn, hand, inputs, grads, gen):
    """Forward and gradients of `fn` (a public fastat op) on `backend` against the oracle and the reference."""
    # forward, no autograd involved
    plain = low_copy(inputs, grads, requires=False)
    _counts["forward"] += 1
    try:
        out = run_backend(backend, fn, plain)
    except BackendUnavailableError as exc:
        note(f"declined: {exc}")
        _counts["forward_refused"] += 1
        _counts["reason"] = str(exc)
        assume(False)
    oracle64 = hand(**cast(inputs, torch.float64, ()))
    dtype = next(v.dtype for v in inputs.values() if isinstance(v, torch.Tensor))
    naive = hand(**cast(inputs, dtype, ()))
    check_rule(f"{name} forward", out, naive, oracle64)
    ref = run_backend("torch", fn, low_copy(inputs, grads, requires=False))
    if backend != "torch":
        check_reference(f"{name} forward", out, ref)
    else:
        assert out.shape == oracle64.shape
    if not grads:
        return
    # gradients of <out, cotangent> with respect to every differentiable input
    # the cotangent is representable in the low dtype, so every run sees the same one (like the inputs)
    cot64 = torch.randn(oracle64.shape, generator=gen, dtype=torch.float64).to(dtype).double().to(oracle64.device)
    leaves = low_copy(inputs, grads, requires=True)
    _counts["grad"] += 1
    try:
        got = run_backend(backend, fn, leaves)
    except BackendUnavailableError as exc:
        note(f"gradients declined: {exc}")
        _counts["grad_refused"] += 1
        _counts["reason"] = str(exc)
        return
    assert got.requires_grad, f"{name}: backend {backend} dropped the autograd graph"
    names = [k for k in grads if isinstance(leaves.get(k), torch.Tensor)]
    g_got = torch.autograd.grad(got, [leaves[k] for k in names], cot64.to(got.dtype), allow_unused=True)
    o64 = cast(inputs, torch.float64, names)
    g_64 = torch.autograd.grad(hand(**o64), [o64[k] for k in names], cot64, allow_unused=True)
    olow = cast(inputs, dtype, names)
    out_low = hand(**olow)
    g_low = torch.autograd.grad(out_low, [olow[k] for k in names], cot64.to(out_low.dtype), allow_unused=True)
    ref_leaves = low_copy(inputs, grads, requires=True)
    ref_out = run_backend("torch", fn, ref_leaves)
    g_ref = torch.autograd.grad(ref_out, [ref_leaves[k] for k in names], cot64.to(ref_out.dtype), allow_unused=True)
    scale = max(max_abs(g) for g in g_64 if g is not None) if any(g is not None for g in g_64) else 0.0
    for k, a, b64, blow, bref in zip(names, g_got, g_64, g_low, g_ref):
        zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        a, b64, blow, bref = zero(a, leaves[k]), zero(b64, o64[k]), zero(blow, olow[k]), zero(bref, ref_leaves[k])
        assert a.dtype == leaves[k].dtype, f"grad {k}: dtype {a.dtype} != input dtype {leaves[k].dtype}"
        check_rule(f"{name} grad {k}", a, blow.to(a.dtype) if blow.dtype != a.dtype else blow, b64, scale)
        if backend != "torch":
            check_reference(f"{name} grad {k}", a, bref)


# ----------------------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("backend,device", params("noisy_input"))
@counted
@SETTINGS
@given(data=st.data())
def test_noisy_input(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B = shape[0]
    inputs = {
        "x0": tensor(shape, dtype, kind, gen, device),
        "noise": tensor(shape, dtype, kind, gen, device),
        "alpha": coefficient(coef, B, 0.05, 1.0, gen, device),
        "sigma": coefficient(coef, B, 0.05, 1.0, gen, device),
        "delta": tensor(shape, dtype, kind, gen, device, 0.1) if data.draw(st.booleans(), label="delta") else None,
    }
    grads = ["x0", "noise", "delta"] + (["alpha", "sigma"] if data.draw(st.booleans(), label="coef grads") else [])
    compare(backend, "noisy_input", fastat.noisy_input, hand_noisy_input, inputs, grads, gen)


@pytest.mark.parametrize("backend,device", params("pgd_step"))
@counted
@SETTINGS
@given(data=st.data())
def test_pgd_step(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B, D = shape[0], math.prod(shape[1:])
    norm = data.draw(st.sampled_from(["l2", "linf"]), label="norm")
    normalize = data.draw(st.booleans(), label="normalize")
    scale = 0.3 * math.sqrt(D) if norm == "l2" else 0.4
    inputs = {
        "delta": tensor(shape, dtype, kind, gen, device, 0.3),
        "grad": tensor(shape, dtype, kind, gen, device),
        "step_size": coefficient(coef, B, 0.05, 0.5, gen, device),
        "radius": coefficient(coef, B, 0.3 * scale, 1.5 * scale, gen, device),
    }

    def fn(delta, grad, step_size, radius):
        return fastat.pgd_step(delta, grad, step_size, radius, norm, normalize)

    def hand(delta, grad, step_size, radius):
        return hand_pgd_step(delta, grad, step_size, radius, norm, normalize)

    # gradients through the step: only where the support data says the backend has them (the reference)
    differentiable = "differentiable" in _dispatch.OPS["pgd_step"].support[backend].features
    grads = ["delta", "grad"] if differentiable and data.draw(st.booleans(), label="grads") else []
    compare(backend, f"pgd_step[{norm}, normalize={normalize}]", fn, hand, inputs, grads, gen)


@pytest.mark.parametrize("backend,device", params("equivariant_mse"))
@counted
@SETTINGS
@given(data=st.data())
def test_equivariant_mse(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B = shape[0]
    target = data.draw(st.sampled_from(["delta_detach", "delta", "original"]), label="target")
    reduction = data.draw(st.sampled_from(["none", "sum", "mean"]), label="reduction")
    inputs = {
        "pred": tensor(shape, dtype, kind, gen, device),
        "noise": tensor(shape, dtype, kind, gen, device),
        "delta": tensor(shape, dtype, kind, gen, device, 0.1),
        "sigma": coefficient(coef, B, 0.1, 1.0, gen, device),
        "weight": data.draw(st.sampled_from([None, "float", "tensor"]), label="weight"),
    }
    if inputs["weight"] is not None:
        inputs["weight"] = coefficient(inputs["weight"], B, 0.5, 2.0, gen, device)

    def fn(pred, noise, delta, sigma, weight):
        return fastat.equivariant_mse(pred, noise, delta, sigma, target, weight, reduction)

    def hand(pred, noise, delta, sigma, weight):
        return hand_equivariant_mse(pred, noise, delta, sigma, target, weight, reduction)

    compare(backend, f"equivariant_mse[{target}, {reduction}]", fn, hand, inputs, ["pred", "noise", "delta"], gen)


@pytest.mark.parametrize("backend,device", params("equivariance_regularizer"))
@counted
@SETTINGS
@given(data=st.data())
def test_equivariance_regularizer(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B = shape[0]
    mode = data.draw(st.sampled_from(["equivariant", "invariant"]), label="mode")
    detach = data.draw(st.booleans(), label="detach_anchor")
    reduction = data.draw(st.sampled_from(["none", "sum", "mean"]), label="reduction")
    inputs = {
        "pred_perturbed": tensor(shape, dtype, kind, gen, device),
        "pred_clean": tensor(shape, dtype, kind, gen, device),
        "omega": tensor(shape, dtype, kind, gen, device, 0.1),
        "weight": coefficient(coef, B, 0.5, 2.0, gen, device),
    }

    def fn(pred_perturbed, pred_clean, omega, weight):
        return fastat.equivariance_regularizer(pred_perturbed, pred_clean, omega, weight, detach, mode, reduction)

    def hand(pred_perturbed, pred_clean, omega, weight):
        return hand_equivariance_regularizer(pred_perturbed, pred_clean, omega, weight, detach, mode, reduction)

    name = f"equivariance_regularizer[{mode}, detach={detach}, {reduction}]"
    compare(backend, name, fn, hand, inputs, ["pred_perturbed", "pred_clean", "omega"], gen)


@pytest.mark.parametrize("backend,device", params("consistency_distance"))
@counted
@SETTINGS
@given(data=st.data())
def test_consistency_distance(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B = shape[0]
    metric = data.draw(st.sampled_from(["l2", "l1", "pseudo_huber"]), label="metric")
    c = data.draw(st.sampled_from([None, 0.5]), label="c")
    reduction = data.draw(st.sampled_from(["none", "sum", "mean"]), label="reduction")
    inputs = {
        "pred": tensor(shape, dtype, kind, gen, device),
        "target": tensor(shape, dtype, kind, gen, device),
        "weight": coefficient(coef, B, 0.5, 2.0, gen, device),
    }

    def fn(pred, target, weight):
        return fastat.consistency_distance(pred, target, metric, c, weight, reduction)

    def hand(pred, target, weight):
        return hand_consistency_distance(pred, target, metric, c, weight, reduction)

    compare(backend, f"consistency_distance[{metric}, c={c}, {reduction}]", fn, hand, inputs, ["pred", "target"], gen)


@pytest.mark.parametrize("backend,device", params("random_perturbation"))
@counted
@SETTINGS
@given(data=st.data())
def test_random_perturbation(backend, device, data):
    shape, kind, dtype, coef, gen = draw_case(data, backend, device)
    B = shape[0]
    norm = data.draw(st.sampled_from(["l2", "linf"]), label="norm")
    init = data.draw(st.sampled_from(["uniform", "normal", "zero"]), label="init")
    out_dtype = data.draw(st.sampled_from([None] + list(dtypes_for(backend, device))), label="dtype")
    like = tensor(shape, dtype, kind, gen, device)
    radius = coefficient(coef, B, 0.1, 2.0, gen, device)
    generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    _counts["forward"] += 1
    try:
        with fastat.use_backend(backend):
            out = fastat.random_perturbation(like, radius, norm, init, generator=generator, dtype=out_dtype)
            zero = fastat.random_perturbation(like, 0.0, norm, init, generator=generator, dtype=out_dtype)
    except BackendUnavailableError as exc:
        note(f"declined: {exc}")
        _counts["forward_refused"] += 1
        _counts["reason"] = str(exc)
        assume(False)
    assert out.shape == like.shape and out.device == like.device and out.dtype == (out_dtype or dtype)
    assert torch.isfinite(out).all() and (zero == 0).all()
    r = col(torch.as_tensor(radius, dtype=torch.float64).expand(B).to(device), rows(out))
    eps = torch.finfo(out.dtype).eps
    flat = rows(out.double())
    if init == "zero":
        assert (out == 0).all()
        return
    if norm == "l2":
        n = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
        assert (n <= r * (1 + 2 * eps)).all(), "outside the L2 ball"
        assert (n > 0).all()
        if init == "uniform" and flat.shape[1] >= 4:
            assert (n >= r * 1e-3).all()  # ||delta|| = R U^(1/D): tiny only with probability ~1e-3^D
    else:
        assert (flat.abs() <= r * (1 + eps)).all(), "outside the box"
        assert (flat.abs().amax(dim=1) > 0).all()


# ------------------------------------------------------------------------------- the harness itself


def test_a_backend_that_declines_every_gradient_check_fails(monkeypatch):
    """Before the counts, a gradient refusal returned silently: a backend refusing all of them passed."""
    real = run_backend

    def refuse_gradients(backend, fn, inputs):
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values()):
            raise BackendUnavailableError("test: gradients refused")
        return real(backend, fn, inputs)

    monkeypatch.setitem(globals(), "run_backend", refuse_gradients)
    with pytest.raises(AssertionError, match=r"every gradient check \(\d+\) was declined: test: gradients refused"):
        test_consistency_distance("torch", "cpu")


def test_a_backend_that_declines_every_example_fails(monkeypatch):
    def refuse(backend, fn, inputs):
        raise BackendUnavailableError("test: refused")

    monkeypatch.setitem(globals(), "run_backend", refuse)
    with pytest.raises(Exception) as info:  # hypothesis' Unsatisfiable, or the count
        test_noisy_input("torch", "cpu")
    assert "declined" in str(info.value) or type(info.value).__name__ == "Unsatisfiable"


def test_settings_are_reproducible_unless_deep():
    assert SETTINGS.derandomize == (DEEP is None)
