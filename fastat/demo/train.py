"""Training of the demo denoisers: one small MLP per (data setting, method), all through fastat's training API.

Methods (names used by `fastat demo --methods`):

    standard        plain DDPM loss                                 diffusion_adv_loss(method="standard")
    ddpm_ip         DDPM-IP input perturbation, gamma = eps         diffusion_adv_loss(method="input_perturbation")
    p1_pgd          P1 with K = 3 PGD-L2 attack steps               diffusion_adv_loss(method="pgd", steps=3)
    p1_free         P1 Free-AT: K = 3 replays per batch             FreeReplay(method="p1", replays=3)
    p2_random       P2 equivariant, random omega                    diffusion_adv_loss(method="equivariant_random")
    p2_adversarial  P2 equivariant, FGSM-RS omega                   diffusion_adv_loss(method="equivariant_adversarial")

Every method gets the same number of optimizer steps, the same batches of training data (per setting),
the same learning-rate schedule and the same initial weights.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List

import torch

from ..bench.timing import interleaved
from .models import MLPDenoiser

METHODS: Dict[str, Dict] = {
    "standard": {"kind": "loss", "method": "standard"},
    "ddpm_ip": {"kind": "loss", "method": "input_perturbation"},
    "p1_pgd": {"kind": "loss", "method": "pgd", "steps": 3},
    "p1_free": {"kind": "free", "method": "p1", "replays": 3},
    "p2_random": {"kind": "loss", "method": "equivariant_random"},
    "p2_adversarial": {"kind": "loss", "method": "equivariant_adversarial"},
}


@dataclass
class TrainConfig:
    steps: int = 450           # optimizer steps per model
    batch: int = 1024          # the step is overhead-bound on CPU: a big batch costs ~nothing extra
    lr: float = 2e-2           # Adam, cosine decay to 10% over `steps`
    hidden: int = 128
    depth: int = 3
    eps: float = 0.1           # P1: L2 radius r (rms: R = r sqrt(D)); DDPM-IP: gamma; P2: r(t) = max(8/255, eps s_t^2)
    p1_alpha: float = 0.1      # P1 normalised L2 step (official value)
    seed: int = 0
    extra: Dict = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return asdict(self)


def _loss_api():
    """fastat's training API (issue 5): diffusion_adv_loss and FreeReplay."""
    from ..training import FreeReplay, diffusion_adv_loss

    return diffusion_adv_loss, FreeReplay


class Progress:
    """A plain-text progress bar on stderr (one line, redrawn in place on a terminal)."""

    def __init__(self, label: str, total: int, stream=None, width: int = 24):
        self.label, self.total, self.width = label, max(total, 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last = -1

    def update(self, done: int) -> None:
        pct = int(100 * done / self.total)
        step = 2 if self.tty else 25
        if pct // step == self.last // step and done != self.total:
            return
        self.last = pct
        filled = int(self.width * done / self.total)
        line = f"  {self.label:<28} [{'#' * filled}{'.' * (self.width - filled)}] {done:>5}/{self.total} {time.perf_counter() - self.start:6.1f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def make_model(cfg: TrainConfig, dim: int, device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    return MLPDenoiser(dim=dim, hidden=cfg.hidden, depth=cfg.depth).to(device)


def _loss_kwargs(spec: Dict, cfg: TrainConfig) -> Dict:
    kw = {"method": spec["method"], "eps": cfg.eps}
    if spec["method"] == "pgd":
        kw.update(steps=spec["steps"], alpha=cfg.p1_alpha)
    return kw


def step_function(name: str, model, optimizer, alphas_cumprod, cfg: TrainConfig, generator: torch.Generator,
                  lr_scheduler=None) -> Callable[[torch.Tensor], int]:
    """fn(x0) -> number of optimizer steps taken: one training step of method `name` on batch x0."""
    diffusion_adv_loss, FreeReplay = _loss_api()
    spec = METHODS[name]
    if spec["kind"] == "free":
        trainer = FreeReplay(model, optimizer, replays=spec["replays"], method=spec["method"],
                             alphas_cumprod=alphas_cumprod, eps=cfg.eps, alpha=cfg.p1_alpha, lr_scheduler=lr_scheduler)

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
        if lr_scheduler is not None:
            lr_scheduler.step()
        return 1

    return loss_step


def train_method(name: str, data: torch.Tensor, alphas_cumprod, cfg: TrainConfig, *, init_state=None,
                 label: str = "", progress: bool = True) -> Dict:
    """Train one model with method `name` on the training set `data` [N, D]; returns
    {"model", "seconds", "optimizer_steps", "ms_per_step"} (wall clock of the whole loop)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    device = data.device
    model = make_model(cfg, data.shape[1], device)
    if init_state is not None:
        model.load_state_dict(init_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    total = cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # attack / noise draws
    batches = torch.Generator().manual_seed(cfg.seed + 2)            # same batch order for every method
    fn = step_function(name, model, optimizer, alphas_cumprod, cfg, gen, sched)
    bar = Progress(label or name, total) if progress else None
    done = 0
    start = time.perf_counter()
    while done < total:
        idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=batches).to(device)
        done += fn(data[idx])
        if bar is not None:
            bar.update(min(done, total))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"model": model, "seconds": seconds, "optimizer_steps": done, "ms_per_step": 1e3 * seconds / done}


def time_steps(names: List[str], data: torch.Tensor, alphas_cumprod, cfg: TrainConfig, reps: int = 20) -> Dict[str, Dict]:
    """Median time per optimizer step of each method, timed interleaved (A B C A B C ...) on fresh copies of
    one model so machine drift hits every method alike. FreeReplay's time is divided by its replays."""
    device = data.device
    base = make_model(cfg, data.shape[1], device)
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
