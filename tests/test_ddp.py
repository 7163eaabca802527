"""DDP with gloo, 2 processes on CPU: attack passes on model.module, final passes through the wrapper,
FreeReplay's gradient accumulation under no_sync, a user's own micro-batch accumulation under no_sync with
P2's two forwards through the wrapper before one backward (find_unused_parameters=False); gradients and
parameters equal one process on the whole batch. Random starts are aligned by drawing each rank's rows of
the one-process draw (the reference backend fills them in logical order). One spawn for all checks
(process start-up is the cost)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastat
from training_utils import TABLE, clone, make

B = 8
WORLD = 2


def _gen_at(row: int, dim: int) -> torch.Generator:
    """A generator whose next box draw (P2's omega) is rows row.. of the one-process draw from seed 7."""
    g = torch.Generator().manual_seed(7)
    if row:
        torch.empty(row, dim, dtype=torch.float64).uniform_(-1.0, 1.0, generator=g)
    return g


def _grads(model):
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def _run(model, x0, noise, t, wrapper=None, row=0):
    """Returns the gradients / parameters of each case; `row` is the first row of this process's slice."""
    net = wrapper if wrapper is not None else model
    dim = x0.shape[1]
    out = []
    model.zero_grad(set_to_none=True)
    for kw in ({"method": "pgd", "steps": 2}, {"method": "equivariant_adversarial"},
               {"method": "equivariant_random", "batch_branches": True}):
        fastat.diffusion_adv_loss(net, x0, t, noise, alphas_cumprod=TABLE, generator=_gen_at(row, dim), **kw).backward()
        out.append(_grads(model))
    # A user's gradient accumulation: two micro-batches, the first under no_sync, P2 adversarial in each.
    half = x0.shape[0] // 2
    for j, part in enumerate((slice(0, half), slice(half, None))):
        ctx = wrapper.no_sync() if wrapper is not None and j == 0 else torch.enable_grad()
        with ctx:
            loss = fastat.diffusion_adv_loss(net, x0[part], t[part], noise[part], alphas_cumprod=TABLE,
                                             method="equivariant_adversarial", generator=_gen_at(row + j * half, dim))
            (loss / 2).backward()
    out.append(_grads(model))
    # Consistency training with the self target (its no-grad target pass goes through the wrapper).
    idx = (torch.arange(x0.shape[0]) + row) % 5
    fastat.consistency_adv_loss(net, None, x0, indices=idx, noise=noise, method="pgd", steps=2).backward()
    out.append(_grads(model))
    for method in ("p1", "p2"):
        replay_model = clone(model)
        replay_net = (torch.nn.parallel.DistributedDataParallel(replay_model) if wrapper is not None else replay_model)
        fr = fastat.FreeReplay(replay_net, torch.optim.SGD(replay_model.parameters(), lr=0.1), 2, method=method,
                               alphas_cumprod=TABLE, grad_accum_steps=4 if wrapper is None else 2)
        fr.step(x0, t, noise, generator=_gen_at(row, dim))
        out.append([p.detach().clone() for p in replay_model.parameters()])
    return out


def _worker(rank, world, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with fastat.use_backend("torch"):
            model, x0, noise, t = make(seed=3, batch=B)
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
            rows = slice(rank * B // world, (rank + 1) * B // world)
            res = _run(model, x0[rows], noise[rows], t[rows], wrapper=ddp, row=rows.start)
        if rank == 0:
            torch.save(res, result_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result_file = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "init"), result_file), nprocs=WORLD, join=True)
    got = torch.load(result_file)
    with fastat.use_backend("torch"):
        model, x0, noise, t = make(seed=3, batch=B)
        want = _run(clone(model), x0, noise, t)
    names = ["pgd", "P2 adversarial", "P2 random, batched branches", "user accumulation with no_sync (P2)",
             "consistency, self target", "FreeReplay P1", "FreeReplay P2"]
    assert len(got) == len(want) == len(names)
    for name, a_list, b_list in zip(names, got, want):
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"{name}: {m}")
