"""Evaluation: robustness of denoisers and samplers, sample metrics and memorisation.

    denoiser_error      error vs an exact denoiser (or P1's target) at x_t + delta, delta none/random/PGD
    sampler_attack      perturb x_t at chosen DDIM steps, measure the final-sample deviation
    ddim_sample         deterministic DDIM sampler with perturbation hooks
    sliced_wasserstein, wasserstein2, mmd     sample-quality metrics
    memorization_score  nearest-neighbour distance ratio of samples to the training set
"""
from .memorization import memorization_score, nn_distance_ratio
from .metrics import median_bandwidth, mmd, sliced_wasserstein, wasserstein2
from .robustness import PERTURBATIONS, denoiser_error, random_on_sphere, sampler_attack
from .sampling import ddim_sample, ddim_step, ddim_timesteps

__all__ = [
    "PERTURBATIONS",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "denoiser_error",
    "median_bandwidth",
    "memorization_score",
    "mmd",
    "nn_distance_ratio",
    "random_on_sphere",
    "sampler_attack",
    "sliced_wasserstein",
    "wasserstein2",
]
