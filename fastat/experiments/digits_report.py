"""The digits experiment's outputs: paired comparisons over seeds, a markdown report and a figure of samples."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .stats import paired_difference, verdict

METRICS = ("fid", "sw2", "resid", "conf")
COMPARED = ("fid", "sw2", "resid")  # lower is better; conf is shown, not compared
LEGEND = (
    "fid: Frechet distance of the fixed classifier's penultimate features (torchmetrics FID with a custom extractor) "
    "to the held-out images; sw2: sliced W2 in pixel space to the held-out images; resid: energy per pixel off the "
    "top-k principal subspace of the clean training images (noise in samples raises it); conf: the classifier's mean "
    "top-class probability. Lower is better except conf."
)


def _values(results: Dict, setting: str, model: str, steps: str, metric: str) -> List[float]:
    return [results[seed][setting][model]["metrics"][steps][metric] for seed in sorted(results)
            if model in results[seed][setting] and steps in results[seed][setting][model]["metrics"]]


def comparisons(results: Dict, cfg) -> List[Dict]:
    """P2: every P2 model vs standard (equal optimizer steps) and vs standard_eqtime (equal wall clock), at the
    largest DDIM step count. P1: each fine-tuning vs the replay control ft_replay at every DDIM step count."""
    out = []
    steps_max = str(max(cfg.sample_steps))
    first = results[min(results)]
    for setting, rows in first.items():
        for model in rows:
            if not model.startswith("p2_"):
                continue
            for baseline in ("standard", "standard_eqtime"):
                for metric in COMPARED:
                    d = paired_difference(_values(results, setting, model, steps_max, metric),
                                          _values(results, setting, baseline, steps_max, metric))
                    out.append(dict(claim="P2", setting=setting, method=model, baseline=baseline, sample_steps=int(steps_max),
                                    metric=metric, verdict=verdict(d), **d))
    for model in ("ft_p1_free", "ft_p1_free_abs"):
        if model not in first.get("clean", {}):
            continue
        for steps in cfg.sample_steps:
            for metric in COMPARED:
                d = paired_difference(_values(results, "clean", model, str(steps), metric),
                                      _values(results, "clean", "ft_replay", str(steps), metric))
                out.append(dict(claim="P1", setting="clean", method=model, baseline="ft_replay", sample_steps=steps,
                                metric=metric, verdict=verdict(d), **d))
    return out


def _cell(vals: List[float]) -> str:
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.4g}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{mean:.4g} ± {sd:.2g}"


def markdown(payload: Dict) -> str:
    cfg, results = payload["config"], payload["results"]
    seeds = sorted(results)
    env = payload["environment"]
    lines = [
        f"# fastat experiment digits ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}{', quick' if payload['quick'] else ''})",
        "",
        f"Command: `{payload['command']}`; {payload['date']}; device {env['device']} ({env['device_name']}), "
        f"{env['torch_threads']} torch thread(s), torch {env['torch']}; load average {env['load_average_at_start']} at "
        f"start, {env['load_average_at_end']} at end; {payload['total_seconds']:.0f} s wall, "
        f"{payload['total_cpu_seconds']:.0f} s CPU.",
        "",
        f"Model: MLP {cfg['hidden']} wide, {cfg['depth']} hidden layers; {cfg['steps']} optimizer steps per model, batch "
        f"{cfg['batch']}, Adam lr {cfg['lr']:g} constant, EMA {cfg['ema']}; P1 fine-tuning {cfg['ft_steps']} steps at lr "
        f"{cfg['ft_lr']:g}; {cfg['n_samples']} samples per model. Metric classifier held-out accuracy "
        f"{payload['classifier_heldout_accuracy']:.3f}; PCA k = {payload['pca_components']} (90% of the variance).",
        "",
        LEGEND,
        "",
    ]
    busy = max(x for x in (env["load_average_at_start"], env["load_average_at_end"], 0.0) if x is not None)
    if busy > 1.5:
        lines += [f"Note: the machine was loaded (1-min load average up to {busy:.1f} on {env['cpu_count']} cores), so "
                  "the per-step time ratio behind standard_eqtime (equal wall clock) is rough.", ""]
    lines += [
        "Floors (real images scored like samples, same count):",
        "",
        "| images | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for name, m in payload["floors"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4g}" for k in METRICS) + " |")
    lines.append("")
    for setting, rows in results[seeds[0]].items():
        step_counts = sorted({int(s) for row in rows.values() for s in row["metrics"]})
        lines += [f"## {setting}: mean ± sd over seeds", "",
                  "| model | DDIM steps | " + " | ".join(METRICS) + " | optimizer steps |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]
        for model, row in rows.items():
            for steps in step_counts:
                if str(steps) not in row["metrics"]:
                    continue
                cells = [_cell(_values(results, setting, model, str(steps), k)) for k in METRICS]
                lines.append(f"| {model} | {steps} | " + " | ".join(cells) + f" | {row['train']['optimizer_steps']} |")
        lines.append("")
    lines += ["## Paired comparisons (method - baseline, per seed; 95% t interval; 'lower' = interval below 0)", "",
              "| claim | setting | method | baseline | DDIM | metric | mean diff | 95% CI | seeds lower | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in payload["comparisons"]:
        lines.append(f"| {c['claim']} | {c['setting']} | {c['method']} | {c['baseline']} | {c['sample_steps']} | "
                     f"{c['metric']} | {c['mean']:+.4g} | [{c['lo']:+.3g}, {c['hi']:+.3g}] | {c['lower_in']}/{c['n']} | "
                     f"{c['verdict']} |")
    return "\n".join(lines)


def figure(mosaics: Dict, payload: Dict, path: Path) -> Optional[Path]:
    """Seed 0: 16 images per row (training data, then each model's samples at the largest DDIM step count), one
    block per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [(setting, name, imgs) for setting, per in mosaics.items() for name, imgs in per.items()]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.6 * len(rows) + 0.6), squeeze=False)
    for ax, (setting, name, imgs) in zip(axes[:, 0], rows):
        tiles = imgs.reshape(-1, 8, 8)[:16].clamp(-1, 1)
        tiles = torch.nn.functional.pad(tiles, (0, 1), value=-1.0)  # a blank column between images
        strip = tiles.permute(1, 0, 2).reshape(8, -1).numpy()
        ax.imshow(strip, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{setting}\n{name}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("digits, seed 0: training images and DDIM samples (8x8, 16 per row; same starting noise per row)",
                 fontsize=8)
    fig.tight_layout(rect=(0.12, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
