"""Drop-in adversarial training loops for diffusion and consistency models (docs/maths.md §5).

Passes per optimizer step (F = forward of B samples; Bi = input-only backward; Bw = backward forming
weight gradients). The standard DDPM step is 1 F + 1 Bw (~3F of work: a full backward costs ~2F).

    method                                   forwards        Bi           Bw
    standard                                 1               0            1
    input_perturbation (DDPM-IP)             1               0            1
    pgd, K steps                             K + 1           K            1
    fgsm_rs                                  2               1            1
    equivariant_random                       2               0            1 (both branches)
    equivariant_random, batch_branches       1 of 2B         0            1 of 2B
    equivariant_random, low_memory           2 + 1 in Bw     0            1 (one branch at a time)
    equivariant_adversarial                  3               1            1 (both branches)
    equivariant_adversarial, batch_branches  2 of 2B         1 of 2B      1 of 2B
    equivariant_adversarial, low_memory      3 + 1 in Bw     1            1 (one branch at a time)
    FreeReplay P1 (per optimizer step)       1               0            1
    FreeReplay P2 (per optimizer step)       2 (1 of 2B)     0            1
    consistency_adv_loss                     as above + 1 no-grad target forward (+1/2 teacher forwards for CD)

(tests/test_training_passes.py checks these counts with forward hooks and weight-gradient hooks.)

Mechanics:
- AMP: wrap the call in ``torch.autocast``; the perturbation stays fp32 (fp64 for fp64 data) and the
  losses accumulate in fp32. fp16: pass ``scaler=`` (a GradScaler); attack losses are scaled and the
  perturbation gradient unscaled; a sample whose gradient is non-finite keeps its perturbation.
- DDP: pass the wrapper. Attack passes run on ``model.module`` (no reduction is prepared for them);
  the final pass(es) go through the wrapper, so gradients are reduced once. Two forwards through the
  wrapper before one backward (P2) are fine with ``find_unused_parameters=False``. FreeReplay's
  gradient accumulation runs the first micro-batches under ``no_sync()``.
- FSDP2 (``fully_shard``): pass the sharded module; attack passes run under
  ``set_requires_gradient_sync(False)`` and use input gradients only, so nothing is reduce-scattered
  for them. FSDP1 wrappers run attack passes under ``no_sync()``. Tested only with a GPU
  (tests/test_training_mechanics.py, marked gpu).
- torch.compile: compile the model, keep the loss call eager (``torch.autograd.grad`` on a compiled
  model's output is fine; inside a compiled region it would break the graph).
- channels_last: inputs keep their layout; per-sample reductions never flatten with ``.view``.
- CUDA graphs: ``GraphedStep`` captures a whole step (attack passes, backward, optimizer step); use
  ``same_dropout=False`` and a capturable optimizer (see cuda_graph.py).
- Dropout and randomness: a call first makes its own draws (timesteps, noise, then the random start /
  DDPM-IP's xi / P2's omega) with ``generator`` or the global generator; every pass then replays one RNG
  state (``same_dropout=True``), so the compared passes (P2 clean/perturbed, attack/final, CM
  student/target) see the same dropout mask, and the global generator is left where one pass left it.
- BatchNorm: attack passes (and P2 low_memory's recompute) restore the running statistics they moved, so
  only the passes that form the loss update them (``keep_running_stats``); they still use batch statistics.
- Grad mode: under torch.no_grad() the losses run their attack and return a loss without a graph;
  inference mode refuses the attack; FreeReplay.step refuses both.
- Pure low precision: the model is fed x0's dtype (bf16/fp16 weights and data need no autocast); the
  perturbation stays fp32.
- One attack loop (attack.py) for every loss and for fastat.eval: x_t formed once, the next model input
  written by ``pgd_step(..., model_input_base=x_t)`` in the same pass as the update.
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
