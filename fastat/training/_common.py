"""Shared mechanics of the training losses: calling the user's model, prediction-type targets,
input-gradient attack passes, DDP unwrapping, dropout-mask replay and argument aliases.

Model calling convention: ``model(x_t, timesteps, **model_kwargs)``. An output with a ``.sample``
field (diffusers ``UNet2DOutput``) or a tuple/list (``return_dict=False``) is unwrapped to its first
tensor.

Prediction types (x_t = a_t * x0 + s_t * eps):
    "epsilon":      target eps
    "v_prediction": target v = a_t * eps - s_t * x0
    "sample":       target x0
P1 folds its perturbation into the noise: x_t + delta = a_t * x0 + s_t * (eps + delta / s_t), so the
implied noise is eps' = eps + delta / s_t while x0 is unchanged. The targets become
    eps' = eps + delta / s_t                 -> equivariant_mse(pred, eps, delta, s_t)
    v'   = a_t * eps' - s_t * x0 = v + delta / (s_t / a_t)
                                            -> equivariant_mse(pred, v, delta, s_t / a_t)
    x0'  = x0                                -> equivariant_mse(pred, x0, None, ., "original")
so every type goes through the one fused loss with an adjusted per-sample scale.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch

from .._checks import check_choice
from .._shapes import column

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def unwrap_output(out: Any) -> torch.Tensor:
    """diffusers' ``.sample`` field, the first element of a tuple/list, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")


def call_model(model, x: torch.Tensor, timesteps, model_kwargs: Optional[Dict[str, Any]]) -> torch.Tensor:
    return unwrap_output(model(x, timesteps, **(model_kwargs or {})))


def inner_model(model):
    """The module to run attack (input-gradient-only) passes on: ``model.module`` for DDP or FSDP(1)
    wrappers, whose forward would otherwise prepare a gradient reduction that never comes."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover
        DistributedDataParallel = ()
    if isinstance(model, DistributedDataParallel):
        return model.module
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            # FSDP(1) must run forwards through its wrapper to unshard; no_sync is the safe choice there.
            return model
    except ImportError:  # pragma: no cover
        pass
    return model


def no_sync(model):
    """``model.no_sync()`` (DDP, FSDP1), FSDP2's ``set_requires_gradient_sync(False)`` for the duration
    (``fully_shard`` modules), else a null context."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp2_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp2_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class SameRandomness:
    """Replays one RNG state before each of several compared passes, so dropout draws the same mask
    (consistency-models practice: ``dropout_state = get_rng_state(); ...; set_rng_state(dropout_state)``).

    Records the CPU state and, for a CUDA device, that device's state. ``enabled=False`` does nothing
    (needed inside CUDA-graph capture, where RNG state cannot be set)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.device = torch.device(device)
        if enabled:
            self.cpu_state = torch.get_rng_state()
            self.cuda_state = torch.cuda.get_rng_state(self.device) if self.cuda else None

    def replay(self) -> None:
        if not self.enabled:
            return
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def p1_target(
    prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(base, scale) so that the P1 target is base + delta / scale (scale None: delta does not enter)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise, sigma
    if prediction_type == "v_prediction":
        a, s = column(alpha, x0), column(sigma, x0)
        return a * noise - s * x0, sigma / alpha
    return x0, None


def p1_loss(pred, base, scale, delta, target: str, weight=None, reduction: str = "none"):
    """Per-sample P1 loss through the fused op (target "original" when delta does not enter)."""
    from ..ops.losses import equivariant_mse

    if scale is None or delta is None:
        return equivariant_mse(pred, base, None, 1.0, "original", weight, reduction)
    return equivariant_mse(pred, base, delta, scale, target, weight, reduction)


def to_epsilon(pred: torch.Tensor, x_in: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """The noise a prediction implies at input x_in (P2's regulariser lives in noise space):
    epsilon: pred;  v: s_t * x_in + a_t * v;  sample: (x_in - a_t * x0_hat) / s_t."""
    if prediction_type == "epsilon":
        return pred
    a, s = column(alpha, x_in), column(sigma, x_in)
    if prediction_type == "v_prediction":
        return s * x_in + a * pred
    return (x_in - a * pred) / s


def input_grad(loss: torch.Tensor, delta: torch.Tensor, scaler=None, retain_graph: bool = False) -> torch.Tensor:
    """d loss / d delta only (no weight gradient is formed or accumulated). With a GradScaler the loss is
    scaled before the backward (so fp16 activation gradients do not underflow) and the gradient unscaled
    after; a sample whose gradient overflowed stays non-finite and pgd_step skips it."""
    if scaler is not None and scaler.is_enabled():
        scale = scaler.get_scale()
        (g,) = torch.autograd.grad(loss * scale, delta, retain_graph=retain_graph)
        return g / scale
    (g,) = torch.autograd.grad(loss, delta, retain_graph=retain_graph)
    return g


ALIASES = {
    "adv_steps": "steps",
    "adv_lr": "alpha",
    "adv_max_norm": "eps",
    "adv_norm_type": "norm",
    "adv_target_type": "target",
}

_NORM_NAMES = {"l2": "l2", "linf": "linf", "inf": "linf", "l_inf": "linf", "l_2": "l2", "2": "l2"}


def resolve_aliases(values: Dict[str, Any], aliases: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Merge AT_Diff/FreeLB names into fastat's; a name given twice with different values is an error.
    `values` holds fastat's names (None = not given); unknown alias names raise TypeError."""
    out = dict(values)
    for alias, value in aliases.items():
        if alias not in ALIASES:
            raise TypeError(f"unexpected keyword argument {alias!r} (AT_Diff aliases: {sorted(ALIASES)})")
        name = ALIASES[alias]
        if name == "norm" and isinstance(value, str):
            value = _NORM_NAMES.get(value.lower(), value)
        if out.get(name) is not None and out[name] != value:
            raise ValueError(f"{name}={out[name]!r} and its alias {alias}={value!r} disagree; pass only one")
        out[name] = value
    for name, value in defaults.items():
        if out.get(name) is None:
            out[name] = value
    return out


def draw_timesteps_noise(x0, timesteps, noise, num_timesteps: int, generator):
    """Uniform integer timesteps in [0, T) and standard normal noise where not given."""
    if timesteps is None:
        timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if x0.is_contiguous(memory_format=torch.channels_last) and x0.ndim == 4:
            noise = noise.contiguous(memory_format=torch.channels_last)
    return timesteps, noise


def perturbation_dtype(x0: torch.Tensor) -> torch.dtype:
    """The perturbation is kept in fp32 (fp64 for fp64 data), whatever the data or autocast dtype."""
    return torch.float64 if x0.dtype == torch.float64 else torch.float32
