"""`fastat demo`: adversarial training of small diffusion models on Gaussian-mixture data whose exact denoiser is
closed form, no download.

Settings (training data; every model is scored against the *clean* distribution):
    clean       8-component 2-D Gaussian ring
    noisy       the 2-D ring, 90% of the training points + N(0, 0.2^2 I)
    outliers    the 2-D ring, 10% of the points replaced by uniform draws in [-4, 4]^2
    clean16     the ring embedded in a 2-D plane of R^16 (random orthonormal basis)
    noisy16     the embedded ring, 90% of the points + N(0, 0.2^2 I_16): the corruption has 14 directions off the
                data's plane, the setting of P2's low-dimensional tests (the 2-D "noisy" only widens the clusters)

Default run (fits 2 minutes on a 2-core CPU): `clean` with standard training and P1 as fine-tuning of the
trained standard model (Free-AT at the official ||delta||/||eps|| ratio, against the replay control with
delta = 0), and `noisy16` with standard training and P2 adversarial. `--methods` runs the given
methods in every chosen setting (fastat.demo.train lists them). Reference rows: `exact` (the clean distribution's
exact denoiser) and, for the noisy settings, `oracle_corrupted` (the exact denoiser of the corrupted training
distribution: the best a model fit to that data can do). Writes demo.json, demo.md and demo.png to `out`.

Models: a 128-wide, 3-layer v-parameterised MLP (fastat.demo.models.MLPDenoiser) per (setting, method), trained on
2^18 points with Adam at batch 1024; 6000 steps in the 2-D settings, 2400 in the 16-D ones (SETTINGS' step_scale).
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from .._backend import get_backend
from .mixture import ExactDenoiser, GaussianMixture, corrupt, noisy_mixture, ring_mixture
from .models import MLPDenoiser
from .train import CONTROL, FINETUNE_P1, METHODS, P1_METHODS, P2_METHODS, TrainConfig, time_steps, train_method, work_units

# step_scale: a setting's scratch models train round(step_scale * steps) optimizer steps. The 16-D settings compare
# methods at equal steps against the oracle row; the 2-D settings train to convergence (the default clean run's
# standard model must reach the exact denoiser's SW2 within 1.5x).
SETTINGS = {
    "clean": {"dim": 2, "corruption": "clean", "step_scale": 1.0, "about": "training data = clean 2-D ring samples"},
    "noisy": {"dim": 2, "corruption": "noisy", "step_scale": 1.0,
              "about": "2-D ring, 90% of the training points + N(0, 0.2^2 I)"},
    "outliers": {"dim": 2, "corruption": "outliers", "step_scale": 1.0,
                 "about": "2-D ring, 10% of the points -> uniform in [-4, 4]^2"},
    "clean16": {"dim": 16, "corruption": "clean", "step_scale": 0.4, "about": "ring on a 2-D plane of R^16, clean"},
    "noisy16": {"dim": 16, "corruption": "noisy", "step_scale": 0.4,
                "about": "ring on a 2-D plane of R^16, 90% of the points + N(0, 0.2^2 I_16) (off-plane noise)"},
}
DEFAULT_SETTINGS = ("clean", "noisy16")
DEFAULT_METHODS = {"clean": ("standard", "ft_replay", "ft_p1_free"),
                   "corrupted": ("standard", "p2_adversarial")}
FEW_STEPS = (5, 10, 20)
REFERENCE_ROWS = ("exact", "oracle_corrupted")

__all__ = ["run_demo", "METHODS", "SETTINGS", "GaussianMixture", "ExactDenoiser", "MLPDenoiser", "ring_mixture",
           "corrupt", "noisy_mixture", "TrainConfig"]


def _parse(names, allowed, what):
    if names is None:
        return None
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return list(allowed)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what} must be 'all' or a non-empty subset of {tuple(allowed)}, got {names!r}")
    return list(dict.fromkeys(names))


def plan(methods: Optional[Iterable[str]], settings: Optional[Iterable[str]]) -> Dict[str, List[str]]:
    """{setting: [methods]} in training order. Without `methods`, each setting gets its default (clean data: the
    P1 fine-tuning comparison; corrupted data: the P2 comparison). "standard" is always trained first (every
    comparison's baseline and the fine-tuning start); any P1 fine-tuning brings its control ft_replay."""
    settings = _parse(settings, SETTINGS, "settings") or list(DEFAULT_SETTINGS)
    chosen = _parse(methods, METHODS, "methods")
    out = {}
    for s in settings:
        names = list(chosen or DEFAULT_METHODS["clean" if SETTINGS[s]["corruption"] == "clean" else "corrupted"])
        if any(m in FINETUNE_P1 for m in names) and CONTROL not in names:
            names.append(CONTROL)
        out[s] = ["standard"] + [m for m in names if m != "standard"]
    return out


def _better(results, setting, method, baseline, metrics, name):
    rows = results[setting]
    mine = [_metric(rows[method], m) for m in metrics]
    base = [_metric(rows[baseline], m) for m in metrics]
    wins = sum(a < b for a, b in zip(mine, base))
    return name, {"holds": wins == len(mine), "wins": wins, "comparisons": len(mine), "metrics": list(metrics),
                  "method": mine, "baseline": base, "baseline_name": baseline}


def _metric(row, name):
    from .report import METRICS

    return float(METRICS[name](row))


def claims(results: Dict) -> Dict:
    """The two papers' claims checked on these numbers, one entry per (claim, setting, method): "holds" when the
    method is lower than its baseline in every listed comparison (with the per-metric values).
      P2: under corrupted training data, err_clean (vs the clean exact denoiser) and SW2 (and, for data on a
          subspace, the samples' off-subspace energy off_rms) are lower than standard's.
      P1: few-step DDIM error (SW2 and traj_err at 5, 10 and 20 steps) is lower: fine-tuning vs the replay
          control ft_replay, from-scratch P1 vs standard."""
    out = {}
    few = [f"{k}@{n}" for n in FEW_STEPS for k in ("SW2", "traj")]
    for setting, rows in results.items():
        corrupted = SETTINGS[setting]["corruption"] != "clean"
        for m in P2_METHODS:
            if corrupted and m in rows:
                metrics = ["err_clean", "SW2"] + (["off_rms"] if SETTINGS[setting]["dim"] > 2 else [])
                k, v = _better(results, setting, m, "standard", metrics, f"P2 {setting} {m} vs standard: {', '.join(metrics)} lower")
                out[k] = v
        for m in FINETUNE_P1:
            if m in rows and CONTROL in rows:
                k, v = _better(results, setting, m, CONTROL, few, f"P1 {setting} {m} vs {CONTROL}: few-step SW2 and traj lower")
                out[k] = v
        for m in P1_METHODS:
            if m in rows:
                k, v = _better(results, setting, m, "standard", few, f"P1 {setting} {m} vs standard: few-step SW2 and traj lower")
                out[k] = v
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
    ft_steps: Optional[int] = None,
    p2_scale: Optional[float] = None,
    p2_bias: Optional[str] = None,
    p1_alpha_mode: Optional[str] = None,
    progress: bool = True,
    stream=None,
    command: Optional[str] = None,
) -> Dict:
    """Run the demo (see the module docstring) and return its results dict (also written to out/demo.json).

    methods / settings: see plan(); steps: optimizer steps per scratch model in the 2-D settings (default 6000,
    --quick 60; the 16-D settings train 0.4 of them, SETTINGS' step_scale);
    ft_steps: fine-tuning optimizer steps (default 600, --quick 30); radius: evaluation perturbation radius r
    (L2, R = r sqrt(D)); threads: CPU threads (default 1: an MLP step is overhead-bound); lr, batch: Adam
    learning rate and batch size; p2_scale / p2_bias: P2's radius r(t) = max(8/255, scale sigma_t^2) ("floor")
    or scale sigma_t^2 + U[8/255, 16/255] ("random"); p1_alpha_mode: "cifar_ratio" (default) or "abs"."""
    stream = stream if stream is not None else sys.stdout
    todo = plan(methods, settings)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use --device cpu")
    base = TrainConfig()
    cfg = TrainConfig(
        steps=steps or (60 if quick else base.steps), batch=batch or (64 if quick else base.batch), lr=lr or base.lr,
        hidden=32 if quick else base.hidden, depth=2 if quick else base.depth, seed=seed,
        ft_steps=ft_steps or (30 if quick else base.ft_steps),
        p2_scale=base.p2_scale if p2_scale is None else p2_scale, p2_bias=p2_bias or base.p2_bias,
        p1_alpha_mode=p1_alpha_mode or base.p1_alpha_mode)
    if cfg.steps < 1 or cfg.ft_steps < 1:
        raise ValueError(f"steps and ft_steps must be >= 1, got {cfg.steps} and {cfg.ft_steps}")
    if cfg.p2_bias not in ("floor", "random"):
        raise ValueError(f"p2_bias must be 'floor' or 'random', got {cfg.p2_bias!r}")
    if cfg.p1_alpha_mode not in ("abs", "cifar_ratio"):
        raise ValueError(f"p1_alpha_mode must be 'abs' or 'cifar_ratio', got {cfg.p1_alpha_mode!r}")
    if quick:
        sizes = dict(n_train=256, n_eval=200, n_samples=200, n_swd=200, projections=64, w2_points=100,
                     mmd_points=200, attack_points=32, sample_steps=20, reps=2)
    else:
        # 2^18 training points: the empirical mode weights of 2048 points are off by up to 1.3%, which alone puts the
        # SW2 of the exact denoiser of that empirical mixture at 2x the clean one's (up to 0.08% at 2^18).
        # Evaluation sized for the 2-minute budget: exact W2 (O(n^3)) on 600 points, MMD (O(n^2)) on 1000; SW2 of
        # 50-step samples on 10000 quasi-random points to the exact quantiles (the exact denoiser's SW2 varies by
        # sd 0.0004 over evaluation draws; 2000 i.i.d. samples vs a 2000-point reference set: sd 0.014-0.027).
        sizes = dict(n_train=2 ** 18, n_eval=2000, n_samples=2000, n_swd=10000, projections=256, w2_points=600,
                     mmd_points=1000, attack_points=500, sample_steps=50, reps=10)
    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(todo, cfg, sizes, dev, out_dir, radius, progress, stream, command, quick)
    finally:
        torch.set_num_threads(old_threads)


def _setting_config(cfg: TrainConfig, setting: str) -> TrainConfig:
    """cfg with the setting's scratch steps (SETTINGS' step_scale)."""
    return replace(cfg, steps=max(1, round(cfg.steps * SETTINGS[setting]["step_scale"])))


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def _run(todo, cfg, sizes, dev, out_dir, radius, progress, stream, command, quick):
    from ..bench.report import git_commit
    from ..progress import Progress
    from ..schedules import ddpm_linear_alphas_cumprod
    from .evaluate import data_floor, evaluate_model, make_eval_set
    from .report import format_markdown, format_table, make_figure, write_json

    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), _load()
    commit = git_commit()  # the code that runs: taken before any result exists
    ab = ddpm_linear_alphas_cumprod(1000)
    eval_kw = dict(radius=radius, few_steps=FEW_STEPS, sample_steps=sizes["sample_steps"],
                   w2_points=sizes["w2_points"], mmd_points=sizes["mmd_points"], attack_points=sizes["attack_points"])
    n_models = sum(len(m) for m in todo.values())
    cfgs = {s: _setting_config(cfg, s) for s in todo}
    steps = "/".join(dict.fromkeys(str(c.steps) for c in cfgs.values()))
    print(f"fastat demo: {n_models} models in {len(todo)} settings ({', '.join(todo)}), {steps} optimizer steps "
          f"from scratch / {cfg.ft_steps} fine-tuning, batch {cfg.batch}, device {dev}, "
          f"{torch.get_num_threads()} CPU thread(s)", file=sys.stderr)
    results, samples, train_sets, eval_sets, exact_rows, floors = {}, {}, {}, {}, {}, {}
    bar = Progress(sum(work_units(m, cfgs[s]) for s, ms in todo.items() for m in ms), n_models, enabled=progress)
    with bar:
        for setting, methods in todo.items():
            info = SETTINGS[setting]
            dim = info["dim"]
            mixture = ring_mixture(dim=dim)
            if dim not in eval_sets:
                eval_sets[dim] = make_eval_set(mixture, ab, sizes["n_eval"], sizes["n_samples"], cfg.seed, dev, FEW_STEPS,
                                               n_swd=sizes["n_swd"], projections=sizes["projections"])
                row = evaluate_model(eval_sets[dim].exact, eval_sets[dim], **eval_kw)
                exact_rows[dim] = (row, row.pop("_samples")[:sizes["n_samples"]])
                floors[dim] = data_floor(eval_sets[dim], sizes["w2_points"], sizes["mmd_points"])
            es = eval_sets[dim]
            clean_train = mixture.sample(sizes["n_train"], torch.Generator().manual_seed(cfg.seed))
            data = corrupt(clean_train, info["corruption"], generator=torch.Generator().manual_seed(cfg.seed + 7)).to(dev)
            train_sets[setting] = data
            results[setting], samples[setting] = {}, {}
            init = None
            for method in methods:
                bar.start_task(f"{setting}/{method}")
                trained = train_method(method, data, ab, cfgs[setting], init_state=init, progress=bar)
                if method == "standard":
                    init = trained["model"].state_dict()
                row = evaluate_model(trained["model"], es, **eval_kw)
                row["train"] = {k: trained[k] for k in ("seconds", "optimizer_steps", "ms_per_step")}
                samples[setting][method] = row.pop("_samples")[:sizes["n_samples"]]
                results[setting][method] = row
            timing = time_steps(methods, data, ab, cfgs[setting], reps=sizes["reps"])
            for method in methods:
                results[setting][method]["time"] = timing[method]
            exact_row, exact_samples = exact_rows[dim]
            results[setting]["exact"] = dict(exact_row)
            samples[setting]["exact"] = exact_samples
            if info["corruption"] == "noisy":
                oracle = ExactDenoiser(noisy_mixture(mixture), ab).to(dev)
                row = evaluate_model(oracle, es, **eval_kw)
                samples[setting]["oracle_corrupted"] = row.pop("_samples")[:sizes["n_samples"]]
                results[setting]["oracle_corrupted"] = row
    elapsed, cpu_seconds, load_end = time.perf_counter() - t_start, time.process_time() - cpu_start, _load()
    busy = max(x for x in (load_start, load_end, 0.0) if x is not None)
    timing_note = (f"timing ratios (time_x) were measured while the machine was loaded (1-min load average up to "
                   f"{busy:.1f} on {os.cpu_count()} cores, this run using {torch.get_num_threads()} thread(s)): "
                   f"treat them as rough" if busy > 1.5 else None)
    payload = {
        "command": command or "fastat.demo.run_demo(...)",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load_start,
            "load_average_at_end": load_end,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "fastat_backend": get_backend(),
        },
        "quick": quick,
        "config": cfg.as_dict(),
        "scratch_steps": {s: cfgs[s].steps for s in todo},
        "sizes": sizes,
        "radius": radius,
        "settings": {s: SETTINGS[s]["about"] for s in todo},
        "methods": {m: METHODS[m] for ms in todo.values() for m in ms},
        "data_floor": {s: floors[SETTINGS[s]["dim"]] for s in todo},
        "results": results,
        "claims": claims(results),
        "timing_note": timing_note,
        "total_seconds": elapsed,
        # CPU time of this process: about the wall time on an idle machine for this single-threaded run
        "total_cpu_seconds": cpu_seconds,
    }
    about = {s: SETTINGS[s]["about"] for s in todo}
    print(format_table(results, about), file=stream)
    for s in todo:
        f = payload["data_floor"][s]
        print(f"finite-sample floor, {s} (clean samples in place of the model's): SW2 {f['swd']:.4f}  MMD {f['mmd']:.4f}  "
              f"W2 {f['w2']:.4f}", file=stream)
    print("\nclaims (method vs baseline on this run; 'holds' = lower in every listed metric):", file=stream)
    for name, c in payload["claims"].items():
        vals = ", ".join(f"{m} {a:.3f}/{b:.3f}" for m, a, b in zip(c["metrics"], c["method"], c["baseline"]))
        print(f"  {'holds' if c['holds'] else 'fails'}  {name}: {c['wins']}/{c['comparisons']} ({vals})", file=stream)
    if timing_note:
        print(f"note: {timing_note}", file=stream)
    json_path = write_json(payload, out_dir / "demo.json")
    (out_dir / "demo.md").write_text(format_markdown(results, about) + "\n")
    bases = {s: ring_mixture(dim=SETTINGS[s]["dim"]).basis for s in todo}
    png = make_figure(results, samples, train_sets, {s: eval_sets[SETTINGS[s]["dim"]].reference for s in todo},
                      bases, out_dir / "demo.png", ab.numel(), note=timing_note)
    print(f"\nwrote {json_path}, {out_dir / 'demo.md'}" + (f", {png}" if png else " (no PNG: matplotlib missing)")
          + f"  [{elapsed:.1f} s wall, {cpu_seconds:.1f} s CPU]", file=stream)
    payload["paths"] = {"json": str(json_path), "md": str(out_dir / "demo.md"), "png": str(png) if png else None}
    return payload
