"""Input gradients of a scalar loss for the attack steps: `torch.autograd.grad` with a cached seed.

    loss_grads(loss, inputs) == torch.autograd.grad(loss, inputs, allow_unused=True)

Without `grad_outputs` the engine seeds the backward with `torch.ones_like(loss)`: one fill kernel and its host
cost on every attack step. `loss_grads` passes instead one ones scalar per (device, dtype), made once and never
written: the engine only reads a seed (its input buffer accumulates in place only into a buffer nothing else
holds, and the cache holds every seed), and a gradient that comes back as the seed itself or a view of it (a loss
that is one of the inputs, or a sum whose backward expands the seed) is copied before it is returned. The call goes
to the engine the way `torch.autograd.grad` does (`torch.autograd.graph._engine_run_backward`), without
re-validating the arguments on every step; anything unusual takes `torch.autograd.grad` itself: tensor subclasses
with `__torch_function__`, functorch transforms, torch.compile tracing, a non-scalar loss, or a seed that would have
to be made while a CUDA graph is being captured (the fill would run only on replay).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

_SEEDS: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
_FLOATS = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
try:
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # an older or newer torch without the engine funnel: the public call
    _engine_run_backward = None
_has_torch_function = torch._C._has_torch_function
_functorch_active = torch._C._are_functorch_transforms_active
_is_compiling = torch.compiler.is_compiling


def grad_seed(loss: torch.Tensor) -> Optional[torch.Tensor]:
    """The cached d loss / d loss = 1 for a scalar loss of this device and dtype (None where one cannot be made)."""
    key = (loss.device, loss.dtype)
    seed = _SEEDS.get(key)
    if seed is None:
        if loss.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        seed = torch.ones((), dtype=loss.dtype, device=loss.device)
        if loss.is_cuda:  # made on whatever stream is current: finished before any stream reads it
            torch.cuda.synchronize(loss.device)
        _SEEDS[key] = seed
    return seed


def loss_grads(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """d loss / d each input (None for an input the loss does not use); the graph is freed."""
    inputs = tuple(inputs)
    if (_engine_run_backward is None or loss.__class__ is not torch.Tensor or loss.ndim != 0
            or not loss.requires_grad or loss.dtype not in _FLOATS or _has_torch_function(inputs)
            or _functorch_active() or _is_compiling()):
        return torch.autograd.grad(loss, inputs, allow_unused=True)
    seed = grad_seed(loss)
    if seed is None:
        return torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = _engine_run_backward((loss,), (seed,), False, False, inputs, True, False)
    pointer = seed.data_ptr()
    if any(g is not None and g.data_ptr() == pointer for g in grads):
        grads = tuple(g.clone() if g is not None and g.data_ptr() == pointer else g for g in grads)
    return grads
