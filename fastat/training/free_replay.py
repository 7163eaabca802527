"""`FreeReplay`: Free-AT minibatch replay (docs/maths.md §1, P1's "fast" loop) and its P2 and CM variants.

One call of ``.step(x0)`` runs K replays of the same batch (same x0, noise and timesteps; x_t formed once):

    delta = 0 (or a random start)                     # reset for every new batch
    repeat K times:
        forward/backward once -> weight gradients AND d loss / d delta (one backward, no attack pass)
        optimizer step (GradScaler, gradient clipping, EMA and LR-scheduler hooks run per replay)
        g = delta.grad / loss_scale (at_diff_grad_scale without a scaler: / 2^20, as AT_Diff's fp32 loop)
        delta, x_in = pgd_step(delta, g, alpha, R, norm, model_input_base=x_t)   # next input, same pass

method="p1": the P1 loss (target modes as in diffusion_adv_loss). Cost per optimizer step: 1 F + 1 Bw.
method="p2": fastat's own Free-AT variant of P2, not an algorithm of the P2 paper: omega is updated from the
    previous replay's backward (no separate attack pass), so it ascends the *training loss* (clean term +
    regulariser), not P2's attack objective J = ||e(x_t + s_t omega) - e(x_t)||^2. Sign step of ``alpha`` * r(t)
    (default 1.25), clamped to the box, from a uniform draw in the box. Cost: 2 F (or one 2B forward) + 1 Bw
    (``low_memory``: + 1 F recomputed in backward, one branch graph held at a time).
method="cm": consistency_adv_loss with the given perturbation (``loss_kwargs`` are passed to it, e.g.
    target_model, mode, teacher); the same indices and z are reused across replays. Cost: 1 F + 1 Bw
    + the no-grad target pass per replay (the EMA target moves between replays).

Gradient accumulation: ``grad_accum_steps=M`` splits x0 into M micro-batches, each with its own
perturbation; under DDP the first M-1 backwards run under ``no_sync``. Each micro-batch loss is divided by M,
so the gradient is that of the whole batch's mean (guided-diffusion / AT_Diff's ``microbatch`` loop sums the
micro-batch means instead: M times larger gradients, the same perturbation steps up to the 1e-8 norm floor).
The returned perturbation is the one after the K-th update (docs/maths.md §5); AT_Diff's loop stops before that
update, so its last delta (and its logged delta_norm) is the one replay K trained on. ``weights`` (per-sample loss
weights, e.g. importance sampling) multiply each sample's loss: the replayed loss is mean_i(w_i * loss_i).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Dict, List, Optional

import torch

from .._checks import check_callable, check_choice, check_tensor, per_sample
from .._shapes import column, reduce
from ..schedules import alphas_cumprod_of
from . import attack
from ._common import SameRandomness, chunk_noise, draw_timesteps_noise, leaf_grad_sum, no_sync, require_input_grad
from ._options import (
    check_bools,
    check_float,
    check_generator,
    check_int_at_least,
    check_model_kwargs,
    check_p2,
    check_scaler,
    resolve_aliases,
)
from .consistency import consistency_adv_loss
from .diffusion import (
    P2_BETA,
    P2_LAMBDA,
    P2_R_MIN,
    P2_RHO,
    P2_STEP_FACTOR,
    RADIUS_BIASES,
    _Batch,
    check_alpha_mode,
    check_p2_modes,
    p1_step_size,
    p1_terms,
    _p2_radius,
    p2_schedule,
    p2_terms,
)

FREE_METHODS = ("p1", "p2", "cm")


class _Replayed:
    """One micro-batch's state across replays: its batch, weights, perturbation and the model input
    x_in = x_t + delta (P2: delta = u = s_t * omega, plus the box radius and lambda_t)."""

    def __init__(self, batch: _Batch, weights, delta, x_in, plan=None, radius=None, lam_t=None):
        self.batch, self.weights, self.delta, self.x_in = batch, weights, delta, x_in
        self.plan, self.radius, self.lam_t = plan, radius, lam_t


class FreeReplay:
    """Free-AT trainer: ``FreeReplay(model, optimizer, replays=3, alphas_cumprod=table).step(x0)``.

    ``replays`` = K (AT_Diff alias ``adv_steps``; default 3). Arguments as in diffusion_adv_loss (eps,
    eps_mode, alpha, norm, random_start, init_mag, target, at_diff_grad_scale, learn_sigma,
    rescale_learned_sigmas, P2's lam, beta, rho, r_min, radius_bias, radius_fn, detach_anchor, batch_branches,
    low_memory, P1's alpha_mode; AT_Diff aliases), validated here. Defaults are P1's official CIFAR-10 settings: K = 3,
    alpha = 0.1, eps = 0.1 (rms: R = 0.1 sqrt(D)), zero init, "delta_detach".

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
        random_start=None,
        init_mag: Optional[float] = None,
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
        radius_bias: str = "floor",
        alpha_mode: str = "abs",
        detach_anchor: bool = False,
        batch_branches: bool = False,
        low_memory: bool = False,
        learn_sigma: bool = False,
        rescale_learned_sigmas: bool = False,
        at_diff_grad_scale: bool = False,
        loss_kwargs: Optional[Dict[str, Any]] = None,
        **aliases,
    ):
        check_choice("method", method, FREE_METHODS)
        check_callable("model", model)
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "zero_grad"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (with step and zero_grad), got {type(optimizer).__name__}")
        if "adv_steps" in aliases:
            aliases = dict(aliases)
            k = aliases.pop("adv_steps")
            if replays is not None and replays != k:
                raise ValueError(f"replays={replays} and its alias adv_steps={k} disagree; pass only one")
            replays = check_int_at_least("adv_steps", k, 1)
        self.replays = 3 if replays is None else check_int_at_least("replays", replays, 1)
        self.grad_accum_steps = check_int_at_least("grad_accum_steps", grad_accum_steps, 1)
        opts = resolve_aliases(
            {"alpha": alpha, "eps": eps, "norm": norm, "target": target, "init_mag": init_mag},
            aliases,
            {"eps": 0.1, "norm": "l2", "target": "delta_detach"},
        )
        check_choice("eps_mode", eps_mode, ("rms", "abs"))
        attack.check_random_start(random_start)
        check_scaler(scaler)
        self.max_grad_norm = check_float("max_grad_norm", max_grad_norm, positive=True, optional=True)
        check_bools(same_dropout=same_dropout, detach_anchor=detach_anchor, batch_branches=batch_branches,
                    low_memory=low_memory, learn_sigma=learn_sigma, rescale_learned_sigmas=rescale_learned_sigmas,
                    at_diff_grad_scale=at_diff_grad_scale)
        check_p2_modes(method == "p2", opts["eps"], radius_fn, batch_branches, low_memory)
        check_choice("radius_bias", radius_bias, RADIUS_BIASES)
        check_alpha_mode(alpha_mode, method, "p1", opts["norm"])
        self.radius_bias, self.alpha_mode = radius_bias, alpha_mode
        lam, beta, rho, r_min = check_p2(lam, beta, rho, r_min)
        if method != "cm" and (alphas_cumprod is None) == (scheduler is None):
            raise ValueError("pass exactly one of alphas_cumprod= or scheduler=")
        if method != "cm":
            alphas_cumprod_of(alphas_cumprod if alphas_cumprod is not None else scheduler)  # checked now, not at step()
        check_callable("radius_fn", radius_fn, optional=True)
        _check_hooks(ema, lr_scheduler)
        loss_kwargs = _check_loss_kwargs(loss_kwargs, method)
        self.model, self.optimizer, self.method = model, optimizer, method
        self.table = alphas_cumprod if alphas_cumprod is not None else scheduler
        if prediction_type is None:
            prediction_type = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        self.prediction_type = prediction_type
        self.opts, self.eps_mode, self.random_start = opts, eps_mode, random_start
        self.at_diff_grad_scale = at_diff_grad_scale
        self.scaler, self.ema, self.lr_scheduler, self.same_dropout = scaler, ema, lr_scheduler, same_dropout
        self.p2 = dict(lam=lam, beta=beta, rho=rho, r_min=r_min, radius_fn=radius_fn, detach_anchor=detach_anchor)
        self.batch_branches, self.low_memory = batch_branches, low_memory
        self.learn_sigma, self.rescale_vb = learn_sigma, rescale_learned_sigmas
        self.loss_kwargs = loss_kwargs

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

    def _backward(self, loss: torch.Tensor) -> Optional[float]:
        """Backward (scaled if a scaler is on); returns the scale to divide the input gradients by."""
        require_input_grad(loss)
        if self.scaler is not None and self.scaler.is_enabled():
            scale = float(self.scaler.get_scale())
            self.scaler.scale(loss).backward()
            return scale
        loss.backward()
        return None

    # -- one batch -----------------------------------------------------------------------------------
    def step(self, x0: torch.Tensor, timesteps=None, noise=None, model_kwargs=None, generator=None,
             weights=None) -> Dict[str, Any]:
        """K replays of one batch, K optimizer steps. ``weights``: per-sample loss weights [B]. Returns
        {"losses": [K] detached losses, "loss_per_sample": [K] detached [B] per-sample losses before the
        weights (guided-diffusion's ``losses["loss"]``, e.g. for a loss-aware timestep sampler's
        ``update_with_local_losses(t, ...)``), "timesteps" [B] (CM: "indices"), "delta": the final
        perturbation(s), a list with one tensor per micro-batch (omega for P2)}. The batch's draws (timesteps and noise when not given, then the starts)
        come from ``generator`` before the first replay; each replay's passes share one RNG state."""
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("FreeReplay.step trains (a backward and an optimizer step per replay); it cannot run "
                               "under torch.no_grad() or torch.inference_mode()")
        check_tensor("x0", x0)
        check_generator(generator)
        model_kwargs = check_model_kwargs(model_kwargs)
        m = self.grad_accum_steps
        if x0.shape[0] % m:
            raise ValueError(f"batch size {x0.shape[0]} is not divisible by grad_accum_steps={m}")
        weights = per_sample("weights", weights, x0.shape[0], x0.device, nonnegative=True)
        if self.method == "cm":
            return self._step_cm(x0, noise, model_kwargs, generator, weights)
        timesteps, noise = draw_timesteps_noise(x0, timesteps, noise, alphas_cumprod_of(self.table).numel(), generator)
        weight_chunks = weights.chunk(m) if isinstance(weights, torch.Tensor) else [weights] * m
        states = [
            self._start(_Batch(self.model, xc, tc, nc, self.table, self.prediction_type,
                               _chunk_kwargs(model_kwargs, i, m, x0.shape[0]), generator, self.same_dropout,
                               self.learn_sigma, self.rescale_vb), wc, generator)
            for i, (xc, tc, nc, wc) in enumerate(zip(x0.chunk(m), timesteps.chunk(m), chunk_noise(noise, m, x0),
                                                     weight_chunks))
        ]
        losses, per_sample_losses = [], []
        for _ in range(self.replays):
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            grads, pers = [], []
            for i, state in enumerate(states):
                state.batch.rng = SameRandomness(x0.device, self.same_dropout)
                x_leaf = state.x_in.detach().requires_grad_(True)
                d_leaf = state.delta.detach().requires_grad_(True)
                sync = contextlib.nullcontext() if i == m - 1 else no_sync(self.model)
                with sync:
                    loss, per = self._loss(state, x_leaf, d_leaf)
                    loss = loss / m
                    scale = self._backward(loss)
                grads.append(leaf_grad_sum((x_leaf.grad, d_leaf.grad), d_leaf, scale))
                total = total + loss.detach()
                pers.append(per)
            self._optimizer_step()
            losses.append(total)
            per_sample_losses.append(torch.cat(pers))
            for state, g in zip(states, grads):
                self._ascend(state, g)
        deltas = [s.delta / column(s.batch.sigma, s.delta) for s in states] if self.method == "p2" else \
            [s.delta for s in states]
        return {"losses": losses, "loss_per_sample": per_sample_losses, "timesteps": timesteps, "delta": deltas}

    def _plan(self, like: torch.Tensor) -> attack.AttackPlan:
        o = self.opts
        return attack.AttackPlan.resolve("free", like, eps=o["eps"], eps_mode=self.eps_mode, norm=o["norm"],
                                         alpha=p1_step_size(o["alpha"], like, self.alpha_mode),
                                         random_start=self.random_start, init_mag=o["init_mag"],
                                         at_diff_grad_scale=self.at_diff_grad_scale)

    def _start(self, b: _Batch, weights, generator) -> _Replayed:
        if self.method == "p1":
            plan = self._plan(b.x0)
            delta = plan.start(b.x0, generator, b.pdtype)
            return _Replayed(b, weights, delta, attack.first_input(b.x_t, delta, plan.init == "zero", b.model_dtype), plan)
        p = self.p2
        radius_fn = p["radius_fn"]
        if radius_fn is None and self.radius_bias != "floor":
            radius_fn = functools.partial(_p2_radius, eps=float(self.opts["eps"]), rho=p["rho"], r_min=p["r_min"],
                                          bias=self.radius_bias, generator=generator)
        radius, lam_t = p2_schedule(b, self.opts["eps"], p["rho"], p["r_min"], radius_fn, p["lam"], p["beta"])
        u = attack.draw_start(b.x0, b.sigma * radius, "linf", "uniform", generator, b.pdtype)
        return _Replayed(b, weights, u, attack.first_input(b.x_t, u, False, b.model_dtype), None, radius, lam_t)

    def _loss(self, state: _Replayed, x_in: torch.Tensor, delta: torch.Tensor):
        """(mean_i w_i * loss_i, the detached unweighted loss_i [B])."""
        b = state.batch
        if self.method == "p1":
            mse, vb = p1_terms(b, x_in, delta, self.opts["target"])
            per = mse + vb
        else:  # P2 with the gradient of the training loss in u = s_t * omega (delta here)
            p = self.p2
            mse, reg, vb = p2_terms(b, delta, x_in, state.lam_t, detach_anchor=p["detach_anchor"],
                                    batch_branches=self.batch_branches, low_memory=self.low_memory)
            per = mse + reg + vb
        unweighted = per.detach()
        if state.weights is not None:
            per = per * column(state.weights, per)
        return reduce(per, "mean"), unweighted

    def _ascend(self, state: _Replayed, g: torch.Tensor) -> None:
        b = state.batch
        if self.method == "p1":
            plan = state.plan
            state.delta, state.x_in = attack.step(state.delta, g, plan.step_size, plan.radius, plan.norm, b.x_t,
                                                  b.model_dtype, attack.effective_divisor(plan.grad_divisor, self.scaler))
            return
        factor = P2_STEP_FACTOR if self.opts["alpha"] is None else float(self.opts["alpha"])
        u_radius = b.sigma * state.radius
        state.delta, state.x_in = attack.step(state.delta, g, factor * u_radius, u_radius, "linf", b.x_t, b.model_dtype)

    def _step_cm(self, x0, noise, model_kwargs, generator, weights):
        """Draws: the start first, then (in the first replay's loss call) the indices and noise."""
        kw = dict(self.loss_kwargs)
        target_model = kw.pop("target_model", None)
        acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
        plan = self._plan(x0)
        delta = plan.start(x0, generator, acc)
        indices = kw.pop("indices", None)
        reduction = kw.pop("reduction", "mean")
        losses: List[torch.Tensor] = []
        per_sample_losses: List[torch.Tensor] = []
        for _ in range(self.replays):
            self.optimizer.zero_grad(set_to_none=True)
            d = delta.detach().requires_grad_(True)
            out = consistency_adv_loss(
                self.model, target_model, x0, delta=d, indices=indices, noise=noise, model_kwargs=model_kwargs,
                generator=generator, return_dict=True, same_dropout=self.same_dropout, **kw,
            )
            indices, noise = out["indices"], out["noise"]
            per = out["loss_per_sample"]
            loss = reduce(per if weights is None else per * weights.to(per.dtype), reduction)
            scale = self._backward(loss)
            g = leaf_grad_sum((d.grad,), d, scale)
            self._optimizer_step()
            losses.append(loss.detach())
            per_sample_losses.append(per.detach())
            delta, _ = attack.step(d.detach(), g, plan.step_size, plan.radius, plan.norm, None, acc,
                                   attack.effective_divisor(plan.grad_divisor, self.scaler))
        return {"losses": losses, "loss_per_sample": per_sample_losses, "indices": indices, "delta": [delta]}


def _check_hooks(ema, lr_scheduler) -> None:
    if ema is not None and not (hasattr(ema, "update_parameters") or hasattr(ema, "step") or callable(ema)):
        raise TypeError("ema must have update_parameters(model) (torch AveragedModel), step(parameters) (diffusers "
                        f"EMAModel) or be callable as ema(model), got {type(ema).__name__}")
    if lr_scheduler is not None and not callable(getattr(lr_scheduler, "step", None)):
        raise TypeError(f"lr_scheduler must have a step() method or be None, got {type(lr_scheduler).__name__}")


# consistency_adv_loss keywords that FreeReplay sets itself (the perturbation, the draws, the dropout replay) or takes
# as its own options (the attack's).
_CM_OWN = ("model", "x0", "delta", "indices", "noise", "model_kwargs", "generator", "return_dict", "same_dropout",
           "weights", "scaler", "method", "eps", "eps_mode", "alpha", "steps", "norm", "random_start", "init_mag",
           "at_diff_grad_scale")


def _check_loss_kwargs(loss_kwargs, method: str) -> Dict[str, Any]:
    """method="cm": keywords for consistency_adv_loss (target_model, mode, teacher, ...); indices may fix the draw."""
    if loss_kwargs is None:
        return {}
    if not isinstance(loss_kwargs, dict):
        raise TypeError(f"loss_kwargs must be a dict of consistency_adv_loss keywords, got {type(loss_kwargs).__name__}")
    if loss_kwargs and method != "cm":
        raise ValueError(f"loss_kwargs is for method='cm' (consistency_adv_loss keywords), got method={method!r}")
    accepted = set(inspect.signature(consistency_adv_loss).parameters) - set(_CM_OWN) - {"aliases"} | {"indices"}
    unknown = sorted(set(loss_kwargs) - accepted)
    if unknown:
        raise ValueError(f"loss_kwargs has keys that consistency_adv_loss does not take from FreeReplay: {unknown} "
                         f"(accepted: {sorted(accepted)}; the attack options are FreeReplay's own)")
    return dict(loss_kwargs)


def _chunk_kwargs(model_kwargs, i: int, m: int, batch: int):
    if not model_kwargs or m == 1:
        return model_kwargs
    return {
        k: v.chunk(m)[i] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
        for k, v in model_kwargs.items()
    }
