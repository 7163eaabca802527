"""P2's low-memory mode (issue 11 item 12): never holds both branch graphs, measured on CPU by the bytes
saved for backward (saved-tensor hooks) beside a standard step; same loss and gradients as the default."""
import pytest
import torch

import fastat
from fastat.bench.saved_bytes import measure_step
from training_utils import TABLE, clone, grads, make, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")


class Wide(torch.nn.Module):
    """An MLP whose activations (B x 512 per layer) dwarf its input and output (B x 16)."""

    def __init__(self, dim=16, width=512, dropout=0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, (t.to(x.dtype) / 1000).reshape(-1, 1)], 1))


def measure(model, x0, t, noise, **kw):
    """(bytes held when backward starts, peak during the forward, bytes held when a recomputation starts)."""
    out = measure_step(model, lambda: fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, **kw))
    return out["held"], out["forward_peak"], out["at_recompute"]


@pytest.mark.parametrize("method", ["equivariant_random", "equivariant_adversarial"])
def test_low_memory_p2_holds_one_graph_at_a_time(method):
    torch.manual_seed(0)
    model = Wide()
    x0, noise, t = torch.randn(64, 16), torch.randn(64, 16), torch.randint(0, 1000, (64,))
    standard, _, _ = measure(model, x0, t, noise, method="standard")
    held, peak, _ = measure(model, x0, t, noise, method=method, generator=torch.Generator().manual_seed(1))
    assert held > 1.8 * standard  # the default mode holds both branch graphs
    held, peak, at_recompute = measure(model, x0, t, noise, method=method, low_memory=True,
                                       generator=torch.Generator().manual_seed(1))
    assert peak <= 1.3 * standard and held <= 1.3 * standard
    # The held branch's graph is freed before the other branch is recomputed (a graph of `standard` bytes),
    # so the backward's peak is below 1.3x as well.
    assert len(at_recompute) == 1 and at_recompute[0] <= 0.3 * standard


@pytest.mark.parametrize("method", ["equivariant_random", "equivariant_adversarial"])
def test_low_memory_p2_gives_the_same_loss_and_gradients(method):
    model, x0, noise, t = make(60, dropout=0.3)
    model.train()
    kw = dict(alphas_cumprod=TABLE, method=method, return_dict=True)
    torch.manual_seed(7)  # the dropout masks: each call advances the global generator by one pass
    ref = fastat.diffusion_adv_loss(model, x0, t, noise, generator=torch.Generator().manual_seed(2), **kw)
    ref_grads = grads(ref["loss"], model)
    torch.manual_seed(7)
    out = fastat.diffusion_adv_loss(model, x0, t, noise, generator=torch.Generator().manual_seed(2), low_memory=True, **kw)
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out["reg"], ref["reg"], atol=1e-12, rtol=1e-12)
    for a, b in zip(grads(out["loss"], model), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_low_memory_free_replay_p2_trajectory():
    model, x0, noise, t = make(61)
    ref_model = clone(model)
    kw = dict(method="p2", alphas_cumprod=TABLE)
    a = fastat.FreeReplay(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.05), 3, **kw).step(
        x0, t, noise, generator=torch.Generator().manual_seed(3))
    b = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, low_memory=True, **kw).step(
        x0, t, noise, generator=torch.Generator().manual_seed(3))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a["delta"][0], b["delta"][0], atol=1e-12, rtol=1e-12)
