"""The demo's outputs: a plain-text table per data setting, a JSON file and a PNG figure."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

METRICS = {
    "err_clean": lambda r: r["denoiser_error"]["clean"],
    "err_rand": lambda r: r["denoiser_error"]["random"],
    "err_pgd": lambda r: r["denoiser_error"]["pgd"],
    "SW2": lambda r: r["samples"]["swd"],
    "MMD": lambda r: r["samples"]["mmd"],
    "W2": lambda r: r["samples"]["w2"],
    **{f"SW2@{n}": (lambda r, n=n: r["few_step"][str(n)]["swd"]) for n in (5, 10, 20)},
    **{f"traj@{n}": (lambda r, n=n: r["few_step"][str(n)]["traj_err"]) for n in (5, 10, 20)},
    "attack": lambda r: r["sampler_attack"],
    "time_x": lambda r: r.get("time", {}).get("relative_to_standard", float("nan")),
}


def _columns(*names: str):
    return [(name, METRICS[name]) for name in names]


COLUMNS = _columns(
    "err_clean", "err_rand", "err_pgd", "SW2", "MMD", "W2", "SW2@5", "SW2@10", "SW2@20", "traj@10", "attack", "time_x"
)

LEGEND = (
    "err_*: mean ||eps_theta - eps*||^2/D vs the exact denoiser at x_t (clean), x_t + random delta, x_t + PGD-5 delta "
    "(||delta|| = R); SW2/MMD/W2: 50-step DDIM samples (--quick: 20) vs clean data; SW2@N: N-step DDIM; traj@10: RMS distance "
    "to the exact denoiser's 10-step DDIM sample from the same noise; attack: final-sample RMS deviation after a "
    "PGD attack on x_t at step 5 of 10; time_x: time per optimizer step / standard's (interleaved timing). "
    "Lower is better everywhere."
)


def _get(fn, row) -> float:
    try:
        return float(fn(row))
    except (KeyError, TypeError):
        return float("nan")


def format_table(results: Dict, settings_info: Dict[str, str]) -> str:
    """One block per data setting; rows are the methods plus the exact denoiser and the data floor."""
    lines: List[str] = []
    head = f"{'method':<16}" + "".join(f"{name:>10}" for name, _ in COLUMNS)
    for setting, rows in results.items():
        lines.append(f"setting: {setting} ({settings_info.get(setting, '')})")
        lines.append(head)
        lines.append("-" * len(head))
        for method, row in rows.items():
            cells = []
            for _, fn in COLUMNS:
                v = _get(fn, row)
                cells.append(f"{'-':>10}" if math.isnan(v) else f"{v:>10.4f}")
            lines.append(f"{method:<16}" + "".join(cells))
        lines.append("")
    lines.append(LEGEND)
    return "\n".join(lines)


def format_markdown(results: Dict, settings_info: Dict[str, str]) -> str:
    out = []
    for setting, rows in results.items():
        out.append(f"**{setting}** ({settings_info.get(setting, '')})\n")
        out.append("| method | " + " | ".join(name for name, _ in COLUMNS) + " |")
        out.append("|---|" + "---|" * len(COLUMNS))
        for method, row in rows.items():
            vals = [_get(fn, row) for _, fn in COLUMNS]
            out.append(f"| {method} | " + " | ".join("-" if math.isnan(v) else f"{v:.4f}" for v in vals) + " |")
        out.append("")
    return "\n".join(out)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def write_json(payload: Dict, path: Path) -> Path:
    path.write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    return path


def make_figure(results: Dict, samples: Dict, train_sets: Dict, reference: torch.Tensor, path: Path,
                num_timesteps: int) -> Optional[Path]:
    """Rows = data settings; columns = training data, each method's samples (+ the exact denoiser's),
    and the denoiser error vs t (clean solid, PGD dashed, log scale). Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = list(results)
    methods = [m for m in next(iter(results.values()))]
    ncols = 2 + len(methods)
    fig, axes = plt.subplots(len(settings), ncols, figsize=(2.3 * ncols, 2.4 * len(settings)), squeeze=False)
    lim = 3.2
    ref = reference[:2000].cpu()
    for r, setting in enumerate(settings):
        ax = axes[r, 0]
        tr = train_sets[setting].cpu()
        ax.scatter(tr[:, 0], tr[:, 1], s=1, c="tab:gray", alpha=0.5)
        ax.set_title(f"{setting}: training data", fontsize=8)
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="lightgray", alpha=0.4)
            s = samples[setting][method].cpu()
            ax.scatter(s[:, 0], s[:, 1], s=1, c="tab:blue" if method != "exact" else "tab:green", alpha=0.5)
            row = results[setting][method]
            ax.set_title(f"{method}\nSW2 {row['samples']['swd']:.3f}  err {row['denoiser_error']['clean']:.3f}", fontsize=7)
        ax = axes[r, -1]
        centers = [(b + 0.5) * num_timesteps / 10 for b in range(10)]
        for i, method in enumerate(m for m in methods if m != "exact"):
            by_t = results[setting][method]["denoiser_error_by_t"]
            color = f"C{i}"
            ax.semilogy(centers, by_t["clean"], "-", color=color, label=method, lw=1)
            ax.semilogy(centers, by_t["pgd"], "--", color=color, lw=1)
        ax.set_title("error vs exact eps* by t\n(solid clean, dashed PGD)", fontsize=7)
        ax.set_xlabel("t", fontsize=7)
        ax.tick_params(labelsize=6)
        if r == 0:
            ax.legend(fontsize=5)
        for ax in axes[r, :-1]:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SUMMARY_METRICS = _columns(
    "err_clean", "err_pgd", "SW2", "MMD", "W2", "SW2@5", "SW2@10", "traj@5", "traj@10", "traj@20", "time_x"
)


def summarize_runs(paths: List[str]) -> str:
    """Markdown: per setting and method, the mean (min-max) of the main metrics over several demo.json files
    (e.g. seeds), and how often each claim held."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = [f"Runs: {len(runs)} ({', '.join(str(Path(p)) for p in paths)}); cells are mean (min-max) over runs.", ""]
    for setting in runs[0]["results"]:
        out += [f"**{setting}** ({runs[0]['settings'][setting]})", "",
                "| method | " + " | ".join(n for n, _ in SUMMARY_METRICS) + " |", "|---|" + "---|" * len(SUMMARY_METRICS)]
        for method in runs[0]["results"][setting]:
            cells = []
            for _, fn in SUMMARY_METRICS:
                vals = [_get(fn, run["results"][setting][method]) for run in runs]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                cells.append("-" if not vals else (f"{sum(vals) / len(vals):.4f}" if len(vals) == 1 else
                             f"{sum(vals) / len(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})"))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["| claim | held in runs | wins / comparisons per run |", "|---|---|---|"]
    for name in runs[0]["claims"]:
        held = sum(bool(run["claims"][name]["holds"]) for run in runs)
        wins = ", ".join(f"{run['claims'][name]['wins']}/{run['claims'][name]['comparisons']}" for run in runs)
        out.append(f"| {name} | {held}/{len(runs)} | {wins} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    print(summarize_runs(sys.argv[1:]))
