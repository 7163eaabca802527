"""Adversarial training of a diffusers UNet2DModel with a DDPMScheduler: the drop-in change is one line.

A standard diffusers training step computes

    noisy = scheduler.add_noise(x0, noise, t)
    loss = F.mse_loss(unet(noisy, t).sample, noise)

With fastat the loss call becomes

    loss = fastat.diffusion_adv_loss(unet, x0, t, noise, scheduler=scheduler, method="pgd")

(or "fgsm_rs", "input_perturbation", "equivariant_random", "equivariant_adversarial"), or the whole step
becomes ``fastat.FreeReplay(unet, optimizer, replays=3, scheduler=scheduler).step(x0)`` (P1's Free-AT).

The defaults below use a tiny UNet so the script runs on a CPU in seconds:
    python examples/diffusers_unet.py --steps 3
"""
from __future__ import annotations

import argparse

import torch
from diffusers import DDPMScheduler, UNet2DModel

import fastat


def tiny_unet(sample_size: int = 8) -> UNet2DModel:
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def toy_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random axis-aligned bright squares on a dark background, in [-1, 1]."""
    x = -torch.ones(batch, 3, size, size)
    for i in range(batch):
        lo = int(torch.randint(0, size // 2, (1,), generator=generator))
        hi = lo + size // 2
        x[i, :, lo:hi, lo:hi] = torch.rand(3, 1, 1, generator=generator) * 2 - 1
    return x


def main(steps: int = 3, batch: int = 4, method: str = "pgd", free_replay: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    trainer = fastat.FreeReplay(unet, optimizer, replays=3, scheduler=scheduler) if free_replay else None
    losses = []
    for step in range(steps):
        x0 = toy_images(batch, 8, gen)
        if trainer is not None:
            out = trainer.step(x0, generator=gen)
            loss = torch.stack(out["losses"]).mean()
        else:
            optimizer.zero_grad(set_to_none=True)
            out = fastat.diffusion_adv_loss(unet, x0, scheduler=scheduler, method=method, generator=gen,
                                            return_dict=True)
            loss = out["loss"]
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        print(f"step {step}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--method", default="pgd", choices=fastat.training.METHODS)
    parser.add_argument("--free-replay", action="store_true", help="P1 Free-AT (3 replays per batch)")
    args = parser.parse_args()
    main(args.steps, args.batch, args.method, args.free_replay)
