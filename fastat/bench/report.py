"""Benchmark results as data: JSON rows with the machine's facts, a markdown table and PNG plots.

JSON layout: {"meta": {device, device_name, torch, triton, python, date, commit, copy_gbps, skipped,
providers, quick, note}, "rows": [{"suite": "ops"|"steps", "case", "provider", "median_ms", ...}]}.
Plots: one panel per op case, achieved GB/s against bytes moved per provider, with the measured copy
bandwidth drawn as the roofline.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import torch


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def git_commit(repo: Optional[Path] = None) -> str:
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def machine_meta(device: torch.device) -> Dict:
    from .._backend import _triton_version

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    return {
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


def write_json(meta: Dict, rows: List[Dict], path: Path) -> Path:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    return path


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(meta: Dict, rows: List[Dict]) -> str:
    """Op tables (one per case: shapes x providers, median ms / speed-up / % of copy) and the step table."""
    out = [f"# fastat benchmarks: {meta['device_name']} ({meta['device']})", "",
           f"torch {meta['torch']}, triton {meta.get('triton')}, python {meta['python']}, {meta['date']}, "
           f"commit {meta['commit']}, {meta.get('torch_threads')} torch threads, load average at start "
           f"{meta.get('load_average_at_start')}.", ""]
    if meta.get("note"):
        out += [meta["note"], ""]
    copy = meta.get("copy", {})
    if copy:
        out += [f"Roofline: device copy {copy['gbps']:.1f} GB/s (bytes read + written, {copy['buffer_mb']} MB buffer).", ""]
    for name, why in (meta.get("skipped") or {}).items():
        out.append(f"- skipped `{name}`: {why}")
    out.append("")
    ops = [r for r in rows if r.get("suite") == "ops"]
    providers = meta.get("providers") or sorted({r["provider"] for r in ops})
    for case in dict.fromkeys(r["case"] for r in ops):
        out += [f"## {case}", "", "| shape | N | " + " | ".join(f"{p} ms (x eager, % copy)" for p in providers) + " |",
                "|---|---|" + "---|" * len(providers)]
        case_rows = [r for r in ops if r["case"] == case]
        for shape in dict.fromkeys(r["shape"] for r in case_rows):
            cells = []
            numel = None
            for p in providers:
                r = next((r for r in case_rows if r["shape"] == shape and r["provider"] == p), None)
                if r is None:
                    cells.append("-")
                elif "error" in r:
                    # "no <backend> kernel for ..." is a gap in coverage, not a failure
                    cells.append("n/a" if r["error"].startswith("no ") else "error")
                    numel = r["numel"]
                else:
                    numel = r["numel"]
                    cells.append(f"{r['median_ms']:.3f} ({_fmt(r['speedup_vs_eager'], '.2f')}x, {r['pct_of_copy']:.1f}%)")
            out.append(f"| {shape} | {numel} | " + " | ".join(cells) + " |")
        reasons = {}
        for r in case_rows:
            if "error" in r:
                reasons.setdefault((r["provider"], r["error"]), []).append(r["shape"])
        for (provider, why), shapes in reasons.items():
            out.append(f"\n{provider} ({', '.join(shapes)}): {why}")
        out.append("")
    from .overhead import markdown as overhead_markdown

    out += overhead_markdown(rows)
    steps = [r for r in rows if r.get("suite") == "steps"]
    if steps:
        keys = [k for k in dict.fromkeys(k for r in steps for k in r) if k not in ("suite",)]
        out += ["## training steps", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in steps:
            out.append("| " + " | ".join(
                (f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "-"))) for k in keys) + " |")
        out.append("")
    return "\n".join(out)


def _log_axis(axis, unit: str, scale: float = 1.0) -> None:
    """Log axis with labels only at 1, 2, 5 x 10^k (in `unit` after dividing by `scale`): no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g}{unit}"))
    axis.set_minor_formatter(NullFormatter())


def plot(meta: Dict, rows: List[Dict], path: Path) -> Optional[Path]:
    """Op panels (achieved GB/s vs MB moved per provider, roofline = measured copy bandwidth) and one panel per step
    case (time per optimizer step relative to the eager standard step, per method and provider)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ops = [r for r in rows if r.get("suite") == "ops" and "gbps" in r]
    steps = [r for r in rows if r.get("suite") == "steps" and "ratio_vs_standard" in r]
    cases = list(dict.fromkeys(r["case"] for r in ops))
    step_cases = list(dict.fromkeys(r["case"] for r in steps))
    panels = len(cases) + len(step_cases)
    if not panels:
        return None
    ncol = min(3, panels)
    nrow = (panels + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.4 * nrow), squeeze=False)
    roof = meta.get("copy", {}).get("gbps")
    flat = list(axes.flat)
    for ax, case in zip(flat, cases):
        case_rows = [r for r in ops if r["case"] == case]
        for i, p in enumerate(dict.fromkeys(r["provider"] for r in case_rows)):
            pts = sorted((r["bytes"], r["gbps"]) for r in case_rows if r["provider"] == p)
            ax.loglog([b for b, _ in pts], [g for _, g in pts], "o-", color=f"C{i}", label=p, ms=3)
        if roof:
            ax.axhline(roof, color="k", ls="--", lw=1, label=f"copy {roof:.0f} GB/s")
        _log_axis(ax.xaxis, " MB", 1e6)
        _log_axis(ax.yaxis, "")
        ax.set_title(f"op: {case}", fontsize=9)
        ax.set_xlabel("bytes moved per call (MB, read + written)", fontsize=8)
        ax.set_ylabel("achieved GB/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax, case in zip(flat[len(cases):], step_cases):
        case_rows = [r for r in steps if r["case"] == case]
        methods = list(dict.fromkeys(r["method"] for r in case_rows))
        providers = list(dict.fromkeys(r["provider"] for r in case_rows))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            vals = {r["method"]: r["ratio_vs_standard"] for r in case_rows if r["provider"] == p}
            ys = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(methods))]
            ax.barh(ys, [vals.get(m, float("nan")) for m in methods], height=width, color=f"C{i}", label=p)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(methods)))
        ax.set_yticklabels(methods, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"training step: {case}", fontsize=9)
        ax.set_xlabel("time per optimizer step / eager standard step", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=6)
    for ax in flat[panels:]:
        ax.axis("off")
    title = f"{meta['device_name']}  torch {meta['torch']}  {meta['date'][:10]}"
    if meta.get("note"):
        title += "\n" + "\n".join(textwrap.wrap(str(meta["note"]), width=int(40 * ncol)))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
