"""Ahead-of-time compilation of recorded Triton launches for sm_90, specialised exactly as the runtime would.

A launch recorded by `capture` (kernel, argument dtypes / values / byte offsets, constexprs, num_warps) is
bound with Triton's own launcher binder (`create_function_from_signature` + `native_specialize_impl`) for
an sm_90 backend: pointers 16-byte aligned unless their byte offset says otherwise, integers divisible by 16
marked so, integers equal to 1 made constants. The resulting (signature, constexprs, attrs) goes to
`triton.compile` for GPUTarget("cuda", 90, 32): the same call the runtime's JIT makes on an H100/H200.

Runs where TRITON_INTERPRET is unset (the kernels must be JITFunctions, not interpreted functions).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import ptx as ptx_tools

ARCH = 90

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
           "int16": torch.int16}


def _kernel(name: str):
    module, attr = name.split(":")
    fn = getattr(importlib.import_module(module), attr)
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{name} is not a compiled-mode JITFunction (is TRITON_INTERPRET set?)")
    return fn


def _stand_in(spec: Dict[str, Any]) -> torch.Tensor:
    """A tiny CPU tensor with the recorded dtype whose address has the recorded alignment (mod 16 bytes).
    On the GPU a fresh caching-allocator block is 512-byte aligned, so only the view's byte offset matters."""
    dtype = _DTYPES[spec["dtype"]]
    size = torch.empty((), dtype=dtype).element_size()
    base = torch.empty(64 // size + 16, dtype=dtype)  # CPU allocations are 64-byte aligned
    skip = (spec["offset_bytes"] % 16) // size
    view = base[skip:]
    assert (view.data_ptr() - base.data_ptr()) % 16 == spec["offset_bytes"] % 16
    return view


def _launch_kwargs(launch: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(every kernel argument by name, launch options) for the binder."""
    args: Dict[str, Any] = {}
    for a in launch["args"]:
        if "tensor" in a:
            args[a["name"]] = _stand_in(a["tensor"])
        elif a["type"] == "dtype":
            args[a["name"]] = getattr(torch, a["value"].replace("torch.", ""))
        else:
            args[a["name"]] = a["value"]
    args.update(launch["constexprs"])
    return args, dict(launch["options"])


def specialise(launch: Dict[str, Any]):
    """(jit fn, backend, target, options, signature, constexprs, attrs) as the runtime's launcher computes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch["kernel"])
    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args, options = _launch_kwargs(launch)
    bound, specialization, opts = binder(**args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, dict(options), bound, specialization, opts)
    return fn, backend, target, opts, signature, constexprs, attrs


def variant_key(launch: Dict[str, Any]) -> str:
    """Identity of the compiled variant: kernel + signature + constexprs + attributes + options."""
    fn, _, _, opts, signature, constexprs, attrs = specialise(launch)
    blob = json.dumps([launch["kernel"], signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((str(k), repr(v)) for k, v in attrs.items()), opts.num_warps, opts.num_stages],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def compile_launch(launch: Dict[str, Any], ptx_dir: Optional[str] = None) -> Dict[str, Any]:
    """Compile one recorded launch for sm_90 and read the result (see `analyse`)."""
    import triton
    from triton.compiler import ASTSource

    fn, _, target, opts, signature, constexprs, attrs = specialise(launch)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=opts.__dict__)
    divisible = _divisible_names(signature, attrs)
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
        with open(os.path.join(ptx_dir, f"{variant_key(launch)}.ptx"), "w") as f:
            f.write(compiled.asm["ptx"])
    result = analyse(compiled.asm["ptx"], list(signature.items()))
    result.update(kernel=launch["kernel"], num_warps=opts.num_warps, num_stages=opts.num_stages,
                  divisible_16=divisible, constants=sorted(n for n, t in signature.items() if t == "constexpr"
                                                           and n not in launch["constexprs"]),
                  shared=compiled.metadata.shared)
    return result


def _divisible_names(signature: Dict[str, str], attrs) -> List[str]:
    names = list(signature)
    out = []
    for path, values in attrs.items():
        if len(path) == 1 and any(v[0] == "tt.divisibility" for v in values):
            out.append(names[path[0]])
    return sorted(out)


def analyse(ptx: str, signature: List[Tuple[str, str]]) -> Dict[str, Any]:
    """Per-argument access widths (PTX), per-kernel SASS widths, registers / spills / stack (ptxas -v)."""
    runtime = [name for name, ty in signature if ty != "constexpr"]
    by_index = ptx_tools.widths_by_param(ptx)
    per_arg = {}
    for index, widths in by_index.items():
        name = runtime[index] if 0 <= index < len(runtime) else f"param_{index}"
        per_arg[name] = widths
    stats, cubin = ptx_tools.ptxas_triton(ptx, f"sm_{ARCH}a")
    sass = ptx_tools.sass_widths(cubin)
    return {"per_arg": per_arg, "resources": stats, "sass": next(iter(sass.values()), {}),
            "accessed": sorted(per_arg), "fingerprint": ptx_tools.fingerprint(ptx),
            "widths_by_index": {str(k): v for k, v in by_index.items()}, "arg_index": {n: i for i, n in enumerate(runtime)}}


def compile_all(launches: List[Dict[str, Any]], log=print, ptx_dir: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """{variant key: analysis} for the distinct variants among `launches` (each compiled once)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (it compiles real kernels)")
    out: Dict[str, Dict[str, Any]] = {}
    for launch in launches:
        key = variant_key(launch)
        if key in out:
            continue
        try:
            out[key] = compile_launch(launch, ptx_dir)
        except Exception as exc:  # a variant that does not compile is a finding, not a crash of the audit
            out[key] = {"kernel": launch["kernel"], "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        log(f"  compiled {launch['kernel'].split(':')[1]} [{key}]"
            + (f" ERROR {out[key]['error'][:200]}" if "error" in out[key] else
               f" regs {out[key]['resources'].get('registers')} spills {out[key]['resources'].get('spill_stores')}"))
    return out
