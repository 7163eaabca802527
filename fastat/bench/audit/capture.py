"""What one public fastat call launches on a GPU backend, recorded on a CPU machine.

The call runs on CPU tensors with TRITON_INTERPRET=1 and three recorders installed:

* every Triton launch (`kernel[grid](...)`, whatever glue makes it) is recorded and *not run*: kernel,
  grid, num_warps, constexprs and each argument (tensor dtype/shape/strides/byte offset, or the scalar value);
* every ATen op the glue runs is recorded with the bytes it reads and writes (a TorchDispatchMode), and
  classified: a device kernel, a view or allocation (no kernel), a host read (`.item()`: a device sync),
  or work on host-resident tensors (which on a GPU implies a host-to-device copy where it meets device data);
* the launch planning of fastat's Triton glue is made to plan for the audited GPU (tile sizes and warps of a
  GPU, `sm_count` SMs) instead of for the interpreter.

Value checks that fastat runs only on CPU tensors (`fastat._checks.values_checkable`) are tagged
`cpu_only` (ops whose results feed nothing but a host read) and left out of the GPU counts.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that never launch a device kernel: allocations, views, metadata.
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "_reshape_alias",
    "as_strided", "expand", "detach", "alias", "t", "transpose", "permute", "select", "slice", "squeeze", "unsqueeze",
    "split", "split_with_sizes", "unbind", "unfold", "diagonal", "lift_fresh", "promote_types", "result_type",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_", "resize_", "view_as",
    "expand_as", "_conj", "resolve_conj", "resolve_neg", "record_stream", "size", "stride", "dim",
}
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}
# In-place ops that write `self` without reading it.
WRITE_ONLY_INPLACE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a tensor covers (an expanded, stride-0 view covers its storage once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 1)
    return min(span, t.numel()) * t.element_size()


def tensor_spec(t: torch.Tensor) -> Dict[str, Any]:
    return {
        "dtype": str(t.dtype).replace("torch.", ""),
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "offset_bytes": t.storage_offset() * t.element_size(),
        "numel": t.numel(),
        "element_size": t.element_size(),
        "span_bytes": _span_bytes(t),
    }


def _tensors(tree) -> List[torch.Tensor]:
    out: List[torch.Tensor] = []

    def visit(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(tree)
    return out


_FASTAT_DIR = None


def _from_fastat() -> bool:
    """Whether fastat's own code (not the benchmark case or autograd's seed) is on the Python stack."""
    global _FASTAT_DIR
    import os
    import sys

    if _FASTAT_DIR is None:
        import fastat

        _FASTAT_DIR = os.path.dirname(os.path.abspath(fastat.__file__))
    bench = os.path.join(_FASTAT_DIR, "bench")
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_FASTAT_DIR) and not name.startswith(bench):
            return True
        frame = frame.f_back
    return False


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


class Recorder(TorchDispatchMode):
    """Records ATen ops (see the module docstring) and the fastat custom ops they nest in.

    host_storages: storages that live on the host in the GPU run (e.g. a schedule's CPU table): an op that
    reads one together with device data implies a host-to-device copy of it first."""

    active: Optional["Recorder"] = None  # the recorder the mocked CUDA ops report to

    def __init__(self, events: List[Dict[str, Any]], host_storages=()):
        super().__init__()
        self.events = events
        self.host = set(host_storages)
        self.stack: List[str] = []
        self._producer: Dict[int, int] = {}  # storage -> index of the event that last wrote it
        self._consumers: Dict[int, List[int]] = {}  # event index -> consumer event indices

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace.startswith("fastat"):
            return self._custom(func, args, kwargs)
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _custom(self, func, args, kwargs):
        name = f"{func.namespace}::{func._opname}"
        self.consume(_tensors((args, kwargs)))
        self.events.append({"kind": "op", "op": name, "inside": self.stack[-1] if self.stack else None})
        self.stack.append(name)
        try:
            with self:  # the op's own glue runs under this recorder too
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        finally:
            self.stack.pop()

    def _record(self, func, args, kwargs, out) -> None:
        name = func._opname
        inputs = _tensors((args, kwargs))
        outputs = _tensors(out)
        index = len(self.events)
        in_keys = {_storage_key(t) for t in inputs}
        event: Dict[str, Any] = {"kind": "torch", "op": f"aten.{name}.{func._overloadname}",
                                 "inside": self.stack[-1] if self.stack else None,
                                 "origin": "fastat" if self.stack or _from_fastat() else "caller"}
        host_inputs = [t for t in inputs if _storage_key(t) in self.host and t.numel() > 1]
        device_inputs = [t for t in inputs if _storage_key(t) not in self.host]
        factory_on_host = not inputs and kwargs.get("device") is None and name not in NO_KERNEL
        if inputs and not device_inputs or factory_on_host:
            event["role"] = "host"  # runs on the CPU in the GPU run too
            self.host.update(_storage_key(t) for t in outputs)
        elif name in HOST_READS:
            event["role"] = "host_read"
        elif name in NO_KERNEL or (not name.endswith("_") and outputs and all(_storage_key(t) in in_keys for t in outputs)):
            event["role"] = "none"
        else:
            event["role"] = "kernel"
            written = list(outputs)
            read = list(inputs)
            if name.endswith("_") and inputs:
                written = [inputs[0]]
                if name in WRITE_ONLY_INPLACE:
                    read = inputs[1:]
            event["read"] = sum(_span_bytes(t) for t in read)
            event["write"] = sum(_span_bytes(t) for t in written)
            event["numel"] = max([t.numel() for t in written] or [0])
            if host_inputs:
                event["h2d"] = sum(_span_bytes(t) for t in host_inputs)
        self.consume(inputs)
        for t in outputs:
            self._producer[_storage_key(t)] = index
        self.events.append(event)

    def consume(self, tensors) -> None:
        """The next event reads `tensors`: link it to the events that produced them."""
        index = len(self.events)
        for t in tensors:
            producer = self._producer.get(_storage_key(t))
            if producer is not None:
                self._consumers.setdefault(producer, []).append(index)

    def tag_cpu_only(self) -> None:
        """Mark host reads and the ops that feed only them: value checks fastat runs on CPU tensors only."""
        changed = True
        while changed:
            changed = False
            for i, event in enumerate(self.events):
                if event.get("kind") != "torch" or event.get("cpu_only"):
                    continue
                consumers = self._consumers.get(i, [])
                if event["role"] == "host_read" or (consumers and all(self.events[c].get("cpu_only") for c in consumers)):
                    event["cpu_only"] = True
                    changed = True


# ---------------------------------------------------------------------------------------------------------------
# Triton launches.


def _arg_spec(name: str, value) -> Dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return {"name": name, "tensor": tensor_spec(value)}
    if isinstance(value, bool):
        return {"name": name, "value": value, "type": "bool"}
    if isinstance(value, int):
        return {"name": name, "value": value, "type": "int"}
    if isinstance(value, float):
        return {"name": name, "value": value, "type": "float"}
    if value is None:
        return {"name": name, "value": None, "type": "none"}
    if isinstance(value, torch.dtype):
        return {"name": name, "value": str(value), "type": "dtype"}
    return {"name": name, "value": repr(value), "type": type(value).__name__}


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@contextlib.contextmanager
def record_triton_launches(recorder: "Recorder") -> Iterator[None]:
    """Every Triton launch appends an event instead of running (interpreter and compiled kernels alike)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = list(self.arg_names)
        bound = dict(zip(names, args))
        constexprs = {}
        options = {}
        for key, value in kwargs.items():
            if key in LAUNCH_OPTIONS:
                options[key] = value
            elif key in names:
                bound[key] = value
        params = {p.name: p for p in getattr(self, "params", [])}
        specs = []
        for name in names:
            if name not in bound:
                continue  # a default
            value = bound[name]
            is_constexpr = params[name].is_constexpr if name in params else _is_constexpr_param(fn, name)
            if is_constexpr:
                constexprs[name] = value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)
            else:
                specs.append(_arg_spec(name, value))
        if callable(grid):
            grid = grid(bound)
        grid = list(grid) + [1] * (3 - len(grid))
        recorder.consume([v for v in bound.values() if isinstance(v, torch.Tensor)])
        from fastat import _triton_utils as tu

        spec = tu.KERNELS.get(fn.__name__)
        recorder.events.append({"kind": "triton", "kernel": f"{fn.__module__}:{fn.__name__}", "grid": [int(g) for g in grid],
                                "options": options, "constexprs": constexprs, "args": specs,
                                "rare_args": list(spec.rare) if spec is not None else [],
                                "inside": recorder.stack[-1] if recorder.stack else None})
        return None

    saved = (InterpretedFunction.run, JITFunction.run)
    InterpretedFunction.run = record
    JITFunction.run = record
    try:
        yield
    finally:
        InterpretedFunction.run, JITFunction.run = saved


def _is_constexpr_param(fn, name: str) -> bool:
    import inspect

    annotation = inspect.signature(fn).parameters[name].annotation
    return "constexpr" in str(annotation)


# ---------------------------------------------------------------------------------------------------------------
# Launch planning as on the audited GPU.


@contextlib.contextmanager
def plan_for_gpu(sm_count: int) -> Iterator[None]:
    """Make fastat's Triton glue choose tiles, warps and reduction grids as it would on a GPU with `sm_count` SMs
    (fastat._triton_utils.plan_for_device), while the kernels are recorded under the interpreter."""
    from fastat import _triton_utils as tu

    with tu.plan_for_device(sm_count=sm_count, interpreting=False):
        yield


# ---------------------------------------------------------------------------------------------------------------
# One case.


def capture_call(fn: Callable[[], Any], backend: str, host_tensors=(), sm_count: int = 132,
                 warmup: bool = True) -> List[Dict[str, Any]]:
    """Events of one call of `fn` (fastat's public API) under `backend` ("triton" or "cuda"), after one unrecorded
    warm-up call (as a benchmark times: first-call work such as cached workspaces and tables is not per call)."""
    from fastat._backend import use_backend

    first = Recorder([], host_storages=[_storage_key(t) for t in host_tensors])
    cuda = mock_cuda_kernels(first) if backend == "cuda" else contextlib.nullcontext()
    with plan_for_gpu(sm_count), cuda, use_backend(backend):
        for recording in ([False] if warmup else []) + [True]:
            recorder = Recorder([], host_storages=[_storage_key(t) for t in host_tensors]) if recording else first
            Recorder.active = recorder
            with record_triton_launches(recorder), recorder:
                fn()
    recorder.tag_cpu_only()
    return recorder.events


# ---------------------------------------------------------------------------------------------------------------
# The CUDA backend without a GPU: fastat's operators are defined in Python (fastat._dispatch.OpDef) and the CUDA library
# only registers kernels for them; here each fastat_cuda::<op> gets a CPU kernel that records the call (expanded later
# by `cuda_model`) and returns the op's fake outputs.


def _spec_or_value(value):
    if isinstance(value, torch.Tensor):
        return tensor_spec(value)
    if isinstance(value, (list, tuple)):
        return [_spec_or_value(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


_CUDA_LIB = {}


def _record_cuda_call(name: str, arg_names, args) -> None:
    record = Recorder.active
    if record is not None:
        record.consume(_tensors(args))
        record.events.append({"kind": "cuda", "op": name, "args": dict(zip(arg_names, map(_spec_or_value, args))),
                              "inside": record.stack[-1] if record.stack else None})


@contextlib.contextmanager
def mock_cuda_kernels(recorder: "Recorder") -> Iterator[None]:
    """Register a CPU kernel for each fastat_cuda::<op> that records the call and returns the op's fake outputs, and
    make the CUDA backend count as available for CPU tensors (its library is not loaded)."""
    from fastat import _backend, _dispatch, _ext

    import types

    library = _dispatch.BACKEND_LIBRARIES["cuda"]
    if "cuda" not in _CUDA_LIB:
        entries = {}
        for name, op in list(_dispatch.OPS.items()):
            arg_names = [a.name for a in torch._C.parse_schema(f"x::{name}{op.schema}").arguments]

            def impl(*args, _name=name, _arg_names=arg_names, _fake=op.fake):
                _record_cuda_call(_name, _arg_names, args)
                return _fake(*args)

            library.impl(name, impl, "CPU")
            entries[name] = impl
        _CUDA_LIB["cuda"] = types.SimpleNamespace(**entries)  # the direct Python entries of a loaded library
    saved_modules = dict(getattr(_ext, "_modules", {}))
    if hasattr(_ext, "_modules"):
        _ext._modules["cuda"] = _CUDA_LIB["cuda"]
    import dataclasses

    saved = (dict(_ext._loaded), _backend.device_refusal, getattr(_dispatch, "device_refusal", None), _backend._cuda_available)
    real_refusal = saved[1]
    supports = {name: dict(op.support) for name, op in _dispatch.OPS.items()}
    for op in _dispatch.OPS.values():  # the kernels run on CPU tensors here (they are recorded, not run)
        if "cuda" in op.support:
            op.support["cuda"] = dataclasses.replace(op.support["cuda"], devices=tuple(op.support["cuda"].devices) + ("cpu",))
    _ext._loaded["cuda"] = "recorded by the kernel audit (no GPU)"
    refusal = lambda b, device_type: None if b == "cuda" else real_refusal(b, device_type)  # noqa: E731
    _backend.device_refusal = refusal
    if saved[2] is not None:
        _dispatch.device_refusal = refusal
    _backend._cuda_available = lambda: True
    _backend.forget()
    Recorder.active = recorder
    try:
        yield
    finally:
        Recorder.active = None
        _ext._loaded.clear()
        _ext._loaded.update(saved[0])
        if hasattr(_ext, "_modules"):
            _ext._modules.clear()
            _ext._modules.update(saved_modules)
        _backend.device_refusal, _backend._cuda_available = saved[1], saved[3]
        for name, support in supports.items():
            _dispatch.OPS[name].support.clear()
            _dispatch.OPS[name].support.update(support)
        if saved[2] is not None:
            _dispatch.device_refusal = saved[2]
        _backend.forget()
