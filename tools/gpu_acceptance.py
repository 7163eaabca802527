#!/usr/bin/env python3
"""GPU acceptance in one command: everything that needs a GPU, each step under its own time cap.

    bash tools/gpu_acceptance.sh OUT_DIR              # on a bare H100/H200 machine (no package registry)
    bash tools/gpu_acceptance.sh OUT_DIR --dry-run    # on a CPU machine: check the plan (CI runs this)
    options: --only a,b   --skip a,b   --deadline SECONDS (total wall budget, default 540)

Steps, in order (cap in seconds; a step that fails or times out leaves the earlier results in place):

    env        10   GPU, driver, clocks, python/torch/triton/nvcc versions, CPU count, git commit
    build      90   pip install --no-build-isolation --no-deps -e . (builds fastat._C_cuda on all cores)
    tests     120   pytest -m "gpu and not slow", every backend on the device, graph/FSDP tests left for later
    ops        95   op benchmarks (eager, torch.compile, triton, cuda; event time per call, and the profiler's
                    kernels and device time per call against a copy from the same run) + the overhead suite
    steps      70   training steps interleaved: DDPM CIFAR-10 UNet (35.7 M, batch 128, bf16) and the toy 2-D MLP
    capture    35   CUDA-graph capture (GraphedStep) and FSDP2 fully_shard on one process
    sanitize   80   compute-sanitizer memcheck + racecheck on a small subset of every kernel
    big        30   the > 2^31-element test (cuda and triton backends)
                   (sum 530 s < 9 minutes; each cap is clipped to what is left of --deadline)

OUT_DIR receives at most 8 files, no sub-folder, rewritten after every step: summary.md (one page: counts,
headline ratios against the targets), summary.json, tests.md (every failure with its first lines), bench.json,
bench.md, bench.png, log.txt (each step's output, tail-capped). The summary is printed at the end.

The workers (`--worker NAME FILE`) run inside the step subprocesses; they are not meant to be called by hand.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the reports import fastat.bench, installed only after this process started
    sys.path.insert(0, str(ROOT))
PY = sys.executable
OUT_FILES = ("summary.md", "summary.json", "tests.md", "bench.json", "bench.md", "bench.png", "log.txt",
             "triton_kernels.tar.gz")
TRITON_ARCHIVE_LIMIT = 15 * 2**20  # the compiled Triton kernels (PTX + metadata) for the CPU-side kernel audit
LOG_TAIL_CHARS = 60_000  # per step, in log.txt
DEFAULT_DEADLINE = 540
# --rehearse: the workers run on the CPU with tiny shapes, to try the whole pipeline without a GPU.
REHEARSE = os.environ.get("FASTAT_ACCEPTANCE_REHEARSE") == "1"
DEVICE = "cpu" if REHEARSE else "cuda"

# Tests run by the "capture" and "big" steps; "tests" deselects them.
CAPTURE_K = "graph_capture or graphed or graph_capturable or fsdp"
BIG_K = "more_than_2_31"

# Targets of issue 13 (H100/H200), checked in the summary.
TARGETS = {
    "chain_ms_cifar": 0.06,
    "chain_ms_pixel512": 0.52,
    "op_pct_of_copy_at_16M": 85.0,
    "free_p1_ratio": 1.00,
    "pgd_k3_ratio": 2.6,
    "p2_adversarial_ratio": 2.0,
    "p2_adversarial_mem_ratio": 1.3,
    "toy_pgd_k3_ms": 1.0,
}

# Op-benchmark plan: (shape name, shape, dtype, cases also timed under torch.compile), in order of importance.
# Every case runs on eager, triton and cuda; torch.compile costs seconds of compilation per (case, shape), so it is
# timed where docs/design.md ("Reference numbers on a GPU") has compiled H100 baselines (the chain and single ops at CIFAR
# and 512x512).
OPS_PLAN = [
    ("cifar", (128, 3, 32, 32), "float32", ("noisy_input", "pgd_step_l2", "equivariant_mse", "chain")),
    ("pixel512", (32, 3, 512, 512), "float32", ("chain",)),
    ("flat16m", (1, 16 * 2**20), "float32", ()),
    ("pixel512", (32, 3, 512, 512), "bfloat16", ()),
    ("toy2d", (65536, 2), "float32", ()),
]


# ----------------------------------------------------------------------------------------------- steps


@dataclass
class Step:
    name: str
    cap_s: int
    what: str
    commands: Callable[["Run"], List[List[str]]]  # argv lists run one after another inside the cap
    env: Dict[str, str] = field(default_factory=dict)
    imports: tuple = ()  # modules the step's commands need (checked by --dry-run)
    executables: tuple = ()  # programs the step needs on PATH (checked by --dry-run; missing -> step skipped)


@dataclass
class Run:
    out: Path
    work: Path
    deadline: float
    dry: bool = False
    results: Dict[str, dict] = field(default_factory=dict)
    log: List[str] = field(default_factory=list)

    def junit(self, step: str) -> Path:
        return self.work / f"junit-{step}.xml"

    def data(self, step: str) -> Path:
        return self.work / f"{step}.json"


def _session_timeout_supported() -> bool:
    """pytest-timeout >= 2.3 stops a whole session cleanly (junit XML still written) at --session-timeout."""
    try:
        from importlib.metadata import version

        major, minor = (int(x) for x in version("pytest-timeout").split(".")[:2])
        return (major, minor) >= (2, 3)
    except Exception:
        return False


def _pytest(run: Run, step: str, marker: str, k: Optional[str], xdist: int, timeout: int) -> List[str]:
    """pytest for one step; -v so that a killed run still shows each finished test's outcome in the log."""
    argv = [PY, "-m", "pytest", "-m", marker, "-v", "-rfE", "-p", "no:cacheprovider", f"--timeout={timeout}",
            f"--junitxml={run.junit(step)}", "-o", "junit_family=xunit1", "--durations=10"]
    cap = next(s.cap_s for s in STEPS if s.name == step) if run.dry is False and STEPS else None
    if cap and _session_timeout_supported():
        argv.append(f"--session-timeout={max(10, cap - 8)}")
    if k:
        argv += ["-k", k]
    argv += ["-n", str(xdist)] if xdist > 1 else ["-p", "no:xdist"]
    return argv


def _workers() -> int:
    return max(1, min(14, (os.cpu_count() or 2) - 2))


STEPS: List[Step] = [
    Step("env", 10, "machine facts", lambda r: [[PY, __file__, "--worker", "env", str(r.data("env"))]],
         imports=("torch",)),
    Step("build", 90, "offline install and CUDA extension build",
         lambda r: [[PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", str(ROOT)],
                    [PY, __file__, "--worker", "build-check", str(r.data("build"))]],
         env={"MAX_JOBS": str(os.cpu_count() or 4), "NVCC_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
         imports=("setuptools", "torch.utils.cpp_extension"), executables=("nvcc",)),
    Step("tests", 120, "GPU tests of every backend (fast ones; graph/FSDP and > 2^31 later)",
         lambda r: [_pytest(r, "tests", "gpu and not slow", f"not ({CAPTURE_K})", _workers(), 90)],
         imports=("pytest", "xdist", "pytest_timeout", "hypothesis")),
    Step("ops", 95, "op benchmarks and the overhead suite",
         lambda r: [[PY, __file__, "--worker", "ops", str(r.data("ops"))]], imports=("fastat.bench.ops",)),
    Step("steps", 70, "training-step benchmarks",
         lambda r: [[PY, __file__, "--worker", "steps", str(r.data("steps"))]], imports=("fastat.bench.steps",)),
    Step("capture", 35, "CUDA-graph capture and FSDP2 on one process",
         lambda r: [_pytest(r, "capture", "gpu", CAPTURE_K, 1, 60)], imports=("torch.distributed.fsdp",)),
    Step("sanitize", 80, "compute-sanitizer memcheck and racecheck on a subset",
         lambda r: [["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20",
                     PY, __file__, "--worker", "sanitize", str(r.data("sanitize-memcheck"))],
                    ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "9", "--print-limit", "20",
                     PY, __file__, "--worker", "sanitize", str(r.data("sanitize-racecheck"))]],
         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, executables=("compute-sanitizer",)),
    Step("big", 30, "> 2^31 elements (int64 indexing)",
         lambda r: [_pytest(r, "big", "gpu", BIG_K, 1, 120)]),
]
STEP_NAMES = [s.name for s in STEPS]


# ------------------------------------------------------------------------------------- running a step


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(step: Step, run: Run) -> dict:
    """Run the step's commands in order within its cap (clipped to the deadline); never raises."""
    start = time.monotonic()
    cap = min(step.cap_s, max(0.0, run.deadline - start))
    result = {"name": step.name, "what": step.what, "cap_s": step.cap_s, "status": "passed", "returncodes": []}
    missing = [e for e in step.executables if shutil.which(e) is None]
    if missing:
        result.update(status="skipped", reason=f"{', '.join(missing)} not on PATH")
        return result
    if cap < 3:
        result.update(status="not run", reason="deadline reached")
        return result
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    chunks = []
    for argv in step.commands(run):
        left = cap - (time.monotonic() - start)
        if left < 2:
            result.update(status="timeout", reason=f"cap of {cap:.0f} s reached before `{_short(argv)}`")
            break
        chunks.append(f"$ {_short(argv)}\n")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            output, _ = proc.communicate()
            chunks.append(output or "")
            result["returncodes"].append("timeout")
            result.update(status="timeout", reason=f"cap of {cap:.0f} s reached in `{_short(argv)}`")
            break
        chunks.append(output or "")
        result["returncodes"].append(proc.returncode)
        print(_tail(output or "", 3000), flush=True)
        if proc.returncode != 0 and result["status"] == "passed":
            result.update(status="failed", reason=f"`{_short(argv)}` exited {proc.returncode}")
    result["seconds"] = round(time.monotonic() - start, 1)
    text = "".join(chunks)
    if run.junit(step.name).exists() is False and "pytest" in " ".join(" ".join(a) for a in step.commands(run)):
        result["verbose_counts"] = verbose_counts(text)
    run.log.append(f"\n===== {step.name} ({result['status']}, {result['seconds']} s of {cap:.0f}) =====\n"
                   + _tail(text, LOG_TAIL_CHARS))
    if step.name == "sanitize":
        result["sanitizer"] = _sanitizer_verdicts(text, result)
    return result


def _short(argv: List[str]) -> str:
    return " ".join(Path(a).name if a in (PY, __file__) else a for a in argv)[:200]


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else f"[... {len(text) - n} characters cut ...]\n" + text[-n:]


def _sanitizer_verdicts(text: str, result: dict) -> List[str]:
    """One clear line per sanitizer tool: clean, errors found, or the device refused."""
    lines = []
    parts = re.split(r"^\$ compute-sanitizer --tool (\w+)", text, flags=re.M)
    for tool, body in zip(parts[1::2], parts[2::2]):
        refused = re.search(r"(Device not supported|Failed to initialize|error 999|LibraryNotLoaded)[^\n]*", body)
        summary = re.search(r"=+ (ERROR SUMMARY: \d+ errors?|RACECHECK SUMMARY: [^\n]*)", body)
        if refused:
            lines.append(f"{tool}: compute-sanitizer refused the device ({refused.group(0).strip()[:160]})")
        elif summary:
            lines.append(f"{tool}: {summary.group(1)}")
        else:
            lines.append(f"{tool}: no summary line (see log.txt)")
    if any("refused the device" in line for line in lines) and result["status"] == "failed":
        result.update(status="skipped", reason="compute-sanitizer refused the device")
    return lines


# ------------------------------------------------------------------------------------------ reporting


_VERBOSE_LINE = re.compile(r"(?:^|\] )(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (\S+::\S+)|^(\S+::\S+) "
                           r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)


def verbose_counts(text: str) -> dict:
    """Outcome counts from pytest -v output (used when a killed session wrote no junit XML)."""
    outcome = {}
    for m in _VERBOSE_LINE.finditer(text):
        word, node = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        outcome[node] = word
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "from": "pytest -v output"}
    for node, word in outcome.items():
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(word, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failures"].append((node, "(no junit XML: the session was cut; see log.txt)"))
    return counts


def junit_counts(path: Path) -> dict:
    """{passed, failed, errors, skipped, failures: [(test, first lines)]} from a junit XML, or {} if absent."""
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"parse_error": str(exc)}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            body = (bad.get("message") or "") + "\n" + (bad.text or "")
            counts["failures"].append((name, _tail(body.strip(), 1500)))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def bench_rows(run: Run) -> List[dict]:
    rows = []
    for name in ("ops", "steps"):
        data = _read_json(run.data(name)) or {}
        rows += data.get("rows", [])
    return rows


def headline(rows: List[dict]) -> Dict[str, dict]:
    """The target numbers of issue 13 from the bench rows (None where not measured)."""
    def op(case, shape_name, dtype, provider):
        for r in rows:
            if (r.get("suite") == "ops" and r.get("case") == case and r.get("shape_name") == shape_name
                    and r.get("dtype") == dtype and r.get("provider") == provider and "median_ms" in r):
                return r
        return None

    def step(case, provider, method, batch=None):
        for r in rows:
            if (r.get("suite") == "steps" and r.get("case") == case and r.get("provider") == provider
                    and r.get("method") == method and (batch is None or r.get("batch") == batch)):
                return r
        return None

    out: Dict[str, dict] = {}
    for key, shape_name in (("chain_ms_cifar", "cifar"), ("chain_ms_pixel512", "pixel512")):
        best = {p: op("chain", shape_name, "float32", p) for p in ("eager", "compile", "triton", "cuda")}
        measured = {p: round(r["median_ms"], 4) for p, r in best.items() if r}
        fused = [measured[p] for p in ("triton", "cuda") if p in measured]
        out[key] = {"value": min(fused) if fused else None, "by_provider": measured}
        device = {p: round(r["device_us"] / 1e3, 4) for p, r in best.items() if r and "device_us" in r}
        if device:
            out[key]["device_ms"] = device
    pct = {}
    for r in rows:  # the kernels' own bandwidth (profiler device time), else the event time's
        if r.get("suite") == "ops" and r.get("numel", 0) >= 16 * 2**20 and r.get("provider") in ("triton", "cuda") \
                and "pct_of_copy" in r and r.get("case") != "chain":
            key = f"{r['case']}/{r['provider']}/{r['dtype']}/{r['shape_name']}"
            pct[key] = round(r.get("device_pct_of_copy", r["pct_of_copy"]), 1)
    out["op_pct_of_copy_at_16M"] = {"value": min(pct.values()) if pct else None, "by_op": pct}
    unet = "ddpm_cifar10_unet"
    for key, method in (("free_p1_ratio", "free_p1"), ("pgd_k3_ratio", "pgd_k3"),
                        ("p2_adversarial_ratio", "p2_adversarial")):
        r = step(unet, "fastat", method)
        e = step(unet, "eager", method)
        out[key] = {"value": round(r["ratio_vs_standard"], 3) if r else None,
                    "eager": round(e["ratio_vs_standard"], 3) if e else None}
    r, s = step(unet, "fastat", "p2_adversarial"), step(unet, "eager", "standard")
    ok = r and s and r.get("peak_mem_mb") and s.get("peak_mem_mb") and not math.isnan(r["peak_mem_mb"])
    out["p2_adversarial_mem_ratio"] = {"value": round(r["peak_mem_mb"] / s["peak_mem_mb"], 3) if ok else None}
    toy = {p: step("toy_mlp_2d", p, "pgd_k3", 4096) for p in ("eager", "fastat", "fastat+cudagraph")}
    measured = {p: round(r["median_ms"], 3) for p, r in toy.items() if r}
    fused = [measured[p] for p in ("fastat", "fastat+cudagraph") if p in measured]
    out["toy_pgd_k3_ms"] = {"value": min(fused) if fused else None, "by_provider": measured}
    for key, entry in out.items():
        v, target = entry["value"], TARGETS[key]
        higher_is_better = key == "op_pct_of_copy_at_16M"
        entry["target"] = target
        entry["met"] = None if v is None else (v >= target if higher_is_better else v <= target)
    return out


def write_outputs(run: Run, env: dict, finished: bool) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    tests = {s: junit_counts(run.junit(s)) or run.results.get(s, {}).get("verbose_counts", {})
             for s in ("tests", "capture", "big")}
    rows = bench_rows(run)
    heads = headline(rows)
    totals = {k: sum(t.get(k, 0) for t in tests.values()) for k in ("passed", "failed", "errors", "skipped")}
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "finished": finished, "env": env, "steps": run.results, "tests": {
                   s: {k: v for k, v in t.items() if k != "failures"} for s, t in tests.items()},
               "test_totals": totals, "headline": heads}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (run.out / "summary.md").write_text(summary_markdown(summary) + "\n")
    (run.out / "tests.md").write_text(tests_markdown(run, tests) + "\n")
    bench_meta = {}
    for name in ("ops", "steps"):
        bench_meta[name] = (_read_json(run.data(name)) or {}).get("meta", {})
    (run.out / "bench.json").write_text(json.dumps({"meta": bench_meta, "env": env, "rows": rows}, indent=1,
                                                   default=str) + "\n")
    (run.out / "bench.md").write_text(bench_markdown(bench_meta, rows) + "\n")
    (run.out / "log.txt").write_text("".join(run.log))
    if rows and not (run.out / "bench.png").exists() and finished:
        _plot(bench_meta, rows, run.out / "bench.png")
    if finished and not run.dry:
        _archive_triton_cache(run.out / "triton_kernels.tar.gz")


def _archive_triton_cache(path: Path) -> None:
    """fastat's compiled Triton kernels (PTX, metadata with registers/spills) as the GPU built them."""
    import tarfile

    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    files = sorted(f for f in cache.rglob("*") if f.suffix in (".json", ".ptx") and f.is_file()) if cache.exists() else []
    total = 0
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            total += f.stat().st_size
            if total > 4 * TRITON_ARCHIVE_LIMIT:  # PTX compresses ~5x; stop well before the file limit
                break
            tar.add(f, arcname=str(f.relative_to(cache)))
    if path.stat().st_size > TRITON_ARCHIVE_LIMIT:
        path.unlink()

def _plot(meta: dict, rows: List[dict], path: Path) -> None:
    try:
        from fastat.bench import report

        op_rows = [r for r in rows if r.get("suite") == "ops" and "median_ms" in r]
        if op_rows:
            report.plot({**meta.get("ops", {})}, op_rows, path)
    except Exception as exc:  # a plot must never lose the run's numbers
        print(f"bench.png not written: {type(exc).__name__}: {exc}")


def summary_markdown(s: dict) -> str:
    env = s["env"]
    lines = [f"# fastat GPU acceptance, {s['date']}{'' if s['finished'] else ' (interrupted)'}", "",
             f"Device: {env.get('gpu', '?')} | driver {env.get('driver', '?')} | CUDA {env.get('torch_cuda', '?')} | "
             f"torch {env.get('torch', '?')} | triton {env.get('triton', '?')} | nvcc {env.get('nvcc', '?')} | "
             f"python {env.get('python', '?')} | {env.get('cpus', '?')} CPUs | commit {env.get('commit', '?')}", "",
             "| step | status | seconds (cap) | note |", "|---|---|---|---|"]
    for name in STEP_NAMES:
        r = s["steps"].get(name)
        if r is None:
            lines.append(f"| {name} | not run | | |")
            continue
        note = r.get("reason", "")
        if name in s["tests"] and s["tests"][name]:
            t = s["tests"][name]
            note = (f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('errors', 0)} errors, "
                    f"{t.get('skipped', 0)} skipped" + (f"; {note}" if note else ""))
        if r.get("sanitizer"):
            note = "; ".join(r["sanitizer"]) + (f"; {note}" if note and note not in "; ".join(r["sanitizer"]) else "")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} ({r['cap_s']}) | {note} |")
    t = s["test_totals"]
    lines += ["", f"Tests in all: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                  f"{t['skipped']} skipped.", "", "| headline | measured | target | met | detail |",
              "|---|---|---|---|---|"]
    for key, h in s["headline"].items():
        detail = h.get("by_provider") or ({"eager": h["eager"]} if h.get("eager") is not None else "")
        if h.get("device_ms"):
            detail = f"event ms {detail}; profiler device ms {h['device_ms']}"
        if key == "op_pct_of_copy_at_16M" and h.get("by_op"):
            worst = sorted(h["by_op"].items(), key=lambda kv: kv[1])[:4]
            detail = ", ".join(f"{k} {v}%" for k, v in worst)
        met = {True: "yes", False: "NO", None: "-"}[h["met"]]
        lines.append(f"| {key} | {h['value'] if h['value'] is not None else 'not measured'} | {h['target']} | {met} | "
                     f"{detail} |")
    return "\n".join(lines)


def tests_markdown(run: Run, tests: Dict[str, dict]) -> str:
    lines = ["# GPU test results", ""]
    for step, t in tests.items():
        if not t:
            lines.append(f"## {step}: no results (step not run or pytest did not start)\n")
            continue
        lines.append(f"## {step}: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped\n")
        for name, body in t.get("failures", [])[:40]:
            lines += [f"### {name}", "```", body, "```", ""]
        if len(t.get("failures", [])) > 40:
            lines.append(f"... and {len(t['failures']) - 40} more (log.txt)\n")
    sanitize = run.results.get("sanitize", {})
    lines += ["## compute-sanitizer", ""] + [f"- {v}" for v in sanitize.get("sanitizer", [])] + (
        [f"- {sanitize.get('status')}: {sanitize.get('reason', '')}"] if sanitize else ["- not run"])
    return "\n".join(lines)


def bench_markdown(meta: dict, rows: List[dict]) -> str:
    try:
        from fastat.bench import report

        ops = [r for r in rows if r.get("suite") == "ops"]
        rest = [r for r in rows if r.get("suite") != "ops"]
        parts = []
        if ops:
            parts.append(report.markdown(meta.get("ops", {}), ops))
        if any("device_us" in r for r in ops):
            parts.append(device_table(ops))
        if rest:
            parts.append(report.markdown(meta.get("steps", meta.get("ops", {})), rest))
        return "\n\n".join(parts) or "no benchmark rows"
    except Exception as exc:
        return f"markdown not rendered ({type(exc).__name__}: {exc}); see bench.json"


AUDIT_JSON = ROOT / "benchmarks" / "results" / "kernel-audit.json"


def _audit_rows() -> Dict[tuple, dict]:
    """The CPU kernel audit's estimates (tools/kernel_audit.py), keyed like the bench rows."""
    data = _read_json(AUDIT_JSON) or {}
    return {(r["case"], r["shape"].split(" ")[0], r["dtype"], r["provider"]): r for r in data.get("rows", [])
            if "est_pct_of_copy" in r}


def device_table(ops: List[dict]) -> str:
    """Per case, shape and provider: event ms per call, the profiler's kernels and device us, device % of copy, and
    beside them the CPU audit's launches and estimated % of copy for the same case where it has one."""
    audit = _audit_rows()
    lines = ["## device view (CUDA profiler) beside the CPU kernel audit", "",
             "Event ms = one call between CUDA events (host gaps included); kernels and device us = the profiler's "
             "count and summed kernel time per call (autograd's own seed kernels included); % copy = bytes moved / "
             "device time against the copy. Audit = `benchmarks/results/kernel-audit.json` (estimated on a CPU).", "",
             "| case | shape | provider | event ms | kernels | device us | % copy (device) | audit launches | "
             "audit est. % copy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ops:
        if "device_us" in r:
            a = audit.get((r["case"], r["shape"].split(" ")[0], r["dtype"], r["provider"]), {})
            lines.append(f"| {r['case']} | {r['shape']} | {r['provider']} | {r['median_ms']:.3f} | {r['kernels']:g} | "
                         f"{r['device_us']:.1f} | {r['device_pct_of_copy']:.1f} | {a.get('launches', '-')} | "
                         f"{a.get('est_pct_of_copy', '-')} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- workers


def _dump(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, default=str))
    tmp.replace(path)  # a step killed mid-write leaves the previous complete file


def worker_env(path: Path) -> None:
    import platform

    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cpus": os.cpu_count(), "host": platform.node()}
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception as exc:
        facts["triton"] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     gpu_mem_gib=round(p.total_memory / 2**30, 1))
    else:
        facts["gpu"] = "none visible to torch"
    smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
                      "temperature.gpu,utilization.gpu", "--format=csv,noheader"])
    if smi:
        fields = [f.strip() for f in smi.splitlines()[0].split(",")]
        keys = ("driver", "clock_sm", "clock_sm_max", "clock_mem", "power", "temp", "util")
        facts.update(dict(zip(keys, fields)))
    nvcc = _run_quiet(["nvcc", "--version"])
    facts["nvcc"] = (re.findall(r"release ([\d.]+)", nvcc or "") or ["not found"])[0]
    facts["commit"] = (_run_quiet(["git", "rev-parse", "--short", "HEAD"]) or "unknown").strip()
    changed = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])
    if changed:  # the tree that ran differs from that commit (a device copy may carry an older .git)
        facts["commit"] += f" + {len(changed.splitlines())} changed files"
    facts["date"] = datetime.date.today().isoformat()
    _dump(path, facts)
    print(json.dumps(facts, indent=1))


def _run_quiet(argv: List[str]) -> Optional[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def worker_build_check(path: Path) -> None:
    import fastat
    from fastat import _ext

    ok, why = _ext.status("cuda")
    _dump(path, {"cuda_extension": ok, "why": why, "fastat": fastat.__file__})
    print(f"fastat._C_cuda: {'loaded' if ok else 'NOT available'}: {why}")
    subprocess.run([PY, "-m", "fastat", "info"], cwd=ROOT)
    if not ok:
        raise SystemExit(1)


def worker_ops(path: Path) -> None:
    import torch

    from fastat.bench import ops as bench_ops
    from fastat.bench import report

    dev = torch.device(DEVICE)
    payload = {"meta": report.machine_meta(dev), "rows": []}
    all_cases = [c.name for c in bench_ops._cases()]
    plan = [("tiny", (4, 3, 8, 8), "float32", ("chain",)), ("tiny", (4, 3, 8, 8), "bfloat16", ())] if REHEARSE \
        else OPS_PLAN
    for shape_name, shape, dtype, compiled in plan:
        for compile_on, cases in ((True, [c for c in all_cases if c in compiled]),
                                  (False, [c for c in all_cases if c not in compiled])):
            if not cases:
                continue
            print(f"ops: {shape_name} {shape} {dtype} compile={compile_on}", flush=True)
            try:
                res = bench_ops.run_op_benchmarks(dev, shapes={shape_name: shape}, dtype=getattr(torch, dtype),
                                                  compile=compile_on, cases=cases, log=lambda m: print(m, flush=True))
            except Exception as exc:  # keep the other shapes' numbers
                print(f"ops {shape_name} {dtype} failed: {type(exc).__name__}: {exc}", flush=True)
                payload["meta"].setdefault("errors", []).append(f"{shape_name}/{dtype}: {type(exc).__name__}: {exc}")
                continue
            for r in res["rows"]:
                if dtype != "float32":  # one markdown row per (shape, dtype)
                    r["shape"] = f"{r['shape']} {r['dtype']}"
            payload["rows"] += res["rows"]
            payload["meta"].update(copy=res["copy"], providers=[p for p in ("eager", "compile", "triton", "cuda", "cpp")
                                                                if p in set(payload["meta"].get("providers", []))
                                                                | set(res["providers"])])
            payload["meta"].setdefault("skipped", {}).update(
                {k: v for k, v in res["skipped"].items() if k != "compile"})
            _dump(path, payload)
    _overhead(dev, payload, path)


def _overhead(dev, payload: dict, path: Path) -> None:
    """The host-overhead suite, where this fastat has one (fastat bench --suites overhead)."""
    from fastat.bench import runner

    if "overhead" not in getattr(runner, "SUITES", ()):
        payload["meta"].setdefault("skipped", {})["overhead"] = "this fastat has no overhead suite"
        _dump(path, payload)
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = runner.run(str(dev), out_dir=tmp, suites="overhead", log=lambda m: print(m, flush=True))
            payload["rows"] += res["rows"]
        except Exception as exc:
            payload["meta"].setdefault("errors", []).append(f"overhead: {type(exc).__name__}: {exc}")
    _dump(path, payload)


def worker_steps(path: Path) -> None:
    import torch

    from fastat.bench import report
    from fastat.bench import steps as bench_steps

    dev = torch.device(DEVICE)
    payload = {"meta": report.machine_meta(dev), "rows": []}
    cases = sorted(bench_steps._cases(dev, quick=REHEARSE), key=lambda c: c["case"] != "ddpm_cifar10_unet")
    for spec in cases:  # the UNet first: its ratios are the headline numbers
        heavy = spec["case"] == "ddpm_cifar10_unet"
        print(f"steps: {spec['case']} {spec['shape']}", flush=True)
        try:
            payload["rows"] += bench_steps.run_case(spec, dev, quick=REHEARSE, reps=2 if REHEARSE else 8 if heavy else 30)
        except Exception as exc:
            payload["meta"].setdefault("errors", []).append(f"{spec['case']}: {type(exc).__name__}: {exc}")
            print(f"steps {spec['case']} failed: {type(exc).__name__}: {exc}", flush=True)
        _dump(path, payload)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for r in payload["rows"]:
        print(f"{r['case']:<18} b={r['batch']:<6} {r['provider']:<17} {r['method']:<24} {r['median_ms']:8.3f} ms "
              f"x{r['ratio_vs_standard']:.2f} peak {r['peak_mem_mb']:.0f} MB", flush=True)


def worker_sanitize(path: Path) -> None:
    """Every kernel of both GPU backends once, at sizes with ragged tails, fp32 and bf16, forward and backward."""
    import torch

    import fastat

    done, refused = [], []
    dev = DEVICE
    for backend in ("triton", "cuda"):
        try:
            fastat.set_backend(backend)
        except fastat.BackendUnavailableError as exc:
            refused.append(f"{backend}: {exc}")
            continue
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((3, 5, 7, 9), (65, 2)):  # ragged tails; a 2-D toy sample (the small-D path)
                g = torch.Generator(device=dev).manual_seed(0)
                x0, noise, delta, grad = (torch.randn(shape, device=dev, dtype=dtype, generator=g) for _ in range(4))
                alpha = torch.rand(shape[0], device=dev, generator=g)
                fastat.noisy_input(x0, noise, alpha, 0.5, delta)
                fastat.noisy_input(x0, fastat.SeededNoise(1, 2), alpha, 0.5, delta)
                for norm in ("l2", "linf"):
                    fastat.pgd_step(delta, grad, 0.1, 0.5, norm)
                    fastat.pgd_step(delta, grad, 0.1, 0.5, norm, model_input_base=x0)
                    fastat.random_perturbation(x0, 0.5, norm)
                pred = x0.clone().requires_grad_(True)
                d = delta.clone().requires_grad_(True)
                fastat.equivariant_mse(pred, noise, d, alpha + 0.1, "delta").backward()
                pp, pc = x0.clone().requires_grad_(True), noise.clone().requires_grad_(True)
                fastat.equivariance_regularizer(pp, pc, delta).backward()
                for metric in ("l2", "l1", "pseudo_huber"):
                    p = x0.clone().requires_grad_(True)
                    fastat.consistency_distance(p, noise, metric).backward()
                fastat.gaussian_noise(x0, 3, 4)
                if dev == "cuda":
                    torch.cuda.synchronize()
                done.append(f"{backend}/{str(dtype)[6:]}/{'x'.join(map(str, shape))}")
    fastat.set_backend("auto")
    _dump(path, {"ran": done, "refused": refused})
    print(f"sanitize subset: {len(done)} groups ran; refused: {refused or 'none'}")


WORKERS = {"env": worker_env, "build-check": worker_build_check, "ops": worker_ops, "steps": worker_steps,
           "sanitize": worker_sanitize}


# ------------------------------------------------------------------------------------------- dry run


def dry_run(steps: List[Step], out: Path) -> int:
    """Check the plan on any machine: commands, imports, test selections, output layout, caps."""
    problems, notes = [], []
    total = sum(s.cap_s for s in STEPS)
    if total > DEFAULT_DEADLINE:
        problems.append(f"step caps sum to {total} s > {DEFAULT_DEADLINE} s")
    if len(OUT_FILES) > 8 or any(not re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in OUT_FILES):
        problems.append(f"output files {OUT_FILES} break the limits (<= 8, plain names)")
    run = Run(out=out, work=Path(tempfile.mkdtemp(prefix="fastat-gpu-acceptance-")), deadline=math.inf, dry=True)
    for step in steps:
        for argv in step.commands(run):
            exe = argv[0]
            if exe in step.executables:
                continue
            if shutil.which(exe) is None and not Path(exe).exists():
                problems.append(f"{step.name}: `{exe}` not found here")
            if "--worker" in argv and argv[argv.index("--worker") + 1] not in WORKERS:
                problems.append(f"{step.name}: unknown worker {argv[argv.index('--worker') + 1]!r}")
        if step.imports:  # in a fresh interpreter, as the step's subprocess will import them
            code = "import " + ", ".join(step.imports)
            proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                problems.append(f"{step.name}: `{code}` fails: {last[:200]}")
        for exe in step.executables:
            if shutil.which(exe) is None:
                notes.append(f"{step.name}: `{exe}` is not on this machine's PATH (the step skips without it)")
    selections = {"tests": ("gpu and not slow", f"not ({CAPTURE_K})"), "capture": ("gpu", CAPTURE_K),
                  "big": ("gpu", BIG_K)}
    wanted = {name: sel for name, sel in selections.items() if name in [s.name for s in steps]}
    if wanted:
        counts = _count_selected(wanted)
        for name, (marker, k) in wanted.items():
            n = counts.get(name)
            if not n:
                problems.append(f"{name}: pytest selects no test with -m '{marker}' -k '{k}' ({counts.get('error', '')})")
            else:
                notes.append(f"{name}: -m '{marker}' -k '{k}' selects {n} tests here (more on a GPU)")
    notes.append("build: " + _build_plan())
    try:  # the reporting code runs on empty results, writing into a scratch folder
        scratch = Path(tempfile.mkdtemp(prefix="fastat-gpu-acceptance-out-"))
        write_outputs(Run(out=scratch, work=run.work, deadline=math.inf), {"gpu": "dry run"}, finished=True)
        written = sorted(p.name for p in scratch.iterdir())
        if [p for p in written if p not in OUT_FILES] or len(written) > 8 or any(p.is_dir() for p in scratch.iterdir()):
            problems.append(f"outputs written: {written}")
        shutil.rmtree(scratch)
    except Exception as exc:
        problems.append(f"reporting failed: {type(exc).__name__}: {exc}")
    print("GPU acceptance plan (dry run):")
    for s in steps:
        print(f"  {s.name:<9} cap {s.cap_s:>4} s  {s.what}")
    print(f"  total caps {total} s; outputs: {', '.join(OUT_FILES)}")
    for n in dict.fromkeys(notes):
        print(f"  note: {n}")
    for p in problems:
        print(f"  PROBLEM: {p}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


class _Names(dict):
    """eval() namespace for a pytest -m / -k expression: every identifier asks `match(identifier)`."""

    def __init__(self, match):
        super().__init__()
        self.match = match

    def __missing__(self, key):
        return self.match(key)


def _selected(expr: str, match) -> bool:
    return bool(eval(expr, {"__builtins__": {}}, _Names(match)))  # expr: identifiers, and/or/not, parentheses


def _count_selected(selections: Dict[str, tuple]) -> Dict[str, int]:
    """Collect the suite once (in a subprocess) and count what each (-m marker, -k keyword) selection picks."""
    code = (
        "import json, sys, pytest\n"
        "class R:\n"
        "    items = []\n"
        "    @pytest.hookimpl(trylast=True)\n"
        "    def pytest_collection_modifyitems(self, items):\n"
        "        R.items = [(i.nodeid, sorted(m.name for m in i.iter_markers()), sorted(i.keywords)) for i in items]\n"
        # -m '' lifts pyproject's default "-m 'not slow'": every selection below is counted over the whole suite
        "pytest.main(['--collect-only', '-q', '-m', '', '-p', 'no:cacheprovider', '-p', 'no:xdist'], plugins=[R()])\n"
        "sys.stderr.write('@@' + json.dumps(R.items))\n"
    )
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "@@" not in proc.stderr:
        return {"error": (proc.stdout + proc.stderr)[-300:]}
    items = json.loads(proc.stderr.split("@@", 1)[1])
    counts = {}
    for name, (marker, k) in selections.items():
        counts[name] = sum(
            1 for nodeid, markers, keywords in items
            if _selected(marker, lambda m, markers=markers: m in markers)
            and _selected(k, lambda w, nodeid=nodeid, keywords=keywords: w.lower() in nodeid.lower()
                          or any(w.lower() in kw.lower() for kw in keywords)))
    return counts


def _build_plan() -> str:
    """What setup.py would decide about the CUDA extension on this machine (read in a fresh interpreter)."""
    code = ("import importlib.util as u; s = u.spec_from_file_location('plan', 'setup.py'); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); a, why, _ = m.cuda_build_plan(); print(f'setup.py would {a} it here ({why})')")
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return (proc.stdout.strip() or proc.stderr.strip()[-200:]) or "setup.py plan not readable"


# ----------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (at most 8 files are written there)")
    parser.add_argument("--dry-run", action="store_true", help="check the plan without a GPU")
    parser.add_argument("--only", default=None, help=f"comma list of steps to run ({','.join(STEP_NAMES)})")
    parser.add_argument("--skip", default="", help="comma list of steps to leave out")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the pipeline on this CPU with tiny shapes (no build step): tries the plumbing")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="total wall budget in seconds")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args.out)
        return 0
    if args.rehearse:
        os.environ["FASTAT_ACCEPTANCE_REHEARSE"] = "1"  # read by the workers (their subprocesses inherit it)
        args.skip += ",build"
    wanted = STEP_NAMES if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = [s for s in list(wanted) + list(skip) if s not in STEP_NAMES]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; steps are {STEP_NAMES}")
    steps = [s for s in STEPS if s.name in wanted and s.name not in skip]
    if args.dry_run:
        return dry_run(steps, args.out)
    if args.out.exists() and any(args.out.iterdir()):
        stale = [p.name for p in args.out.iterdir() if p.name not in OUT_FILES]
        if stale:
            parser.error(f"{args.out} holds files this run would not write ({stale[:5]}); use an empty folder")
    run = Run(out=args.out, work=Path(tempfile.mkdtemp(prefix="fastat-gpu-acceptance-")),
              deadline=time.monotonic() + args.deadline)
    env: dict = {}
    for step in steps:
        print(f"\n=== {step.name}: {step.what} (cap {step.cap_s} s)", flush=True)
        run.results[step.name] = run_step(step, run)
        r = run.results[step.name]
        print(f"=== {step.name}: {r['status']} in {r.get('seconds', 0)} s {r.get('reason', '')}", flush=True)
        if step.name == "env":
            env = _read_json(run.data("env")) or {}
        write_outputs(run, env, finished=False)
    write_outputs(run, env, finished=True)
    print("\n" + (run.out / "summary.md").read_text())
    return 0 if all(r["status"] in ("passed", "skipped") for r in run.results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
