"""Kernel audit: the GPU kernels' codegen, launches and bytes, read on a CPU machine (tools/kernel_audit.py).

    run(out_dir=None, shapes=None, backends=("triton", "cuda")) -> {"rows", "kernels", "checks", "meta", ...}

1. capture (subprocess, TRITON_INTERPRET=1): every case of fastat.bench.ops at each audited shape, through the
   public API, with Triton launches, ATen glue and the CUDA backend's op calls recorded (`capture`);
2. compile (subprocess, real Triton): each distinct Triton variant for sm_90 as the runtime specialises it
   (`triton_aot`), and every CUDA kernel with nvcc -Xptxas -v (`cuda_aot`); widths from PTX/SASS (`ptx`);
3. model: bytes per launch, floors, estimated time and fraction of the copy roofline (`model`);
4. checks (`checks`) and the markdown/JSON report (`report`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import cuda_model, model

ROOT = Path(__file__).resolve().parents[3]


def _python_env(interpret: bool) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default (triton 3.9 warns when unset)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _stage(args: List[str], interpret: bool, log, triton_path: Optional[str] = None) -> None:
    cmd = [sys.executable, "-m", "fastat.bench.audit.stages"] + args
    env = _python_env(interpret)
    if triton_path:  # another Triton install first on the path (the archive's version)
        env["PYTHONPATH"] = triton_path + os.pathsep + env["PYTHONPATH"]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=3600)
    for line in proc.stderr.splitlines()[-200:]:
        log(line)
    if proc.returncode != 0:
        raise RuntimeError(f"audit stage {args[0]} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def run(shapes: Optional[Iterable[str]] = None, backends: Iterable[str] = ("triton", "cuda"),
        log: Callable[[str], None] = print, cache_dir: Optional[str] = None, gpu_archive: Optional[str] = None,
        raw: Optional[str] = None, archive_triton: Optional[str] = None) -> Dict:
    """Run the whole audit; returns {"meta", "rows", "kernels", "cuda_kernels", "checks", "validation"}.
    raw: a JSON file for the captured events and compiled variants: written after a run, read instead of
    capturing and compiling when it exists (to re-model without recompiling).
    gpu_archive: a GPU run's Triton cache to compare with (`validate`); archive_triton: a folder holding the
    archive's Triton version (`pip install --target DIR triton==X`) for the exact PTX comparison."""
    from . import checks, cuda_aot, stages

    start = time.time()
    shapes = list(shapes or stages.AUDIT_SHAPES)
    backends = list(backends)
    if raw and Path(raw).exists():
        captured, compiled = json.loads(Path(raw).read_text())
        log(f"captured events and compiled variants read from {raw}")
    else:
        captured, compiled = _capture_and_compile(shapes, backends, log)
        if raw:
            Path(raw).write_text(json.dumps([captured, compiled]))
    keys = iter(compiled["keys"])
    variants = compiled["variants"]
    for c in captured:
        for e in c.get("events", []):
            if e["kind"] == "triton":
                e["variant"] = next(keys)
    cuda_kernels: Dict[str, Any] = {}
    if "cuda" in backends:
        log("compile CUDA kernels (nvcc sm_90, -Xptxas -v)")
        cuda_kernels = cuda_aot.compile_kernels(Path(cache_dir) if cache_dir else None, log)
    rows = [build_row(c, variants, cuda_kernels) for c in captured]
    kernels = kernel_table(captured, variants)
    result = {
        "meta": {"model": model.CONSTANTS, "arch": "sm_90", "shapes": {s: stages.AUDIT_SHAPES[s] for s in shapes},
                 "triton": _version("triton"), "torch": _version("torch"), "seconds": None},
        "rows": rows, "kernels": kernels, "cuda_kernels": cuda_kernels,
    }
    if gpu_archive:
        from .validate import against_archive

        log(f"validate against the GPU runtime's kernels in {gpu_archive}")
        archive_ptx = None
        if archive_triton:
            archive_ptx = _compile_ptx_with(archive_triton, captured, log)
        result["validation"] = against_archive(gpu_archive, kernels, archive_ptx)
    result["checks"] = checks.run_all(result)
    result["meta"]["seconds"] = round(time.time() - start, 1)
    return result


def _capture_and_compile(shapes: List[str], backends: List[str], log):
    with tempfile.TemporaryDirectory(prefix="fastat_audit_") as tmp:
        captured_path, launches_path, compiled_path = (Path(tmp) / n for n in ("capture.json", "launches.json", "compiled.json"))
        log("capture (TRITON_INTERPRET=1, launches recorded, nothing run)")
        _stage(["capture", str(captured_path), "--shapes", ",".join(shapes), "--backends", ",".join(backends)], True, log)
        captured = json.loads(captured_path.read_text())["cases"]
        launches = [e for c in captured for e in c.get("events", []) if e["kind"] == "triton"]
        launches_path.write_text(json.dumps(launches))
        log(f"compile {len(launches)} Triton launches for sm_90")
        _stage(["compile", str(launches_path), str(compiled_path)], False, log)
        compiled = json.loads(compiled_path.read_text())
    return captured, compiled


def _compile_ptx_with(triton_path: str, captured: List[Dict[str, Any]], log) -> Dict[str, str]:
    """{variant (local key): PTX} of every recorded launch compiled with the Triton found in `triton_path`."""
    launches = [e for c in captured for e in c.get("events", []) if e["kind"] == "triton"]
    with tempfile.TemporaryDirectory(prefix="fastat_audit_other_triton_") as tmp:
        paths = [Path(tmp) / n for n in ("launches.json", "compiled.json")]
        paths[0].write_text(json.dumps(launches))
        ptx_dir = Path(tmp) / "ptx"
        log(f"compile the variants again with the triton in {triton_path}")
        _stage(["compile", str(paths[0]), str(paths[1]), "--ptx-dir", str(ptx_dir)], False, log, triton_path=triton_path)
        other_keys = json.loads(paths[1].read_text())["keys"]
        out = {}
        for launch, other in zip(launches, other_keys):
            path = ptx_dir / f"{other}.ptx"
            if path.exists():
                out[launch["variant"]] = path.read_text()
        return out


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def build_row(c: Dict[str, Any], variants: Dict[str, Any], cuda_kernels: Dict[str, Any]) -> Dict[str, Any]:
    shape = c["shape"]
    numel = model.prod(shape)
    elt = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[c["dtype"]]
    row: Dict[str, Any] = {"suite": "audit", "case": c["case"], "shape_name": c["shape_name"],
                           "shape": "x".join(map(str, shape)), "numel": numel, "dtype": c["dtype"], "provider": c["backend"]}
    if "error" in c:
        row["error"] = c["error"]
        return row
    launches: List[Dict[str, Any]] = []
    host_reads = 0
    for e in c["events"]:
        if e.get("cpu_only"):
            continue
        if e["kind"] == "triton":
            entry = model.triton_launch(e, variants.get(e["variant"]))
            entry["variant"] = e["variant"]
            launches.append(entry)
        elif e["kind"] == "cuda":
            for l in cuda_model.launches(e["op"], e["args"]):
                launches.append(model.cuda_launch(l, cuda_kernels, elt))
        elif e["kind"] == "torch":
            if e["role"] == "kernel":
                launches.append(model.torch_launch(e))
            elif e["role"] == "host_read":
                host_reads += 1
    row.update(model.summarize(c["case"], numel, shape[0], elt, c["bench_multiple"], launches, host_reads))
    row["kernels"] = [{k: v for k, v in l.items() if k in ("kind", "name", "blocks", "threads", "registers", "read", "write",
                                                             "serial", "parallelism", "variant", "streams", "vector", "origin")}
                      | {"est_us": round(l["est_us"], 2)} for l in launches]
    return row


def kernel_table(captured: List[Dict[str, Any]], variants: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One entry per compiled Triton variant: where it is used, its launch shape, registers, widths per argument."""
    out: Dict[str, Dict[str, Any]] = {}
    for c in captured:
        for e in c.get("events", []):
            if e["kind"] != "triton":
                continue
            v = variants.get(e["variant"], {})
            entry = out.setdefault(e["variant"], {
                "variant": e["variant"], "kernel": e["kernel"].split(":")[1], "num_warps": e["options"].get("num_warps"),
                "constexprs": e["constexprs"], "uses": [],
                "dtypes": sorted({a["tensor"]["dtype"] for a in e["args"] if "tensor" in a}),
                "aligned": all(a["tensor"]["offset_bytes"] % 16 == 0 for a in e["args"] if "tensor" in a),
                "D": next((a.get("value") for a in e["args"] if a["name"] == "D"), e["constexprs"].get("D")),
                "data_args": _data_args(e),
                "error": v.get("error"), "resources": v.get("resources", {}), "per_arg": v.get("per_arg", {}),
                "sass": v.get("sass", {}), "divisible_16": v.get("divisible_16", []), "constants": v.get("constants", []),
                "fingerprint": v.get("fingerprint"), "widths_by_index": v.get("widths_by_index", {}),
                "arg_index": v.get("arg_index", {}),
            })
            use = f"{c['backend']}/{c['shape_name']}/{c['case']}"
            if use not in entry["uses"]:
                entry["uses"].append(use)
    return list(out.values())


def _data_args(event: Dict[str, Any]) -> List[str]:
    """Tensor arguments of the [B, D] data size (not per-sample coefficients, partials or seeds)."""
    sizes = [a["tensor"]["numel"] for a in event["args"] if "tensor" in a]
    biggest = max(sizes or [0])
    return [a["name"] for a in event["args"] if "tensor" in a and a["tensor"]["numel"] == biggest and biggest > 1]
