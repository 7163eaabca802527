"""Backend state: which kernel family runs fastat's ops, which families this machine can run, and the one cache.

Backends:
    torch   the pure-PyTorch reference (every device; the oracle for all kernels)
    triton  fused Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
    cuda    hand-written CUDA C++ kernels (CUDA tensors; needs the CUDA extension)
    cpp     CPU C++ kernels with at::parallel_for (CPU tensors; needs the CPU extension)
    auto    per call: the fastest available kernel for the tensors' device, else the reference

The choice comes from, in order: `use_backend(...)` / `set_backend(...)`, the environment variable
FASTAT_BACKEND, then "auto". Nothing here touches CUDA or imports triton at import time.

`CACHE` is fastat's only memo of facts that are costly to learn: machine probes (is triton importable, is an
extension built) and the dispatch decisions of fastat._dispatch, keyed by tuples (a decision's key holds the
backend choice, so switching backends -- `use_backend` in a loop -- keeps every decision). `forget()` empties it;
it runs when an extension gets loaded (fastat._ext calls it back) and on `fastat.preload()`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional, Tuple

from . import _ext
from ._errors import BackendUnavailableError

__all__ = ["BACKENDS", "BackendUnavailableError", "backend_status", "get_backend", "set_backend", "use_backend"]

BACKENDS = ("torch", "triton", "cuda", "cpp")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "FASTAT_BACKEND"
COMPILED = ("cpp", "cuda")  # backends whose kernels are C++ libraries (fastat._ext)

CACHE: dict = {}
_requested: Optional[str] = None  # None = not set by the user: fall back to the env var
_default: Optional[str] = None  # $FASTAT_BACKEND as last read (None: read it on the next call)


def forget() -> None:
    """Drop every memoised probe and dispatch decision (they are recomputed on the next call)."""
    global _default
    CACHE.clear()
    _default = None


_ext.add_listener(forget)


def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the backend for all later fastat calls ("auto", "torch", "triton", "cuda", "cpp").

    An explicit backend is checked now: if this machine cannot run it the call raises
    BackendUnavailableError saying why (no GPU, triton missing, extension not built).
    """
    global _requested, _default
    name = _check_choice(name)
    _default = None
    if name != "auto":
        ok, why = backend_status(name)
        if not ok:
            raise BackendUnavailableError(f"fastat backend {name!r} is not available: {why}")
    _requested = name


def _env_choice() -> str:
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto"
    try:
        return _check_choice(env.strip())
    except ValueError:
        raise ValueError(f"environment variable {ENV_VAR}={env!r} must be one of {CHOICES}") from None


def get_backend() -> str:
    """The backend in force: the last `set_backend`, else $FASTAT_BACKEND, else "auto"."""
    global _default
    if _requested is not None:
        return _requested
    _default = None  # read the environment again (and keep the answer for the ops' hot path)
    _default = _env_choice()
    return _default


def choice() -> str:
    """get_backend() for the ops' hot path: $FASTAT_BACKEND is read once (os.environ.get costs ~8k instructions)
    and again on every get_backend(), set_backend() and forget()."""
    return _requested or _default or get_backend()



@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed fastat calls on backend `name`, then restore the previous one."""
    global _requested
    previous = _requested
    set_backend(name)
    try:
        yield
    finally:
        _requested = previous


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_version() -> Optional[str]:
    """triton's version, None when not installed, "broken (...)" when its import fails (probed once)."""
    key = ("triton version",)
    if key not in CACHE:
        if importlib.util.find_spec("triton") is None:
            CACHE[key] = None
        else:
            try:
                import triton

                CACHE[key] = triton.__version__
            except Exception as exc:  # a broken install must not break fastat
                CACHE[key] = f"broken ({type(exc).__name__}: {exc})"
    return CACHE[key]


_triton_version = triton_version  # older name, kept for callers outside the core


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def backend_status(name: str) -> Tuple[bool, str]:
    """(available, reason) for one backend on this machine, independent of any tensor (probed once)."""
    name = _check_choice(name)
    key = ("status", name)
    if key not in CACHE:
        CACHE[key] = _probe(name)
    return CACHE[key]


def _probe(name: str) -> Tuple[bool, str]:
    if name in ("torch", "auto"):
        return True, "reference implementation, always available"
    if name == "triton":
        version = triton_version()
        if version is None:
            return False, "triton is not installed (pip install 'fastat[triton]')"
        if version.startswith("broken"):
            return False, f"triton failed to import: {version}"
        if _cuda_available():
            return True, f"triton {version} on CUDA"
        if triton_interpreting():
            return True, f"triton {version} under TRITON_INTERPRET=1 (CPU interpreter, slow)"
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly)"
    if name == "cuda" and not _cuda_available():
        return False, "no CUDA GPU visible to torch"
    return _ext.status(name)


def is_built(name: str) -> bool:
    """Whether a backend's kernels run without starting a compiler (auto never builds); probed once."""
    if name not in COMPILED:
        return True
    key = ("built", name)
    if key not in CACHE:
        CACHE[key] = _ext.is_built(name)
    return CACHE[key]


def device_refusal(backend: str, device_type: str) -> Optional[str]:
    """Why `backend` cannot run on tensors of `device_type` on this machine, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreting()):
            return None
        return f"triton kernels run on CUDA tensors (got {device_type}; CPU needs TRITON_INTERPRET=1)"
    if backend == "cuda":
        return None if device_type == "cuda" else f"cuda kernels need CUDA tensors (got {device_type})"
    if backend == "cpp":
        return None if device_type == "cpu" else f"cpp kernels need CPU tensors (got {device_type})"
    return f"unknown backend {backend!r}"
