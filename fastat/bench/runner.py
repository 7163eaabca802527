"""`fastat bench`: op, step and host-overhead benchmarks for the backends this machine can run, written as JSON,
markdown, PNG.

    run(device, quick, out_dir, suites) -> {"json", "md", "png", "rows", "meta"}

Files: <out_dir>/<device>-<date>[-<suites>][-quick].json/.md/.png (default out_dir ./fastat_bench_out; the
repository's committed results are written with --out benchmarks/results), <device> = "cpu" or the GPU's name; the
suites appear in the name unless they are the default ("ops,steps"). The "steps" suite comes from
fastat.bench.steps.run_step_benchmarks(device, quick=...) when that module exists; "overhead" is
fastat.bench.overhead (host time per call against eager, kernels per call); "audit" writes
<out_dir>/kernel-audit.md/.json (fastat.bench.audit: the GPU kernels read on this machine, no GPU needed).
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

from . import report

SUITES = ("ops", "steps", "overhead", "audit")
DEFAULT_SUITES = ("ops", "steps")  # "overhead", "audit" run when asked for (--suites overhead or ops,overhead)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _step_rows(device, quick: bool, log: Callable[[str], None]):
    """Rows of fastat.bench.steps, or (None, why) when that suite does not exist here."""
    try:
        steps = importlib.import_module("fastat.bench.steps")
    except ModuleNotFoundError as exc:
        if exc.name != "fastat.bench.steps":
            raise
        return None, "fastat.bench.steps is not present in this fastat"
    if not hasattr(steps, "run_step_benchmarks"):
        return None, "fastat.bench.steps has no run_step_benchmarks"
    takes_log = "log" in inspect.signature(steps.run_step_benchmarks).parameters
    try:
        result = steps.run_step_benchmarks(device, quick=quick, **({"log": log} if takes_log else {}))
    except Exception as exc:  # a failing suite must not lose the other suite's results
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return None, f"run_step_benchmarks failed: {type(exc).__name__}: {first}"
    rows = result.get("rows", result) if isinstance(result, dict) else result
    out = []
    for r in rows:
        r = dict(r)
        r["suite"] = "steps"
        out.append(r)
    return out, None


DEFAULT_OUT = "fastat_bench_out"  # in the working directory: never inside the installed package or the source tree


def run(device: str = "cpu", quick: bool = False, out_dir: str = DEFAULT_OUT,
        suites: Optional[Iterable[str]] = None, log: Callable[[str], None] = _log,
        note: Optional[str] = None, compile: Optional[bool] = None, threads: Optional[int] = None) -> Dict:
    """Run the suites on `device` and write the result files; returns their paths, the rows and the meta.

    threads: torch CPU threads for the run (None: leave torch's setting). On a CPU shared with other jobs,
    multi-threaded kernels mostly measure the scheduler (a parallel region waits for a descheduled thread):
    use threads=1 there and say so in `note`."""
    from .ops import run_op_benchmarks

    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run(device, quick, out_dir, suites, log, note, compile, run_op_benchmarks)
    finally:
        torch.set_num_threads(old_threads)


def _run(device, quick, out_dir, suites, log, note, compile, run_op_benchmarks) -> Dict:

    suites = list(DEFAULT_SUITES if suites is None else ([s.strip() for s in suites.split(",")] if isinstance(suites, str) else suites))
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise ValueError(f"suites must be a non-empty subset of {SUITES}, got {suites!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use --device cpu")
    meta = report.machine_meta(dev)
    meta.update(quick=quick, suites=suites, skipped={}, providers=[], note=note)
    rows: List[Dict] = []
    if "ops" in suites:
        log(f"ops suite on {meta['device_name']}{' (quick)' if quick else ''}")
        ops = run_op_benchmarks(dev, quick=quick, compile=compile, log=log)
        rows += ops["rows"]
        meta.update(copy=ops["copy"], providers=ops["providers"])
        meta["skipped"].update(ops["skipped"])
    if "steps" in suites:
        log(f"steps suite on {meta['device_name']}{' (quick)' if quick else ''}")
        step_rows, why = _step_rows(dev, quick, log)
        if step_rows is None:
            meta["skipped"]["steps"] = why
            log(f"  skipped: {why}")
        else:
            rows += step_rows
    if "overhead" in suites:
        from .overhead import run_overhead_benchmarks

        log(f"overhead suite on {meta['device_name']}{' (quick)' if quick else ''}")
        overhead = run_overhead_benchmarks(dev, quick=quick, log=log)
        rows += overhead["rows"]
        meta["overhead_providers"] = overhead["providers"]
        meta["skipped"].update({f"overhead {k}": v for k, v in overhead["skipped"].items()})
    if "audit" in suites:  # sm_90 codegen, launches and bytes per op, read on any machine (fastat.bench.audit)
        from .audit import report as audit_report, run as run_audit

        meta["audit"] = {k: str(v) for k, v in audit_report.write(run_audit(log=log), out_dir).items()}
    for name, why in meta["skipped"].items():
        log(f"skipped column {name}: {why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    named = "" if tuple(suites) == DEFAULT_SUITES else "-" + "-".join(suites)
    stem = f"{report.device_slug(dev)}-{datetime.date.today().isoformat()}{named}{'-quick' if quick else ''}"
    json_path = report.write_json(meta, rows, out / f"{stem}.json")
    md_path = out / f"{stem}.md"
    md_path.write_text(report.markdown(meta, rows) + "\n")
    png = report.plot(meta, rows, out / f"{stem}.png")
    log(f"wrote {json_path}, {md_path}" + (f", {png}" if png else " (no PNG: matplotlib missing or no op rows)"))
    return {"json": json_path, "md": md_path, "png": png, "rows": rows, "meta": meta}
