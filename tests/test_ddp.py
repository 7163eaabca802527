"""DDP with gloo, 2 processes on CPU: attack passes on model.module, final passes through the wrapper,
FreeReplay's gradient accumulation under no_sync; gradients and parameters equal one process on the
whole batch. One spawn for all checks (process start-up is the cost)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastat
from training_utils import TABLE, clone, make

B = 8


def _run(model, x0, noise, t, wrapper=None):
    """Returns (pgd grads, P2-adversarial grads, parameters after 2 FreeReplay replays with accumulation)."""
    net = wrapper if wrapper is not None else model
    out = []
    for kw in ({"method": "pgd", "steps": 2}, {"method": "equivariant_adversarial"}):
        model.zero_grad(set_to_none=True)
        loss = fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE,
                                         generator=torch.Generator().manual_seed(7), **kw)
        loss.backward()
        out.append([p.grad.clone() for p in model.parameters()])
    fr = fastat.FreeReplay(net, torch.optim.SGD(model.parameters(), lr=0.1), 2, alphas_cumprod=TABLE,
                           grad_accum_steps=4 if wrapper is None else 2)
    fr.step(x0, t, noise)
    out.append([p.detach().clone() for p in model.parameters()])
    return out


def _worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with fastat.use_backend("torch"):
            model, x0, noise, t = make(seed=3, batch=B)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            half = slice(rank * B // world, (rank + 1) * B // world)
            res = _run(model, x0[half], noise[half], t[half], wrapper=ddp)
        if rank == 0:
            torch.save(res, result_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2, join=True)
    got = torch.load(result_file)
    with fastat.use_backend("torch"):
        model, x0, noise, t = make(seed=3, batch=B)
        want = _run(clone(model), x0, noise, t)
    for a, b in zip(got[0], want[0]):  # PGD-AT gradients (zero start: deterministic)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # P2: attack on model.module, two forwards through DDP, one backward. Its random start depends on the
    # slice, so only the run itself (no DDP error) and finite reduced gradients are checked here.
    assert all(torch.isfinite(g).all() for g in got[1])
    for a, b in zip(got[2], want[2]):  # FreeReplay: accumulation with no_sync, one reduction per replay
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)

