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
    "off_rms": lambda r: r["samples"]["off_rms"],
    "attack": lambda r: r["sampler_attack"],
    "time_x": lambda r: r.get("time", {}).get("relative_to_standard", float("nan")),
}


def _columns(*names: str):
    return [(name, METRICS[name]) for name in names]


COLUMNS = _columns(
    "err_clean", "err_rand", "err_pgd", "SW2", "MMD", "W2", "off_rms", "SW2@5", "SW2@10", "SW2@20", "traj@10", "attack",
    "time_x"
)

LEGEND = (
    "err_*: mean ||eps_theta - eps*||^2/D vs the clean data's exact denoiser at x_t (clean), x_t + random delta, "
    "x_t + PGD-5 delta (||delta|| = R); SW2: sliced W2 of 10000 50-step DDIM samples (--quick: 200, 20 steps) to the "
    "clean distribution (its exact projected quantiles; 256 directions and the sampler's quasi-random noise shared "
    "by every row); "
    "MMD/W2: the first 1000/600 samples vs clean data; off_rms: RMS "
    "norm of the samples off the data's plane (embedded settings); SW2@N: N-step DDIM, 2000 samples; traj@10: RMS distance to the "
    "exact denoiser's 10-step DDIM sample from the same noise; attack: final-sample RMS deviation after a PGD attack "
    "on x_t at step 5 of 10; time_x: time per optimizer step / standard's (interleaved timing). Rows exact and "
    "oracle_corrupted: the exact denoisers of the clean and of the corrupted training distribution. Lower is better "
    "everywhere."
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


FIGURE_LEGEND = (
    "Panels: training data and 50-step DDIM samples (blue; the exact denoisers' in green) over clean data (grey); "
    "embedded settings are drawn in the data's plane. SW2: sliced W2 of 10000 samples to the clean distribution "
    "(exact quantiles); err: mean ||eps_theta - eps*||^2/D "
    "vs the clean exact denoiser; off: RMS norm off the plane; models use EMA weights. Right: err by timestep "
    "(solid at x_t, dashed under a PGD attack of radius R). Lower is better."
)


def make_figure(results: Dict, samples: Dict, train_sets: Dict, references: Dict, bases: Dict, path: Path,
                num_timesteps: int, note: Optional[str] = None) -> Optional[Path]:
    """Rows = data settings; columns = training data, each method's samples (+ the exact denoisers'), and the
    denoiser error vs t (clean solid, PGD dashed, log scale). Returns None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    settings = list(results)
    ncols = 2 + max(len(results[s]) for s in settings)
    fig, axes = plt.subplots(len(settings), ncols, figsize=(2.3 * ncols, 2.5 * len(settings) + 0.9), squeeze=False)
    lim = 3.2

    def plane(x, setting):
        x = x.detach().cpu().double()
        basis = bases.get(setting)
        return x if basis is None else x @ basis

    for r, setting in enumerate(settings):
        ref = plane(references[setting][:2000], setting)
        xlabel, ylabel = ("plane coord 1", "plane coord 2") if bases.get(setting) is not None else ("x1", "x2")
        ax = axes[r, 0]
        tr = plane(train_sets[setting], setting)
        ax.scatter(tr[:, 0], tr[:, 1], s=1, c="tab:gray", alpha=0.5)
        ax.set_title(f"{setting}: training data", fontsize=8)
        methods = list(results[setting])
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="lightgray", alpha=0.4)
            pts = plane(samples[setting][method], setting)
            ax.scatter(pts[:, 0], pts[:, 1], s=1, c="tab:green" if method in ("exact", "oracle_corrupted") else "tab:blue",
                       alpha=0.5)
            row = results[setting][method]
            extra = f"\noff {row['samples']['off_rms']:.3f}" if "off_rms" in row["samples"] else ""
            ax.set_title(f"{method}\nSW2 {row['samples']['swd']:.3f}  err {row['denoiser_error']['clean']:.4f}{extra}",
                         fontsize=7)
        for ax in axes[r, : len(methods) + 1]:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xlabel(xlabel, fontsize=6)
            ax.set_ylabel(ylabel, fontsize=6)
            ax.tick_params(labelsize=5)
        for ax in axes[r, len(methods) + 1: -1]:
            ax.axis("off")
        ax = axes[r, -1]
        centers = [(b + 0.5) * num_timesteps / 10 for b in range(10)]
        for i, method in enumerate(methods):
            by_t = results[setting][method].get("denoiser_error_by_t")
            if by_t is None or method == "exact":
                continue
            color = f"C{i}"
            ax.semilogy(centers, by_t["clean"], "-", color=color, label=method, lw=1)
            ax.semilogy(centers, by_t["pgd"], "--", color=color, lw=1)
        ax.set_title(f"{setting}: err vs timestep\n(solid at x_t, dashed under PGD)", fontsize=7)
        ax.set_xlabel("timestep t (of 1000)", fontsize=7)
        ax.set_ylabel("err (MSE to eps*)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    text = FIGURE_LEGEND + (f"\nNote: {note}." if note else "")
    fig.text(0.01, 0.005, text, fontsize=6.5, wrap=True, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.09 if note else 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SUMMARY_METRICS = _columns(
    "err_clean", "err_pgd", "SW2", "MMD", "W2", "off_rms", "SW2@5", "SW2@10", "traj@5", "traj@10", "traj@20", "time_x"
)


def summarize_runs(paths: List[str]) -> str:
    """Markdown: per setting and method, the mean (min-max) of the main metrics over several demo.json files
    (e.g. seeds); per claim, how often it held and the paired difference (method - baseline) of each metric with
    its 95% t interval over the runs."""
    from ..experiments.stats import paired_difference, verdict

    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = [f"Runs: {len(runs)} ({', '.join(str(Path(p)) for p in paths)}); cells are mean (min-max) over runs.", ""]
    for setting in runs[0]["results"]:
        cols = [(n, fn) for n, fn in SUMMARY_METRICS
                if any(not math.isnan(_get(fn, row)) for row in runs[0]["results"][setting].values())]
        out += [f"**{setting}** ({runs[0]['settings'][setting]})", "",
                "| method | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for method in runs[0]["results"][setting]:
            cells = []
            for _, fn in cols:
                vals = [_get(fn, run["results"][setting][method]) for run in runs]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                cells.append("-" if not vals else (f"{sum(vals) / len(vals):.4f}" if len(vals) == 1 else
                             f"{sum(vals) / len(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})"))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["| claim | held in runs | metric: mean difference (method - baseline) [95% CI], runs lower |", "|---|---|---|"]
    for name, first in runs[0]["claims"].items():
        held = sum(bool(run["claims"][name]["holds"]) for run in runs)
        parts = []
        for i, metric in enumerate(first["metrics"]):
            d = paired_difference([run["claims"][name]["method"][i] for run in runs],
                                  [run["claims"][name]["baseline"][i] for run in runs])
            parts.append(f"{metric}: {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] {d['lower_in']}/{d['n']} "
                         f"({verdict(d)})")
        out.append(f"| {name} | {held}/{len(runs)} | " + "; ".join(parts) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    print(summarize_runs(sys.argv[1:]))
