"""fastat._ext, the loader of the compiled extensions: status strings, is_built, the cache, the build policy
("auto" never starts a compiler; an explicit "cpp" builds on demand), and what happens without a toolchain
or with a broken one. Scenarios that need a fresh process (empty cache, no compiler) run in a subprocess.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastat
from fastat import _backend, _dispatch, _ext
from fastat._backend import BackendUnavailableError, backend_status


def run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter with extra environment variables; return its stdout."""
    full_env = {**os.environ, **env}
    full_env.pop("FASTAT_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _toolchain_or_built() -> bool:
    return _ext.is_built("cpp") or _ext._toolchain_problem() is None


needs_cpp = pytest.mark.skipif(not _toolchain_or_built(), reason="no C++ toolchain and no built extension")


def test_kinds_are_checked():
    for fn in (_ext.status, _ext.is_built, _ext.load):
        with pytest.raises(ValueError, match="kind must be one of"):
            fn("rocm")


def test_sources_are_found():
    names = {p.name for p in _ext.cpu_sources()}
    assert {"ops.cpp", "noisy_input.cpp", "perturbation.cpp", "losses.cpp"} <= names
    assert (_ext.cpu_sources()[0].parent / "launch.h").is_file()
    # the per-element functors the CPU shares with the CUDA kernels are part of the build and of its fingerprint
    shared = {p.name for p in _ext._headers(_ext.cpu_sources())}
    assert {"noisy_input_ops.cuh", "perturbation_ops.cuh", "losses_ops.cuh", "kernel_utils.cuh", "host_common.h"} <= shared


def test_jit_build_is_named_after_the_isa_level(monkeypatch):
    level = _ext.isa_level()
    assert _ext.cpu_library() == f"fastat_cpu_ops_{level}" and _ext.cpu_build_dir().name == _ext.cpu_library()
    assert ("-mavx2" in _ext.cpu_cflags()) == (level == "avx2")
    # A CPU without AVX2 sharing the cache gets its own portable build, never this one.
    _ext.isa_level.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    try:
        assert _ext.isa_level() == "base" and _ext.cpu_build_dir().name == "fastat_cpu_ops_base"
        assert "-mavx2" not in _ext.cpu_cflags() and "-O3" in _ext.cpu_cflags()
    finally:
        _ext.isa_level.cache_clear()


@needs_cpp
def test_status_after_load_says_where_it_came_from():
    namespace = _ext.load("cpp")
    assert namespace is torch.ops.fastat_cpp
    ok, why = _ext.status("cpp")
    assert ok and why.startswith("built (") and ("cached at" in why or "prebuilt" in why)
    assert _ext.is_built("cpp")
    assert backend_status("cpp") == (True, why)
    fastat.set_backend("cpp")  # available and built: no error


@needs_cpp
def test_auto_on_cpu_uses_cpp_once_built():
    _ext.load("cpp")
    x = torch.randn(4, 3, 8, 8)
    fastat.set_backend("auto")
    for name in ("noisy_input", "pgd_step", "residual_loss", "gaussian_noise"):
        route = _dispatch.select(_dispatch.OPS[name], "cpu", x.dtype, 0, 192)
        assert route.backend == "cpp" and route.forward is getattr(_ext.module("cpp"), name), name
    # random starts: auto on CPU draws with torch's generator (measured faster), cpp runs when chosen
    assert _dispatch.select(_dispatch.OPS["random_perturbation"], "cpu", x.dtype, 0, 192).backend == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_cuda_status_without_gpu():
    ok, why = _ext.status("cuda")
    assert not ok and why == "no CUDA GPU visible to torch"
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        _ext.load("cuda")
    with pytest.raises(BackendUnavailableError, match="not available"):
        fastat.set_backend("cuda")


def test_cli_info_reports_the_extensions(capsys):
    from fastat.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    cpp_line = next(line for line in out.splitlines() if line.strip().startswith("cpp"))
    assert _ext.status("cpp")[1] in cpp_line
    cuda_line = next(line for line in out.splitlines() if line.strip().startswith("cuda"))
    assert _ext.status("cuda")[1] in cuda_line


@pytest.mark.skipif(_ext._toolchain_problem() is not None, reason="needs a C++ compiler and ninja")
def test_auto_never_builds(tmp_path):
    """With an empty cache, auto computes on the reference and leaves the cache empty."""
    out = run_python(
        """
        import warnings, torch, fastat, fastat._ext as e
        from fastat import _dispatch
        from fastat.ops.noisy_input import reference
        ok, why = e.status("cpp")
        assert ok and why.startswith("not built yet: builds on first use"), why
        x = torch.randn(3, 2, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # skipping an unbuilt backend is the expected path: no warning
            y = fastat.noisy_input(x, x, 0.3, 0.4, x)
            fastat.equivariant_mse(x, x, x, 0.5)
            fastat.pgd_step(x, x, 0.1, 1.0)
        assert _dispatch.select(_dispatch.OPS["noisy_input"], "cpu", x.dtype, 0, 32).backend == "torch"
        assert torch.equal(y, reference.noisy_input(x, x, x, None, None, 0.3, 0.4, 0, 0, x.dtype))
        assert not e.is_built("cpp") and "cpp" not in e._loaded
        print("OK", why)
        """,
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert out.startswith("OK not built yet")
    assert not any(tmp_path.rglob("*.so")) and not any(tmp_path.rglob("*.o"))


def test_without_toolchain_status_is_one_line_and_explicit_choice_raises(monkeypatch):
    """As on a machine with no compiler and no cached build (state patched for this test only)."""
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_failed", {})
    _backend.forget()
    monkeypatch.setattr(_ext, "_cached_library", lambda: None)
    monkeypatch.setattr(_ext, "PREBUILT_CPU_MODULE", "fastat._no_such_prebuilt_module")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    ok, why = _ext.status("cpp")
    assert not ok and why.startswith("not built, and cannot build here: no C++ compiler") and "\n" not in why
    assert not _ext.is_built("cpp")
    with pytest.raises(BackendUnavailableError, match=re.escape("no C++ compiler")) as info:
        fastat.set_backend("cpp")
    assert "\n" not in str(info.value)
    with pytest.raises(BackendUnavailableError, match=re.escape("cannot build the fastat C++ extension: no C++ compiler")):
        _ext.load("cpp")
    fastat.set_backend("auto")
    assert _dispatch.select(_dispatch.OPS["noisy_input"], "cpu", torch.float32, 0, 64).backend == "torch"


@pytest.mark.skipif(_ext._toolchain_problem() is not None, reason="needs ninja to reach the compile step")
def test_broken_compiler_fails_once_with_a_clear_error(tmp_path):
    out = run_python(
        """
        import fastat, fastat._ext as e
        for attempt in range(2):
            try:
                e.load("cpp")
            except fastat.BackendUnavailableError as exc:
                message = str(exc)
                assert message.startswith("building the fastat C++ extension failed"), message
                assert "FASTAT_VERBOSE_BUILD=1" in message
            else:
                raise AssertionError("the build should fail")
        ok, why = e.status("cpp")
        assert not ok and why == message, (why, message)
        print("OK")
        """,
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        CXX="/bin/false",
    )
    assert out.strip() == "OK"
    assert not any(tmp_path.rglob("*.so"))


@needs_cpp
def test_cached_build_loads_without_compiler_or_ninja():
    _ext.load("cpp")
    cached = _ext._cached_library()
    if cached is None:
        pytest.skip("the extension came from a prebuilt fastat._C, not the JIT cache")
    out = run_python(
        """
        import torch, fastat, fastat._ext as e
        from fastat import _dispatch
        ok, why = e.status("cpp")
        assert ok and why.startswith("built (cached at"), why
        assert e.is_built("cpp")
        # above the auto break-even sample size (_dispatch.AUTO_CPP_MIN_SAMPLE_NUMEL): auto picks the built kernel
        assert _dispatch.select(_dispatch.OPS["residual_loss"], "cpu", torch.float32, 0, 64).backend == "cpp"
        print("OK", e.status("cpp")[1])
        """,
        TORCH_EXTENSIONS_DIR=str(cached.parent.parent),
        CXX="/nonexistent/c++",
        PATH="/nonexistent",
    )
    assert out.startswith("OK built (cached at")
