"""Backend state (set/get/use_backend, FASTAT_BACKEND), availability errors, and the dispatch registry
(auto order, refusals: warn-once fallback under auto, an error naming the op under an explicit backend)."""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

import fastat
from fastat import _backend, _dispatch
from fastat._backend import BACKENDS, BackendUnavailableError

PUBLIC_DISPATCHED = ["noisy_input", "pgd_step", "random_perturbation", "equivariant_mse", "equivariance_regularizer", "consistency_distance"]


def test_set_get_and_case():
    fastat.set_backend("torch")
    assert fastat.get_backend() == "torch"
    fastat.set_backend("AUTO")
    assert fastat.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        fastat.set_backend("numpy")
    with pytest.raises(ValueError, match="backend"):
        fastat.set_backend(None)
    assert fastat.get_backend() == "auto"  # a rejected choice changes nothing


def test_use_backend_restores_on_exit_and_on_exception():
    fastat.set_backend("auto")
    with fastat.use_backend("torch"):
        assert fastat.get_backend() == "torch"
        with fastat.use_backend("auto"):
            assert fastat.get_backend() == "auto"
        assert fastat.get_backend() == "torch"
    assert fastat.get_backend() == "auto"
    with pytest.raises(KeyError):
        with fastat.use_backend("torch"):
            raise KeyError("boom")
    assert fastat.get_backend() == "auto"
    with pytest.raises(ValueError):
        with fastat.use_backend("bogus"):
            pass
    assert fastat.get_backend() == "auto"


def test_env_var(monkeypatch):
    monkeypatch.setattr(_backend, "_requested", None)
    monkeypatch.delenv("FASTAT_BACKEND", raising=False)
    assert fastat.get_backend() == "auto"
    monkeypatch.setenv("FASTAT_BACKEND", " Torch ")
    assert fastat.get_backend() == "torch"
    fastat.set_backend("auto")  # an explicit choice wins over the environment
    assert fastat.get_backend() == "auto"
    monkeypatch.setattr(_backend, "_requested", None)
    monkeypatch.setenv("FASTAT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTAT_BACKEND"):
        fastat.get_backend()
    with pytest.raises(ValueError, match="FASTAT_BACKEND"):
        fastat.noisy_input(torch.ones(2, 2), torch.ones(2, 2), 1.0, 1.0)


@pytest.mark.parametrize("name", BACKENDS)
def test_explicit_backend_available_or_says_why(name):
    ok, why = fastat.backend_status(name)
    assert isinstance(why, str) and why
    if ok:
        fastat.set_backend(name)
        assert fastat.get_backend() == name
    else:
        with pytest.raises(BackendUnavailableError, match=name) as err:
            fastat.set_backend(name)
        assert why in str(err.value)
        with pytest.raises(BackendUnavailableError):
            with fastat.use_backend(name):
                pass
        assert fastat.get_backend() != name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_unavailable_on_cpu():
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        fastat.set_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_needs_interpreter_on_cpu(monkeypatch):
    if _backend._triton_version() is None:
        pytest.skip("triton not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        fastat.set_backend("triton")
    assert "TRITON_INTERPRET" in _backend.device_refusal("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fastat.backend_status("triton")[0]
    assert _backend.device_refusal("triton", "cpu") is None


def test_device_refusals():
    assert _backend.device_refusal("torch", "cpu") is None and _backend.device_refusal("torch", "cuda") is None
    assert "CUDA tensors" in _backend.device_refusal("cuda", "cpu")
    assert "CPU tensors" in _backend.device_refusal("cpp", "cuda")
    assert _backend.device_refusal("triton", "cuda") is None


def test_every_public_op_has_a_reference_kernel():
    for op in PUBLIC_DISPATCHED:
        assert "torch" in _dispatch.registered_backends(op), op
    assert set(PUBLIC_DISPATCHED) <= set(_dispatch.registered_ops())


def test_auto_on_cpu_uses_reference_unless_cpp(monkeypatch):
    x = torch.randn(3, 4)
    calls = {
        "noisy_input": (x, x, 1.0, 1.0, None),
        "pgd_step": (x, x, 0.1, 1.0, "l2", True),
        "random_perturbation": (x, 1.0, "l2", "uniform", None, None),
        "equivariant_mse": (x, x, x, 0.5, "delta"),
        "equivariance_regularizer": (x, x, x, False, "equivariant"),
        "consistency_distance": (x, x, "l2", 0.1),
    }
    fastat.set_backend("auto")
    for op, args in calls.items():
        chosen = _dispatch.select(op, x.device, *args)
        # auto on CPU: a built cpp kernel (select loaded it) or the reference; never triton or cuda
        assert chosen in (_dispatch._load(op, "torch"), _dispatch._LOADED.get((op, "cpp"))), op
    # with no compiled kernels available, auto on CPU is exactly the reference (triton is never tried on CPU)
    monkeypatch.setattr(_dispatch, "backend_status", lambda name: (name in ("torch", "triton"), "test"))
    _dispatch.forget_probes()  # availability is memoised per process; drop it so the patch is seen
    for op, args in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unavailable backend is the expected path: no warning
            assert _dispatch.select(op, x.device, *args) is _dispatch._load(op, "torch"), op


# ------------------------------------------------------------------------ a throwaway op for dispatch

OP = "_fastat_test_throwaway"


@pytest.fixture
def throwaway(monkeypatch):
    module = types.ModuleType("_fastat_test_kernels")
    loaded = []

    def reference(x, limit=1.0):
        return ("torch", x)

    @_dispatch.refuses_when(lambda x, limit=1.0: f"x={x} exceeds {limit}" if x > limit else None)
    def fast(x, limit=1.0):
        return ("triton", x)

    module.reference, module.fast = reference, fast
    monkeypatch.setitem(sys.modules, "_fastat_test_kernels", module)
    _dispatch.register_kernel(OP, "torch", "_fastat_test_kernels:reference")
    _dispatch.register_kernel(OP, "triton", "_fastat_test_kernels:fast")
    _dispatch.register_kernel(OP, "cuda", "_fastat_no_such_module:kernel")  # never imported on CPU
    _dispatch.set_auto_order("cpu", ("cuda", "triton"), op=OP)
    # make the test independent of this machine: every backend "available", every device accepted
    monkeypatch.setattr(_dispatch, "backend_status", lambda name: (name != "cuda", "cuda: not built (test)"))
    monkeypatch.setattr(_dispatch, "device_refusal", lambda backend, device_type: None)
    yield loaded
    _dispatch._REGISTRY.pop(OP, None)
    for key in [k for k in _dispatch._LOADED if k[0] == OP]:
        del _dispatch._LOADED[key]
    _dispatch._AUTO_ORDER_PER_OP.pop((OP, "cpu"), None)
    _dispatch._WARNED.difference_update({m for m in _dispatch._WARNED if OP in m})


def test_registration_is_lazy(throwaway):
    assert "_fastat_no_such_module" not in sys.modules
    assert _dispatch.registered_backends(OP) == ["cuda", "torch", "triton"]


def test_auto_picks_kernel_then_warns_once_on_refusal(throwaway):
    cpu = torch.device("cpu")
    fastat.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.call(OP, cpu, 0.5) == ("triton", 0.5)
    with pytest.warns(UserWarning, match=f"fastat.{OP}: falling back to the torch reference.*triton: x=2.0 exceeds 1.0"):
        assert _dispatch.call(OP, cpu, 2.0) == ("torch", 2.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _dispatch.call(OP, cpu, 2.0) == ("torch", 2.0)  # same reason: warned already
    assert not [w for w in seen if OP in str(w.message)]
    with pytest.warns(UserWarning, match="x=3.0 exceeds 2.5"):  # a new reason warns again
        assert _dispatch.call(OP, cpu, 3.0, limit=2.5) == ("torch", 3.0)
    assert "_fastat_no_such_module" not in sys.modules  # cuda was unavailable: skipped, never loaded


def test_explicit_refusal_raises_naming_the_op(throwaway, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_backend, "_requested", "triton")
    assert _dispatch.call(OP, cpu, 0.5) == ("triton", 0.5)
    with pytest.raises(BackendUnavailableError, match=f"fastat.{OP}: backend 'triton' cannot run this call: x=2.0 exceeds 1.0"):
        _dispatch.call(OP, cpu, 2.0)
    monkeypatch.setattr(_backend, "_requested", "cpp")
    with pytest.raises(BackendUnavailableError, match=f"fastat.{OP}.*has no kernel"):
        _dispatch.call(OP, cpu, 0.5)
    monkeypatch.setattr(_backend, "_requested", "cuda")
    with pytest.raises(BackendUnavailableError, match="not built"):
        _dispatch.call(OP, cpu, 0.5)
    monkeypatch.setattr(_backend, "_requested", "torch")
    assert _dispatch.call(OP, cpu, 5.0) == ("torch", 5.0)


def test_auto_order_per_op_overrides_device_order(throwaway):
    cpu = torch.device("cpu")
    fastat.set_backend("auto")
    _dispatch.set_auto_order("cpu", (), op=OP)
    assert _dispatch.call(OP, cpu, 0.5) == ("torch", 0.5)
    _dispatch.set_auto_order("cpu", ("triton",), op=OP)
    assert _dispatch.call(OP, cpu, 0.5) == ("triton", 0.5)


def test_import_touches_neither_triton_nor_cuda():
    code = (
        "import sys, torch, fastat\n"
        "x = torch.randn(2, 3)\n"
        "fastat.pgd_step(x, fastat.noisy_input(x, x, 0.5, 0.5), 0.1, 1.0)\n"
        "assert 'triton' not in sys.modules, 'importing fastat imported triton'\n"
        "assert not torch.cuda.is_initialized(), 'importing fastat initialised CUDA'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTAT_BACKEND"] = "torch"  # no JIT build of a compiled extension inside this check
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr


def test_first_call_traces_under_torch_compile_fullgraph():
    """A fresh process whose very first fastat call is inside torch.compile(fullgraph=True) (auto backend):
    dispatch must not import or probe the disk while tracing."""
    script = (
        "import torch, fastat\n"
        "def f(x0, n, d, p):\n"
        "    xt = fastat.noisy_input(x0, n, 0.5, 0.8, d)\n"
        "    return fastat.equivariant_mse(p * xt, n, d, 0.8)\n"
        "x0, n, d = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)\n"
        "p = torch.tensor(1.5, requires_grad=True)\n"
        "got = torch.compile(f, fullgraph=True, backend='eager')(x0, n, d, p)\n"
        "torch.testing.assert_close(got, f(x0, n, d, p))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTAT_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_auto_skips_a_kernel_below_its_measured_sample_size(monkeypatch):
    """auto uses a backend only for samples of at least its measured break-even size; explicit choice ignores it."""
    op = "_fastat_test_sized"
    module = types.ModuleType("_fastat_test_sized_kernels")
    module.reference = lambda x: "torch"
    module.fast = lambda x: "cpp"
    monkeypatch.setitem(sys.modules, "_fastat_test_sized_kernels", module)
    monkeypatch.setattr(_dispatch, "backend_status", lambda name: (True, "test"))
    monkeypatch.setattr(_dispatch, "device_refusal", lambda backend, device_type: None)
    monkeypatch.setattr(_dispatch, "_built", lambda backend: True)
    monkeypatch.setitem(_dispatch._AUTO_MIN_SAMPLE_NUMEL, ("cpp", "cpu"), 32)
    _dispatch.register_kernel(op, "torch", "_fastat_test_sized_kernels:reference")
    _dispatch.register_kernel(op, "cpp", "_fastat_test_sized_kernels:fast")
    try:
        cpu = torch.device("cpu")
        fastat.set_backend("auto")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # below break-even is not a refusal: no warning
            assert _dispatch.call(op, cpu, torch.zeros(4096, 2)) == "torch"
            assert _dispatch.call(op, cpu, torch.zeros(4096, 31)) == "torch"
        assert _dispatch.call(op, cpu, torch.zeros(2, 32)) == "cpp"
        assert _dispatch.call(op, cpu, torch.zeros(0, 3, 32, 32)) == "cpp"
        monkeypatch.setattr(_backend, "_requested", "cpp")
        assert _dispatch.call(op, cpu, torch.zeros(4096, 2)) == "cpp"
    finally:
        _dispatch._REGISTRY.pop(op, None)
        for key in [k for k in _dispatch._LOADED if k[0] == op]:
            del _dispatch._LOADED[key]
    assert _dispatch.AUTO_CPP_MIN_SAMPLE_NUMEL == 32
