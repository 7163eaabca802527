"""The validation layer (fastat._checks) and the per-sample shape helpers (fastat._shapes), plus the
cross-op policies of issue 2 item 5: dtypes, coefficient forms, value checks skipped while tracing."""
import math

import pytest
import torch

import fastat
from fastat import _checks, _shapes

X = torch.randn(3, 4)


@pytest.mark.parametrize(
    "value,exc,match",
    [
        ([1.0], TypeError, "torch.Tensor, got list"),
        (3.0, TypeError, "torch.Tensor, got float"),
        (torch.ones(3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones(3, dtype=torch.bool), TypeError, "floating-point"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "floating-point"),
        (torch.tensor(1.0), ValueError, "leading batch dimension"),
    ],
    ids=["list", "float", "int64", "bool", "complex", "0-d"],
)
def test_check_tensor_rejects(value, exc, match):
    with pytest.raises(exc, match=f"^x must .*{match}"):
        _checks.check_tensor("x", value)


def test_check_tensor_accepts_every_float_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert _checks.check_tensor("x", X.to(dtype)) is not None
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None:
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            _checks.check_tensor("x", X.to(fp8))


def test_check_like():
    _checks.check_like("noise", X.half(), "x0", X)  # dtypes may differ (promotion), shape and device may not
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(3, 4\), got \(4, 3\)"):
        _checks.check_like("noise", X.t(), "x0", X)
    with pytest.raises(ValueError, match="noise is on meta but x0 is on cpu"):
        _checks.check_like("noise", torch.empty(3, 4, device="meta"), "x0", X)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        _checks.check_like("noise", None, "x0", X)


def test_check_choice():
    assert _checks.check_choice("norm", "l2", ("l2", "linf")) == "l2"
    for bad in ("L2", "l3", None, 2):
        with pytest.raises(ValueError, match=r"norm must be one of \('l2', 'linf'\)"):
            _checks.check_choice("norm", bad, ("l2", "linf"))


def test_per_sample_forms():
    cpu = torch.device("cpu")
    assert _checks.per_sample("r", None, 3, cpu) is None
    assert _checks.per_sample("r", 2, 3, cpu) == 2.0 and isinstance(_checks.per_sample("r", 2, 3, cpu), float)
    out = _checks.per_sample("r", torch.tensor(0.5), 3, cpu)
    assert out.shape == (3,) and (out == 0.5).all()  # 0-d tensors are expanded to [B]
    out = _checks.per_sample("r", torch.arange(3.0)[:, None], 3, cpu)
    assert out.shape == (3,)  # [B, 1] is accepted
    assert _checks.per_sample("r", torch.empty(0), 0, cpu).shape == (0,)
    # a coefficient that requires grad keeps its graph
    w = torch.ones(3, requires_grad=True)
    assert _checks.per_sample("w", w, 3, cpu).requires_grad
    for bad, exc, match in [
        (True, TypeError, "r must be a float or a tensor"),
        ("1", TypeError, "r must be a float or a tensor"),
        (torch.ones(3, dtype=torch.int32), TypeError, "r must be a floating-point tensor"),
        (torch.ones(1), ValueError, r"r must be a float or have one value per sample \(shape \[3\]\)"),
        (torch.ones(3, 2), ValueError, "one value per sample"),
        (torch.ones(3, device="meta"), ValueError, "r is on meta but the data is on cpu"),
    ]:
        with pytest.raises(exc, match=match):
            _checks.per_sample("r", bad, 3, cpu)


@pytest.mark.parametrize("form", ["float", "tensor"])
def test_per_sample_value_checks(form):
    cpu = torch.device("cpu")

    def v(x):
        return x if form == "float" else torch.full((2,), x)

    for x in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="r must be finite"):
            _checks.per_sample("r", v(x), 2, cpu)
    assert _checks.per_sample("r", v(math.inf), 2, cpu, finite=False) is not None
    with pytest.raises(ValueError, match="r must be >= 0"):
        _checks.per_sample("r", v(-1e-3), 2, cpu, nonnegative=True)
    with pytest.raises(ValueError, match="r must be > 0"):
        _checks.per_sample("r", v(0.0), 2, cpu, positive=True)
    assert _checks.per_sample("r", v(0.0), 2, cpu, nonnegative=True) is not None


def test_value_checks_skipped_while_tracing(monkeypatch):
    # Under torch.compile / CUDA-graph capture the checks that read tensor values are skipped (no sync);
    # shape and device checks still run. Python floats are always checked (no device read).
    monkeypatch.setattr(_checks, "values_checkable", lambda tensor=None: False)
    bad = torch.tensor([float("nan"), -1.0])
    assert _checks.per_sample("r", bad, 2, torch.device("cpu"), nonnegative=True) is not None
    with pytest.raises(ValueError, match="one value per sample"):
        _checks.per_sample("r", torch.ones(3), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="r must be finite"):
        _checks.per_sample("r", math.nan, 2, torch.device("cpu"))


def test_values_checkable_eagerly():
    assert _checks.values_checkable() is True
    assert _checks.values_checkable(torch.zeros(2)) is True


def test_device_tensor_values_read_only_on_request(monkeypatch):
    # Reading a GPU tensor's values is a device sync on every op call: off unless FASTAT_CHECK_VALUES=1.
    off_cpu = torch.empty(2, device="meta")
    monkeypatch.delenv("FASTAT_CHECK_VALUES", raising=False)
    assert _checks.values_checkable(off_cpu) is False
    monkeypatch.setenv("FASTAT_CHECK_VALUES", "1")
    assert _checks.values_checkable(off_cpu) is True


def test_check_batch():
    _checks.check_batch("t", torch.zeros(3), "x0", X)
    with pytest.raises(ValueError, match="t has batch size 2 but x0 has 3"):
        _checks.check_batch("t", torch.zeros(2), "x0", X)


# ------------------------------------------------------------------------------------------ _shapes


def test_shape_helpers():
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert _shapes.sample_dims(x) == (1, 2, 3) and _shapes.per_sample_numel(x) == 60
    assert _shapes.sample_dims(torch.randn(4)) == () and _shapes.per_sample_numel(torch.randn(4)) == 1
    torch.testing.assert_close(_shapes.sum_flat(x), x.reshape(2, -1).sum(1))
    torch.testing.assert_close(_shapes.mean_flat(x), x.reshape(2, -1).mean(1))
    v = torch.randn(4)
    assert torch.equal(_shapes.sum_flat(v), v)  # a [B] tensor has one element per sample
    assert _shapes.mean_flat(torch.empty(0, 3)).shape == (0,)
    assert _shapes.column(0.5, x) == 0.5
    assert _shapes.column(torch.ones(2), x).shape == (2, 1, 1, 1)
    assert _shapes.compute_dtype(x.half(), None, x.bfloat16()) == torch.float32
    assert _shapes.compute_dtype(x.half(), x.double()) == torch.float64
    per = torch.tensor([1.0, 2.0, 6.0])
    assert torch.equal(_shapes.reduce(per, "none"), per)
    assert _shapes.reduce(per, "sum").item() == 9.0 and _shapes.reduce(per, "mean").item() == 3.0
    assert _shapes.reduce(torch.empty(0), "mean").item() == 0.0 and _shapes.reduce(torch.empty(0), "sum").item() == 0.0


# --------------------------------------------------------------------------- policies across the ops


def test_mixed_dtypes_promote_and_accumulate_in_fp32():
    with fastat.use_backend("torch"):
        x = torch.randn(2, 3, dtype=torch.bfloat16)
        assert fastat.noisy_input(x, x.half(), 1.0, 1.0).dtype == torch.float32  # promote(bf16, fp16)
        assert fastat.equivariant_mse(x, x, x, 0.5).dtype == torch.float32
        assert fastat.consistency_distance(x.double(), x.double()).dtype == torch.float64
        # pgd_step keeps delta's dtype; a fp32 grad is not rounded to bf16 before the step
        d = torch.zeros(1, 2, dtype=torch.bfloat16)
        g = torch.tensor([[1.0, 1e-3]])
        out = fastat.pgd_step(d, g, 1.0, 10.0, "l2")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), (g / g.norm()).bfloat16().float())


def test_integer_coefficients_are_floats():
    with fastat.use_backend("torch"):
        x = torch.randn(2, 3, dtype=torch.float64)
        torch.testing.assert_close(fastat.noisy_input(x, x, 1, 2), 3 * x)
        torch.testing.assert_close(fastat.pgd_step(x, x, 0, 100), x)


# ------------------------------------------------------------------------------- the training API


def _training_case():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()

    def model(x, t):
        return lin(torch.cat([x, t.to(x.dtype)[:, None] / 1000], 1))

    x0 = torch.randn(4, 2, dtype=torch.float64)
    return model, x0, torch.tensor([1, 50, 300, 999])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"timesteps": torch.tensor([1, 2, 3])}, ValueError, r"^timesteps must have shape \[B\]=\[4\], got \(3,\)"),
        ({"timesteps": torch.tensor([[1], [2], [3], [4]])}, ValueError, r"^timesteps must have shape \[B\]=\[4\], got \(4, 1\)"),
        ({"timesteps": torch.tensor([1.0, 2.0, 3.0, 4.0])}, TypeError, "^timesteps must be an integer tensor"),
        ({"timesteps": [1, 2, 3, 4]}, TypeError, "^timesteps must be an integer tensor"),
        ({"timesteps": torch.tensor([1, 2, 3, 1000])}, ValueError, r"^timesteps must lie in \[0, 999\]"),
        ({"eps": math.nan}, ValueError, "^eps must be a float >= 0"),
        ({"eps": -0.1}, ValueError, "^eps must be a float >= 0"),
        ({"eps": "0.1"}, TypeError, "^eps must be a float"),
        ({"alpha": math.inf}, ValueError, "^alpha must be a finite float >= 0"),
        ({"adv_init_mag": -1.0}, ValueError, "^adv_init_mag must be a finite float >= 0"),
        ({"noise": torch.randn(4, 3, dtype=torch.float64)}, ValueError, r"^noise must have the shape of x0"),
        ({"weights": torch.ones(4, 1, 2, dtype=torch.float64)}, ValueError, "^weights must"),
        ({"weights": torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=torch.float64)}, ValueError, "^weights must be finite"),
        ({"method": "equivariant_random", "batch_branches": True, "low_memory": True}, ValueError, "low_memory"),
        ({"method": "fgsm_rs", "eps": math.inf}, ValueError, "^eps=inf"),
    ],
)
def test_training_errors_name_the_argument(kwargs, exc, match):
    model, x0, t = _training_case()
    kwargs = dict(kwargs)
    t = kwargs.pop("timesteps", t)
    noise = kwargs.pop("noise", None)
    with pytest.raises(exc, match=match):
        fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=fastat.schedules.ddpm_linear_alphas_cumprod(1000),
                                  **kwargs)


def test_a_model_without_a_timestep_argument_is_told_the_calling_convention():
    _, x0, t = _training_case()
    lin = torch.nn.Linear(2, 2).double()
    table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
    with pytest.raises(TypeError, match=r"model\(x_t, timesteps, \*\*model_kwargs\)"):
        fastat.diffusion_adv_loss(lin, x0, t, alphas_cumprod=table)
    with pytest.raises(TypeError, match=r"model\(x_t, timesteps, \*\*model_kwargs\)"):
        fastat.diffusion_adv_loss(lambda x: lin(x), x0, t, alphas_cumprod=table)

    def raises_inside(x, ts):
        raise TypeError("a bug inside the model")

    with pytest.raises(TypeError, match="^a bug inside the model$"):  # the model's own errors pass through
        fastat.diffusion_adv_loss(raises_inside, x0, t, alphas_cumprod=table)


def test_free_replay_validates_at_construction():
    model, x0, t = _training_case()
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
    for kwargs, match in [({"eps": math.nan}, "^eps must be a float >= 0"), ({"alpha": -1.0}, "^alpha must"),
                          ({"adv_init_mag": math.nan}, "^adv_init_mag must"), ({"rho": math.nan}, "^rho must"),
                          ({"max_grad_norm": 0.0}, "^max_grad_norm must")]:
        with pytest.raises(ValueError, match=match):
            fastat.FreeReplay(model, opt, 2, alphas_cumprod=table, **kwargs)
    with pytest.raises(TypeError, match="^optimizer must"):
        fastat.FreeReplay(model, None, 2, alphas_cumprod=table)
    fr = fastat.FreeReplay(model, opt, 2, alphas_cumprod=table)
    with pytest.raises(ValueError, match=r"^timesteps must have shape \[B\]=\[4\]"):
        fr.step(x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"^weights must"):
        fr.step(x0, t, weights=torch.ones(3, dtype=torch.float64))


def test_consistency_errors_name_the_argument():
    _, x0, _ = _training_case()
    model = lambda x, s: x  # noqa: E731
    for kwargs, exc, match in [
        ({"eps": math.nan}, ValueError, "^eps must be a float >= 0"),
        ({"indices": torch.tensor([0, 1])}, ValueError, "^indices must"),
        ({"indices": torch.tensor([0.0, 1.0, 2.0, 3.0])}, TypeError, "^indices must be an integer tensor"),
        ({"noise": torch.randn(4, 3)}, ValueError, "^noise must have the shape of x0"),
        ({"weights": torch.ones(2)}, ValueError, "^weights must"),
        ({"steps": -1}, ValueError, "^steps must"),
    ]:
        with pytest.raises(exc, match=match):
            fastat.consistency_adv_loss(model, None, x0, **kwargs)
