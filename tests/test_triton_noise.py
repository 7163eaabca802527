"""Seeded Gaussian noise: the torch Philox/Box-Muller reference against triton's tl.randn (interpreter)."""
import pytest
import torch

import fastat
from fastat import SeededNoise
from fastat.ops.noise import reference as ref
from utils import layout

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _randint4x_kernel(out, seed, offset, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)
    mask = i < N
    c0, c1, c2, c3 = tl.randint4x(seed, offset + i)
    tl.store(out + i, c0.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
    tl.store(out + N + i, c1.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out + 2 * N + i, c2.to(tl.int64) & 0xFFFFFFFF, mask=mask)
    tl.store(out + 3 * N + i, c3.to(tl.int64) & 0xFFFFFFFF, mask=mask)


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 5), (2**40 + 7, 2**32 - 100), (2**62 + 3, 123)])
def test_philox_integers_bit_exact(seed, offset):
    n = 1000
    out = torch.empty(4 * n, dtype=torch.int64, device=DEV)
    _randint4x_kernel[(1,)](out, seed, offset, n, BLOCK=1024)
    idx = torch.arange(n, dtype=torch.int64, device=DEV) + offset
    zero = torch.zeros_like(idx)
    expect = ref.philox(seed, idx & ref.M32, (idx >> 32) & ref.M32, zero, zero)
    for k in range(4):
        assert torch.equal(out[k * n:(k + 1) * n], expect[k]), f"philox word {k} differs"


@pytest.mark.parametrize("seed,offset", [(0, 0), (99, 7), (2**35 + 1, 2**33)])
def test_gaussian_noise_matches_reference(seed, offset):
    like = torch.empty(6, 3, 7, 5, device=DEV)
    expect = ref.gaussian_noise(like, seed, offset, torch.float32)
    with fastat.use_backend("triton"):
        got = fastat.gaussian_noise(like, seed, offset)
    torch.testing.assert_close(got, expect, atol=2e-6, rtol=2e-6)


def test_offsets_index_one_stream():
    like = torch.empty(4, 50, device=DEV)
    with fastat.use_backend("triton"):
        whole = fastat.gaussian_noise(like, 5, 0).flatten()
        tail = fastat.gaussian_noise(torch.empty(2, 50, device=DEV), 5, 100).flatten()
        other_seed = fastat.gaussian_noise(like, 6, 0).flatten()
    assert torch.equal(whole[100:], tail)
    assert not torch.equal(whole, other_seed)
    assert SeededNoise(5, 0).next(like) == SeededNoise(5, 200)


@pytest.mark.parametrize("kind", ["channels_last", "noncontiguous"])
def test_layouts_index_logically(kind):
    base = torch.empty(3, 4, 5, 6, device=DEV)
    like = layout(base, kind)
    with fastat.use_backend("triton"):
        got = fastat.gaussian_noise(like, 11, 3)
        plain = fastat.gaussian_noise(base, 11, 3)
    assert torch.equal(got, plain)
    assert got.is_contiguous(memory_format=torch.channels_last) == (kind == "channels_last")
    expect = ref.gaussian_noise(like, 11, 3, torch.float32)
    assert got.stride() == expect.stride()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moments_and_dtype(backend):
    like = torch.empty(32, 1000, device=DEV)
    with fastat.use_backend(backend):
        x = fastat.gaussian_noise(like, 2024)
        h = fastat.gaussian_noise(like, 2024, dtype=torch.float16)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
    assert h.dtype == torch.float16 and torch.equal(h, x.half())


def test_validation_errors():
    like = torch.empty(2, 3)
    with pytest.raises(ValueError, match="seed"):
        fastat.gaussian_noise(like, -1)
    with pytest.raises(TypeError, match="offset"):
        fastat.gaussian_noise(like, 1, offset=1.5)
    with pytest.raises(ValueError, match="SeededNoise.seed"):
        SeededNoise(2**63)
    with pytest.raises(TypeError, match="SeededNoise.offset"):
        SeededNoise(1, offset=True)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor or a fastat.SeededNoise"):
        fastat.noisy_input(like, 3, 1.0, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        fastat.gaussian_noise(like, 1, dtype=torch.int32)


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_seeded_noisy_input_and_loss_regenerate_the_same_noise(kind, dtype):
    """x_t built with SeededNoise and the loss target built with the same SeededNoise see one noise."""
    torch.manual_seed(0)
    shape = (3, 4, 5, 6)
    x0 = layout(torch.randn(shape, device=DEV).to(dtype), kind)
    delta = layout(torch.randn(shape, device=DEV).to(dtype) * 0.1, kind)
    alpha, sigma = torch.rand(3, device=DEV), torch.rand(3, device=DEV) + 0.2
    noise = SeededNoise(77, 1000)
    eps = noise.materialize(x0)
    assert eps.dtype == torch.float32
    with fastat.use_backend("torch"):
        expect = fastat.noisy_input(x0, eps.to(dtype), alpha, sigma, delta)  # the same values, stored
        seeded_ref = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    with fastat.use_backend("triton"):
        xt = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    assert xt.dtype == dtype  # seeded noise does not promote
    torch.testing.assert_close(xt.float(), seeded_ref.float(), atol=2e-3, rtol=2e-3)
    atol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(xt.float(), expect.float(), atol=atol, rtol=atol)
    # the model predicts exactly eps + delta/sigma -> the "delta" loss is ~0 only if the noise matches
    pred = (eps + delta.float() / sigma[:, None, None, None]).to(dtype)
    with fastat.use_backend("triton"):
        loss = fastat.equivariant_mse(pred, noise, delta, sigma, "delta", reduction="none")
    assert loss.max().item() < (1e-10 if dtype == torch.float32 else 1e-4)


@pytest.mark.gpu
def test_gpu_noise_matches_reference_and_interpreter_convention():
    like = torch.empty(8, 3, 32, 32, device="cuda")
    with fastat.use_backend("triton"):
        got = fastat.gaussian_noise(like, 123, 456)
    expect = ref.gaussian_noise(like, 123, 456, torch.float32)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_q_sample_accepts_seeded_noise():
    x0 = torch.randn(4, 3, 5, device=DEV)
    t = torch.tensor([1, 5, 900, 999], device=DEV)
    table = fastat.schedules.ddpm_linear_alphas_cumprod(1000)
    with fastat.use_backend("torch"):
        expect = fastat.q_sample(x0, SeededNoise(1, 2), t, table)
    with fastat.use_backend("triton"):
        got = fastat.q_sample(x0, SeededNoise(1, 2), t, table)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)
