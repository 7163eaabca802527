"""Does the ahead-of-time compilation reproduce what the GPU runtime compiled?

A GPU run's Triton cache (one folder per kernel variant with `<kernel>.ptx` and `<kernel>.json`) is compared with
the audit's variants in two ways:

* exact: the audit's variants compiled with the archive's Triton version (`archive_ptx`, see `run`'s
  `archive_triton`) whose PTX code, debug sections and comments aside, is byte-identical to a runtime kernel;
* by fingerprint (local Triton version): a runtime kernel with the same `ptx.fingerprint` (name, threads,
  parameter types, bytes per thread per tensor) and the same access widths per tensor parameter; registers are
  read by assembling both PTX files with the same ptxas.

The archive holds the variants that run happened to compile (its tests' shapes): an audit variant absent from
it is neither confirmed nor contradicted.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import ptx as ptx_tools


def code_of(ptx: str) -> str:
    """PTX without debug sections, .loc/.file lines and comments (they hold paths and line numbers)."""
    cut = ptx.find("\t.section")
    if cut >= 0:
        ptx = ptx[:cut]
    lines = []
    for line in ptx.splitlines():
        text = line.split("//")[0].rstrip()
        if not text.strip() or text.strip().startswith((".loc", ".file", "$L__")):
            continue
        lines.append(text)
    return "\n".join(lines)


def _digest(ptx: str) -> str:
    return hashlib.sha1(code_of(ptx).encode()).hexdigest()


def _load_archive(folder: str) -> Dict[tuple, List[Dict[str, Any]]]:
    out: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for path in sorted(Path(folder).rglob("*.ptx")):
        text = path.read_text()
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        out[_key(ptx_tools.fingerprint(text))].append({"path": str(path), "ptx": text, "meta": meta,
                                                       "widths": ptx_tools.widths_by_param(text), "digest": _digest(text)})
    return out


def _key(fp) -> tuple:
    return json.loads(json.dumps(fp)).__repr__()  # lists and tuples alike after a JSON round trip


def _same_widths(a: Dict, b: Dict, indices=None) -> bool:
    """Same access widths for the parameters `indices` (all when None)."""
    def norm(w):
        return {str(k): {kind: {str(bits): n for bits, n in c.items()} for kind, c in v.items()} for k, v in w.items()
                if indices is None or str(k) in indices}

    return norm(a) == norm(b)


def against_archive(folder: str, kernels: List[Dict[str, Any]], archive_ptx: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """archive_ptx: {variant: PTX of that variant compiled with the archive's Triton version} (exact check)."""
    archive = _load_archive(folder)
    runtime = [c for v in archive.values() for c in v]
    versions = sorted({c["meta"].get("triton_version", "?") for c in runtime})
    by_digest = {c["digest"]: c for c in runtime}
    lines = ["| kernel | variant | used by | same kernel in the archive | [B, D] tensors: local widths = runtime widths | "
             "regs local PTX | regs runtime PTX (same ptxas) |", "|---|---|---|---|---|---|---|"]
    identical = same_widths = 0
    for k in kernels:
        local_widths = k.get("widths_by_index", {})
        regs = (k.get("resources") or {}).get("registers")
        if archive_ptx is not None:
            twin = by_digest.get(_digest(archive_ptx[k["variant"]])) if k["variant"] in archive_ptx else None
            how = "identical PTX code" if twin else "not in archive"
        else:  # no archive-version compile: the same fingerprint is the best available evidence
            candidates = archive.get(_key(k["fingerprint"]), []) if k.get("fingerprint") else []
            twin = next((c for c in candidates if _same_widths(c["widths"], local_widths)), candidates[0] if candidates else None)
            how = f"same fingerprint ({len(candidates)})" if twin else "not in archive"
        if twin is None:
            lines.append(f"| {k['kernel']} | {k['variant'][:8]} | {k['uses'][0]} | {how} | - | {regs} | - |")
            continue
        identical += archive_ptx is not None
        data = {str(k["arg_index"][a]) for a in k.get("data_args", []) if a in k.get("arg_index", {})}
        widths_ok = _same_widths(twin["widths"], local_widths, data)
        same_widths += widths_ok
        try:
            runtime_regs = ptx_tools.ptxas_triton(twin["ptx"])[0].get("registers")
        except (RuntimeError, FileNotFoundError) as exc:
            runtime_regs = f"ptxas: {str(exc)[:60]}"
        lines.append(f"| {k['kernel']} | {k['variant'][:8]} | {k['uses'][0]} | {how} | {'yes' if widths_ok else 'NO'} | "
                     f"{regs} | {runtime_regs} |")
    found = identical if archive_ptx is not None else sum("same fingerprint" in l for l in lines)
    summary = (f"Archive: {len(runtime)} kernels compiled by the GPU runtime (triton {', '.join(versions)}). "
               + (f"{identical} of the {len(kernels)} audit variants, compiled ahead of time with that Triton version from the "
                  f"recorded launches, have PTX code identical to one of them (the same specialisation: alignment, "
                  f"divisibility, constants, tile). " if archive_ptx is not None else
                  f"{found} of the {len(kernels)} audit variants have a runtime kernel with the same fingerprint. ")
               + f"For {same_widths} of those {found} the local Triton's PTX moves the [B, D] tensors with the same access "
               f"widths (per-sample coefficients aside: triton 3.6 loads them 4-8 times per thread, 3.9 once); registers: "
               f"local PTX and runtime PTX assembled by the same ptxas.")
    return {"summary": summary, "identical": identical if archive_ptx is not None else None, "found": found,
            "same_widths": same_widths, "variants": len(kernels), "archive_kernels": len(runtime), "archive_triton": versions,
            "lines": lines}
