"""`fastat demo`: adversarial training of a small diffusion model on an embedded 2-D Gaussian mixture, no download.

For each data setting (clean; "noisy": 90% of the training points with added Gaussian noise; "outliers":
10% of the points replaced by far-away uniform draws) and each method (standard, DDPM-IP, P1 PGD and
Free-AT, P2 random and adversarial), train one MLP eps-denoiser with fastat's training API, then measure
it against the *clean* mixture, whose exact denoiser eps* is closed form (see fastat.demo.mixture):
denoiser error at clean, randomly and adversarially perturbed x_t, sample quality (sliced W2, W2, MMD),
few-step DDIM error, a sampler attack, memorisation, and the time per optimizer step relative to standard.
Writes demo.json, demo.md and demo.png to `out`.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from .._backend import get_backend
from .mixture import CORRUPTIONS, ExactDenoiser, GaussianMixture, corrupt, ring_mixture
from .models import MLPDenoiser
from .train import METHODS, TrainConfig, time_steps, train_method

SETTINGS = {
    "clean": "training data = clean mixture samples",
    "noisy": "90% of the training points + N(0, 0.2^2 I) noise",
    "outliers": "10% of the training points replaced by uniform draws in [-4, 4]^2",
}
FEW_STEPS = (5, 10, 20)

__all__ = ["run_demo", "METHODS", "SETTINGS", "GaussianMixture", "ExactDenoiser", "MLPDenoiser", "ring_mixture",
           "corrupt", "TrainConfig"]


def _parse(names, allowed, what):
    if names is None:
        return list(allowed)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what} must be a non-empty subset of {tuple(allowed)}, got {names!r}")
    return list(dict.fromkeys(names))


def _claims(results: Dict) -> Dict:
    """The two papers' claims checked on these numbers, one entry per (claim, setting, method):
    "holds" when the method beats standard in every listed comparison, with the counts and values.
      P2: under corrupted training data (noisy, outliers), err_clean (vs the clean exact denoiser) is lower.
      P1: few-step DDIM error is lower: SW2 to clean data and traj_err, at 5, 10 and 20 steps (6 comparisons)."""
    out = {}
    for setting in ("noisy", "outliers"):
        rows = results.get(setting, {})
        if "standard" not in rows:
            continue
        base = rows["standard"]["denoiser_error"]["clean"]
        for m in ("p2_random", "p2_adversarial"):
            if m in rows:
                v = rows[m]["denoiser_error"]["clean"]
                out[f"P2 {setting} {m}: err_clean below standard"] = {
                    "holds": v < base, "wins": int(v < base), "comparisons": 1, "method": [v], "standard": [base]}
    for setting, rows in results.items():
        if "standard" not in rows:
            continue
        for m in ("p1_pgd", "p1_free"):
            if m not in rows:
                continue
            mine, base = [], []
            for n in FEW_STEPS:
                for key in ("swd", "traj_err"):
                    mine.append(rows[m]["few_step"][str(n)][key])
                    base.append(rows["standard"]["few_step"][str(n)][key])
            wins = sum(a < b for a, b in zip(mine, base))
            out[f"P1 {setting} {m}: few-step SW2 and traj_err (5/10/20 steps) below standard"] = {
                "holds": wins == len(mine), "wins": wins, "comparisons": len(mine), "method": mine, "standard": base}
    return out


def run_demo(
    *,
    methods: Optional[Iterable[str]] = None,
    settings: Optional[Iterable[str]] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    device: str = "cpu",
    out: str = "fastat_demo_out",
    quick: bool = False,
    radius: float = 0.1,
    threads: Optional[int] = None,
    lr: Optional[float] = None,
    batch: Optional[int] = None,
    progress: bool = True,
    stream=None,
    command: Optional[str] = None,
) -> Dict:
    """Run the demo (see the module docstring) and return its results dict (also written to out/demo.json).

    methods: subset of METHODS ("standard" is always added: it is every comparison's baseline);
    settings: subset of ("clean", "noisy", "outliers"); steps: optimizer steps per model (default 450,
    --quick 40); radius: perturbation radius r for evaluation (L2, R = r sqrt(2)); threads: CPU threads
    (default 1: a 2-layer MLP step is overhead-bound and extra threads only contend); lr, batch: Adam learning
    rate and batch size (defaults in TrainConfig; --quick uses batch 64)."""
    stream = stream if stream is not None else sys.stdout
    methods = _parse(methods, METHODS, "methods")
    if "standard" not in methods:
        methods.insert(0, "standard")
    settings = _parse(settings, CORRUPTIONS, "settings")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use --device cpu")
    if quick:
        cfg = TrainConfig(steps=steps or 40, batch=batch or 64, lr=lr or TrainConfig.lr, hidden=32, depth=2, seed=seed)
        sizes = dict(n_train=256, n_eval=200, n_samples=200, w2_points=100, mmd_points=200, attack_points=32,
                     sample_steps=20, reps=2)
    else:
        cfg = TrainConfig(steps=steps or 450, seed=seed, lr=lr or TrainConfig.lr, batch=batch or TrainConfig.batch)
        # Evaluation sized for the 2-minute budget: exact W2 (O(n^3)) on 600 points, MMD (O(n^2)) on 1000.
        sizes = dict(n_train=2048, n_eval=2000, n_samples=2000, w2_points=600, mmd_points=1000, attack_points=500,
                     sample_steps=50, reps=10)
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(methods, settings, cfg, sizes, dev, out_dir, radius, progress, stream, command, quick)
    finally:
        torch.set_num_threads(old_threads)


def _run(methods, settings, cfg, sizes, dev, out_dir, radius, progress, stream, command, quick):
    from ..schedules import ddpm_linear_alphas_cumprod
    from .evaluate import data_floor, evaluate_model, make_eval_set
    from .report import format_markdown, format_table, make_figure, write_json

    t_start, cpu_start = time.perf_counter(), time.process_time()
    mixture = ring_mixture()
    ab = ddpm_linear_alphas_cumprod(1000)
    g = torch.Generator().manual_seed(cfg.seed)
    clean_train = mixture.sample(sizes["n_train"], g)
    es = make_eval_set(mixture, ab, sizes["n_eval"], sizes["n_samples"], cfg.seed, dev, FEW_STEPS)
    eval_kw = dict(radius=radius, few_steps=FEW_STEPS, sample_steps=sizes["sample_steps"],
                   w2_points=sizes["w2_points"], mmd_points=sizes["mmd_points"], attack_points=sizes["attack_points"])
    print(f"fastat demo: {len(methods)} methods x {len(settings)} settings, {cfg.steps} optimizer steps each, "
          f"batch {cfg.batch}, device {dev}, {torch.get_num_threads()} CPU thread(s)", file=sys.stderr)
    results, samples, train_sets = {}, {}, {}
    # The exact denoiser does not depend on the training data: evaluate it once, redo only memorisation.
    exact_row = evaluate_model(es.exact, es, **eval_kw)
    exact_samples = exact_row.pop("_samples")
    for setting in settings:
        data = corrupt(clean_train, setting, generator=torch.Generator().manual_seed(cfg.seed + 7)).to(dev)
        train_sets[setting] = data
        results[setting], samples[setting] = {}, {}
        for method in methods:
            trained = train_method(method, data, ab, cfg, label=f"{setting}/{method}", progress=progress)
            row = evaluate_model(trained["model"], es, train=data, **eval_kw)
            row["train"] = {k: trained[k] for k in ("seconds", "optimizer_steps", "ms_per_step")}
            samples[setting][method] = row.pop("_samples")
            results[setting][method] = row
        timing = time_steps(methods, data, ab, cfg, reps=sizes["reps"])
        for method in methods:
            results[setting][method]["time"] = timing[method]
        from ..eval import memorization_score

        results[setting]["exact"] = dict(exact_row, memorization=memorization_score(exact_samples, data))
        samples[setting]["exact"] = exact_samples
    floor = data_floor(es, sizes["w2_points"], sizes["mmd_points"])
    elapsed, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    payload = {
        "command": command or "fastat.demo.run_demo(...)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": load,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "fastat_backend": get_backend(),
        },
        "quick": quick,
        "config": cfg.as_dict(),
        "sizes": sizes,
        "radius": radius,
        "mixture": {"means": mixture.means.tolist(), "stds": mixture.stds.tolist(), "weights": mixture.weights.tolist()},
        "settings": {s: SETTINGS[s] for s in settings},
        "methods": {m: METHODS[m] for m in methods},
        "data_floor": floor,
        "results": results,
        "claims": _claims(results),
        "total_seconds": elapsed,
        # CPU time of this process: about the wall time on an idle machine for this single-threaded run
        "total_cpu_seconds": cpu_seconds,
    }
    table = format_table(results, SETTINGS)
    print(table, file=stream)
    print(f"\nfinite-sample floor (two independent clean sets): SW2 {floor['swd']:.4f}  MMD {floor['mmd']:.4f}  "
          f"W2 {floor['w2']:.4f}", file=stream)
    print("claims (method vs standard, this run):", file=stream)
    for name, c in payload["claims"].items():
        vals = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(c["method"], c["standard"]))
        print(f"  {'holds' if c['holds'] else 'fails'}  {name}: {c['wins']}/{c['comparisons']} ({vals})", file=stream)
    json_path = write_json(payload, out_dir / "demo.json")
    (out_dir / "demo.md").write_text(format_markdown(results, SETTINGS) + "\n")
    png = make_figure(results, samples, train_sets, es.reference, out_dir / "demo.png", ab.numel())
    print(f"\nwrote {json_path}, {out_dir / 'demo.md'}" + (f", {png}" if png else " (no PNG: matplotlib missing)")
          + f"  [{elapsed:.1f} s wall, {cpu_seconds:.1f} s CPU]", file=stream)
    payload["paths"] = {"json": str(json_path), "md": str(out_dir / "demo.md"), "png": str(png) if png else None}
    return payload
