"""Training of the demo denoisers: one small MLP per (data setting, method), all through fastat's training API.

Methods (names used by `fastat demo --methods`). "scratch" methods train from a fresh initialisation;
"finetune" methods start from the same setting's trained standard model (its EMA weights), as P1 does:

    standard        plain DDPM loss                                   diffusion_adv_loss(method="standard")
    ddpm_ip         DDPM-IP input perturbation, gamma = eps           diffusion_adv_loss(method="input_perturbation")
    p1_pgd          P1, K = 3 PGD-L2 steps, from scratch              diffusion_adv_loss(method="pgd", steps=3)
    p1_free         P1 Free-AT, K = 3 replays per batch, from scratch FreeReplay(method="p1", replays=3)
    p2_random       P2 equivariant, random omega                      diffusion_adv_loss(method="equivariant_random")
    p2_adversarial  P2 equivariant, FGSM-RS omega                     diffusion_adv_loss(method="equivariant_adversarial")
    ft_replay       fine-tune: K = 3 replays per batch with delta = 0 FreeReplay(method="p1", eps=0): the control
    ft_p1_free      fine-tune with P1 Free-AT (P1's official algorithm) FreeReplay(method="p1", replays=3)
    ft_p1_pgd       fine-tune with P1, K = 3 PGD-L2 steps             diffusion_adv_loss(method="pgd", steps=3)

P1's step follows `TrainConfig.p1_alpha_mode` (default "cifar_ratio": the official alpha = 0.1 scaled so that
||delta|| / ||eps|| is the official CIFAR-10 run's; "abs" is the official code's absolute step, 28-39x stronger in
2-D). P2's radius r(t) = max(floor, scale * sigma_t^rho) or with a random bias (see fastat.training.p2_radius).
Every method of a setting sees the same batches, noise draws and initial weights; evaluation uses EMA weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..bench.timing import interleaved
from .models import MLPDenoiser

METHODS: Dict[str, Dict] = {
    "standard": {"kind": "scratch", "method": "standard", "cost": 1.0},
    "ddpm_ip": {"kind": "scratch", "method": "input_perturbation", "cost": 1.0},
    "p1_pgd": {"kind": "scratch", "method": "pgd", "steps": 3, "cost": 3.0},
    "p1_free": {"kind": "scratch", "free": "p1", "replays": 3, "cost": 1.0},
    "p2_random": {"kind": "scratch", "method": "equivariant_random", "cost": 2.0},
    "p2_adversarial": {"kind": "scratch", "method": "equivariant_adversarial", "cost": 2.7},
    "ft_replay": {"kind": "finetune", "free": "p1", "replays": 3, "eps": 0.0, "cost": 1.0},
    "ft_p1_free": {"kind": "finetune", "free": "p1", "replays": 3, "cost": 1.0},
    "ft_p1_pgd": {"kind": "finetune", "method": "pgd", "steps": 3, "cost": 3.0},
}
P1_METHODS = ("p1_pgd", "p1_free")
P2_METHODS = ("p2_random", "p2_adversarial")
FINETUNE_P1 = ("ft_p1_free", "ft_p1_pgd")
CONTROL = "ft_replay"


@dataclass
class TrainConfig:
    steps: int = 6000          # optimizer steps per scratch model (settings may scale it: SETTINGS' step_scale)
    batch: int = 1024
    lr: float = 3e-3           # Adam, cosine decay to 2% over `steps`
    hidden: int = 128
    depth: int = 3
    parameterization: str = "v"  # "v": the MLP's output is read as v (MLPDenoiser); "eps": as eps
    ema: float = 0.998         # EMA decay of the evaluated weights (warm-up: min(ema, (1 + k) / (10 + k)))
    eps: float = 0.1           # P1: L2 radius r (rms: R = r sqrt(D)); DDPM-IP: gamma
    p1_alpha: float = 0.1      # P1: official L2 step
    p1_alpha_mode: str = "cifar_ratio"
    p2_scale: float = 1.0      # P2: r(t) = max(p2_floor, p2_scale * sigma_t^p2_rho) (bias "floor")
    p2_rho: float = 2.0
    p2_floor: float = 8.0 / 255.0
    p2_bias: str = "floor"
    ft_steps: int = 600        # fine-tuning optimizer steps (FreeReplay: 3 per batch)
    ft_lr: float = 1e-4        # constant (the scratch schedule ends at 6e-5)
    ft_ema: float = 0.995
    seed: int = 0
    extra: Dict = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return asdict(self)


class EMA:
    """Exponential moving average of a model's parameters: ema <- d * ema + (1 - d) * model, with the warm-up
    d_k = min(decay, (1 + k) / (10 + k)) (k = updates so far). Callable, so FreeReplay's `ema=` hook takes it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.model = copy.deepcopy(model).eval()
        self.decay, self.updates = decay, 0
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), 1.0 - d)
        self.updates += 1


def make_model(cfg: TrainConfig, dim: int, device, alphas_cumprod: Optional[torch.Tensor] = None) -> torch.nn.Module:
    """The demo's MLP eps-denoiser, initialised from cfg.seed; v-parameterised (needs `alphas_cumprod`) unless
    cfg.parameterization == "eps"."""
    if cfg.parameterization not in ("v", "eps"):
        raise ValueError(f"parameterization must be 'v' or 'eps', got {cfg.parameterization!r}")
    if cfg.parameterization == "v" and alphas_cumprod is None:
        raise ValueError("a v-parameterised model needs alphas_cumprod (its eps = sqrt(abar) F + sqrt(1 - abar) x_t)")
    torch.manual_seed(cfg.seed)
    return MLPDenoiser(dim=dim, hidden=cfg.hidden, depth=cfg.depth,
                       alphas_cumprod=alphas_cumprod if cfg.parameterization == "v" else None).to(device)


def _loss_kwargs(spec: Dict, cfg: TrainConfig) -> Dict:
    kw = {"method": spec["method"]}
    if spec["method"] == "pgd":
        kw.update(steps=spec["steps"], alpha=cfg.p1_alpha, alpha_mode=cfg.p1_alpha_mode, eps=cfg.eps)
    elif spec["method"] == "input_perturbation":
        kw.update(eps=cfg.eps)
    elif spec["method"].startswith("equivariant"):
        kw.update(eps=cfg.p2_scale, rho=cfg.p2_rho, r_min=cfg.p2_floor, radius_bias=cfg.p2_bias)
    return kw


def step_function(name: str, model, optimizer, alphas_cumprod, cfg: TrainConfig, generator: torch.Generator,
                  lr_scheduler=None, ema: Optional[EMA] = None) -> Callable[[torch.Tensor], int]:
    """fn(x0) -> number of optimizer steps taken: one training step of method `name` on batch x0."""
    from ..training import FreeReplay, diffusion_adv_loss

    spec = METHODS[name]
    if "free" in spec:
        trainer = FreeReplay(model, optimizer, replays=spec["replays"], method=spec["free"], alphas_cumprod=alphas_cumprod,
                             eps=spec.get("eps", cfg.eps), alpha=cfg.p1_alpha, alpha_mode=cfg.p1_alpha_mode,
                             lr_scheduler=lr_scheduler, ema=ema)

        def free_step(x0):
            trainer.step(x0, generator=generator)
            return spec["replays"]

        return free_step
    kw = _loss_kwargs(spec, cfg)

    def loss_step(x0):
        loss = diffusion_adv_loss(model, x0, alphas_cumprod=alphas_cumprod, generator=generator, **kw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema(model)
        if lr_scheduler is not None:
            lr_scheduler.step()
        return 1

    return loss_step


def train_method(name: str, data: torch.Tensor, alphas_cumprod, cfg: TrainConfig, *, init_state=None,
                 progress=None) -> Dict:
    """Train one model with method `name` on the training set `data` [N, D]. Finetune methods need `init_state`
    (the standard model's EMA state dict). Returns {"model" (EMA weights), "raw", "seconds", "optimizer_steps",
    "ms_per_step"}; `progress` (fastat.progress.Progress) is advanced by cost x optimizer steps."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    spec = METHODS[name]
    finetune = spec["kind"] == "finetune"
    if finetune and init_state is None:
        raise ValueError(f"method {name!r} fine-tunes a trained model: pass init_state (the standard model's weights)")
    device = data.device
    model = make_model(cfg, data.shape[1], device, alphas_cumprod)
    if init_state is not None:
        model.load_state_dict(init_state)
    total = cfg.ft_steps if finetune else cfg.steps
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ft_lr if finetune else cfg.lr)
    sched = None if finetune else torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    ema = EMA(model, cfg.ft_ema if finetune else cfg.ema)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # attack / noise draws
    batches = torch.Generator().manual_seed(cfg.seed + 2)            # same batch order for every method
    fn = step_function(name, model, optimizer, alphas_cumprod, cfg, gen, sched, ema)
    done = 0
    start = time.perf_counter()
    while done < total:
        idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=batches).to(device)
        taken = fn(data[idx])
        done += taken
        if progress is not None:
            progress.advance(spec["cost"] * taken)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"model": ema.model, "raw": model, "seconds": seconds, "optimizer_steps": done,
            "ms_per_step": 1e3 * seconds / done}


def work_units(name: str, cfg: TrainConfig) -> float:
    """The progress units a model of method `name` is worth (cost per optimizer step x optimizer steps)."""
    spec = METHODS[name]
    return spec["cost"] * (cfg.ft_steps if spec["kind"] == "finetune" else cfg.steps)


def time_steps(names: List[str], data: torch.Tensor, alphas_cumprod, cfg: TrainConfig, reps: int = 20,
               model: Optional[torch.nn.Module] = None) -> Dict[str, Dict]:
    """Median time per optimizer step of each method, timed interleaved (A B C A B C ...) on fresh copies of
    one model (`model`, default make_model(cfg)) so machine drift hits every method alike. FreeReplay's time is
    divided by its replays."""
    device = data.device
    base = model if model is not None else make_model(cfg, data.shape[1], device, alphas_cumprod)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    x0 = data[: cfg.batch]
    fns, per = {}, {}
    for name in names:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        fn = step_function(name, model, opt, alphas_cumprod, cfg, gen)
        fns[name] = (lambda f: (lambda: f(x0)))(fn)
        per[name] = METHODS[name].get("replays", 1)
    timed = interleaved(fns, device=device, warmup=3, reps=reps)
    out = {}
    ref = timed["standard"]["median_ms"] / per["standard"] if "standard" in timed else None
    for name, t in timed.items():
        ms = t["median_ms"] / per[name]
        out[name] = {"ms_per_step": ms, "q10_ms": t["q10_ms"] / per[name], "q90_ms": t["q90_ms"] / per[name],
                     "relative_to_standard": (ms / ref) if ref else float("nan")}
    return out
