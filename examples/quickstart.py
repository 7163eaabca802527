"""The README's quick start, runnable as written (CI runs it): `python examples/quickstart.py`.

A tiny eps-prediction model on 2-D data stands in for yours; every fastat call is the one the README shows.
"""
import torch

import fastat


class TinyDenoiser(torch.nn.Module):
    """model(x_t, t) -> predicted noise, fastat's calling convention."""

    def __init__(self, dim: int = 2, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x_t, t):
        return self.net(torch.cat([x_t, t.float()[:, None] / 1000], dim=1))


torch.manual_seed(0)
model = TinyDenoiser()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x0 = torch.randn(256, 2)

# --- README quick start ---
table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)

# Drop-in AT loss for a DDPM training loop (P1's loss with a 3-step PGD attack):
loss = fastat.diffusion_adv_loss(model, x0, alphas_cumprod=table, method="pgd", steps=3, eps=0.1)
loss.backward(); optimizer.step(); optimizer.zero_grad()

# P1's Free-AT: K optimizer steps per batch, the perturbation's gradient comes from the training backward.
trainer = fastat.FreeReplay(model, optimizer, replays=3, alphas_cumprod=table)
trainer.step(x0)

# P2, equivariant AT (clean loss + lambda_t * equivariance regulariser); scheduler=DDPMScheduler() works too.
loss = fastat.diffusion_adv_loss(model, x0, alphas_cumprod=table, method="equivariant_adversarial")
loss.backward(); optimizer.step(); optimizer.zero_grad()
# --- end ---

print(f"quickstart ok: P2 loss {loss.item():.4f}, backend {fastat.get_backend()}")
