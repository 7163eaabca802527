"""Backend state: which kernel family runs fastat's ops, and which families this machine can run.

Backends:
    torch   the pure-PyTorch reference (every device; the oracle for all kernels)
    triton  fused Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
    cuda    hand-written CUDA C++ kernels (CUDA tensors; needs the CUDA extension)
    cpp     CPU C++ kernels with at::parallel_for (CPU tensors; needs the CPU extension)
    auto    per call: the fastest available kernel for the tensors' device, else the reference

The choice comes from, in order: `use_backend(...)` / `set_backend(...)`, the environment
variable FASTAT_BACKEND, then "auto". Nothing here touches CUDA or imports triton at import time.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from typing import Iterator, Optional, Tuple

BACKENDS = ("torch", "triton", "cuda", "cpp")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "FASTAT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine or for this call."""


_requested: Optional[str] = None  # None = not set by the user: fall back to the env var


def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    return name.lower()


def set_backend(name: str) -> None:
    """Select the backend for all later fastat calls ("auto", "torch", "triton", "cuda", "cpp").

    An explicit backend is checked now: if this machine cannot run it the call raises
    BackendUnavailableError saying why (no GPU, triton missing, extension not built).
    """
    global _requested
    name = _check_choice(name)
    if name != "auto":
        ok, why = backend_status(name)
        if not ok:
            raise BackendUnavailableError(f"fastat backend {name!r} is not available: {why}")
        from ._dispatch import preload

        preload(name)
    else:
        from ._dispatch import forget_probes

        forget_probes()
    _requested = name


def get_backend() -> str:
    """The backend in force: the last `set_backend`, else $FASTAT_BACKEND, else "auto"."""
    if _requested is not None:
        return _requested
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return "auto"
    try:
        return _check_choice(env)
    except ValueError:
        raise ValueError(f"environment variable {ENV_VAR}={env!r} must be one of {CHOICES}") from None


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


_cache: dict = {}  # plain dict, not lru_cache: torch.compile traces dict lookups but not imports


def _triton_version() -> Optional[str]:
    if "triton" not in _cache:
        if importlib.util.find_spec("triton") is None:
            _cache["triton"] = None
        else:
            try:
                import triton

                _cache["triton"] = triton.__version__
            except Exception as exc:  # a broken install must not break fastat
                _cache["triton"] = f"broken ({type(exc).__name__}: {exc})"
    return _cache["triton"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _extension_status(kind: str) -> Tuple[bool, str]:
    """(built, reason) for the compiled extensions; fastat._ext owns building and loading them."""
    ext = sys.modules.get("fastat._ext")  # imported by fastat/__init__; no import here (torch.compile traces this)
    if ext is None:
        return False, "fastat._ext (the extension loader) is not imported"
    return ext.status(kind)


def backend_status(name: str) -> Tuple[bool, str]:
    """(available, reason) for one backend on this machine, independent of any tensor."""
    name = _check_choice(name)
    if name in ("torch", "auto"):
        return True, "reference implementation, always available"
    if name == "triton":
        version = _triton_version()
        if version is None:
            return False, "triton is not installed (pip install 'fastat[triton]')"
        if version.startswith("broken"):
            return False, f"triton failed to import: {version}"
        if _cuda_available():
            return True, f"triton {version} on CUDA"
        if triton_interpreting():
            return True, f"triton {version} under TRITON_INTERPRET=1 (CPU interpreter, slow)"
        return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the Triton kernels on CPU, slowly)"
    if name == "cuda":
        if not _cuda_available():
            return False, "no CUDA GPU visible to torch"
        return _extension_status("cuda")
    return _extension_status("cpp")


def device_refusal(backend: str, device_type: str) -> Optional[str]:
    """Why `backend` cannot run on tensors of `device_type`, or None if it can."""
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
