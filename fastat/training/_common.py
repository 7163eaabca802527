"""Shared mechanics of the training losses: calling the user's model, prediction-type targets,
input-gradient attack passes, DDP unwrapping, dropout-mask replay, and the batch's own draws.

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
import inspect
from typing import Any, Dict, Optional, Sequence

import torch

from .._autograd import loss_grads
from .._checks import check_choice, check_like, values_checkable
from .._shapes import column
from ..ops.noise import SeededNoise

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def unwrap_output(out: Any, name: str = "the model") -> torch.Tensor:
    """diffusers' ``.sample`` field, the first element of a tuple/list, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"{name} returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")


def check_output(out: torch.Tensor, x: torch.Tensor, name: str = "model", channels: int = 1) -> torch.Tensor:
    """A model's prediction: a floating tensor of its input's shape (``channels`` times the channels along dim 1
    for a learned-variance output), so a wrong output is named here, not as a loss operand."""
    if not out.is_floating_point():
        raise TypeError(f"{name} returned a {out.dtype} tensor; expected a floating-point prediction shaped like its "
                        f"input {tuple(x.shape)}")
    if out.shape != x.shape:
        expected = x.shape if channels == 1 or x.ndim < 2 else (x.shape[0], channels * x.shape[1], *x.shape[2:])
        if out.shape != expected:
            raise ValueError(f"{name} returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}; expected "
                             f"{tuple(expected)}" + (" (learn_sigma=True: 2C channels along dim 1)" if channels == 2 else ""))
    return out


def require_input_grad(loss: torch.Tensor) -> torch.Tensor:
    """The attack differentiates the loss w.r.t. the model input: a model run under no_grad, or one that detaches its
    output, gets a clear error instead of autograd's."""
    if not loss.requires_grad:
        raise ValueError("the model's output does not depend on its input through autograd (is the model run under "
                         "torch.no_grad(), or is its output detached?): the perturbation needs d loss / d x_t")
    return loss


def call_model(model, x: torch.Tensor, timesteps, model_kwargs: Optional[Dict[str, Any]]) -> torch.Tensor:
    """``model(x, timesteps, **model_kwargs)``, unwrapped. A TypeError raised because the model cannot take
    these arguments says so; one raised inside the model passes through unchanged."""
    kwargs = model_kwargs or {}
    try:
        out = model(x, timesteps, **kwargs)
    except TypeError as err:
        if _accepts(model, (x, timesteps), kwargs):
            raise
        raise TypeError(
            f"the model is called as model(x_t, timesteps, **model_kwargs) (model_kwargs keys: {sorted(kwargs)}), "
            f"which {type(model).__name__} does not accept: {err}. Wrap it, e.g. lambda x, t: net(x)"
        ) from err
    return unwrap_output(out)


def _accepts(model, args, kwargs) -> bool:
    """Whether the model's signature binds the call (True when it cannot be inspected)."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature (builtins, some C callables)
        return True
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


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


def running_stat_modules(model) -> list:
    """The normalisation layers of ``model`` (an nn.Module, or a wrapper of one) that update running statistics
    in this forward: BatchNorm / SyncBatchNorm / InstanceNorm(track_running_stats=True) in training mode.
    A plain callable exposes none."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
            and m.training and m.track_running_stats and m.running_mean is not None]


@contextlib.contextmanager
def keep_running_stats(modules):
    """Run a pass that must leave running statistics unchanged (an attack pass, a checkpoint's recompute):
    it still normalises with the batch's statistics, as the training pass does; the buffers are restored after."""
    if not modules:
        yield
        return
    saved = [(m, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in modules]
    try:
        yield
    finally:
        # Through .data: an earlier training pass's graph saved these buffers (batch_norm's backward takes them
        # but, in training mode, never reads them), so a tracked in-place write would fail its version check.
        for m, mean, var, count in saved:
            m.running_mean.data.copy_(mean)
            m.running_var.data.copy_(var)
            if count is not None:
                m.num_batches_tracked.data.copy_(count)


class SameRandomness:
    """One RNG state shared by the compared passes of a call, so dropout draws the same mask in each
    (consistency-models practice: ``state = get_rng_state(); ...; set_rng_state(state)``).

    The state is recorded by the first pass (after every draw the call makes itself) and restored
    before each later pass, so after the call the generator stands where one pass left it: it is
    advanced, never rewound. Records the CPU state and, for a CUDA device, that device's state.
    ``enabled=False`` does nothing (needed inside CUDA-graph capture, where RNG state cannot be set)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.state = None

    def replay(self) -> None:
        if not self.enabled:
            return
        if self.state is None:
            self.state = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.cuda else None)
            return
        torch.set_rng_state(self.state[0])
        if self.cuda:
            torch.cuda.set_rng_state(self.state[1], self.device)


def p1_target(prediction_type: str, x0: torch.Tensor, noise, alpha: torch.Tensor, sigma: torch.Tensor):
    """(base, scale) so that the P1 target is base + delta / scale (scale None: delta does not enter).
    ``noise`` may be a SeededNoise; it is materialised only for v-prediction, whose base needs it."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise, sigma
    if prediction_type == "v_prediction":
        if isinstance(noise, SeededNoise):
            noise = noise.materialize(x0, torch.promote_types(x0.dtype, torch.float32))
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


def input_grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor], scaler=None) -> torch.Tensor:
    """d loss / d inputs, summed over the given leaves (no weight gradient is formed or accumulated), in the
    dtype of the last one (`fastat._autograd.loss_grads`: the engine seeded with a cached ones scalar, no fill
    per step). The attack loops pass (x_in, delta): the model input and the perturbation, which
    may also enter the loss directly (P1's "delta" target). With a GradScaler the loss is scaled before
    the backward (so fp16 activation gradients do not underflow) and the gradient unscaled after; a
    sample whose gradient overflowed stays non-finite and pgd_step skips it."""
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    require_input_grad(loss)
    grads = loss_grads(loss if scale is None else loss * scale, inputs)
    return leaf_grad_sum(grads, inputs[-1], scale)


def leaf_grad_sum(grads, like: torch.Tensor, scale=None) -> torch.Tensor:
    """The sum of the non-None gradients, in like's dtype, divided by a loss scale if one was applied."""
    total = None
    for g in grads:
        if g is not None:
            g = g.to(like.dtype)
            total = g if total is None else total + g
    if total is None:
        total = torch.zeros_like(like)
    return total if scale is None else total / scale


def draw_timesteps_noise(x0, timesteps, noise, num_timesteps: int, generator):
    """Uniform integer timesteps in [0, T), then standard normal noise, each drawn only where not given
    (in this order, with `generator` or the global generator); given ones are validated."""
    batch = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, num_timesteps, (batch,), device=x0.device, generator=generator)
    else:
        check_timesteps("timesteps", timesteps, x0)
        if batch and batch <= 256 and values_checkable(timesteps):  # before the noise draw: a refusal draws nothing
            values = timesteps.tolist()
            if min(values) < 0 or max(values) >= num_timesteps:
                raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got values in [{min(values)}, "
                                 f"{max(values)}]")
    if noise is None:
        noise = standard_normal(x0, x0.dtype, generator)
    elif not isinstance(noise, SeededNoise):
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor or a fastat.SeededNoise, got {type(noise).__name__}")
        check_like("noise", noise, "x0", x0)
    return timesteps, noise


def standard_normal(like: torch.Tensor, dtype: torch.dtype, generator) -> torch.Tensor:
    """N(0, I) of like's shape, drawn in logical order, in like's layout when it is channels_last (4-D)."""
    out = torch.randn(like.shape, device=like.device, dtype=dtype, generator=generator)
    if like.ndim == 4 and like.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def check_timesteps(name: str, timesteps, x0: torch.Tensor) -> None:
    """An integer tensor of shape [B] on x0's device."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.dtype.is_floating_point or timesteps.dtype in (
        torch.bool, torch.complex64, torch.complex128
    ):
        what = getattr(timesteps, "dtype", type(timesteps).__name__)
        raise TypeError(f"{name} must be an integer tensor of shape [B], got {what}")
    if tuple(timesteps.shape) != (x0.shape[0],):
        raise ValueError(f"{name} must have shape [B]=[{x0.shape[0]}], got {tuple(timesteps.shape)}")
    if timesteps.device != x0.device:
        raise ValueError(f"{name} is on {timesteps.device} but x0 is on {x0.device}; put them on one device")


def chunk_noise(noise, chunks: int, like: torch.Tensor):
    """Split a noise tensor along the batch, or a SeededNoise into the streams of its row blocks
    (element i of a row-major [B, ...] tensor is draw offset + i, so block j starts at its first row)."""
    if not isinstance(noise, SeededNoise):
        return list(noise.chunk(chunks))
    rows = [len(c) for c in torch.arange(like.shape[0]).chunk(chunks)]
    per_row = like[0].numel() if like.shape[0] else 0
    starts = [sum(rows[:j]) * per_row for j in range(len(rows))]
    return [SeededNoise(noise.seed, noise.offset + start) for start in starts]


def perturbation_dtype(x0: torch.Tensor) -> torch.dtype:
    """The perturbation is kept in fp32 (fp64 for fp64 data), whatever the data or autocast dtype."""
    return torch.float64 if x0.dtype == torch.float64 else torch.float32
