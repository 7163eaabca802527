"""P2's activation memory and time per step, default vs ``low_memory=True``, beside a standard step.

Memory: bytes saved for backward (fastat.bench.saved_bytes): held when backward starts, peak during the
forward, and the backward's peak for low_memory = held when the recomputation starts + the recomputed
branch's graph (one standard forward's). Time: forward + backward per optimizer step, timed round-robin
(fastat.bench.timing.interleaved) on the reference backend, 1 thread.

Run:  python benchmarks/p2_memory.py [--reps 20] [--out benchmarks/results/p2_memory-cpu.md]
"""
from __future__ import annotations

import argparse
import platform

import torch

import fastat
from fastat.bench.models import DDPMUNet
from fastat.bench.saved_bytes import measure_step
from fastat.bench.timing import interleaved

TABLE = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
CASES = {
    "standard": {"method": "standard"},
    "p2_random": {"method": "equivariant_random"},
    "p2_random low_memory": {"method": "equivariant_random", "low_memory": True},
    "p2_adversarial": {"method": "equivariant_adversarial"},
    "p2_adversarial low_memory": {"method": "equivariant_adversarial", "low_memory": True},
}


def main(reps: int, out: str) -> str:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, dropout=0.1)
    x0 = torch.randn(16, 3, 16, 16)
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (16,))

    def step(kw):
        def run():
            model.zero_grad(set_to_none=True)
            loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, **kw)
            loss.backward()

        return run

    with fastat.use_backend("torch"):
        mem = {name: measure_step(model, lambda kw=kw: fastat.diffusion_adv_loss(model, x0, t, noise,
                                                                                 alphas_cumprod=TABLE, **kw))
               for name, kw in CASES.items()}
        times = interleaved({name: step(kw) for name, kw in CASES.items()}, device="cpu", warmup=2, reps=reps)
    std_bytes, std_ms = mem["standard"]["held"], times["standard"]["median_ms"]
    lines = [
        "# P2 activation memory and step time: default vs low_memory (CPU)",
        "",
        f"Model: DDPMUNet(ch=32, ch_mult=(1, 2), attn at 8, 16x16, dropout 0.1), batch 16x3x16x16, fp32, reference "
        f"backend, 1 thread; {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"`python benchmarks/p2_memory.py --reps {reps}`.",
        "Saved bytes = activation storage held for backward (saved-tensor hooks, parameters excluded), as a ratio "
        "to the standard step's; backward peak for low_memory = held at the recomputation + one standard graph.",
        "",
        "| case | held at backward | forward peak | backward peak | time / step (ms) | time vs standard |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in mem.items():
        backward_peak = max([m["held"]] + [r + std_bytes for r in m["at_recompute"]])
        lines.append(
            f"| {name} | {m['held'] / std_bytes:.2f}x | {m['forward_peak'] / std_bytes:.2f}x | "
            f"{backward_peak / std_bytes:.2f}x | {times[name]['median_ms']:.1f} | {times[name]['median_ms'] / std_ms:.2f}x |"
        )
    lines.append("")
    lines.append(f"Standard step: {std_bytes / 2**20:.1f} MiB saved for backward.")
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/p2_memory-cpu.md")
    args = parser.parse_args()
    print(main(args.reps, args.out))
