"""Compile fastat's CUDA kernels for sm_90 on a CPU machine and read what ptxas and the SASS say.

Every csrc/cuda/*.cu is compiled device-only (`nvcc -cubin`, sm_90, the flags of tools/check_cuda_compile.py,
against the installed torch's headers) with `-Xptxas -v`; per kernel instantiation: registers, stack frame,
spill stores/loads (ptxas), and the widths of its global loads and stores (LDG/STG in `cuobjdump -sass`).
Results are cached by the hash of the sources and flags.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from . import ptx as ptx_tools

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc" / "cuda"


def _compile_check_module():
    path = ROOT / "tools" / "check_cuda_compile.py"
    spec = importlib.util.spec_from_file_location("fastat_check_cuda_compile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """`void fastat::elementwise_kernel<4, fastat::NoisyInputOp<float> >(long, fastat::NoisyInputOp<float>)`
    -> `elementwise_kernel<4, NoisyInputOp<float>>`."""
    name = demangled.replace("(anonymous namespace)::", "").replace("fastat::", "").replace("c10::", "")
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return re.sub(r"\s*>", ">", name[:cut]).strip()


def sources() -> List[Path]:
    return sorted(CSRC.glob("*.cu"))


def _digest(flags: List[str]) -> str:
    h = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(CSRC.glob("*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def compile_kernels(cache_dir: Optional[Path] = None, log=print) -> Dict[str, Dict]:
    """{short kernel name: {registers, stack, spill_stores, spill_loads, sass: {load, store}, source}}.

    Empty when nvcc is missing (the CUDA columns of the audit then say so)."""
    check = _compile_check_module()
    nvcc = check.find_nvcc()
    if nvcc is None:
        log("  nvcc not found: CUDA kernels not compiled")
        return {}
    flags = check.NVCC_FLAGS + check.abi_flag()
    cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "fastat_audit_cache"
    cache = cache_dir / f"cuda-{_digest(flags)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix="fastat_audit_nvcc_") as tmp:
        shim = Path(tmp) / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text(check.SHIM)
        includes = check.include_dirs(str(Path(tmp) / "shim"))
        for src in sources():
            cubin = Path(tmp) / f"{src.stem}.cubin"
            cmd = [nvcc, "-cubin", str(src), "-o", str(cubin)] + flags + [f"-I{d}" for d in includes] + ["-Xptxas", "-v"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stderr[-3000:]}")
            stats = ptx_tools.parse_ptxas_log(proc.stdout + proc.stderr)
            sass = ptx_tools.sass_widths(cubin.read_bytes())
            mangled = list(stats)
            for name, pretty in zip(mangled, demangle(mangled)):
                entry = dict(stats[name])
                entry.update(sass=sass.get(name, {}), source=src.name, mangled=name)
                out[short_name(pretty)] = entry
            log(f"  nvcc sm_90 {src.name}: {len(mangled)} kernels")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1, sort_keys=True))
    return json.loads(cache.read_text())  # one form (string width keys) whether cached or fresh
