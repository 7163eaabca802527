"""`diffusion_adv_loss`: a drop-in replacement for the loss call of a DDPM-style training loop that
adds P1 (DRO-equivalent AT), P2 (equivariant AT) or a classic AT method (docs/maths.md §1-3).

Passes per optimizer step for each method: the cost table in ``fastat.training`` (package docstring).

x_t is formed once per batch; attack steps feed the model the input that pgd_step writes in the same
pass as the update (``model_input_base``, see attack.py). Attack passes take input gradients only: no
weight gradient is formed, nothing is accumulated in ``.grad`` (so no ``zero_grad`` race), and under DDP
they run on ``model.module`` (the final pass goes through the wrapper, so gradient reduction happens once).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.utils.checkpoint

from .._checks import check_callable, check_choice, check_finite, check_float, check_tensor, per_sample
from .._shapes import REDUCTIONS, column, reduce
from ..ops.losses import equivariance_regularizer
from ..ops.noisy_input import noisy_input
from ..ops.perturbation import per_sample_norm
from ..schedules import alpha_sigma, alphas_cumprod_of
from . import attack
from ._common import (
    PREDICTION_TYPES,
    SameRandomness,
    call_model,
    check_output,
    draw_timesteps_noise,
    inner_model,
    keep_running_stats,
    no_sync,
    p1_loss,
    p1_target,
    perturbation_dtype,
    running_stat_modules,
    standard_normal,
    to_epsilon,
)
from ._options import (
    check_bools,
    check_generator,
    check_model_kwargs,
    check_p2,
    check_scaler,
    resolve_aliases,
)
from .vb import hybrid_vb

METHODS = ("pgd", "fgsm_rs", "input_perturbation", "equivariant_random", "equivariant_adversarial", "standard")
P2_METHODS = ("equivariant_random", "equivariant_adversarial")
EPS_MODES = ("rms", "abs")

# P2 defaults (docs/maths.md §2): lambda = 0.3, r(t) = max(r_min, eps * sigma_t^rho), rho = 2, r_min = 8/255,
# lambda_t = lambda * sqrt(3) / (beta * r(t)), FGSM step 1.25 * r(t).
P2_LAMBDA = 0.3
P2_BETA = 1.0
P2_RHO = 2.0
P2_R_MIN = 8.0 / 255.0
P2_STEP_FACTOR = 1.25


RADIUS_BIASES = ("floor", "random")
# P1's official run: CIFAR-10, D = 3 * 32 * 32, absolute L2 step alpha = 0.1 (``alpha_mode="cifar_ratio"``).
P1_OFFICIAL_DIM = 3 * 32 * 32
ALPHA_MODES = ("abs", "cifar_ratio")


def p2_radius(sigma: torch.Tensor, eps: float, rho: float = P2_RHO, r_min: float = P2_R_MIN, bias: str = "floor",
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """P2's time-dependent box radius [B], shaped like sigma_t, with scale ``eps``, exponent ``rho``, floor ``r_min``:

        bias="floor":  r(t) = max(r_min, eps * sigma_t^rho)
        bias="random": r(t) = eps * sigma_t^rho + b,  b ~ Uniform[r_min, 2 r_min] per sample (drawn with generator)

    Unverified against the authors' code: the paper and secondary sources describe r(t) as following sigma_t
    with rho = 2 and a (random) bias of at least 8/255; the scale, the floor and the bias law are our reading."""
    check_choice("bias", bias, RADIUS_BIASES)
    if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point():
        raise TypeError(f"sigma must be a floating-point tensor of noise levels [B], got "
                        f"{sigma.dtype if isinstance(sigma, torch.Tensor) else type(sigma).__name__}")
    check_float("eps", eps)
    check_finite("rho", rho)
    check_float("r_min", r_min, positive=True)
    check_generator(generator)
    return _p2_radius(sigma, eps, rho, r_min, bias, generator)


def _p2_radius(sigma: torch.Tensor, eps: float, rho: float, r_min: float, bias: str, generator) -> torch.Tensor:
    """p2_radius with its arguments checked (the loss checks them once per call)."""
    base = eps * sigma.double() ** rho
    if bias == "floor":
        return base.clamp_min(r_min).to(sigma.dtype)
    u = torch.rand(sigma.shape, generator=generator, device=sigma.device, dtype=torch.float64)
    return (base + r_min * (1.0 + u)).to(sigma.dtype)


def p1_step_size(alpha: Optional[float], like: torch.Tensor, alpha_mode: str = "abs") -> Optional[float]:
    """P1's L2 ascent step: ``alpha`` ("abs", the official code; None keeps the default) or alpha * sqrt(D / 3072)
    ("cifar_ratio", alpha None = the official 0.1: the step, hence ||delta|| / ||eps|| ~ K alpha / sqrt(D), is that
    of the official CIFAR-10 run at any D)."""
    check_choice("alpha_mode", alpha_mode, ALPHA_MODES)
    if alpha_mode == "abs":
        return alpha
    alpha = 0.1 if alpha is None else alpha
    return alpha * math.sqrt(like[0].numel() / P1_OFFICIAL_DIM) if like.shape[0] else alpha


def check_alpha_mode(alpha_mode: str, method: str, p1_method: str, norm: str) -> None:
    check_choice("alpha_mode", alpha_mode, ALPHA_MODES)
    if alpha_mode != "abs" and method != p1_method:
        raise ValueError(f"alpha_mode={alpha_mode!r} applies to method={p1_method!r} only, got method={method!r}")
    if alpha_mode != "abs" and norm != "l2":
        raise ValueError(f"alpha_mode={alpha_mode!r} needs norm='l2', got norm={norm!r}")


def p2_weight(radius: torch.Tensor, lam: float = P2_LAMBDA, beta: float = P2_BETA) -> torch.Tensor:
    """lambda_t = lambda * sqrt(3) / (beta * r(t)); sqrt(3)/r is 1/std of Uniform[-r, r]."""
    check_float("lam", lam)
    check_float("beta", beta, positive=True)
    per_sample("radius", radius, radius.shape[0] if isinstance(radius, torch.Tensor) and radius.ndim else 1,
               radius.device if isinstance(radius, torch.Tensor) else torch.device("cpu"), positive=True)
    return _p2_weight(radius, lam, beta)


def _p2_weight(radius: torch.Tensor, lam: float, beta: float) -> torch.Tensor:
    return lam * math.sqrt(3.0) / (beta * radius)


class _Batch:
    """Everything fixed for one batch: data, noise, timesteps, coefficients, x_t and the prediction target.

    The model is fed x0's dtype (a pure bf16/fp16 model gets bf16/fp16 inputs); the perturbation, the
    coefficients and the losses stay in fp32 (fp64 for fp64 data)."""

    def __init__(self, model, x0, timesteps, noise, table, prediction_type, model_kwargs, generator, same_dropout,
                 learn_sigma: bool = False, rescale_vb: bool = False):
        self.model = model
        self.attack_model = inner_model(model)
        # FSDP(1)-style wrappers cannot be bypassed: run their attack passes under no_sync.
        self.attack_ctx = (lambda: no_sync(model)) if self.attack_model is model else contextlib.nullcontext
        self.x0 = x0
        self.table = table
        self.timesteps, self.noise = draw_timesteps_noise(x0, timesteps, noise, alphas_cumprod_of(table).numel(), generator)
        self.pdtype = perturbation_dtype(x0)
        # float64 coefficients for float64 data: a float64 loop written from the formulas agrees to rounding.
        alpha, sigma = alpha_sigma(table, self.timesteps, self.pdtype)
        self.model_dtype = x0.dtype
        self.alpha, self.sigma = alpha.to(x0.device, self.pdtype), sigma.to(x0.device, self.pdtype)
        self.prediction_type = prediction_type
        self.base, self.scale = p1_target(prediction_type, x0, self.noise, self.alpha, self.sigma)
        self.kwargs = model_kwargs or {}
        self.generator = generator
        self.rng = SameRandomness(x0.device, same_dropout)
        self.learn_sigma, self.rescale_vb = learn_sigma, rescale_vb

    @functools.cached_property
    def norm_layers(self) -> list:
        """Normalisation layers whose running statistics attack passes and recomputes must not move."""
        return running_stat_modules(self.model)

    @functools.cached_property
    def x_t(self) -> torch.Tensor:
        """a_t * x0 + s_t * eps in the model's dtype, formed once per batch."""
        return noisy_input(self.x0, self.noise, self.alpha, self.sigma).to(self.model_dtype)

    def noisy(self, delta: torch.Tensor) -> torch.Tensor:
        """x_t + delta in one pass (when x_t itself is not needed)."""
        return noisy_input(self.x0, self.noise, self.alpha, self.sigma, delta).to(self.model_dtype)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.x0.shape[0], device=self.x0.device, dtype=self.pdtype)

    def split(self, out: torch.Tensor, x: torch.Tensor):
        """(mean prediction, variance values or None) of the model's output at input x: learned-variance models
        output 2C channels."""
        if not self.learn_sigma:
            return check_output(out, x), None
        if self.x0.ndim < 2:
            raise ValueError(f"learn_sigma=True needs data with a channel dim 1 ([B, C, ...]), got x0 of shape "
                             f"{tuple(self.x0.shape)}")
        channels = self.x0.shape[1]
        if out.ndim < 2 or out.shape[1] != 2 * channels:
            raise ValueError(f"learn_sigma=True needs a model output of 2C = {2 * channels} channels along dim 1 "
                             f"(mean prediction, variance values), got shape {tuple(out.shape)}")
        check_output(out, x, channels=2)
        return out[:, :channels], out[:, channels:]

    def forward(self, x, attack: bool = False):
        self.rng.replay()
        if attack:
            with self.attack_ctx():
                return self.split(call_model(self.attack_model, x, self.timesteps, self.kwargs), x)
        return self.split(call_model(self.model, x, self.timesteps, self.kwargs), x)

    def forward_checkpointed(self, x):
        """The forward at x without holding its graph: backward recomputes it (same dropout mask), after the
        branches created later have released theirs. Runs on the inner module (no DDP hooks in backward)."""

        calls = []

        def run(inp):
            self.rng.replay()
            calls.append(None)  # the second call is backward's recompute: it must not update running stats again
            with keep_running_stats(self.norm_layers if len(calls) > 1 else ()):
                return call_model(self.attack_model, inp, self.timesteps, self.kwargs)

        return self.split(torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False), x)

    def forward_pair(self, xa, xb, attack: bool = False):
        """One forward of the 2B batch [xa; xb] (model_kwargs tensors with a batch dim are repeated)."""
        batch = xa.shape[0]
        kwargs = {
            k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v
            for k, v in self.kwargs.items()
        }
        t2 = torch.cat([self.timesteps, self.timesteps])
        x = torch.cat([xa, xb])
        if xa.ndim == 4 and xa.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        model = self.attack_model if attack else self.model
        self.rng.replay()
        with self.attack_ctx() if attack else contextlib.nullcontext():
            mean, var = self.split(call_model(model, x, t2, kwargs), x)
        halves = lambda v: (None, None) if v is None else (v[:batch], v[batch:])  # noqa: E731
        (ma, mb), (va, vb) = halves(mean), halves(var)
        return (ma, va), (mb, vb)

    def vb(self, pred, var, x) -> torch.Tensor:
        """The hybrid loss's VB term at x with the mean frozen [B] (zeros without learned variance)."""
        if var is None:
            return self.zeros()
        return hybrid_vb(self.table, self.timesteps, self.x0, x, pred, var, self.prediction_type, self.rescale_vb)


def p1_terms(b: _Batch, x_in: torch.Tensor, delta: Optional[torch.Tensor], target: str, attack: bool = False):
    """(mse [B], vb [B]) of P1 at model input x_in = x_t + delta. The VB term sits where AT_Diff puts it:
    at x_in ("delta"), at x_in without its gradient ("delta_detach"), at the clean x_t ("original")."""
    pred, var = b.forward(x_in, attack)
    mse = p1_loss(pred, b.base, b.scale, delta, target)
    vb_at = {"delta": x_in, "delta_detach": x_in.detach()}.get(target, b.x_t) if delta is not None else x_in
    return mse, b.vb(pred, var, vb_at)


def _p1(b: _Batch, method: str, plan: Optional[attack.AttackPlan], opts, scaler) -> Dict[str, Any]:
    """P1-family losses: standard, input_perturbation, pgd, fgsm_rs."""
    if method == "standard":
        mse, vb = p1_terms(b, b.x_t, None, "original")
        return {"mse": mse, "vb": vb, "delta": None}
    if method == "input_perturbation":  # DDPM-IP: everything, VB included, at the perturbed input
        xi = standard_normal(b.x0, b.pdtype, b.generator)
        delta = column(b.sigma, xi) * float(opts["eps"]) * xi
        mse, vb = p1_terms(b, b.noisy(delta), None, "original")
        return {"mse": mse, "vb": vb, "delta": delta}

    target = opts["target"]

    def attack_loss(x_in, delta):
        mse, vb = p1_terms(b, x_in, delta, target, attack=True)
        return (mse + vb).sum()

    delta, x_in, grad = attack.run_plan(plan, attack_loss, b.x_t, b.x0, b.generator, b.pdtype, b.model_dtype, scaler,
                                        b.norm_layers)
    mse, vb = p1_terms(b, x_in, delta, target)
    return {"mse": mse, "vb": vb, "delta": delta, "grad": grad}


def p2_schedule(b: _Batch, eps: float, rho: float, r_min: float, radius_fn, lam: float, beta: float):
    """P2's per-sample box radius r(t) [B] (``radius_fn(sigma)`` or p2_radius) and weight lambda_t [B]."""
    radius = radius_fn(b.sigma) if radius_fn is not None else _p2_radius(b.sigma, eps, rho, r_min, "floor", None)
    radius = per_sample("radius_fn(sigma)", radius, b.x0.shape[0], b.x0.device, positive=True)
    radius = torch.as_tensor(radius, dtype=b.pdtype, device=b.x0.device).expand(b.x0.shape[0])
    return radius, _p2_weight(radius, lam, beta)


def p2_terms(b: _Batch, u, x_pert, lam_t, *, detach_anchor=False, regularizer="equivariant", batch_branches=False,
             low_memory=False, clean=None):
    """P2's final terms [B]: mse and vb of the clean branch, lambda_t * the regulariser.

    u = s_t * omega is the perturbation of x_t and x_pert = x_t + u the perturbed model input (u and x_pert
    may be leaves whose gradient the caller reads: Free-AT). ``clean`` = (pred, var) of a clean pass made
    earlier (the adversarial attack's anchor). ``low_memory``: one branch is checkpointed and created
    first, so backward frees the other branch's graph before recomputing it (never both graphs at once)."""
    omega = u / column(b.sigma, u)
    x_clean = b.x_t
    if batch_branches:
        (pred_clean, var), (pred_pert, _) = b.forward_pair(x_clean, x_pert)
    elif low_memory and clean is None:
        pred_pert, _ = b.forward_checkpointed(x_pert)
        pred_clean, var = b.forward(x_clean)
    else:
        pred_clean, var = clean if clean is not None else b.forward(x_clean)
        pred_pert, _ = b.forward(x_pert)
    pt = b.prediction_type
    mse = p1_loss(pred_clean, b.base, None, None, "original")
    e_clean = to_epsilon(pred_clean, x_clean, b.alpha, b.sigma, pt)
    e_pert = to_epsilon(pred_pert, x_pert, b.alpha, b.sigma, pt)
    reg = equivariance_regularizer(
        e_pert, e_clean, omega if regularizer == "equivariant" else None, lam_t, detach_anchor, regularizer, "none"
    )
    return mse, reg, b.vb(pred_clean, var, x_clean)


def _p2(b: _Batch, method, opts, p2, radius_fn, detach_anchor, regularizer, batch_branches, low_memory, scaler):
    """P2: clean term + lambda_t * equivariance regulariser, omega random or one FGSM step."""
    radius, lam_t = p2_schedule(b, float(opts["eps"]), p2["rho"], p2["r_min"], radius_fn, p2["lam"], p2["beta"])
    s = column(b.sigma, b.x0)
    u_radius = b.sigma * radius  # the box of u = s_t * omega
    u = attack.draw_start(b.x0, u_radius, "linf", "uniform", b.generator, b.pdtype)
    x_pert = attack.first_input(b.x_t, u, False, b.model_dtype)
    grad = clean = None
    pt = b.prediction_type
    if method == "equivariant_adversarial":
        factor = P2_STEP_FACTOR if opts["alpha"] is None else float(opts["alpha"])
        if batch_branches:
            def attack_j(x_in, _u):
                (anchor, _), (pred, _) = b.forward_pair(b.x_t, x_in, attack=True)
                anchor = to_epsilon(anchor, b.x_t, b.alpha, b.sigma, pt).detach()
                return _j(to_epsilon(pred, x_in, b.alpha, b.sigma, pt), anchor)
        else:
            clean = b.forward_checkpointed(b.x_t) if low_memory else b.forward(b.x_t)
            anchor = to_epsilon(clean[0], b.x_t, b.alpha, b.sigma, pt).detach()

            def attack_j(x_in, _u):
                return _j(to_epsilon(b.forward(x_in, attack=True)[0], x_in, b.alpha, b.sigma, pt), anchor)

        u, x_pert, grad = attack.ascend(attack_j, b.x_t, u, steps=1, step_size=factor * u_radius, radius=u_radius,
                                        norm="linf", x_in=x_pert, scaler=scaler, model_dtype=b.model_dtype,
                                        norm_layers=b.norm_layers)
        grad = grad * s  # reported as d J / d omega
    mse, reg, vb = p2_terms(b, u, x_pert, lam_t, detach_anchor=detach_anchor, regularizer=regularizer,
                            batch_branches=batch_branches, low_memory=low_memory, clean=clean)
    return {"mse": mse, "reg": reg, "vb": vb, "delta": u, "grad": grad}


def _j(e_pert, anchor):
    """The adversarial attack's objective J = sum_i ||e(x_t + s omega) - stop_grad(e(x_t))||^2 / D, written as
    the regulariser with omega = 0 and no weight."""
    return equivariance_regularizer(e_pert, anchor, None, mode="invariant", reduction="sum")


def diffusion_adv_loss(
    model: Callable,
    x0: torch.Tensor,
    timesteps: Optional[torch.Tensor] = None,
    noise=None,
    *,
    alphas_cumprod=None,
    scheduler=None,
    prediction_type: Optional[str] = None,
    method: str = "pgd",
    eps: Optional[float] = None,
    eps_mode: str = "rms",
    alpha: Optional[float] = None,
    steps: Optional[int] = None,
    norm: Optional[str] = None,
    random_start=None,
    init_mag: Optional[float] = None,
    target: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    return_dict: bool = False,
    weights=None,
    scaler=None,
    same_dropout: bool = True,
    batch_branches: bool = False,
    low_memory: bool = False,
    learn_sigma: bool = False,
    rescale_learned_sigmas: bool = False,
    at_diff_grad_scale: bool = False,
    lam: float = P2_LAMBDA,
    beta: float = P2_BETA,
    rho: float = P2_RHO,
    r_min: float = P2_R_MIN,
    radius_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    radius_bias: str = "floor",
    alpha_mode: str = "abs",
    detach_anchor: bool = False,
    regularizer: str = "equivariant",
    **aliases,
):
    """Adversarial (or plain) DDPM training loss for one batch; call ``.backward()`` on the result.

    x_t = a_t * x0 + s_t * eps, (a_t, s_t) from ``alphas_cumprod`` (a table) or ``scheduler`` (anything
    with ``alphas_cumprod``, e.g. diffusers' DDPMScheduler, whose ``config.prediction_type`` is used when
    ``prediction_type`` is None). ``timesteps``: an integer tensor [B] (default: uniform in [0, T));
    ``noise``: a tensor like x0 or a ``fastat.SeededNoise`` (regenerated in-kernel, never stored, for
    eps-prediction) (default N(0, I)). The model is called as ``model(x_t, timesteps, **model_kwargs)``.

    Methods (P1 loss: loss_i = mean_flat((pred(x_t + delta) - target(delta))^2), see _common for the
    target of each prediction type):
      "standard":   the plain loss (no perturbation).
      "pgd":        delta from ``steps`` input-gradient ascent steps on the P1 loss (default 3), L2
                    normalised step ``alpha`` (default 0.1, P1) or sign step for Linf (default
                    2.5 * eps / steps), radius ``eps`` (default 0.1; ``eps_mode="rms"`` means
                    R = eps * sqrt(D) for L2, AT_Diff's ``adv_max_norm``; ``eps=0``: radius 0, the
                    standard loss; ``eps=math.inf``: no projection, AT_Diff's ``adv_max_norm=0``).
                    ``random_start``: False/"zero" (default, P1), True/"uniform", "normal"; ``init_mag``
                    (AT_Diff's ``adv_init_mag``): the start's radius in eps's units (> 0 implies a uniform
                    start; 0 a zero start; default eps). ``target``: "delta_detach" (default), "delta",
                    "original". ``at_diff_grad_scale=True``: divide the perturbation's gradient by 2^20
                    as AT_Diff's fp32 loop does (shorter steps where ||g|| < ~0.0105; with an enabled
                    ``scaler`` only the unscale, as its fp16 loop; see attack.py).
                    ``alpha_mode="cifar_ratio"`` scales the L2 step by sqrt(D / 3072) so that ||delta|| / ||eps||
                    is the official CIFAR-10 run's at any D (see p1_step_size).
      "fgsm_rs":    one step from a uniform random start, step ``alpha`` = 1.25 * R by default.
      "input_perturbation": DDPM-IP, delta = s_t * eps * xi with xi ~ N(0, I) (``eps`` = gamma, default 0.1),
                    target "original".
      "equivariant_random" / "equivariant_adversarial" (P2): omega in the box [-r(t), r(t)]^D,
          L_i = mean_flat((pred(x_t) - target)^2)
              + lambda_t * mean_flat((e(x_t + s_t*omega) - (e(x_t) + omega))^2)
          with e(.) the noise implied by the prediction (to_epsilon), r(t) = max(r_min, eps * s_t^rho)
          (``eps`` default 0.1, ``rho`` 2, ``r_min`` 8/255; or ``radius_fn(sigma) -> r``);
          ``radius_bias="random"``: r(t) = eps * s_t^rho + U[r_min, 2 r_min] instead (see p2_radius; the
          schedule's scale, floor and bias law are unverified against the authors' code),
          lambda_t = lam * sqrt(3) / (beta * r(t)) (lam 0.3, beta 1.0). "random": omega uniform in the box.
          "adversarial": uniform start, one sign step of size ``alpha`` * r(t) (alpha = 1.25 by default)
          ascending J = ||e(x_t + s_t*omega) - stop_grad(e(x_t))||^2, clamped to the box.
          ``detach_anchor`` stops the gradient through e(x_t) in the regulariser (default False);
          ``regularizer="invariant"`` is the failing ablation (study only). ``batch_branches=True`` runs
          the clean and perturbed branches as one forward of 2B (dropout masks then differ per row).
          ``low_memory=True`` never holds both branch graphs: one branch is checkpointed and recomputed in
          backward (one extra forward; peak saved activations ~1x a standard step instead of ~2x).

    Learned variance (``learn_sigma=True``, a 2C-channel output [mean prediction, v]): IDDPM's hybrid loss
    adds the VB term with the mean frozen (vb.py), at x_adv as AT_Diff does ("delta"/"delta_detach"; the
    clean x_t for "original"), at the perturbed input for DDPM-IP, at x_t for P2's clean branch;
    ``rescale_learned_sigmas`` scales it by T/1000. The attack ascends mse + vb.

    AT_Diff/FreeLB aliases: adv_steps, adv_lr, adv_max_norm, adv_norm_type, adv_target_type, adv_init_mag
    (a name given twice with different values raises). ``scaler``: a GradScaler whose scale is applied to
    the attack loss and removed from the perturbation gradient (non-finite samples keep their delta).
    ``weights``: per-sample loss weights [B] (importance sampling, e.g. guided-diffusion's
    loss-second-moment sampler): loss_i = w_i * (mse_i + reg_i + vb_i); the attack is unaffected.

    Randomness: the draws of the call (timesteps and noise when not given, then DDPM-IP's xi, the random
    start or P2's omega) come from ``generator`` (default: the global generator), in this order, before any
    model pass. ``same_dropout``: every pass then replays one RNG state (same dropout mask); after the call
    the global generator stands where one pass left it (advanced, never rewound). Set False under
    CUDA-graph capture.

    Returns the loss reduced by ``reduction`` ("mean" | "sum" | "none" -> [B]; "mean" of an empty batch is
    0); with ``return_dict`` a dict: loss, loss_per_sample, mse (main term [B]), reg ([B], P2 else zeros),
    vb ([B], zeros without learn_sigma), delta_norm (L2 norm of the perturbation of x_t [B]), grad_norm
    (L2 norm of the last attack gradient [B], zeros if none), delta (detached), timesteps, noise.
    """
    check_callable("model", model)
    check_tensor("x0", x0)
    check_choice("method", method, METHODS)
    check_choice("eps_mode", eps_mode, EPS_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("regularizer", regularizer, ("equivariant", "invariant"))
    if (alphas_cumprod is None) == (scheduler is None):
        raise ValueError("pass exactly one of alphas_cumprod= (a 1-D abar table) or scheduler= (e.g. DDPMScheduler)")
    table = alphas_cumprod if alphas_cumprod is not None else scheduler
    if prediction_type is None:
        config = getattr(scheduler, "config", None)
        prediction_type = getattr(config, "prediction_type", None) or "epsilon"
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    opts = resolve_aliases(
        {"steps": steps, "alpha": alpha, "eps": eps, "norm": norm, "target": target, "init_mag": init_mag},
        aliases,
        {"eps": 0.1, "norm": "l2", "target": "delta_detach"},
    )
    attack.check_random_start(random_start)
    check_generator(generator)
    model_kwargs = check_model_kwargs(model_kwargs)
    check_scaler(scaler)
    check_bools(return_dict=return_dict, same_dropout=same_dropout, batch_branches=batch_branches,
                low_memory=low_memory, learn_sigma=learn_sigma, detach_anchor=detach_anchor,
                rescale_learned_sigmas=rescale_learned_sigmas, at_diff_grad_scale=at_diff_grad_scale)
    lam, beta, rho, r_min = check_p2(lam, beta, rho, r_min)
    _check_steps(method, opts["steps"])
    check_p2_modes(method in P2_METHODS, opts["eps"], radius_fn, batch_branches, low_memory)
    check_choice("radius_bias", radius_bias, RADIUS_BIASES)
    check_callable("radius_fn", radius_fn, optional=True)
    check_alpha_mode(alpha_mode, method, "pgd", opts["norm"])
    if radius_bias != "floor" and radius_fn is None:
        radius_fn = functools.partial(_p2_radius, eps=float(opts["eps"]), rho=rho, r_min=r_min, bias=radius_bias,
                                      generator=generator)
    weights = per_sample("weights", weights, x0.shape[0], x0.device, nonnegative=True)

    b = _Batch(model, x0, timesteps, noise, table, prediction_type, model_kwargs, generator, same_dropout,
               learn_sigma, rescale_learned_sigmas)
    if method in P2_METHODS:
        p2 = {"lam": lam, "beta": beta, "rho": rho, "r_min": r_min}
        out = _p2(b, method, opts, p2, radius_fn, detach_anchor, regularizer, batch_branches, low_memory, scaler)
    else:
        plan = None
        if method in ("pgd", "fgsm_rs"):
            plan = attack.AttackPlan.resolve(
                method, x0, eps=opts["eps"], eps_mode=eps_mode, norm=opts["norm"],
                alpha=p1_step_size(opts["alpha"], x0, alpha_mode),
                steps=opts["steps"], random_start=random_start, init_mag=opts["init_mag"],
                at_diff_grad_scale=at_diff_grad_scale)
        out = _p1(b, method, plan, opts, scaler)
        out["reg"] = b.zeros()
    per = out["mse"] + out["reg"] + out["vb"]
    if weights is not None:
        per = per * column(weights, per)
    loss = reduce(per, reduction)
    if not return_dict:
        return loss
    delta, zeros = out["delta"], b.zeros()
    return {
        "loss": loss,
        "loss_per_sample": per,
        "mse": out["mse"],
        "reg": out["reg"],
        "vb": out["vb"],
        "delta_norm": per_sample_norm(delta) if delta is not None else zeros,
        "grad_norm": per_sample_norm(out["grad"]) if out.get("grad") is not None else zeros,
        "delta": delta.detach() if delta is not None else None,
        "timesteps": b.timesteps,
        "noise": b.noise,
    }


def check_p2_modes(p2: bool, eps: float, radius_fn, batch_branches: bool, low_memory: bool) -> None:
    if batch_branches and low_memory:
        raise ValueError("low_memory=True checkpoints one P2 branch; batch_branches=True runs both in one forward: "
                         "choose one")
    if p2 and math.isinf(eps) and radius_fn is None:
        raise ValueError("eps=inf has no meaning for P2's box radius r(t) = max(r_min, eps * s_t^rho)")


def _check_steps(method: str, steps) -> None:
    if steps is None:
        return
    if method == "fgsm_rs" and steps != 1:
        raise ValueError(f"method='fgsm_rs' takes exactly one step, got steps={steps}")
    if method not in ("pgd", "fgsm_rs") and steps != 0:
        raise ValueError(f"steps={steps} has no meaning for method={method!r} (only 'pgd' takes steps)")
