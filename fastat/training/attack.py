"""The one attack loop of every training loss and of the evaluation: projected ascent on a perturbation
delta of a model input, through the fused entry points.

    x_in = x_base + delta                      (x_base, e.g. x_t, is formed once per batch)
    repeat `steps` times:
        g = d loss(x_in, delta) / d x_in + d loss(x_in, delta) / d delta    (input gradients only)
        delta, x_in = pgd_step(delta, g / grad_divisor, step_size, radius, norm, model_input_base=x_base)

pgd_step writes the next model input in the same pass as the update, so no step recomputes x_t.
The loss sees x_in and delta as separate leaves: the model path through x_in and a direct path through
delta (P1's "delta" target, P2's omega) add up to d loss / d delta since x_in = x_base + delta.

`AttackPlan` turns the user's options (radius eps in "rms" or "abs" units, step alpha, steps, random
start and its radius init_mag, AT_Diff's gradient scale) into the numbers of one batch; defaults:

    method     steps   start                       step size (L2 | Linf)
    "pgd"      3       zero (uniform if init_mag)  0.1 | 2.5 R / steps
    "fgsm_rs"  1       uniform in the ball / box   1.25 R
    "free"     -       zero (uniform if init_mag)  0.1 | R / 4          (FreeReplay, one step per replay)

eps = math.inf means no projection (AT_Diff's ``adv_max_norm=0``); defaults that need R then need an
explicit alpha / init_mag. ``at_diff_grad_scale=True`` divides the gradient by the loss scale before the
step as AT_Diff's loop does (``delta.grad / 2**lg_loss_scale``). Without fp16 its ``lg_loss_scale`` stays
20 while the loss is not scaled: the step becomes alpha * g / max(||g||, 2^20 * 1e-8 ~= 0.0105), shorter
for samples with a small gradient. With fp16 the loss is scaled by that same 2^lg_loss_scale, so the
division is exactly the unscale: with an enabled GradScaler (whose unscale fastat always applies) the
flag divides by nothing more (`effective_divisor`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple, Union

import torch

from .._checks import check_choice
from .._shapes import Coef
from ..ops.perturbation import pgd_step, random_perturbation, rms_radius
from ._common import input_grad, keep_running_stats

AT_DIFF_GRAD_DIVISOR = 2.0**20
INITS = {True: "uniform", False: "zero", "uniform": "uniform", "normal": "normal", "zero": "zero"}
PLAN_METHODS = ("pgd", "fgsm_rs", "free")


def check_random_start(value):
    if value is not None and (not isinstance(value, (bool, str)) or value not in INITS):
        raise ValueError(f"random_start must be a bool or one of 'uniform', 'normal', 'zero', got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class AttackPlan:
    """The perturbation of one batch: absolute radius (math.inf: no projection), steps, step size, start."""

    norm: str
    radius: float
    steps: int
    step_size: float
    init: str
    init_radius: float
    grad_divisor: float = 1.0

    @classmethod
    def resolve(cls, method: str, like: torch.Tensor, *, eps: float, eps_mode: str, norm: str, alpha=None,
                steps=None, random_start=None, init_mag=None, at_diff_grad_scale: bool = False) -> "AttackPlan":
        check_choice("method", method, PLAN_METHODS)

        def absolute(r: float) -> float:
            return rms_radius(r, like) if (eps_mode == "rms" and norm == "l2" and math.isfinite(r)) else r

        radius = absolute(eps)
        if method == "fgsm_rs":
            if steps not in (None, 1):
                raise ValueError(f"method='fgsm_rs' takes exactly one step, got steps={steps}")
            steps, default_init = 1, "uniform"
        else:
            steps = 3 if steps is None else steps
            default_init = "uniform" if init_mag else "zero"
        init = default_init if random_start is None else INITS[random_start]
        if init_mag == 0 and random_start is None:
            init = "zero"
        if init_mag and init == "zero":
            raise ValueError(f"init_mag={init_mag} sets a random start's radius, but random_start={random_start!r}")
        if method == "fgsm_rs" and init == "zero":
            raise ValueError("method='fgsm_rs' needs a random start; use method='pgd' with steps=1 for plain FGSM")
        init_radius = absolute(init_mag) if init_mag else radius
        if alpha is None:
            if norm == "l2" and method != "fgsm_rs":
                alpha = 0.1
            else:
                alpha = {"pgd": 2.5 * radius / max(steps, 1), "fgsm_rs": 1.25 * radius, "free": radius / 4}[method]
        unbounded = [what for what, v in (("a default step alpha", alpha), ("a random start", init_radius if init != "zero" else 0))
                     if math.isinf(v)]
        if unbounded:
            raise ValueError(f"eps=inf (no projection) leaves method={method!r} without {' and '.join(unbounded)}: "
                             "pass alpha= (and init_mag= for a random start)")
        return cls(norm, radius, steps, float(alpha), init, init_radius,
                   AT_DIFF_GRAD_DIVISOR if at_diff_grad_scale else 1.0)

    def start(self, like: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor:
        """delta_0: zeros, or a random draw of radius init_radius (one call of draw_start)."""
        if self.init == "zero":
            return torch.zeros_like(like, dtype=dtype)
        return draw_start(like, self.init_radius, self.norm, self.init, generator, dtype)


def draw_start(like: torch.Tensor, radius: Coef, norm: str, init: str, generator, dtype: torch.dtype) -> torch.Tensor:
    """A random start through the public op; a generator on another device than the data (a CPU generator
    for CUDA data) draws on its own device and the result is moved."""
    if generator is not None and generator.device.type != like.device.type:
        cpu_like = torch.empty(like.shape, dtype=like.dtype, device=generator.device)
        if isinstance(radius, torch.Tensor):
            radius = radius.to(generator.device)
        return random_perturbation(cpu_like, radius, norm, init, generator, dtype=dtype).to(like.device)
    return random_perturbation(like, radius, norm, init, generator, dtype=dtype)


def effective_divisor(grad_divisor: float, scaler) -> float:
    """AT_Diff's division by its loss scale: the unscale itself when a GradScaler is on (already applied to the
    gradient), else ``grad_divisor`` (2^20 with at_diff_grad_scale, the fp32 run's unused lg_loss_scale)."""
    return 1.0 if scaler is not None and scaler.is_enabled() else grad_divisor


def projection_radius(radius: Union[float, torch.Tensor], delta: torch.Tensor):
    """pgd_step's radius; no projection (math.inf) is the dtype's largest value, where P_R is the identity."""
    if isinstance(radius, float) and math.isinf(radius):
        return torch.finfo(delta.dtype).max
    return radius


def first_input(x_base: torch.Tensor, delta: torch.Tensor, zero: bool, model_dtype: torch.dtype) -> torch.Tensor:
    """x_base + delta in the model's dtype (x_base itself for a zero start)."""
    return (x_base if zero else x_base + delta).to(model_dtype)


def step(delta: torch.Tensor, grad: torch.Tensor, step_size, radius, norm: str, x_base: Optional[torch.Tensor],
         model_dtype: torch.dtype, grad_divisor: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One fused update: (delta', x_base + delta' in the model's dtype), or (delta', None) without x_base."""
    if grad_divisor != 1.0:
        grad = grad / grad_divisor
    radius = projection_radius(radius, delta)
    if x_base is None:
        return pgd_step(delta, grad, step_size, radius, norm), None
    delta, x_in = pgd_step(delta, grad, step_size, radius, norm, model_input_base=x_base)
    return delta, x_in.to(model_dtype)


def ascend(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_base: torch.Tensor,
    delta: torch.Tensor,
    *,
    steps: int,
    step_size,
    radius,
    norm: str,
    x_in: Optional[torch.Tensor] = None,
    scaler=None,
    grad_divisor: float = 1.0,
    model_dtype: Optional[torch.dtype] = None,
    norm_layers=(),
):
    """`steps` projected ascent steps on delta (module docstring); loss_fn(x_in, delta) -> the attack loss
    summed over the batch. Returns (delta, x_in, last gradient or None), all without a graph.
    ``norm_layers`` (running_stat_modules of the model): their running statistics are restored after each
    attack pass, so only the passes that form the loss update them. Needs autograd: refuses inference mode
    (under torch.no_grad() the input gradients are still taken)."""
    if steps and torch.is_inference_mode_enabled():
        raise RuntimeError("the attack takes input gradients and cannot run under torch.inference_mode(); use "
                           "torch.no_grad() to evaluate an adversarial loss (the attack runs, the loss has no graph)")
    model_dtype = x_base.dtype if model_dtype is None else model_dtype
    grad_divisor = effective_divisor(grad_divisor, scaler)
    if x_in is None:
        x_in = first_input(x_base, delta, False, model_dtype)
    grad = None
    for _ in range(steps):
        x_leaf = x_in.detach().requires_grad_(True)
        d_leaf = delta.detach().requires_grad_(True)
        with torch.enable_grad(), keep_running_stats(norm_layers):
            grad = input_grad(loss_fn(x_leaf, d_leaf), (x_leaf, d_leaf), scaler)
        delta, x_in = step(d_leaf.detach(), grad, step_size, radius, norm, x_base, model_dtype, grad_divisor)
    return delta, x_in.detach(), grad


def run_plan(plan: AttackPlan, loss_fn, x_base: torch.Tensor, like: torch.Tensor, generator, dtype: torch.dtype,
             model_dtype: torch.dtype, scaler=None, norm_layers=()):
    """Start and ascend as `plan` says: (delta, x_in, last gradient or None)."""
    delta = plan.start(like, generator, dtype)
    x_in = first_input(x_base, delta, plan.init == "zero", model_dtype)
    return ascend(loss_fn, x_base, delta, steps=plan.steps, step_size=plan.step_size, radius=plan.radius,
                  norm=plan.norm, x_in=x_in, scaler=scaler, grad_divisor=plan.grad_divisor, model_dtype=model_dtype,
                  norm_layers=norm_layers)
