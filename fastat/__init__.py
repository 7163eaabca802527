"""fastat: fused kernels for cheap adversarial training of diffusion and consistency models.

Importing fastat touches neither CUDA nor triton nor a compiled extension; kernels load on first use.
"""
import torch  # noqa: F401  (compiled extensions need libtorch loaded first)

from . import _ext, schedules  # _ext: the compiled-extension loader (pure Python; builds nothing at import)
from ._dispatch import preload
from ._backend import BACKENDS, BackendUnavailableError, backend_status, get_backend, set_backend, use_backend
from .ops.losses import consistency_distance, equivariance_regularizer, equivariant_mse
from .ops.noise import SeededNoise, gaussian_noise
from .ops.noisy_input import noisy_input, q_sample
from .ops.perturbation import per_sample_norm, pgd_step, random_perturbation, rms_radius
from .schedules import alpha_sigma
from .training import EDMAdvLoss, FreeReplay, GuidedDiffusionAdvLosses, consistency_adv_loss, diffusion_adv_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "SeededNoise",
    "alpha_sigma",
    "backend_status",
    "preload",
    "consistency_distance",
    "equivariance_regularizer",
    "equivariant_mse",
    "gaussian_noise",
    "get_backend",
    "noisy_input",
    "per_sample_norm",
    "pgd_step",
    "q_sample",
    "random_perturbation",
    "rms_radius",
    "schedules",
    "set_backend",
    "use_backend",
    "diffusion_adv_loss",
    "FreeReplay",
    "consistency_adv_loss",
    "GuidedDiffusionAdvLosses",
    "EDMAdvLoss",
]
