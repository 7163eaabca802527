"""Per-op kernel registry and selection.

Each op family registers, per backend, the dotted path of a callable with the same signature as
its reference. The module is imported on first use, so importing fastat never imports triton or a
compiled extension. A kernel may carry an `unsupported(*args, **kwargs) -> str | None` attribute
(set with `refuses_when`) that says why it cannot run one particular call.

The backend is chosen *before* autograd records anything: `select` returns the callable and the
op's public function calls it, so the chosen kernel's own autograd is what gets recorded.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._shapes import per_sample_numel
from ._backend import BackendUnavailableError, backend_status, device_refusal, get_backend

AUTO_CPP_MIN_SAMPLE_NUMEL = 32

_REGISTRY: Dict[str, Dict[str, str]] = {}
_LOADED: Dict[Tuple[str, str], Callable] = {}
_WARNED: set = set()

# Order tried by "auto" per device type before the reference. Kernel libraries can reorder this
# per op from measurements (see `set_auto_order`).
_AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
_AUTO_ORDER_PER_OP: Dict[Tuple[str, str], Tuple[str, ...]] = {}

# "auto" skips a kernel (silently: the reference is simply faster there) when the first tensor argument
# has fewer elements per sample than this, keyed by (backend, device type). Measured with
# benchmarks/cpu_chain.py (2-core EPYC, 1 thread, eager / cpp): at D = 2 (65536x2) the cpp kernels lose
# (noisy_input 0.74x, equivariant_mse fwd+bwd 0.73x, chain 0.92x: per-sample work items cost more than the
# elements they touch); at D = 8 the loss still loses (0.87x); from D = 32 every op wins (noisy_input 1.23x,
# loss 1.17x, chain 2.25x), and at 128x3x32x32 the chain is 4.4x (fastat bench).
_AUTO_MIN_SAMPLE_NUMEL: Dict[Tuple[str, str], int] = {("cpp", "cpu"): AUTO_CPP_MIN_SAMPLE_NUMEL}


def set_auto_min_sample_numel(backend: str, device_type: str, numel: int) -> None:
    """Let "auto" use `backend` on `device_type` only for samples of at least `numel` elements."""
    _AUTO_MIN_SAMPLE_NUMEL[(backend, device_type)] = int(numel)


def _big_enough(backend: str, device_type: str, args) -> bool:
    threshold = _AUTO_MIN_SAMPLE_NUMEL.get((backend, device_type), 0)
    if threshold <= 0 or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim == 0:
        return True
    return per_sample_numel(args[0]) >= threshold


def register_kernel(op: str, backend: str, target: str) -> None:
    """Register `target` ("package.module:function") as `op`'s kernel on `backend`."""
    _REGISTRY.setdefault(op, {})[backend] = target
    if backend == "torch":  # plain torch: load now, so torch.compile never traces an import
        _load(op, backend)


def preload(backend: Optional[str] = None) -> None:
    """Import the kernels of `backend` (default: every available backend) now, not on first call.

    Needed before `torch.compile(fullgraph=True)` traces a first call: tracing cannot import modules.
    """
    forget_probes()
    for op, kernels in _REGISTRY.items():
        for name in kernels:
            if (backend is None or name == backend) and _status(name)[0]:
                _load(op, name)


def refuses_when(check: Callable[..., Optional[str]]) -> Callable[[Callable], Callable]:
    """Decorator for a kernel: `check(*args, **kwargs)` returns why a call is unsupported, or None."""

    def wrap(fn: Callable) -> Callable:
        fn.unsupported = check
        return fn

    return wrap


def set_auto_order(device_type: str, order: Tuple[str, ...], op: Optional[str] = None) -> None:
    """Backends "auto" tries (before the reference) for `device_type`, for all ops or one op."""
    if op is None:
        _AUTO_ORDER[device_type] = tuple(order)
    else:
        _AUTO_ORDER_PER_OP[(op, device_type)] = tuple(order)


def registered_backends(op: str) -> List[str]:
    return sorted(_REGISTRY.get(op, {}))


def registered_ops() -> List[str]:
    return sorted(_REGISTRY)


def _load(op: str, backend: str) -> Callable:
    key = (op, backend)
    if key not in _LOADED:
        module_name, attr = _REGISTRY[op][backend].split(":")
        _LOADED[key] = getattr(importlib.import_module(module_name), attr)
    return _LOADED[key]


# Machine-level facts, memoised: probing a compiled backend reads the disk, far too slow per call and
# impossible while torch.compile traces. `forget_probes` clears them (set_backend, preload, new builds).
_STATUS: Dict[str, Tuple[bool, str]] = {}
_BUILT: Dict[str, bool] = {}


def forget_probes() -> None:
    _STATUS.clear()
    _BUILT.clear()


def _status(backend: str) -> Tuple[bool, str]:
    if backend not in _STATUS:
        if torch.compiler.is_compiling():
            return False, "not probed before torch.compile tracing (call fastat.preload() first)"
        _STATUS[backend] = backend_status(backend)
    return _STATUS[backend]


def _built(backend: str) -> bool:
    """auto never starts a compiler: a compiled backend counts only once built (fastat._ext.is_built)."""
    if backend not in ("cpp", "cuda"):
        return True
    if backend not in _BUILT:
        if torch.compiler.is_compiling():
            return False
        from . import _ext

        _BUILT[backend] = _ext.is_built(backend)
    return _BUILT[backend]


def _refusal(op: str, backend: str, device_type: str, args, kwargs) -> Optional[str]:
    """Why `backend` cannot run this call of `op`, or None."""
    if backend not in _REGISTRY.get(op, {}):
        return f"backend {backend!r} has no kernel for {op}"
    ok, why = _status(backend)
    if not ok:
        return why
    why = device_refusal(backend, device_type)
    if why is not None:
        return why
    if (op, backend) not in _LOADED and torch.compiler.is_compiling():
        return "kernel not loaded before torch.compile tracing (call fastat.preload() first)"
    check = getattr(_load(op, backend), "unsupported", None)
    return check(*args, **kwargs) if check is not None else None


def select(op: str, device: torch.device, *args, **kwargs) -> Callable:
    """The kernel that runs this call of `op` on `device` under the current backend choice."""
    requested = get_backend()
    if requested != "auto":
        why = _refusal(op, requested, device.type, args, kwargs)
        if why is not None:
            raise BackendUnavailableError(f"fastat.{op}: backend {requested!r} cannot run this call: {why}")
        return _load(op, requested)
    order = _AUTO_ORDER_PER_OP.get((op, device.type), _AUTO_ORDER.get(device.type, ()))
    reasons = []
    for backend in order:
        if backend not in _REGISTRY.get(op, {}) or not _status(backend)[0] or not _built(backend):
            continue  # not built or not installed here: the reference is the expected path
        if not _big_enough(backend, device.type, args):
            continue
        why = _refusal(op, backend, device.type, args, kwargs)
        if why is None:
            return _load(op, backend)
        reasons.append(f"{backend}: {why}")
    if reasons and not torch.compiler.is_compiling():
        message = f"fastat.{op}: falling back to the torch reference ({'; '.join(reasons)})"
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, stacklevel=4)
    return _load(op, "torch")


def call(op: str, device: torch.device, *args, **kwargs):
    """Select the kernel for this call and run it."""
    return select(op, device, *args, **kwargs)(*args, **kwargs)
