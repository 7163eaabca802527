"""Backend state (set/get/use_backend, FASTAT_BACKEND), availability errors, and the selector (auto order, refusals
derived from each op's support data: warn-once fallback under auto, an error naming the op under an explicit backend;
the one cache; no import cycle inside fastat)."""
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
    assert not fastat.backend_status("triton")[0]  # probes are memoised until fastat._backend.forget()
    _backend.forget()
    assert fastat.backend_status("triton")[0]
    assert _backend.device_refusal("triton", "cpu") is None


def test_device_refusals():
    assert _backend.device_refusal("torch", "cpu") is None and _backend.device_refusal("torch", "cuda") is None
    assert "CUDA tensors" in _backend.device_refusal("cuda", "cpu")
    assert "CPU tensors" in _backend.device_refusal("cpp", "cuda")
    assert _backend.device_refusal("triton", "cuda") is None


def test_every_public_op_has_one_operator_with_a_reference_kernel():
    ops = {"noisy_input", "noisy_input_backward", "gaussian_noise", "pgd_step", "random_perturbation", "residual_loss",
           "residual_loss_backward"}
    assert set(_dispatch.registered_ops()) == ops
    for name in ops:
        op = _dispatch.OPS[name]
        assert "torch" in op.support and hasattr(torch.ops.fastat, name), name
        assert callable(_dispatch.kernel(op, "torch")), name
        for backend in ("cpp", "cuda"):  # compiled backends get the same schema in their own namespace
            assert hasattr(getattr(torch.ops, f"fastat_{backend}"), name), (name, backend)
            same = getattr(torch.ops, f"fastat_{backend}").__getattr__(name).default._schema
            assert str(same).split("(", 1)[1] == str(op.overload._schema).split("(", 1)[1], (name, backend)


def test_auto_on_cpu_uses_reference_unless_cpp(monkeypatch):
    fastat.set_backend("auto")
    for op in _dispatch.OPS.values():
        route = _dispatch.select(op, "cpu", torch.float32, 0, 192)
        assert route.backend in ("torch", "cpp"), op  # never triton or cuda on CPU tensors
        if route.backend == "cpp":
            assert route.forward is getattr(fastat._ext.module("cpp"), op.name)
    # with no compiled kernels available, auto on CPU is exactly the reference (triton is never tried on CPU)
    monkeypatch.setattr(_backend, "backend_status", lambda name: (name in ("torch", "triton"), "test"))
    _backend.forget()
    for op in _dispatch.OPS.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an unavailable backend is the expected path: no warning
            assert _dispatch.select(op, "cpu", torch.float32, 0, 192).backend == "torch", op


def test_decisions_are_cached_once_per_choice_until_forgotten():
    op = _dispatch.OPS["noisy_input"]
    fastat.set_backend("torch")
    route = _dispatch.select(op, "cpu", torch.float32, 0, 8)
    assert _dispatch.select(op, "cpu", torch.float32, 0, 8) is route  # one cache entry, reused
    fastat.set_backend("auto")
    with fastat.use_backend("torch"):  # switching backends keeps the decisions made for each choice
        assert _dispatch.select(op, "cpu", torch.float32, 0, 8) is route
    assert ("noisy_input", "torch", "cpu", torch.float32, 0, 0) in _backend.CACHE
    _backend.forget()
    assert not _backend.CACHE


def fastat_import_graph():
    """{module: fastat modules it imports}, from the source: imports at any depth (a lazy import inside a
    function closes a cycle as surely as one at the top)."""
    import ast
    import pathlib

    root = pathlib.Path(fastat.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        module = ".".join(("fastat",) + path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = (base + ("." + node.module if node.module else "")) if node.level else node.module
                if target and target.startswith("fastat"):
                    edges.add(target)
                    edges.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("fastat"))
        graph[module] = edges
    return {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}


def test_no_import_cycle_inside_fastat():
    """No modules of fastat import each other in a circle, directly or through others."""
    graph = fastat_import_graph()
    assert graph["fastat._dispatch"] >= {"fastat._backend", "fastat._ext"}  # the graph is real
    assert "fastat._dispatch" not in graph["fastat._backend"] and "fastat._backend" not in graph["fastat._ext"]

    # a package's __init__ importing its own submodules is how packages work; a cycle through two siblings is not
    def is_parent(a, b):
        return b.startswith(a + ".")

    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if is_parent(node, nxt) or is_parent(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


# ------------------------------------------------------------------------ a throwaway op for the selector


@pytest.fixture
def throwaway(monkeypatch):
    """An op in its own namespace, with a torch kernel and a "triton" kernel that runs fp32 only (support data),
    a "cuda" kernel that is never available, and every machine probe answered by the test."""
    module = types.ModuleType("_fastat_test_kernels")
    module.throwaway = lambda x: x + 1  # torch
    fast = types.ModuleType("_fastat_test_fast_kernels")
    fast.throwaway = lambda x: x + 2  # triton
    monkeypatch.setitem(sys.modules, "_fastat_test_kernels", module)
    library = torch.library.Library("fastat_test_throwaway", "DEF")
    loaded = []

    def load_fast():
        loaded.append("triton")
        return fast

    op = _dispatch.OpDef(
        "throwaway", "(Tensor x) -> Tensor", fake=lambda x: torch.empty_like(x),
        python_kernels={"torch": lambda: module, "triton": load_fast},
        support={"torch": _dispatch.Support(_dispatch.ANY_DEVICE),
                 "triton": _dispatch.Support(("cpu",), dtypes=(torch.float32,)),
                 "cuda": _dispatch.Support(("cpu",))},
        key=lambda x: ("cpu", x.dtype, 1), library=library)
    monkeypatch.setattr(_backend, "backend_status", lambda name: (name != "cuda", "cuda: not built (test)"))
    monkeypatch.setattr(_backend, "device_refusal", lambda backend, device_type: None)
    _dispatch.set_auto_order("cpu", ("cuda", "triton"), op="throwaway")
    yield op, loaded
    _dispatch._AUTO_ORDER_PER_OP.pop(("throwaway", "cpu"), None)
    _dispatch._WARNED.difference_update({m for m in _dispatch._WARNED if "throwaway" in m})
    library._destroy()


def _call(op, x):
    return _dispatch.select(op, "cpu", x.dtype, 0, 1).forward(x)


def test_kernels_load_lazily(throwaway):
    op, loaded = throwaway
    fastat.set_backend("torch")
    assert _call(op, torch.zeros(1)).item() == 1 and loaded == []
    fastat.set_backend("auto")
    assert _call(op, torch.zeros(1)).item() == 2 and loaded == ["triton"]


def test_auto_picks_kernel_then_warns_once_with_the_reason_from_support_data(throwaway):
    op, _ = throwaway
    fastat.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _call(op, torch.zeros(1)).item() == 2
    message = "fastat.throwaway: falling back to the torch reference .*triton: triton kernels run float32 .got float64."
    with pytest.warns(UserWarning, match=message):
        assert _call(op, torch.zeros(1, dtype=torch.float64)).item() == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _call(op, torch.zeros(1, dtype=torch.float64)).item() == 1  # same reason: warned already
    assert not [w for w in seen if "throwaway" in str(w.message)]
    with pytest.warns(UserWarning, match="got float16"):  # a new reason warns again
        _call(op, torch.zeros(1, dtype=torch.float16))


def test_explicit_refusal_raises_naming_the_op(throwaway, monkeypatch):
    op, _ = throwaway
    monkeypatch.setattr(_backend, "_requested", "triton")
    assert _call(op, torch.zeros(1)).item() == 2
    with pytest.raises(BackendUnavailableError, match="fastat.throwaway: backend 'triton' cannot run this call: "
                                                      "triton kernels run float32 .got float64."):
        _call(op, torch.zeros(1, dtype=torch.float64))
    monkeypatch.setattr(_backend, "_requested", "cpp")
    with pytest.raises(BackendUnavailableError, match="fastat.throwaway.*has no kernel"):
        _call(op, torch.zeros(1))
    monkeypatch.setattr(_backend, "_requested", "cuda")
    with pytest.raises(BackendUnavailableError, match="not built"):
        _call(op, torch.zeros(1))
    monkeypatch.setattr(_backend, "_requested", "torch")
    assert _call(op, torch.zeros(1, dtype=torch.float64)).item() == 1


def test_refusal_reasons_come_from_the_support_data():
    op = _dispatch.OPS["noisy_input"]
    feature = op.feature_bits["coefficient_grad"]
    for backend in ("cpp", "cuda", "triton"):
        assert "coefficient_grad" not in op.support[backend].features
    assert "coefficient_grad" in op.support["torch"].features
    why = op.refusal("triton", "cpu", torch.float32, feature)
    if _backend.backend_status("triton")[0]:
        assert why == "triton kernels do not implement gradients into tensor-valued alpha/sigma"
        assert op.refusal("triton", "cpu", torch.float64, 0) == "triton kernels run float32, float16, bfloat16 (got float64)"
    assert "run on cuda tensors (got cpu)" in op.refusal("cuda", "cpu", torch.float32, 0) or not _backend.backend_status("cuda")[0]
    assert op.refusal("torch", "cpu", torch.float64, feature) is None


def test_auto_order_per_op_overrides_device_order(throwaway):
    op, _ = throwaway
    fastat.set_backend("auto")
    _dispatch.set_auto_order("cpu", (), op="throwaway")
    assert _call(op, torch.zeros(1)).item() == 1
    _dispatch.set_auto_order("cpu", ("triton",), op="throwaway")
    assert _call(op, torch.zeros(1)).item() == 2


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
    op = _dispatch.OPS["noisy_input"]
    assert op.support["cpp"].auto_min_sample_numel == _dispatch.AUTO_CPP_MIN_SAMPLE_NUMEL == 32
    monkeypatch.setattr(_backend, "backend_status", lambda name: (True, "test"))
    monkeypatch.setattr(_backend, "device_refusal", lambda backend, device_type: None)
    monkeypatch.setattr(_backend, "is_built", lambda backend: True)
    monkeypatch.setattr(op, "route", lambda backend: _dispatch.Route(backend, None, None, False, backend == "torch"))
    fastat.set_backend("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below break-even is not a refusal: no warning
        assert _dispatch.select(op, "cpu", torch.float32, 0, 2).backend == "torch"
        assert _dispatch.select(op, "cpu", torch.float32, 0, 31).backend == "torch"
    assert _dispatch.select(op, "cpu", torch.float32, 0, 32).backend == "cpp"
    assert _dispatch.select(op, "cpu", torch.float32, 0, 3072).backend == "cpp"
    monkeypatch.setattr(_backend, "_requested", "cpp")
    assert _dispatch.select(op, "cpu", torch.float32, 0, 2).backend == "cpp"
    monkeypatch.setattr(_backend, "_requested", "auto")
    try:
        _dispatch.set_auto_min_sample_numel("cpp", "cpu", 100)
        assert _dispatch.select(op, "cpu", torch.float32, 0, 64).backend == "torch"
        assert _dispatch.select(op, "cpu", torch.float32, 0, 100).backend == "cpp"
    finally:
        _dispatch._AUTO_MIN_OVERRIDE.pop(("cpp", "cpu"), None)
        _backend.forget()


@pytest.mark.parametrize("choice", ["torch", "cpp"])
def test_torch_compile_sees_the_one_operator_whatever_the_kernel(choice):
    """Under a kernel backend the traced graph holds fastat's operators (torch.ops.fastat.*, the same whatever
    backend supplies the kernel); under backend "torch" the reference is traced as plain aten ops."""
    if choice == "cpp":
        problem = fastat._ext._toolchain_problem() if not fastat._ext.is_built("cpp") else None
        if problem is not None:
            pytest.skip(f"cannot build the C++ extension here: {problem}")

    def f(x0, n, d, p):
        xt = fastat.noisy_input(x0, n, 0.5, 0.8, d)
        return fastat.equivariant_mse(p * xt, n, d, 0.8)

    x0, n, d = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    p = torch.tensor(1.5, requires_grad=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with fastat.use_backend(choice):
        got = torch.compile(f, fullgraph=True, backend=capture)(x0, n, d, p)
        torch.testing.assert_close(got, f(x0, n, d, p))
    targets = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    fastat_ops = {t for t in targets if t.startswith("fastat")}
    if choice == "torch":
        assert not fastat_ops, targets
    else:
        assert fastat_ops == {"fastat.noisy_input.default", "fastat.residual_loss.default"}, targets
    torch._dynamo.reset()


def test_loss_refusal_names_the_public_functions():
    pred = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(4, dtype=torch.float64, requires_grad=True)
    with fastat.use_backend("cpp"):
        if not _backend.is_built("cpp"):
            pytest.skip("cpp extension not built")
        with pytest.raises(BackendUnavailableError, match=r"fastat.residual_loss \(equivariant_mse, "
                                                          r"equivariance_regularizer, consistency_distance\): backend "
                                                          r"'cpp' cannot run this call: .*tensor-valued sigma"):
            fastat.equivariant_mse(pred, torch.randn_like(pred), torch.randn_like(pred), sigma, "delta")
