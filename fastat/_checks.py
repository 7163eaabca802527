"""Input validation shared by every op: clear errors that name the argument and what was expected.

Value checks on tensors (negative or non-finite radius, ...) need a device-to-host read, so they
are skipped while torch.compile traces or a CUDA graph is being captured; shape, dtype and device
checks always run. The ops' public functions check a coefficient tensor's values with `check_values` unless
the kernel that runs the call checks them itself (the cpp kernels do, for free, while reading them).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

import torch

Coef = Union[float, torch.Tensor]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOATS = frozenset(FLOAT_DTYPES)
# False only inside fastat._triton_utils.replace_launch (the overhead benchmark's stand-in for a GPU run, which does
# not read values: each read would be a device sync).
_READ_CPU_VALUES = True


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_float(name: str, value, *, positive: bool = False, finite: bool = True, optional: bool = False):
    """A Python number >= 0 (> 0 if positive; +inf allowed unless finite) returned as float, or None."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    bound = "> 0" if positive else ">= 0"
    if math.isnan(value) or value < 0 or (positive and value == 0) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}float {bound}, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    """Any finite Python number (e.g. an exponent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def check_int_at_least(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    if value is not True and value is not False:
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_generator(generator, name: str = "generator") -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")


def check_callable(name: str, value, *, optional: bool = False):
    """A callable (a model, a hook), or None if optional."""
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {type(value).__name__}")
    return value


def check_tensor(name: str, x, *, min_ndim: int = 1) -> torch.Tensor:
    """A floating-point tensor with a leading batch dimension."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have a leading batch dimension (at least {min_ndim}-d), got shape {tuple(x.shape)}")
    return x


def check_like(name: str, x, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`x` is a floating tensor with the same shape and device as `ref`."""
    return check_same(name, x, ref_name, ref.shape, ref.device)


def check_same(name: str, x, ref_name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`x` is a floating tensor of the reference's `shape` on its `device` (check_like with the reference's
    attributes read once: the ops' hot path)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        check_tensor(name, x)
    if x.shape != shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {device}; put them on one device")
    return x


def values_checkable(tensor: Optional[torch.Tensor] = None) -> bool:
    """Whether reading tensor values is allowed: never while tracing or capturing (it would break the
    graph), and for tensors off the CPU only with FASTAT_CHECK_VALUES=1 (each read is a device sync,
    too costly on every op call of a training step). A CPU tensor's read touches no device."""
    if torch.compiler.is_compiling():
        return False
    if tensor is not None and tensor.is_cpu:
        return _READ_CPU_VALUES
    if tensor is not None and os.environ.get("FASTAT_CHECK_VALUES", "0") != "1":
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def per_sample(
    name: str,
    value,
    batch: int,
    device: torch.device,
    *,
    nonnegative: bool = False,
    positive: bool = False,
    finite: bool = True,
) -> Optional[Coef]:
    """A per-sample coefficient: a Python number, a 0-d tensor, or a tensor of `batch` elements.

    Returns a float, or a floating tensor of shape [batch] on `device` (0-d tensors are expanded).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape [B]={[batch]}, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the data is on {device}")
        if value.ndim == 0:
            value = value.expand(batch)
        elif value.numel() != batch or any(s != 1 for s in value.shape[1:]):
            raise ValueError(
                f"{name} must be a float or have one value per sample (shape [{batch}]), got shape {tuple(value.shape)}"
            )
        value = value.reshape(batch)
        if values_checkable(value) and value.numel():
            detached = value.detach()
            if finite and not bool(torch.isfinite(detached).all()):
                raise ValueError(f"{name} must be finite, got non-finite values")
            if positive and not bool((detached > 0).all()):
                raise ValueError(f"{name} must be > 0, got min {detached.min().item():g}")
            if nonnegative and not bool((detached >= 0).all()):
                raise ValueError(f"{name} must be >= 0, got min {detached.min().item():g}")
        return value
    value = float(value)
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def coefficient(
    name: str, value, batch: int, device: torch.device, acc: torch.dtype, *, nonnegative: bool = False,
    positive: bool = False,
) -> Tuple[Optional[torch.Tensor], float]:
    """A per-sample coefficient as the ops take it: (None, float) for a number (checked here), or a contiguous
    [B] tensor in the accumulation dtype `acc` and 0.0 for a tensor (a 0-d tensor is expanded, [B, 1, ...] is
    accepted; gradients flow through the conversion). A tensor's values are checked by `check_values`."""
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        if dtype is not acc and not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the data is on {device}")
        shape = value.shape
        if len(shape) != 1 or shape[0] != batch:
            if not shape:
                value = value.expand(batch)
            elif value.numel() != batch or any(s != 1 for s in shape[1:]):
                raise ValueError(
                    f"{name} must be a float or have one value per sample (shape [{batch}]), got shape {tuple(shape)}"
                )
            value = value.reshape(batch)
        if dtype is not acc:
            value = value.to(acc)
        if not value.is_contiguous():
            value = value.contiguous()
        return value, 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor of shape [B]={[batch]}, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return None, value


def check_values(name: str, value: Optional[torch.Tensor], *, nonnegative: bool = False, positive: bool = False) -> None:
    """A coefficient tensor's values: finite, and > 0 or >= 0 if asked (skipped where values_checkable says so)."""
    if value is None or not values_checkable(value):
        return
    if value.numel() <= 256:  # a [B] coefficient: reading it whole is cheaper than reducing it on the device
        values = value.tolist()
        if not values:
            return
        finite = all(map(math.isfinite, values))
        low = min(values)
    else:
        low, high = (float(v) for v in torch.aminmax(value.detach()))
        finite = math.isfinite(low) and math.isfinite(high)
    if not finite:
        raise ValueError(f"{name} must be finite, got non-finite values")
    if positive and not low > 0:
        raise ValueError(f"{name} must be > 0, got min {low:g}")
    if nonnegative and not low >= 0:
        raise ValueError(f"{name} must be >= 0, got min {low:g}")


def check_batch(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} has batch size {x.shape[0]} but {ref_name} has {ref.shape[0]}")
