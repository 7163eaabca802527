"""Validation of the training loops' user options, and AT_Diff / FreeLB argument aliases.

Every check names the argument as the user passed it (``adv_lr`` when the alias was used, ``alpha``
otherwise), and runs when the option is given: at the loss call, or when FreeReplay is constructed.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from .._checks import (  # noqa: F401 (check_float, check_finite, check_int_at_least, check_generator: re-exported)
    check_choice,
    check_finite,
    check_flag,
    check_float,
    check_generator,
    check_int_at_least,
)

# AT_Diff / FreeLB name -> fastat name.
ALIASES = {
    "adv_steps": "steps",
    "adv_lr": "alpha",
    "adv_max_norm": "eps",
    "adv_norm_type": "norm",
    "adv_target_type": "target",
    "adv_init_mag": "init_mag",
}

_NORM_NAMES = {"l2": "l2", "linf": "linf", "inf": "linf", "l_inf": "linf", "l_2": "l2", "2": "l2"}


def check_eps(name: str, value) -> float:
    """The perturbation radius: a float >= 0; math.inf means no projection."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0 (math.inf: no projection), got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a float >= 0 (math.inf: no projection), got {value!r}")
    return float(value)


def check_steps(name: str, value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def check_norm(name: str, value) -> str:
    if isinstance(value, str):
        value = _NORM_NAMES.get(value.lower(), value)
    return check_choice(name, value, ("l2", "linf"))


_CHECKS = {
    "steps": check_steps,
    "alpha": lambda n, v: check_float(n, v, optional=True),
    "eps": lambda n, v: None if v is None else check_eps(n, v),
    "norm": lambda n, v: None if v is None else check_norm(n, v),
    "target": lambda n, v: None if v is None else check_choice(n, v, ("delta_detach", "delta", "original")),
    "init_mag": lambda n, v: check_float(n, v, optional=True),
}


def resolve_aliases(values: Dict[str, Any], aliases: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Merge AT_Diff/FreeLB names into fastat's, each value validated under the name it was given.

    `values` holds fastat's names (None = not given); an alias whose fastat name is not in `values`, or
    an unknown keyword, raises TypeError; a name given twice with different values raises ValueError.
    ``adv_max_norm=0`` means "no projection" (AT_Diff projects only ``if adv_max_norm > 0``): eps = inf.
    """
    out = {name: (_CHECKS[name](name, v) if name in _CHECKS else v) for name, v in values.items()}
    for alias, value in aliases.items():
        name = ALIASES.get(alias)
        if name is None or name not in values:
            known = sorted(a for a, n in ALIASES.items() if n in values)
            raise TypeError(f"unexpected keyword argument {alias!r} (AT_Diff aliases accepted here: {known})")
        value = _CHECKS[name](alias, value)
        if alias == "adv_max_norm" and value == 0:
            value = math.inf
        if out.get(name) is not None and out[name] != value:
            hint = " (adv_max_norm=0 means no projection: eps=math.inf)" if alias == "adv_max_norm" else ""
            raise ValueError(f"{name}={out[name]!r} and its alias {alias}={aliases[alias]!r} disagree{hint}; pass only one")
        out[name] = value
    for name, value in defaults.items():
        if out.get(name) is None:
            out[name] = value
    return out


def check_p2(lam, beta, rho, r_min) -> Tuple[float, float, float, float]:
    """P2's weight and radius options: lam >= 0, beta > 0, rho finite, r_min > 0."""
    return (check_float("lam", lam), check_float("beta", beta, positive=True), check_finite("rho", rho),
            check_float("r_min", r_min, positive=True))


def check_model_kwargs(model_kwargs, name: str = "model_kwargs", callee: str = "the model") -> Dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments for {callee}, got {type(model_kwargs).__name__}")
    return model_kwargs


def check_scaler(scaler) -> None:
    if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")


def check_bools(**flags) -> None:
    """Each keyword is a flag that must be True or False."""
    for name, value in flags.items():
        check_flag(name, value)
