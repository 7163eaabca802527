"""Triton's flat tiles (samples of D <= 16 elements, a power of two, read as whole consecutive runs so the accesses
are 128-bit): several programs, a partial last tile, and every op that uses them, against the torch reference."""
import pytest
import torch

import fastat
import fastat._triton_utils as tu
from utils import tol

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (shape, tile): tile elements per program; 1000 x 2 over tiles of 64 is 16 programs, the last one partial.
CASES = [((1000, 2), 64), ((37, 4), 32), ((20, 16), 64), ((9, 1), 4), ((6, 2, 2, 2), 16)]


def _pair(fn, tile):
    with fastat.use_backend("torch"):
        expect = fn()
    with fastat.use_backend("triton"), tu.overrides(tile=tile):
        got = fn()
    return expect, got


@pytest.mark.parametrize("shape,tile", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_tiles_match_the_reference(shape, tile, dtype):
    g = torch.Generator().manual_seed(0)
    x0, noise, delta, grad = (torch.randn(shape, generator=g).to(DEV, dtype) for _ in range(4))
    alpha = torch.rand(shape[0], generator=g).to(DEV)
    sigma = (torch.rand(shape[0], generator=g) + 0.1).to(DEV)
    radius = torch.rand(shape[0], generator=g).to(DEV)
    atol, rtol = tol(dtype)

    expect, got = _pair(lambda: fastat.noisy_input(x0, noise, alpha, sigma, delta), tile)
    torch.testing.assert_close(got, expect, atol=atol, rtol=rtol)

    for norm in ("l2", "linf"):
        with torch.no_grad():
            expect, got = _pair(lambda: fastat.pgd_step(delta, grad, 0.1, radius, norm, model_input_base=x0), tile)
        for e, o in zip(expect, got):
            torch.testing.assert_close(o, e, atol=atol, rtol=rtol)

    def loss_and_grads():
        pred = x0.detach().clone().requires_grad_(True)
        d = delta.detach().clone().requires_grad_(True)
        loss = fastat.equivariant_mse(pred, noise, d, sigma, "delta", reduction="mean")
        return (loss.detach(), *torch.autograd.grad(loss, (pred, d)))

    expect, got = _pair(loss_and_grads, tile)
    for e, o in zip(expect, got):
        torch.testing.assert_close(o.float(), e.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape,tile", CASES[:3])
def test_flat_l2_random_start_is_on_the_sphere_of_its_draws(shape, tile):
    """The fused L2 random start (norms from the tile itself) draws what the two-pass form draws."""
    like = torch.empty(shape, device=DEV)
    outs = []
    for overrides in ({"tile": tile}, {"tile": tile, "split": 1}):
        g = torch.Generator(device=DEV).manual_seed(5)
        with fastat.use_backend("triton"), tu.overrides(**overrides):
            outs.append(fastat.random_perturbation(like, 0.5, "l2", "normal", generator=g))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    assert float(outs[0].flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5
