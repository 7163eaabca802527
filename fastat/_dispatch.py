"""The operator layer: one torch.library operator per op, and the selector that routes each call to one backend.

An op is declared once, as an `OpDef`: its schema (one argument order, one meaning per name), its fake (meta)
function, its autograd Function, and what each backend's kernel supports (`Support`: devices, dtypes, optional
features, auto's size threshold) -- data from which every refusal reason is derived. The schema is defined once,
as `fastat::<name>`, and again, unchanged, in the namespaces of the compiled backends (`fastat_cpp::<name>`,
`fastat_cuda::<name>`), whose C++ libraries register kernels against it (TORCH_LIBRARY_IMPL; the registration
checks the C++ signature against the schema). Backends contribute kernels and nothing else:

    torch   reference.py   a Python function with the op's signature (the oracle; differentiable by autograd)
    triton  triton_kernels.py   a Python function with the op's signature
    cpp     csrc/cpu       torch.ops.fastat_cpp.<name>     (no Python glue)
    cuda    csrc/cuda      torch.ops.fastat_cuda.<name>    (no Python glue)

Calls. The public function (fastat/ops/<family>/__init__.py) validates, maps the user's arguments onto the
schema, and asks `select` for a `Route` -- the chosen backend's forward and backward kernels -- then
    * when a gradient is needed: `op.function.apply(route, *args)`, the op's one autograd Function, or, where a
      compiled backend has that Function in C++ (residual_loss on cpp and cuda), `route.autograd(*args)`;
    * otherwise: `route.forward(*args)`, the kernel directly;
    * the reference route runs the reference directly either way (autograd records its aten ops, so every
      input, coefficients included, is differentiable).
Under torch.compile the public function calls the operator `torch.ops.fastat.<name>` itself (unless the
explicit backend is the reference, which the compiler traces and fuses), so a compiled graph holds the same op
whatever the backend. At run time the operator's kernel (registered as CompositeExplicitAutograd) asks `select`
again, and its autograd kernel is the same Function over the operator-level route.

Why this shape (callgrind instructions per call on the 2-core CPU box, 8x3x8x8 fp32, noisy_input with the cpp
kernel; eager `alpha*x0 + sigma*noise + delta` is 67k): C++ op through its OpOverload 46k before the kernel's
fixed cost was cut; the same kernel behind a Python CompositeExplicitAutograd kernel (a selector registered on
the op) 66k; behind `torch.library.custom_op` 116k, 257k with its autograd; `torch.autograd.Function.apply`
adds 33k (21k through the C-level apply, used here), a Function with `setup_context` 123k. So the eager path
selects in Python once, from the one cache, and calls the kernel directly; the operator layer is what the
compiler and torch.library see.

Decisions are memoised in fastat._backend.CACHE, keyed by (op, backend choice, device type, dtype, features,
size class); `fastat._backend.forget()` clears them.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _backend, _ext
from ._backend import BACKENDS, CACHE, COMPILED
from ._errors import BackendUnavailableError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")

LIBRARY = torch.library.Library("fastat", "DEF")
# The compiled backends' namespaces: the same schemas, for their C++ kernels to register against.
BACKEND_LIBRARIES = {backend: torch.library.Library(_ext.NAMESPACES[backend], "DEF") for backend in COMPILED}

# Order tried by "auto" per device type before the reference (per op overrides: `set_auto_order`). CUDA tensors:
# the cuda kernels first where the extension is built, else triton. Measured on an H200 (first GPU run,
# benchmarks/results/gpu-h200-2026-11-30-first-run): cuda took at most triton's time per call in all 45 op x shape
# cells (128x3x32x32 to 32x3x512x512, fp32 and bf16, 65536x2, 1x16M); both backends have been rewritten since, so the
# next GPU run measures this again (tools/gpu_acceptance.sh).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
_AUTO_ORDER_PER_OP: Dict[Tuple[str, str], Tuple[str, ...]] = {}
_AUTO_MIN_OVERRIDE: Dict[Tuple[str, str], int] = {}
_WARNED: set = set()
OPS: Dict[str, "OpDef"] = {}
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]  # autograd.Function.apply without its Python wrapper

# Measured break-even of the cpp kernels (benchmarks/cpu_chain.py, 2-core EPYC, 1 thread, eager / cpp): at D = 2
# (65536x2) they lose (noisy_input 0.74x, equivariant_mse fwd+bwd 0.73x, chain 0.92x: per-sample work items cost
# more than the elements they touch); at D = 8 the loss still loses (0.87x); from D = 32 every op wins.
AUTO_CPP_MIN_SAMPLE_NUMEL = 32
_SIZE_STEPS: Tuple[int, ...] = (AUTO_CPP_MIN_SAMPLE_NUMEL,)  # every auto threshold in use (see `select`)


@dataclasses.dataclass(frozen=True)
class Support:
    """What one backend's kernel of one op runs. Every refusal reason is derived from these fields.

    devices: device types of the tensors; dtypes: the data dtype (as the op defines it); features: optional
    features of a call the kernel handles (names from the op's `features`); auto_min_sample_numel: "auto" uses
    the kernel only for samples of at least this many elements (measured break-even; explicit choice ignores
    it); checks_values: the kernel validates the values of its coefficient tensors itself (no Python check)."""

    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    features: Tuple[str, ...] = ()
    auto_min_sample_numel: int = 0
    checks_values: bool = False


class Route(NamedTuple):
    """The kernels one call runs: the forward and backward kernels of one backend."""

    backend: str
    forward: Callable
    backward: Optional[Callable]
    checks_values: bool  # the kernel validates coefficient values (no Python check needed)
    direct: bool  # the reference: call `forward` directly even when a gradient is needed (aten autograd)
    autograd: Optional[Callable] = None  # a compiled backend's differentiable forward (its autograd node in C++)


class OpDef:
    """One operator: schema, fake, autograd and per-backend support, defined once; kernels are looked up lazily.

    name: the op (torch.ops.fastat.<name>); schema: "(args) -> returns"; fake: the meta function;
    python_kernels: backend -> zero-argument loader returning the module that holds that backend's Python kernel
    (an attribute named like the op; compiled backends need none: their kernel is torch.ops.<namespace>.<name>);
    support: backend -> Support; features: feature name -> what it means (for refusal messages); key: args ->
    (device type, data dtype, elements per sample) for the operator-level selector; function: the autograd
    Function (forward(ctx, route, *args)), None for ops without a derivative (autograd falls through: outputs
    never require grad); backward: the OpDef of the backward op whose kernel the Function calls; auto_order:
    device type -> the backends "auto" tries for this op (default: AUTO_ORDER), where measurements say so.
    """

    def __init__(self, name: str, schema: str, *, fake: Callable, python_kernels: Dict[str, Callable],
                 support: Dict[str, Support], key: Callable, features: Optional[Dict[str, str]] = None,
                 function: Optional[type] = None, backward: Optional["OpDef"] = None, public_name: Optional[str] = None,
                 library: Optional[torch.library.Library] = None, auto_order: Optional[Dict[str, Tuple[str, ...]]] = None):
        self.name, self.schema = name, schema
        self.python_kernels, self.support, self.key, self.fake = python_kernels, support, key, fake
        self.features = dict(features or {})
        self.feature_bits = {f: 1 << i for i, f in enumerate(self.features)}
        self.function, self.backward_op = function, backward
        self.public_name = public_name or name
        for device_type, order in (auto_order or {}).items():  # this op's own auto order (a measurement)
            _AUTO_ORDER_PER_OP[(name, device_type)] = tuple(order)
        library = LIBRARY if library is None else library  # another library: tests' throwaway ops
        library.define(name + schema)
        # trailing arguments with defaults (e.g. noisy_input's timesteps): the dispatcher may hand a Python kernel
        # fewer arguments than the schema has; the backends' kernels always take all of them
        parsed = torch._C.parse_schema(f"{library.ns}::{name}{schema}").arguments
        self._defaults = tuple(a.default_value for a in parsed)
        torch.library.register_fake(f"{library.ns}::{name}", fake, lib=library)
        library.impl(name, self._operator_kernel, "CompositeExplicitAutograd")
        for backend, backend_library in BACKEND_LIBRARIES.items():
            if backend in support and library is LIBRARY:
                backend_library.define(name + schema)
                # A backend's kernel is only ever called inside the op's autograd Function or where no gradient is
                # needed: autograd passes through it (no "autograd kernel was not registered" fallback per call).
                backend_library.impl(name, torch.library.fallthrough_kernel, "Autograd")
        self.overload = getattr(getattr(torch.ops, library.ns), name).default
        self.forward_op: Optional[OpDef] = None  # set when this op is another op's backward
        if backward is not None:
            backward.forward_op = self
        # Not differentiable (function None): the op runs below autograd and its outputs never require grad.
        library.impl(name, self._autograd_kernel if function is not None else self._below_autograd, "Autograd")
        if library is LIBRARY:
            OPS[name] = self
        _note_thresholds(support)

    # ----------------------------------------------------------------- the torch.library side

    def _below_autograd(self, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return self.overload(*args)

    @property
    def operator_route(self) -> Route:
        """The Route of a call to the operator itself (torch.compile, torch.ops): its kernels are the operators.
        A backward op's Function differentiates through the forward op, so its route is the forward op's."""
        if self.forward_op is not None:
            return Route("operator", self.forward_op.overload, self._below_autograd, False, False)
        return Route("operator", self._below_autograd, self.backward_op.overload if self.backward_op else None, False, False)

    def _autograd_kernel(self, *args):
        return self.function.apply(self.operator_route, *self._complete(args))

    def _complete(self, args: tuple) -> tuple:
        return args + self._defaults[len(args):] if len(args) < len(self._defaults) else args

    def _operator_kernel(self, *args):
        args = self._complete(args)
        device_type, dtype, numel = self.key(*args)
        route = select(self, device_type, dtype, 0, numel)
        out = route.forward(*args)
        return _conform(out, self.fake(*args)) if route.direct else out

    # ----------------------------------------------------------------- support data -> reasons

    def refusal(self, backend: str, device_type: str, dtype: torch.dtype, features: int) -> Optional[str]:
        """Why `backend`'s kernel cannot run such a call (None if it can), from its Support and this machine."""
        support = self.support.get(backend)
        if support is None:
            return f"backend {backend!r} has no kernel for {self.public_name}"
        ok, why = _backend.backend_status(backend)
        if not ok:
            return why
        if device_type not in support.devices:
            return f"{backend} kernels run on {'/'.join(support.devices)} tensors (got {device_type})"
        why = _backend.device_refusal(backend, device_type)
        if why is not None:
            return why
        if dtype not in support.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in support.dtypes)
            return f"{backend} kernels run {names} (got {str(dtype).replace('torch.', '')})"
        missing = [f for f, bit in self.feature_bits.items() if features & bit and f not in support.features]
        if missing:
            return f"{backend} kernels do not implement {'; '.join(self.features[f] for f in missing)}"
        return None

    def auto_min_sample_numel(self, backend: str, device_type: str) -> int:
        return _AUTO_MIN_OVERRIDE.get((backend, device_type), self.support[backend].auto_min_sample_numel)

    def route(self, backend: str) -> Route:
        """Load `backend`'s kernels of this op (and of its backward op)."""
        forward = kernel(self, backend)
        backward = kernel(self.backward_op, backend) if self.backward_op is not None else None
        autograd = getattr(_ext.module(backend), self.name + "_autograd", None) if backend in COMPILED else None
        return Route(backend, forward, backward, self.support[backend].checks_values, backend == "torch", autograd)

    def __repr__(self) -> str:
        return f"OpDef(fastat::{self.name}{self.schema})"


def _conform(out, template):
    """The reference's outputs in the layout the fake (and every kernel) gives them (run inside the operator)."""
    if isinstance(out, torch.Tensor):
        if out.stride() == template.stride() or out.numel() <= 1:
            return out
        return template.copy_(out)
    return tuple(_conform(o, t) for o, t in zip(out, template))


def _note_thresholds(support: Dict[str, Support]) -> None:
    global _SIZE_STEPS
    steps = {s.auto_min_sample_numel for s in support.values() if s.auto_min_sample_numel > 0}
    _SIZE_STEPS = tuple(sorted(set(_SIZE_STEPS) | steps))


def kernel(op: OpDef, backend: str) -> Callable:
    """The kernel of `op` on `backend`: the Python function, or the compiled library's direct entry (the same C++
    function its TORCH_LIBRARY_IMPL registers for torch.ops.fastat_<backend>.<name>, without torch.ops' generic
    argument handling: ~25k fewer instructions per call)."""
    if backend in COMPILED:
        return getattr(_ext.module(backend), op.name)
    return getattr(op.python_kernels[backend](), op.name)


# --------------------------------------------------------------------------------------------- the selector

def select(op: OpDef, device_type: str, dtype: torch.dtype, features: int, sample_numel: int) -> Route:
    """The Route of one call: decided once per (op, backend choice, device type, dtype, features, size class);
    the size class (how many of auto's size thresholds the sample reaches) matters to "auto" only."""
    choice = _backend._requested or _backend._default or _backend.get_backend()
    size = 0
    if choice == "auto":
        for step in _SIZE_STEPS:
            size += sample_numel >= step
    key = (op.name, choice, device_type, dtype, features, size)
    route = CACHE.get(key)
    if route is None:
        route = CACHE[key] = _decide(op, choice, device_type, dtype, features, sample_numel)
    if route.__class__ is str:
        raise BackendUnavailableError(route)
    return route


def _decide(op: OpDef, choice: str, device_type: str, dtype: torch.dtype, features: int, sample_numel: int):
    """A Route, or the message of the error an explicit choice that cannot run raises."""
    if choice != "auto":
        why = op.refusal(choice, device_type, dtype, features)
        if why is not None:
            return f"fastat.{op.public_name}: backend {choice!r} cannot run this call: {why}"
        try:
            return op.route(choice)
        except BackendUnavailableError as exc:
            return f"fastat.{op.public_name}: backend {choice!r} cannot run this call: {exc}"
    reasons = []
    for backend in _AUTO_ORDER_PER_OP.get((op.name, device_type), AUTO_ORDER.get(device_type, ())):
        if backend not in op.support or not _backend.backend_status(backend)[0] or not _backend.is_built(backend):
            continue  # not installed or not built here: the reference is the expected path, silently
        if device_type not in op.support[backend].devices or _backend.device_refusal(backend, device_type):
            continue
        if sample_numel < op.auto_min_sample_numel(backend, device_type):
            continue  # below the measured break-even: the reference is faster, silently
        why = op.refusal(backend, device_type, dtype, features)
        if why is None:
            try:
                return op.route(backend)
            except BackendUnavailableError as exc:
                why = str(exc)
        reasons.append(f"{backend}: {why}")
    if reasons:
        message = f"fastat.{op.public_name}: falling back to the torch reference ({'; '.join(reasons)})"
        if message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, stacklevel=5)
    return op.route("torch")


def run(op: OpDef, route: Route, args: Sequence, needs_grad: bool):
    """Run one call on `route`: when a gradient is needed, through the backend's autograd kernel in C++ where it has
    one (csrc/cuda/loss_autograd.h), else through the op's autograd Function; otherwise the kernel directly."""
    if needs_grad and not route.direct:
        if torch._C._are_functorch_transforms_active():
            return op.function.apply(route, *args)
        if route.autograd is not None:
            return route.autograd(*args)
        return _C_APPLY(op.function, route, *args)
    return route.forward(*args)


def compiling() -> bool:
    """True while torch.compile traces: the public functions then call the operator itself."""
    return torch.compiler.is_compiling()


def traced_as_reference() -> bool:
    """Under torch.compile with the reference chosen explicitly, trace the reference (the compiler fuses it)."""
    return _backend.choice() == "torch"


def feature_bits(op: OpDef, **flags: bool) -> int:
    bits = 0
    for name, on in flags.items():
        if on:
            bits |= op.feature_bits[name]
    return bits


# ----------------------------------------------------------------------------------- user-level controls

def set_auto_order(device_type: str, order: Tuple[str, ...], op: Optional[str] = None) -> None:
    """Backends "auto" tries (before the reference) for `device_type`, for all ops or one op."""
    if op is None:
        AUTO_ORDER[device_type] = tuple(order)
    else:
        _AUTO_ORDER_PER_OP[(op, device_type)] = tuple(order)
    _backend.forget()


def set_auto_min_sample_numel(backend: str, device_type: str, numel: int) -> None:
    """Let "auto" use `backend` on `device_type` only for samples of at least `numel` elements (every op)."""
    global _SIZE_STEPS
    _AUTO_MIN_OVERRIDE[(backend, device_type)] = int(numel)
    _SIZE_STEPS = tuple(sorted(set(_SIZE_STEPS) | {int(numel)}))
    _backend.forget()


PUBLIC: Dict[str, OpDef] = {}  # public function name -> the operator it runs (fastat.equivariant_mse -> residual_loss)


def register_public(name: str, op: OpDef) -> None:
    PUBLIC[name] = op


def registered_ops() -> List[str]:
    return sorted(OPS)


def registered_backends(name: str) -> List[str]:
    """Backends with a kernel for an operator, or for the operator behind a public function."""
    op = OPS.get(name) or PUBLIC.get(name)
    return sorted(op.support) if op is not None else []


def preload(backend: Optional[str] = None) -> None:
    """Load the kernels of `backend` (default: every available one) now, instead of on the first call
    (imports the Triton modules, loads -- and for cpp builds -- the extensions)."""
    if backend is not None:
        if not isinstance(backend, str) or backend.lower() not in _backend.BACKENDS:
            raise ValueError(f"backend must be None (every available one) or one of {_backend.BACKENDS}, got {backend!r}")
        backend = backend.lower()
    _backend.forget()
    for op in OPS.values():
        for name in op.support:
            if (backend is None or name == backend) and _backend.backend_status(name)[0]:
                if backend is None and name in COMPILED and not _backend.is_built(name):
                    continue  # preload() never starts a compiler; preload("cpp") does
                op.route(name)


def forget_probes() -> None:
    """Older name of fastat._backend.forget."""
    _backend.forget()


__all__ = ["BACKENDS", "OpDef", "Route", "Support", "preload", "registered_backends", "registered_ops", "run",
           "select", "set_auto_min_sample_numel", "set_auto_order"]
