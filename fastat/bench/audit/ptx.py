"""Reading compiled kernels: global load/store widths per pointer parameter (PTX), per kernel (SASS), and
register / spill / stack figures (ptxas -v, cuobjdump --dump-resource-usage).

PTX is not SSA, so a load's address is traced back through every definition of each register it uses
until the `ld.param` of a pointer parameter: that parameter is the tensor the access belongs to.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_REG = re.compile(r"%[a-z]+\d+")
_PARAM_DECL = re.compile(r"\.param\s+(\.\w+)\s*(\.ptr)?[^,)]*?\s(\w+_param_(\d+))")
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_WIDTH = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
          "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64, "b128": 128}
NO_DEST = ("st.", "bra", "ret", "bar.", "barrier", "exit", "trap", "membar", "fence", "prefetch", "red.", "@")


def _instructions(ptx: str) -> List[Tuple[str, str]]:
    """(opcode, operand text) of every instruction, predicates stripped."""
    out = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line.startswith((".", "$", "}", "{", "//")) or line.endswith(":"):
            continue
        line = line.rstrip(";").strip()
        if line.startswith("@"):
            line = line.split(None, 1)[1] if " " in line else ""
        if not line:
            continue
        parts = line.split(None, 1)
        out.append((parts[0], parts[1] if len(parts) > 1 else ""))
    return out


def access_width(opcode: str) -> int:
    """Bits moved per thread by an ld/st opcode: vector count x element width (ld.global.v4.b32 -> 128)."""
    fields = opcode.split(".")
    vec = 1
    width = 0
    for f in fields:
        if f.startswith("v") and f[1:].isdigit():
            vec = int(f[1:])
        elif f in _WIDTH:
            width = _WIDTH[f]
    return vec * width


def params(ptx: str) -> Dict[str, Tuple[int, bool]]:
    """{param symbol: (index, is_pointer)} of the (first) entry function."""
    out = {}
    for m in _PARAM_DECL.finditer(ptx):
        out[m.group(3)] = (int(m.group(4)), m.group(2) is not None or m.group(1) == ".u64")
    return out


def entry_name(ptx: str) -> Optional[str]:
    m = _ENTRY.search(ptx)
    return m.group(1) if m else None


def global_accesses(ptx: str) -> List[Dict]:
    """Every ld.global / st.global: {"kind": "load"|"store", "width": bits, "params": [pointer param indices]}."""
    decl = params(ptx)
    defs: Dict[str, List[Tuple[str, str]]] = {}
    accesses = []
    for opcode, operands in _instructions(ptx):
        if opcode.startswith(("ld.global", "st.global")):
            address = re.search(r"\[([^\]]*)\]", operands)
            accesses.append((opcode, _REG.findall(address.group(1)) if address else []))
        if opcode.startswith(NO_DEST):
            continue
        if opcode.startswith("ld.param"):
            m = re.search(r"\[\s*(\w+)", operands)
            dests = _REG.findall(operands.split(",")[0])
            for d in dests:
                defs.setdefault(d, []).append(("param", m.group(1) if m else ""))
            continue
        if operands.startswith("{"):
            dest_text, _, src_text = operands.partition("}")
        else:
            dest_text, _, src_text = operands.partition(",")
        for d in _REG.findall(dest_text):
            defs.setdefault(d, []).append(("op", src_text))
    result = []
    for opcode, regs in accesses:
        seen, todo, found = set(), list(regs), set()
        while todo:
            reg = todo.pop()
            if reg in seen:
                continue
            seen.add(reg)
            for kind, text in defs.get(reg, []):
                if kind == "param":
                    if text in decl and decl[text][1]:
                        found.add(decl[text][0])
                else:
                    todo.extend(_REG.findall(text))
        result.append({"kind": "load" if opcode.startswith("ld") else "store", "width": access_width(opcode),
                       "params": sorted(found)})
    return result


def param_types(ptx: str) -> List[str]:
    """PTX parameter types in order (".u64 .ptr", ".f32", ".u32", ...) of the entry function."""
    out = []
    for m in _PARAM_DECL.finditer(ptx):
        out.append(m.group(1) + (" .ptr" if m.group(2) else ""))
    return out


def fingerprint(ptx: str) -> Tuple:
    """What identifies a variant independently of its access widths: entry name, threads per block, parameter
    types, and per pointer parameter the bytes one thread loads and stores (the same whether moved in 16-bit
    or 128-bit pieces; it changes with the tile size and with the constexpr switches)."""
    threads = re.search(r"\.reqntid\s+(\d+)", ptx)
    per = {}
    for a in global_accesses(ptx):
        for p in a["params"]:
            slot = per.setdefault(p, [0, 0])
            slot[0 if a["kind"] == "load" else 1] += a["width"] // 8
    return (entry_name(ptx), int(threads.group(1)) if threads else None, tuple(param_types(ptx)),
            tuple(sorted((p, l, s) for p, (l, s) in per.items())))


def widths_by_param(ptx: str) -> Dict[int, Dict[str, Dict[int, int]]]:
    """{param index: {"load": {width: count}, "store": {width: count}}}; accesses whose address mixes several
    pointer parameters (none in fastat's kernels) are listed under each."""
    out: Dict[int, Dict[str, Dict[int, int]]] = {}
    for a in global_accesses(ptx):
        for p in a["params"] or [-1]:
            slot = out.setdefault(p, {"load": Counter(), "store": Counter()})
            slot[a["kind"]][a["width"]] += 1
    return {p: {k: dict(v) for k, v in d.items()} for p, d in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# ptxas / cuobjdump.


def triton_tool(name: str) -> Optional[str]:
    """A CUDA binary utility shipped with Triton's NVIDIA backend (ptxas, cuobjdump, nvdisasm), else on PATH."""
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which(name)


_PTXAS_FUNC = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> Dict[str, Dict[str, int]]:
    """{mangled kernel: {registers, stack, spill_stores, spill_loads}} from `ptxas -v` output."""
    out: Dict[str, Dict[str, int]] = {}
    kernel = None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            kernel = m.group(1)
            out.setdefault(kernel, {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0})
            continue
        if kernel is None:
            continue
        m = _PTXAS_STACK.search(line)
        if m:
            out[kernel].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            out[kernel]["registers"] = int(m.group(1))
    return out


def triton_ptxas(capability: int = 90) -> Optional[str]:
    """The ptxas Triton's NVIDIA backend assembles with for this capability (it may pick a newer one than
    the bundled `ptxas`, e.g. `ptxas-blackwell`, for newer PTX versions)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except Exception:  # an older/newer triton without get_ptxas(capability)
        return triton_tool("ptxas")


def ptxas_triton(ptx: str, arch: str = "sm_90a", ptxas: Optional[str] = None) -> Tuple[Dict[str, int], bytes]:
    """Assemble Triton PTX the way Triton's NVIDIA backend does (-lineinfo -v --regAllocOptLevel=2):
    ({registers, stack, spill_stores, spill_loads}, cubin)."""
    ptxas = ptxas or triton_ptxas(int(re.sub(r"\D", "", arch)))
    if ptxas is None:
        raise FileNotFoundError("ptxas not found (neither in triton's NVIDIA backend nor on PATH)")
    with tempfile.TemporaryDirectory(prefix="fastat_ptxas_") as tmp:
        src, out = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o", str(out)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
        stats = parse_ptxas_log(proc.stdout + proc.stderr)
        return (next(iter(stats.values())) if stats else {}), out.read_bytes()


_SASS_FUNC = re.compile(r"Function : (\S+)")
_SASS_MEM = re.compile(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)")


def sass_widths(cubin: bytes) -> Dict[str, Dict[str, Dict[int, int]]]:
    """{kernel: {"load": {bits: count}, "store": {bits: count}}} of the global accesses in the SASS."""
    tool = triton_tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="fastat_sass_") as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {}
    return parse_sass(proc.stdout)


def parse_sass(text: str) -> Dict[str, Dict[str, Dict[int, int]]]:
    out: Dict[str, Dict[str, Counter]] = {}
    kernel = None
    for line in text.splitlines():
        m = _SASS_FUNC.search(line)
        if m:
            kernel = m.group(1)
            out[kernel] = {"load": Counter(), "store": Counter()}
            continue
        if kernel is None:
            continue
        for op, suffix in _SASS_MEM.findall(line):
            bits = 32
            for token in suffix.strip(".").split("."):
                if token in ("128", "64"):
                    bits = int(token)
                elif token in ("U16", "S16"):
                    bits = 16
                elif token in ("U8", "S8"):
                    bits = 8
            out[kernel]["load" if op == "LDG" else "store"][bits] += 1
    return {k: {kind: dict(c) for kind, c in v.items()} for k, v in out.items()}
