"""`FreeReplay`: Free-AT minibatch replay (SPEC §1, P1's "fast" loop) and its P2 and CM variants.

One call of ``.step(x0)`` runs K replays of the same batch (same x0, noise and timesteps):

    delta = 0 (or a random start)                     # reset for every new batch
    repeat K times:
        forward/backward once -> weight gradients AND d loss / d delta (one backward, no attack pass)
        optimizer step (GradScaler, gradient clipping, EMA and LR-scheduler hooks run per replay)
        g = delta.grad / loss_scale
        delta = pgd_step(delta, g, alpha, R, norm)    # L2: normalised ascent + projection; Linf: sign + clamp

method="p1": the P1 loss (target modes as in diffusion_adv_loss). Cost per optimizer step: 1 F + 1 Bw.
method="p2": P2 with omega updated from the previous replay's backward (no separate attack pass): the
    step ascends the training loss's gradient in omega (sign step of ``alpha`` * r(t), default 1.25,
    clamped to the box), starting from a uniform draw in the box. Cost: 2 F (or one 2B forward) + 1 Bw.
method="cm": consistency_adv_loss with the given perturbation (``loss_kwargs`` are passed to it, e.g.
    target_model, mode, teacher); the same indices and z are reused across replays. Cost: 1 F + 1 Bw
    + the no-grad target pass per replay (the EMA target moves between replays).

Gradient accumulation: ``grad_accum_steps=M`` splits x0 into M micro-batches, each with its own
perturbation; under DDP the first M-1 backwards run under ``no_sync``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

from .._checks import check_choice, check_tensor
from .._shapes import column
from ..ops.perturbation import NORMS, pgd_step, random_perturbation, rms_radius
from ..ops.losses import TARGETS, equivariance_regularizer
from .consistency import consistency_adv_loss
from .diffusion import P2_BETA, P2_LAMBDA, P2_R_MIN, P2_RHO, P2_STEP_FACTOR, _Batch, p2_radius, p2_weight
from ._common import SameRandomness, draw_timesteps_noise, no_sync, p1_loss, resolve_aliases, to_epsilon
from ..schedules import alphas_cumprod_of

FREE_METHODS = ("p1", "p2", "cm")


class FreeReplay:
    """Free-AT trainer: ``FreeReplay(model, optimizer, replays=3, alphas_cumprod=table).step(x0)``.

    ``replays`` = K (AT_Diff alias ``adv_steps``; default 3). Arguments as in diffusion_adv_loss (eps, eps_mode, alpha, norm, random_start, target, P2's lam, beta,
    rho, r_min, radius_fn, detach_anchor, batch_branches; AT_Diff aliases). Defaults are P1's official
    CIFAR-10 settings: K = 3, alpha = 0.1, eps = 0.1 (rms: R = 0.1 sqrt(D)), zero init, "delta_detach".

    Hooks per replay (= per optimizer step): ``scaler`` (torch.amp.GradScaler: scale, unscale the delta
    gradient, skip non-finite steps), ``max_grad_norm`` (clipping after unscale), ``ema`` (an object with
    ``update_parameters(model)`` like torch's AveragedModel, ``step(parameters)`` like diffusers' EMAModel,
    or a callable ``ema(model)``), ``lr_scheduler.step()``.
    """

    def __init__(
        self,
        model,
        optimizer,
        replays: Optional[int] = None,
        *,
        method: str = "p1",
        alphas_cumprod=None,
        scheduler=None,
        prediction_type: Optional[str] = None,
        eps: Optional[float] = None,
        eps_mode: str = "rms",
        alpha: Optional[float] = None,
        norm: Optional[str] = None,
        random_start=False,
        target: Optional[str] = None,
        scaler=None,
        ema=None,
        lr_scheduler=None,
        grad_accum_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        same_dropout: bool = True,
        lam: float = P2_LAMBDA,
        beta: float = P2_BETA,
        rho: float = P2_RHO,
        r_min: float = P2_R_MIN,
        radius_fn=None,
        detach_anchor: bool = False,
        batch_branches: bool = False,
        loss_kwargs: Optional[Dict[str, Any]] = None,
        **aliases,
    ):
        check_choice("method", method, FREE_METHODS)
        if "adv_steps" in aliases:
            aliases = dict(aliases)
            k = aliases.pop("adv_steps")
            if replays is not None and replays != k:
                raise ValueError(f"replays={replays} and its alias adv_steps={k} disagree; pass only one")
            replays = k
        replays = 3 if replays is None else replays
        if isinstance(replays, bool) or not isinstance(replays, int) or replays < 1:
            raise ValueError(f"replays must be an int >= 1, got {replays!r}")
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        opts = resolve_aliases(
            {"alpha": alpha, "eps": eps, "norm": norm, "target": target},
            aliases,
            {"eps": 0.1, "norm": "l2", "target": "delta_detach"},
        )
        check_choice("norm", opts["norm"], NORMS)
        check_choice("target", opts["target"], TARGETS)
        if method != "cm" and (alphas_cumprod is None) == (scheduler is None):
            raise ValueError("pass exactly one of alphas_cumprod= or scheduler=")
        self.model, self.optimizer, self.replays, self.method = model, optimizer, replays, method
        self.table = alphas_cumprod if alphas_cumprod is not None else scheduler
        if prediction_type is None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        self.prediction_type = prediction_type
        self.eps, self.eps_mode, self.norm, self.target = float(opts["eps"]), eps_mode, opts["norm"], opts["target"]
        self.alpha = opts["alpha"]
        self.random_start = random_start
        self.scaler, self.ema, self.lr_scheduler = scaler, ema, lr_scheduler
        self.grad_accum_steps, self.max_grad_norm, self.same_dropout = grad_accum_steps, max_grad_norm, same_dropout
        self.p2 = dict(lam=lam, beta=beta, rho=rho, r_min=r_min, radius_fn=radius_fn, detach_anchor=detach_anchor)
        self.batch_branches = batch_branches
        self.loss_kwargs = dict(loss_kwargs or {})

    # -- hooks ---------------------------------------------------------------------------------------
    def _optimizer_step(self) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            if self.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
        if self.ema is not None:
            if hasattr(self.ema, "update_parameters"):
                self.ema.update_parameters(self.model)
            elif hasattr(self.ema, "step"):
                self.ema.step(self.model.parameters())
            else:
                self.ema(self.model)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _backward(self, loss: torch.Tensor) -> float:
        """Backward (scaled if a scaler is on); returns the scale to divide the delta gradient by."""
        if self.scaler is not None and self.scaler.is_enabled():
            scale = float(self.scaler.get_scale())
            self.scaler.scale(loss).backward()
            return scale
        loss.backward()
        return 1.0

    # -- one batch -----------------------------------------------------------------------------------
    def step(self, x0: torch.Tensor, timesteps=None, noise=None, model_kwargs=None, generator=None) -> Dict[str, Any]:
        """K replays of one batch, K optimizer steps. Returns {"losses": [K] detached losses,
        "delta": the final perturbation(s) (a list with one tensor per micro-batch)}."""
        check_tensor("x0", x0)
        m = self.grad_accum_steps
        if x0.shape[0] % m:
            raise ValueError(f"batch size {x0.shape[0]} is not divisible by grad_accum_steps={m}")
        if self.method == "cm":
            return self._step_cm(x0, noise, model_kwargs, generator)
        timesteps, noise = draw_timesteps_noise(x0, timesteps, noise, alphas_cumprod_of(self.table).numel(), generator)
        chunks = [
            _Batch(self.model, xc, tc, nc, self.table, self.prediction_type, _chunk_kwargs(model_kwargs, i, m, x0.shape[0]),
                   generator, self.same_dropout)
            for i, (xc, tc, nc) in enumerate(zip(x0.chunk(m), timesteps.chunk(m), noise.chunk(m)))
        ]
        perturb = [self._init(b, generator) for b in chunks]
        losses = []
        for _ in range(self.replays):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            grads = []
            for i, (b, (d, radius)) in enumerate(zip(chunks, perturb)):
                b.rng = SameRandomness(b.x0.device, self.same_dropout)
                d = d.detach().requires_grad_(True)
                sync = contextlib.nullcontext() if i == m - 1 else no_sync(self.model)
                with sync:
                    loss = self._loss(b, d, radius) / m
                    scale = self._backward(loss)
                grads.append(d.grad / scale)
                total = total + loss.detach()
            self._optimizer_step()
            losses.append(total)
            perturb = [(self._ascend(d, g, radius), radius) for (d, radius), g in zip(perturb, grads)]
        return {"losses": losses, "delta": [d for d, _ in perturb]}

    def _init(self, b: _Batch, generator):
        if self.method == "p1":
            radius = rms_radius(self.eps, b.x0) if (self.eps_mode == "rms" and self.norm == "l2") else self.eps
            init = {True: "uniform", False: "zero"}.get(self.random_start, self.random_start)
            return random_perturbation(b.x0, radius, self.norm, init, generator, dtype=b.pdtype), radius
        p = self.p2
        radius = p["radius_fn"](b.sigma) if p["radius_fn"] is not None else p2_radius(b.sigma, self.eps, p["rho"], p["r_min"])
        radius = radius.to(b.pdtype)
        return random_perturbation(b.x0, radius, "linf", "uniform", generator, dtype=b.pdtype), radius

    def _loss(self, b: _Batch, d: torch.Tensor, radius) -> torch.Tensor:
        if self.method == "p1":
            pred = b.forward(b.x_t(d))
            return p1_loss(pred, b.base, b.scale, d, self.target, reduction="mean")
        # P2 with the gradient of the training loss in omega (d is omega here).
        p, pt = self.p2, b.prediction_type
        x_clean = b.x_t()
        x_pert = b.x_t(column(b.sigma, d) * d)
        if self.batch_branches:
            pred_clean, pred_pert = b.forward_pair(x_clean, x_pert)
        else:
            pred_clean = b.forward(x_clean)
            pred_pert = b.forward(x_pert)
        mse = p1_loss(pred_clean, b.base, None, None, "original")
        reg = equivariance_regularizer(
            to_epsilon(pred_pert, x_pert, b.alpha, b.sigma, pt),
            to_epsilon(pred_clean, x_clean, b.alpha, b.sigma, pt),
            d,
            p2_weight(radius, p["lam"], p["beta"]),
            p["detach_anchor"],
            "equivariant",
            "none",
        )
        return (mse + reg).mean()

    def _ascend(self, d, g, radius):
        if self.method in ("p1", "cm"):
            step = self.alpha if self.alpha is not None else (0.1 if self.norm == "l2" else radius / 4)
            return pgd_step(d.detach(), g, step, radius, self.norm)
        factor = P2_STEP_FACTOR if self.alpha is None else float(self.alpha)
        return pgd_step(d.detach(), g, factor * radius, radius, "linf")

    def _step_cm(self, x0, noise, model_kwargs, generator):
        kw = dict(self.loss_kwargs)
        target_model = kw.pop("target_model", None)
        radius = rms_radius(self.eps, x0) if (self.eps_mode == "rms" and self.norm == "l2") else self.eps
        init = {True: "uniform", False: "zero"}.get(self.random_start, self.random_start)
        acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
        delta = random_perturbation(x0, radius, self.norm, init, generator, dtype=acc)
        indices = kw.pop("indices", None)
        losses = []
        for _ in range(self.replays):
            self.optimizer.zero_grad(set_to_none=True)
            d = delta.detach().requires_grad_(True)
            out = consistency_adv_loss(
                self.model, target_model, x0, delta=d, indices=indices, noise=noise, model_kwargs=model_kwargs,
                generator=generator, return_dict=True, same_dropout=self.same_dropout, **kw,
            )
            indices, noise = out["indices"], out["noise"]
            scale = self._backward(out["loss"])
            g = d.grad / scale
            self._optimizer_step()
            losses.append(out["loss"].detach())
            delta = self._ascend(d, g, radius)
        return {"losses": losses, "delta": [delta]}


def _chunk_kwargs(model_kwargs, i: int, m: int, batch: int):
    if not model_kwargs or m == 1:
        return model_kwargs
    return {
        k: v.chunk(m)[i] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
        for k, v in model_kwargs.items()
    }
