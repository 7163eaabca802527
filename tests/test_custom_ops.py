"""torch.library registration of the Triton kernels: opcheck (schema, fake tensors, autograd, AOT dispatch)
under the interpreter; torch.compile(fullgraph=True) and CUDA-graph capture of an AT inner step on GPU."""
import pytest
import torch

import fastat
from fastat import SeededNoise

pytest.importorskip("triton")
from fastat.ops.losses.triton_kernels import residual_loss_backward_op, residual_loss_op  # noqa: E402
from fastat.ops.noise.triton_kernels import gaussian_noise_op  # noqa: E402
from fastat.ops.noisy_input.triton_kernels import noisy_input_backward_op, noisy_input_op  # noqa: E402
from fastat.ops.perturbation.triton_kernels import pgd_step_op, random_perturbation_op  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _r(*shape, cl=False, grad=False):
    x = torch.randn(*shape, device=DEV)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _samples():
    b = 3
    alpha, sigma = torch.rand(b, device=DEV), torch.rand(b, device=DEV) + 0.2
    seed = torch.tensor([12345], device=DEV)
    yield "gaussian_noise", gaussian_noise_op, (_r(b, 4, 5), 3, 5, torch.float32)
    yield "gaussian_noise_cl", gaussian_noise_op, (_r(b, 2, 3, 4, cl=True), 3, 5, torch.float16)
    yield "noisy_input", noisy_input_op, (_r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True),
                                          alpha, 0.0, None, 0.5, 0, 0, torch.float32)
    yield "noisy_input_seeded_cl", noisy_input_op, (_r(b, 2, 3, 4, cl=True, grad=True), None, None,
                                                    None, 0.7, sigma, 0.0, 9, 100, torch.float32)
    yield "noisy_input_backward", noisy_input_backward_op, (_r(b, 4, 5), alpha, 0.0, None, 0.3,
                                                            torch.float32, torch.float16, True, True)
    yield "pgd_step_l2", pgd_step_op, (_r(b, 4, 5), _r(b, 4, 5), _r(b, 4, 5), alpha, 0.0, None, 0.5, True, True)
    yield "pgd_step_linf", pgd_step_op, (_r(b, 4, 5), _r(b, 4, 5), None, None, 0.1, sigma, 0.0, False, True)
    yield "random_l2", random_perturbation_op, (_r(b, 4, 5), seed, sigma, 0.0, True, False, torch.float32)
    yield "random_linf", random_perturbation_op, (_r(b, 4, 5), seed, None, 0.5, False, True, torch.float16)
    yield "residual_loss", residual_loss_op, (_r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True),
                                              sigma, 0.0, 0, 0.0, 0, 0, True)
    yield "residual_loss_seeded", residual_loss_op, (_r(b, 2, 3, 4, cl=True, grad=True), None, None, None, 1.0,
                                                     2, 0.01, 4, 8, True)
    yield "residual_loss_l1_nograd", residual_loss_op, (_r(b, 4, 5), _r(b, 4, 5), None, None, 1.0, 1, 0.0, 0, 0, False)
    res = _r(b, 4, 5)
    yield "residual_loss_backward", residual_loss_backward_op, (torch.rand(b, device=DEV), res, torch.rand(b, device=DEV),
                                                                sigma, 0.0, 2, 0.1, torch.float32, torch.float32,
                                                                torch.float16, True, False, True)


SAMPLES = {name: (op, args) for name, op, args in _samples()}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_opcheck(name):
    op, args = SAMPLES[name]
    torch.library.opcheck(op, args)


def test_ops_are_registered_under_fastat_namespace():
    for name in ("gaussian_noise", "noisy_input", "noisy_input_backward", "pgd_step", "random_perturbation",
                 "residual_loss", "residual_loss_backward"):
        assert hasattr(torch.ops.fastat, name)


def _forward(x0, delta, alpha, sigma):
    """An AT inner step's forward without the network: x_adv from seeded noise, a stand-in model, the loss."""
    noise = SeededNoise(7, 0)
    x_adv = fastat.noisy_input(x0, noise, alpha, sigma, delta)
    pred = 0.5 * x_adv
    return fastat.equivariant_mse(pred, noise, delta, sigma, "delta"), x_adv


def _update(delta, grad, x_adv):
    return fastat.pgd_step(delta, grad, 0.1, 1.0, "l2", model_input_base=x_adv)


def _chain(forward, update, x0, alpha, sigma):
    """torch.autograd.grad itself breaks a dynamo graph, so it runs between the two compiled functions
    (the custom ops' backward is compiled by AOT autograd as part of the forward graph's backward)."""
    delta = torch.zeros_like(x0, requires_grad=True)
    loss, x_adv = forward(x0, delta, alpha, sigma)
    (grad,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        new_delta, next_input = update(delta.detach(), grad, x_adv.detach())
    return loss.detach(), grad, new_delta, next_input


def _compile_check(device):
    x0 = torch.randn(4, 3, 8, 8, device=device)
    alpha, sigma = torch.rand(4, device=device), torch.rand(4, device=device) + 0.2
    with fastat.use_backend("triton"):
        eager = _chain(_forward, _update, x0, alpha, sigma)  # also imports the kernels before tracing
        torch._dynamo.reset()
        compiled = _chain(torch.compile(_forward, fullgraph=True), torch.compile(_update, fullgraph=True), x0, alpha, sigma)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    _compile_check("cuda")


@pytest.mark.slow  # inductor on CPU: ~10 s of CPU time (24 s wall on the loaded 2-core box)
def test_cpu_torch_compile_fullgraph_under_interpreter():
    _compile_check("cpu")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x0 = torch.randn(8, 3, 16, 16, device="cuda")
    alpha, sigma = torch.rand(8, device="cuda"), torch.rand(8, device="cuda") + 0.2
    delta = torch.zeros_like(x0)
    grad = torch.randn_like(x0)
    pred = torch.randn_like(x0)
    with fastat.use_backend("triton"):

        def step():
            x = fastat.noisy_input(x0, SeededNoise(3, 0), alpha, sigma, delta)
            loss = fastat.equivariant_mse(pred, SeededNoise(3, 0), delta, sigma, "delta_detach")
            new, nxt = fastat.pgd_step(delta, grad, 0.1, 1.0, "l2", model_input_base=x)
            init = fastat.random_perturbation(x0, 0.5, "linf")
            return x, loss, new, nxt, init

        eager = step()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside capture (compiles the kernels)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
    for e, c in list(zip(eager, captured))[:4]:
        torch.testing.assert_close(c, e)
    assert captured[4].abs().max() <= 0.5
