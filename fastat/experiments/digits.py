"""`fastat experiment digits`: P1 and P2 on scikit-learn's bundled 8x8 digits (no download), over several seeds.

Data: the 1797 images of `sklearn.datasets.load_digits`, scaled to [-1, 1], split once (stratified, fixed) into
1437 training and 360 held-out images. Model: an MLP eps-denoiser with a sinusoidal timestep embedding
(fastat.demo.models), Adam at a constant learning rate after a short warm-up, EMA weights evaluated, DDPM linear
schedule with 1000 steps, DDIM (eta = 0) sampling, final samples clipped to [-1, 1].

Per seed (model initialisation, batch order, noise and corruption draws; the split and the metric classifier
are fixed):
  clean     standard; P2 adversarial (radius scale 1.0); P1 as fine-tuning of the standard model: Free-AT at
            the official ||delta||/||eps|| ratio (ft_p1_free) and at the official absolute step (ft_p1_free_abs),
            against the replay control with delta = 0 (ft_replay); DDIM 10, 20 and 50 steps
  noisy0.2, noisy0.1   90% of the training images + N(0, sigma^2) pixel noise: standard; P2 adversarial at
            radius scale 1.0 (and 0.1 on noisy0.2: the scale sweep); P2 random at 1.0
Every setting also has "standard_eqtime": the standard run continued (constant learning rate, EMA) until it has
used the wall-clock time of P2 adversarial (ratio of per-step times measured interleaved in the same run).
Metrics (fastat.experiments.image_metrics) against the held-out images, with floors from real images.
Comparisons: paired differences over seeds with 95% t intervals (fastat.experiments.stats).
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

P1_FINETUNES = ("ft_p1_free", "ft_p1_free_abs")


@dataclass
class DigitsConfig:
    seeds: int = 5
    hidden: int = 256
    depth: int = 3
    embed: int = 64
    steps: int = 3000          # optimizer steps of every scratch model
    batch: int = 128
    lr: float = 2e-3           # constant after `warmup` linear steps
    warmup: int = 100
    ema: float = 0.999
    ft_steps: int = 600        # P1 fine-tuning optimizer steps (3 per batch)
    ft_lr: float = 1e-4
    ft_ema: float = 0.995
    n_samples: int = 1000
    sample_steps: Tuple[int, ...] = (10, 20, 50)
    noise_levels: Tuple[float, ...] = (0.2, 0.1)
    noisy_fraction: float = 0.9
    p2_scales: Tuple[float, ...] = (0.1, 1.0)
    timing_reps: int = 10
    classifier_steps: int = 600
    extra: Dict = field(default_factory=dict)

    @classmethod
    def for_run(cls, quick: bool, device: torch.device, seeds: Optional[int] = None) -> "DigitsConfig":
        """CPU default; --quick: 1 seed, short training; CUDA: a wider, deeper MLP trained longer on bigger batches."""
        cfg = cls()
        if device.type == "cuda":
            cfg = replace(cfg, hidden=1024, depth=4, embed=128, steps=6000, batch=512, lr=5e-4, ft_steps=900,
                          n_samples=2000)
        if quick:
            cfg = replace(cfg, seeds=1, steps=400, ft_steps=60, n_samples=300, timing_reps=3, warmup=20, ema=0.99,
                          classifier_steps=200)
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {seeds}")
            cfg = replace(cfg, seeds=seeds)
        return cfg


def load_digits_split(device) -> Dict[str, torch.Tensor]:
    """sklearn's digits in [-1, 1] ([N, 64] float32) with labels, split 80/20 stratified with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ValueError("fastat experiment digits needs scikit-learn and torchmetrics: "
                         "pip install 'fastat[digits]'") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=bunch.target, random_state=0)
    return {"train_x": x[tr].to(device), "train_y": y[tr].to(device), "test_x": x[te].to(device), "test_y": y[te].to(device)}


def _train_cfg(cfg: DigitsConfig, seed: int, **overrides):
    from ..demo.train import TrainConfig

    base = TrainConfig(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, hidden=cfg.hidden, depth=cfg.depth, seed=seed,
                       parameterization="eps")  # the model is _make_model's eps-MLP
    return replace(base, **overrides)


def _make_model(cfg: DigitsConfig, seed: int, dim: int, device):
    from ..demo.models import MLPDenoiser

    torch.manual_seed(seed)
    return MLPDenoiser(dim=dim, hidden=cfg.hidden, depth=cfg.depth, embed_dim=cfg.embed).to(device)


def train_snapshots(method: str, data: torch.Tensor, ab, cfg: DigitsConfig, seed: int, snapshots: List[int], *,
                    init_state=None, progress=None, **train_overrides) -> Dict:
    """Train `method` (a fastat.demo.train method) and keep a copy of the EMA weights at each optimizer-step count
    in `snapshots`; returns {"models": {steps: model}, "seconds": {steps: training seconds so far}}."""
    from ..demo.train import EMA, METHODS, step_function

    finetune = init_state is not None
    model = _make_model(cfg, seed, data.shape[1], data.device)
    if finetune:
        model.load_state_dict(init_state)
    tcfg = _train_cfg(cfg, seed, **train_overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ft_lr if finetune else cfg.lr)
    sched = None if finetune else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / cfg.warmup))
    ema = EMA(model, cfg.ft_ema if finetune else cfg.ema)
    gen = torch.Generator(device=data.device).manual_seed(seed + 1)
    batches = torch.Generator().manual_seed(seed + 2)
    step = step_function(method, model, optimizer, ab, tcfg, gen, sched, ema)
    cost = METHODS[method]["cost"]
    models, seconds, done, elapsed = {}, {}, 0, 0.0
    for target in sorted(snapshots):
        start = time.perf_counter()
        while done < target:
            idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=batches).to(data.device)
            taken = step(data[idx])
            done += taken
            if progress is not None:
                progress.advance(cost * taken)
        if data.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        models[target], seconds[target] = copy.deepcopy(ema.model), elapsed
    return {"models": models, "seconds": seconds}


def settings(cfg: DigitsConfig) -> List[str]:
    """"clean", then "noisy<sigma>" per noise level."""
    return ["clean"] + [f"noisy{s:g}" for s in cfg.noise_levels]


def _plan(cfg: DigitsConfig) -> Dict[str, List[Tuple[str, str, Dict]]]:
    """{setting: [(name, method, train overrides)]} of the scratch P2 models (standard is trained separately)."""
    out = {}
    for setting in settings(cfg):
        if setting == "clean":
            out[setting] = [("p2_adv_s1", "p2_adversarial", {"p2_scale": 1.0})]
        else:  # the radius-scale sweep on the strongest noise only (time budget)
            scales = cfg.p2_scales if setting == f"noisy{max(cfg.noise_levels):g}" else (1.0,)
            out[setting] = [(f"p2_adv_s{s:g}", "p2_adversarial", {"p2_scale": s}) for s in scales]
            out[setting].append(("p2_rand_s1", "p2_random", {"p2_scale": 1.0}))
    return out


def _units(cfg: DigitsConfig, ratio_guess: float = 2.0) -> float:
    from ..demo.train import METHODS

    per_setting = cfg.steps * ratio_guess  # standard continued to equal time
    total = 0.0
    for setting, runs in _plan(cfg).items():
        total += per_setting + sum(METHODS[m]["cost"] * cfg.steps for _, m, _ in runs)
    total += 3 * cfg.ft_steps
    return total * cfg.seeds


def corrupt_images(x: torch.Tensor, sigma: float, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A copy of x [N, D] in which a random `fraction` of the images get + N(0, sigma^2) pixel noise."""
    n = x.shape[0]
    chosen = torch.randperm(n, generator=generator)[: int(round(fraction * n))]
    out = x.clone()
    out[chosen.to(x.device)] += sigma * torch.randn(len(chosen), x.shape[1], generator=generator).to(x)
    return out


def _sample(model, x_T, ab, steps: int) -> torch.Tensor:
    from ..eval import ddim_sample

    model.eval()
    return ddim_sample(model, x_T, ab, steps).clamp(-1.0, 1.0).cpu()


def run_digits(*, quick: bool = False, seeds: Optional[int] = None, device: str = "cpu", out: str = "fastat_digits_out",
               threads: Optional[int] = None, progress: bool = True, stream=None, command: Optional[str] = None,
               config: Optional[DigitsConfig] = None) -> Dict:
    """Run the experiment (module docstring); writes digits.json, digits.md and digits.png to `out` and returns the
    results dict. `config` overrides the defaults entirely (tests use a tiny one)."""
    stream = stream if stream is not None else sys.stdout
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use --device cpu")
    cfg = config or DigitsConfig.for_run(quick, dev, seeds)
    old_threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, dev, out_dir, quick, progress, stream, command)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: DigitsConfig, dev, out_dir: Path, quick: bool, progress: bool, stream, command) -> Dict:
    from ..bench.report import git_commit
    from ..demo.report import write_json
    from ..demo.train import time_steps
    from ..progress import Progress
    from ..schedules import ddpm_linear_alphas_cumprod
    from . import digits_report
    from .image_metrics import ImageMetrics, train_classifier

    t_start, cpu_start = time.perf_counter(), os.times()
    commit = git_commit()  # the code that runs: taken before any result exists
    load_start = _load()
    data = load_digits_split(dev)
    ab = ddpm_linear_alphas_cumprod(1000)
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    classifier = train_classifier(cpu(data["train_x"]), cpu(data["train_y"]), steps=cfg.classifier_steps)
    with torch.no_grad():
        accuracy = float((classifier.logits(cpu(data["test_x"])).argmax(1) == cpu(data["test_y"])).float().mean())
    metrics = ImageMetrics(classifier, cpu(data["test_x"]), cpu(data["train_x"]))
    floors = _floors(metrics, cpu(data["train_x"]), cfg)
    print(f"fastat experiment digits: {cfg.seeds} seed(s), MLP {cfg.hidden}x{cfg.depth}, {cfg.steps} steps per model, "
          f"device {dev}; metric classifier held-out accuracy {accuracy:.3f}, PCA k = {metrics.k}", file=sys.stderr)
    plan = _plan(cfg)
    n_models = cfg.seeds * sum(1 + len(runs) + (3 if s == "clean" else 0) for s, runs in plan.items())
    results: Dict = {}
    mosaics: Dict = {}
    with Progress(_units(cfg), n_models, enabled=progress) as bar:
        for seed in range(cfg.seeds):
            results[seed] = {}
            g = torch.Generator().manual_seed(10_000 + seed)
            x_T = torch.randn(cfg.n_samples, data["train_x"].shape[1], generator=g).to(dev)
            for setting in settings(cfg):
                train = data["train_x"]
                if setting != "clean":
                    sigma = float(setting[len("noisy"):])
                    train = corrupt_images(train, sigma, cfg.noisy_fraction, torch.Generator().manual_seed(seed + 77))
                rows = results[seed][setting] = {}
                # Equal wall-clock: per-step time of P2 adversarial over standard's, timed interleaved in this run.
                timing = time_steps(["standard", "p2_adversarial"], train, ab, _train_cfg(cfg, seed, p2_scale=1.0),
                                    reps=cfg.timing_reps, model=_make_model(cfg, seed, train.shape[1], dev))
                ratio = timing["p2_adversarial"]["relative_to_standard"]
                eq_steps = max(cfg.steps, int(round(cfg.steps * ratio)))
                bar.start_task(f"seed {seed} {setting}/standard (+ equal time: {eq_steps} steps)")
                std = train_snapshots("standard", train, ab, cfg, seed, [cfg.steps, eq_steps], progress=bar)
                steps_here = cfg.sample_steps if setting == "clean" else (max(cfg.sample_steps),)
                for name, steps in (("standard", cfg.steps), ("standard_eqtime", eq_steps)):
                    rows[name] = _evaluate(std["models"][steps], x_T, ab, metrics, steps_here, seed)
                    rows[name]["train"] = {"optimizer_steps": steps, "seconds": std["seconds"][steps]}
                rows["standard_eqtime"]["train"]["time_ratio_p2_adversarial"] = ratio
                mosaics.setdefault(setting, {})
                if seed == 0:
                    mosaics[setting]["training data"] = cpu(train[:16])
                    mosaics[setting]["standard"] = _sample(std["models"][cfg.steps], x_T[:16], ab, max(cfg.sample_steps))
                for name, method, overrides in plan[setting]:
                    bar.start_task(f"seed {seed} {setting}/{name}")
                    run = train_snapshots(method, train, ab, cfg, seed, [cfg.steps], progress=bar, **overrides)
                    model = run["models"][cfg.steps]
                    rows[name] = _evaluate(model, x_T, ab, metrics, steps_here, seed)
                    rows[name]["train"] = {"optimizer_steps": cfg.steps, "seconds": run["seconds"][cfg.steps]}
                    if seed == 0:
                        mosaics[setting][name] = _sample(model, x_T[:16], ab, max(cfg.sample_steps))
                if setting == "clean":
                    init = std["models"][cfg.steps].state_dict()
                    for name, method, overrides in (("ft_replay", "ft_replay", {}), ("ft_p1_free", "ft_p1_free", {}),
                                                    ("ft_p1_free_abs", "ft_p1_free", {"p1_alpha_mode": "abs"})):
                        bar.start_task(f"seed {seed} clean/{name}")
                        run = train_snapshots(method, train, ab, cfg, seed, [cfg.ft_steps], init_state=init, progress=bar,
                                              **overrides)
                        rows[name] = _evaluate(run["models"][cfg.ft_steps], x_T, ab, metrics, cfg.sample_steps, seed)
                        rows[name]["train"] = {"optimizer_steps": cfg.ft_steps, "seconds": run["seconds"][cfg.ft_steps]}
    wall, cpu_end = time.perf_counter() - t_start, os.times()
    cpu_seconds = (cpu_end.user + cpu_end.system + cpu_end.children_user + cpu_end.children_system
                   - cpu_start.user - cpu_start.system - cpu_start.children_user - cpu_start.children_system)
    load_end = _load()
    comparisons = digits_report.comparisons(results, cfg)
    finite = all(math.isfinite(v) for seed_rows in results.values() for rows in seed_rows.values()
                 for row in rows.values() for per in row["metrics"].values() for v in per.values())
    payload = {
        "command": command or "fastat.experiments.digits.run_digits(...)",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": load_start, "load_average_at_end": load_end,
        },
        "quick": quick,
        "config": asdict(cfg),
        "classifier_heldout_accuracy": accuracy,
        "pca_components": metrics.k,
        "floors": floors,
        "results": results,
        "comparisons": comparisons,
        "finite": finite,
        "total_seconds": wall,
        "total_cpu_seconds": cpu_seconds,
    }
    text = digits_report.markdown(payload)
    print(text, file=stream)
    json_path = write_json(payload, out_dir / "digits.json")
    (out_dir / "digits.md").write_text(text + "\n")
    png = digits_report.figure(mosaics, payload, out_dir / "digits.png")
    print(f"wrote {json_path}, {out_dir / 'digits.md'}" + (f", {png}" if png else "")
          + f"  [{wall:.1f} s wall, {cpu_seconds:.1f} s CPU]", file=stream)
    payload["paths"] = {"json": str(json_path), "md": str(out_dir / "digits.md"), "png": str(png) if png else None}
    return payload


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def _evaluate(model, x_T, ab, metrics, sample_steps, seed: int) -> Dict:
    return {"metrics": {str(n): metrics(_sample(model, x_T, ab, n), seed=seed) for n in sample_steps}}


def _floors(metrics, train_x: torch.Tensor, cfg: DigitsConfig) -> Dict[str, Dict[str, float]]:
    """Real images scored like samples: training images vs held-out (the floor a perfect model reaches with this
    many samples), and the noisy training sets (what a model that reproduces its corrupted data would score)."""
    g = torch.Generator().manual_seed(0)
    n = min(cfg.n_samples, train_x.shape[0])
    subset = train_x[torch.randperm(train_x.shape[0], generator=g)[:n]]
    out = {"train_vs_heldout": metrics(subset)}
    for sigma in cfg.noise_levels:
        noisy = corrupt_images(subset, sigma, cfg.noisy_fraction, torch.Generator().manual_seed(1)).clamp(-1, 1)
        out[f"noisy{sigma:g}_train_vs_heldout"] = metrics(noisy)
    return out
