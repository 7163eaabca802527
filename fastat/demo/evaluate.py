"""Evaluation of one demo denoiser against the clean mixture, with fastat.eval.

Every model is evaluated on the same fixed draws (EvalSet): clean x0, timesteps, noise, the sampler's
starting noise x_T, the SW2 projection directions and an independent clean reference set. Metrics:

    denoiser_error.{clean,random,pgd}: mean over (x0, t) of mean_flat((eps_theta(x) - eps*(x))^2) at
        x = x_t, x_t + random delta (||delta|| = R) and x_t + PGD delta (5 steps), R = radius * sqrt(D)
    samples.swd: sliced W2 of `n_swd` DDIM (`sample_steps` steps) samples from quasi-random x_T (scrambled
        Sobol points, qmc_normal) to the clean distribution itself:
        sqrt(mean_j mean_i (sorted <theta_j, x>_i - Q_j((i + 0.5) / n))^2), Q_j the exact quantile function of
        the clean mixture projected on theta_j (closed form, no reference-sample noise); the same `projections`
        directions and the same x_T for every row (common random numbers)
    samples.{mmd,w2}: the first mmd_points / w2_points samples vs the clean reference set (their cost grows as
        n^2 and n^3)
    few_step[N].{swd,traj_err}: SW2 (as above) of N-step DDIM samples from the first n_samples x_T, and traj_err = mean per-sample RMS distance
        to the exact denoiser's N-step DDIM sample from the same x_T (model error only, no discretisation error)
    sampler_attack: mean final-sample RMS deviation when x_t is attacked (PGD, radius R) at the middle
        step of a 10-step DDIM trajectory
    memorization: nearest-neighbour distance ratio of the samples to the (possibly corrupted) training set
    samples.off_rms (data on a subspace only): sqrt(mean ||(I - P) x||^2) of the samples, their energy off the
        data's subspace (noise in the samples; 0 for the clean data and the exact denoiser's limit)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from ..eval import (
    ddim_sample,
    denoiser_error,
    memorization_score,
    mmd,
    sampler_attack,
    wasserstein2,
)
from .mixture import ExactDenoiser, GaussianMixture

MMD_BANDWIDTHS = (0.1, 0.3, 1.0)  # fixed (not data-dependent) so every method is scored with one kernel
T_BINS = 10


@dataclass
class EvalSet:
    mixture: GaussianMixture
    alphas_cumprod: torch.Tensor
    x0: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    x_T: torch.Tensor
    reference: torch.Tensor
    seed: int
    n_samples: int = 0
    projections: torch.Tensor = None
    exact: ExactDenoiser = None
    exact_few: Dict[int, torch.Tensor] = field(default_factory=dict)
    _quantiles: Dict[int, torch.Tensor] = field(default_factory=dict)

    def generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def swd(self, samples: torch.Tensor) -> float:
        """Sliced W2 of samples [n, D] to the clean mixture (module docstring), exact quantiles cached per n."""
        n = samples.shape[0]
        if n not in self._quantiles:
            levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            self._quantiles[n] = self.mixture.projected_quantiles(self.projections, levels).to(samples.device)
        theta = self.projections.to(samples.device)
        proj = (samples.reshape(n, -1).to(torch.float64) @ theta).sort(dim=0).values
        return float((proj - self._quantiles[n]).pow(2).mean().sqrt())


def qmc_normal(n: int, dim: int, seed: int) -> torch.Tensor:
    """n quasi-random N(0, I_dim) points [n, dim] (float32): Phi^-1 of a scrambled Sobol sequence. The sampler's
    starting noise: a deterministic sampler maps it to samples whose empirical distribution is far closer to the
    model's distribution than n i.i.d. draws would be, so SW2 measures the model rather than sampling noise."""
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    return torch.special.ndtri(u.clamp(1e-9, 1 - 1e-9)).to(torch.float32)


def make_eval_set(mixture: GaussianMixture, alphas_cumprod, n_eval: int, n_samples: int, seed: int,
                  device, few_steps: Sequence[int], n_swd: int = 0, projections: int = 256) -> EvalSet:
    """Fixed draws for one seed: x_T (quasi-random, qmc_normal) has max(n_swd, n_samples) rows (the 50-step
    samples, scored by SW2 on all of them); the first n_samples serve the few-step samplers and the other sample
    metrics; the clean reference set has n_samples points."""
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    g = torch.Generator().manual_seed(seed + 1000)
    num_t = alphas_cumprod.numel()
    x0 = mixture.sample(n_eval, g).to(device)
    # Stratified timesteps: every method sees the same, evenly covered set of t.
    timesteps = (torch.arange(n_eval) * num_t // n_eval).to(device)
    noise = torch.randn(n_eval, mixture.dim, generator=g).to(device)
    x_T = qmc_normal(max(n_swd, n_samples), mixture.dim, seed + 1000).to(device)
    reference = mixture.sample(n_samples, g).to(device)
    theta = torch.randn(mixture.dim, projections, dtype=torch.float64, generator=g)
    es = EvalSet(mixture, alphas_cumprod, x0, timesteps, noise, x_T, reference, seed, n_samples,
                 theta / theta.norm(dim=0, keepdim=True))
    es.exact = ExactDenoiser(mixture, alphas_cumprod).to(device)
    for n in few_steps:
        es.exact_few[n] = ddim_sample(es.exact, x_T[:n_samples], alphas_cumprod, n)
    return es


def _binned(values: torch.Tensor, timesteps: torch.Tensor, num_t: int):
    bins = (timesteps * T_BINS // num_t).clamp_max(T_BINS - 1)
    return [float(values[bins == b].mean()) if (bins == b).any() else float("nan") for b in range(T_BINS)]


def sample_metrics(samples: torch.Tensor, es: EvalSet, w2_points: int, mmd_points: int = 0) -> Dict[str, float]:
    """SW2 to the clean distribution on all points; MMD to the reference set on the first `mmd_points` (O(n^2));
    exact W2 on the first `w2_points` (O(n^3)); a count of 0 leaves that metric out."""
    reference = es.reference
    out = {"swd": es.swd(samples)}
    if mmd_points:
        out["mmd"] = mmd(samples[:mmd_points], reference[:mmd_points], bandwidth=MMD_BANDWIDTHS)
    n = min(w2_points, samples.shape[0], reference.shape[0])
    if n >= 2:
        out["w2"] = wasserstein2(samples[:n], reference[:n])
    return out


def evaluate_model(model, es: EvalSet, *, radius: float, pgd_steps: int = 5, few_steps: Sequence[int] = (5, 10, 20),
                   sample_steps: int = 100, w2_points: int = 1000, mmd_points: int = 2000, attack_points: int = 500,
                   train: Optional[torch.Tensor] = None) -> Dict:
    """All metrics of the module docstring for one model; the `sample_steps` samples are returned under "_samples"."""
    model.eval()
    ab = es.alphas_cumprod
    num_t = ab.numel()
    common = dict(reference=es.exact, radius=radius, radius_mode="rms")
    errs = {}
    for i, kind in enumerate(("none", "random", "pgd")):
        e = denoiser_error(model, es.x0, ab, es.timesteps, es.noise, perturbation=kind, steps=pgd_steps,
                           generator=es.generator(10 + i), **common)
        errs["clean" if kind == "none" else kind] = e
    samples = ddim_sample(model, es.x_T, ab, sample_steps)
    result = {
        "denoiser_error": {k: float(v.mean()) for k, v in errs.items()},
        "denoiser_error_by_t": {"bins": T_BINS, "clean": _binned(errs["clean"], es.timesteps, num_t),
                                "pgd": _binned(errs["pgd"], es.timesteps, num_t)},
        "samples": sample_metrics(samples, es, w2_points, mmd_points),
        "few_step": {},
    }
    for n in few_steps:
        s = ddim_sample(model, es.x_T[:es.n_samples], ab, n)
        m = sample_metrics(s, es, 0)
        m["traj_err"] = float(((s - es.exact_few[n]) ** 2).mean(dim=1).sqrt().mean())
        result["few_step"][str(n)] = m
    k = min(attack_points, es.x_T.shape[0])
    attack = sampler_attack(model, es.x_T[:k], ab, 10, attack_at=(5,), radius=radius, mode="pgd", steps=3,
                            generator=es.generator(20))
    result["sampler_attack"] = float(attack["error"].mean())
    if es.mixture.basis is not None:
        result["samples"]["off_rms"] = float(es.mixture.off_subspace(samples).pow(2).sum(1).mean().sqrt())
    if train is not None:
        result["memorization"] = memorization_score(samples[:es.n_samples], train)
    result["finite"] = all(torch.isfinite(torch.as_tensor(v)).all() for v in _leaves(result))
    result["_samples"] = samples
    return result


def _leaves(d):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, (int, float)))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield v


def data_floor(es: EvalSet, w2_points: int, mmd_points: int) -> Dict[str, float]:
    """The finite-sample floor of i.i.d. clean samples of the models' sample size (x_T's rows) in place of the
    samples: SW2 to the clean distribution, MMD and W2 between two independent clean sets. The models' and exact
    denoisers' SW2 can lie below its SW2: their samples come from quasi-random x_T."""
    other = es.mixture.sample(es.x_T.shape[0], es.generator(30)).to(es.reference.device)
    return sample_metrics(other, es, w2_points, mmd_points)
