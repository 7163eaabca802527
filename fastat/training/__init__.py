"""Drop-in adversarial training loops for diffusion and consistency models (SPEC §5).

Passes per optimizer step (F = forward of B samples; Bi = input-only backward; Bw = backward forming
weight gradients). The standard DDPM step is 1 F + 1 Bw (~3F of work: a full backward costs ~2F).

    method                                   forwards        Bi           Bw
    standard                                 1               0            1
    input_perturbation (DDPM-IP)             1               0            1
    pgd, K steps                             K + 1           K            1
    fgsm_rs                                  2               1            1
    equivariant_random                       2               0            1 (both branches)
    equivariant_random, batch_branches       1 of 2B         0            1 of 2B
    equivariant_adversarial                  3               1            1 (both branches)
    equivariant_adversarial, batch_branches  2 of 2B         1 of 2B      1 of 2B
    FreeReplay P1 (per optimizer step)       1               0            1
    FreeReplay P2 (per optimizer step)       2 (1 of 2B)     0            1
    consistency_adv_loss                     as above + 1 no-grad target forward (+1/2 teacher forwards for CD)

(tests/test_training_passes.py checks these counts with forward hooks and weight-gradient hooks.)
"""
from .adapters import EDMAdvLoss, GuidedDiffusionAdvLosses
from .consistency import consistency_adv_loss, consistency_grid
from .cuda_graph import GraphedStep
from .diffusion import METHODS, diffusion_adv_loss, p2_radius, p2_weight
from .free_replay import FreeReplay

__all__ = [
    "EDMAdvLoss",
    "FreeReplay",
    "GraphedStep",
    "GuidedDiffusionAdvLosses",
    "METHODS",
    "consistency_adv_loss",
    "consistency_grid",
    "diffusion_adv_loss",
    "p2_radius",
    "p2_weight",
]
