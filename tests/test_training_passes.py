"""Pass counts per optimizer step against the cost table (fastat.training docstring / README):
forwards (and their batch sizes) with a forward hook, weight-gradient backwards with a parameter hook,
backwards through each forward output with an output hook; attack passes never touch .grad."""
import pytest
import torch

import fastat
from training_utils import TABLE, make, reference_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("reference_backend")

B, K = 6, 3

# method, extra kwargs -> (forward batch sizes, outputs that receive a gradient, weight-gradient backwards)
# input-only backwards (Bi) = outputs with a gradient - outputs in the weight-gradient backward.
TABLE_ROWS = {
    "standard": ({}, [B], 1, 1),
    "input_perturbation": ({}, [B], 1, 1),
    "pgd": ({"steps": K}, [B] * (K + 1), K + 1, 1),
    "fgsm_rs": ({}, [B, B], 2, 1),
    "equivariant_random": ({}, [B, B], 2, 1),
    "equivariant_random/batched": ({"batch_branches": True}, [2 * B], 1, 1),
    "equivariant_adversarial": ({}, [B, B, B], 3, 1),
    "equivariant_adversarial/batched": ({"batch_branches": True}, [2 * B, 2 * B], 2, 1),
}


class Counter:
    def __init__(self, model):
        self.forwards, self.out_grads, self.weight_grads, self.calls = [], 0, 0, 0
        model.register_forward_hook(self._fwd)
        model.register_forward_pre_hook(self._call)
        model.l1.weight.register_hook(self._wgrad)

    def _call(self, module, args):
        self.calls += 1  # also counts a checkpoint's recomputation, which stops before the forward hook

    def _fwd(self, module, args, out):
        self.forwards.append(out.shape[0])
        if out.requires_grad:  # no-grad passes (CM target) have no backward
            out.register_hook(self._ograd)

    def _ograd(self, g):
        self.out_grads += 1

    def _wgrad(self, g):
        self.weight_grads += 1


@pytest.mark.parametrize("name", sorted(TABLE_ROWS))
def test_diffusion_pass_counts(name):
    kwargs, forwards, out_grads, weight_grads = TABLE_ROWS[name]
    model, x0, noise, t = make(batch=B)
    c = Counter(model)
    loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method=name.split("/")[0], **kwargs)
    assert all(p.grad is None for p in model.parameters()), "an attack pass accumulated a weight gradient"
    assert c.weight_grads == 0
    loss.backward()
    assert (c.forwards, c.out_grads, c.weight_grads) == (forwards, out_grads, weight_grads)


@pytest.mark.parametrize("method,forwards", [("equivariant_random", 2), ("equivariant_adversarial", 3)])
def test_low_memory_p2_recomputes_one_branch(method, forwards):
    """low_memory: the same forwards and backwards plus one forward recomputed inside the backward."""
    model, x0, noise, t = make(batch=B)
    c = Counter(model)
    loss = fastat.diffusion_adv_loss(model, x0, t, noise, alphas_cumprod=TABLE, method=method, low_memory=True)
    assert c.calls == forwards and c.weight_grads == 0
    loss.backward()
    assert c.calls == forwards + 1 and c.out_grads == forwards and c.weight_grads == 1


@pytest.mark.parametrize("method,batched,forwards", [("p1", False, [B]), ("p2", False, [B, B]), ("p2", True, [2 * B])])
def test_free_replay_pass_counts(method, batched, forwards):
    model, x0, noise, t = make(batch=B)
    c = Counter(model)
    fr = fastat.FreeReplay(model, torch.optim.SGD(model.parameters(), lr=0.01), K, method=method,
                           alphas_cumprod=TABLE, batch_branches=batched)
    fr.step(x0, t, noise)
    # per optimizer step: the forwards of one replay and exactly one backward, no attack pass
    assert c.forwards == forwards * K
    assert c.weight_grads == K and c.out_grads == len(forwards) * K


def test_consistency_pass_counts():
    model, x0, _, _ = make(batch=B)
    c = Counter(model)
    loss = fastat.consistency_adv_loss(model, None, x0, method="pgd", steps=2)
    loss.backward()
    # 1 no-grad target forward + 2 attack forwards + 1 training forward; 2 Bi + 1 Bw
    assert c.forwards == [B] * 4 and c.out_grads == 3 and c.weight_grads == 1
