"""torch.library registration of the Triton kernels: opcheck (schema, fake tensors, autograd, AOT dispatch)
under the interpreter; torch.compile(fullgraph=True) and CUDA-graph capture of an AT inner step on GPU;
and an ahead-of-time compile of every kernel variant to an sm_90 cubin, which needs no GPU (triton ships
ptxas), so code the interpreter accepts but the GPU compiler would reject is caught on CPU too.

Run the compile check alone: `python tests/test_custom_ops.py [fp32,bf16,fp16]`.
"""
import os
import subprocess
import sys
import time

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
@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter path; a GPU machine runs the gpu variant")
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


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (run as a script: the kernels must be decorated without TRITON_INTERPRET).


def _aot_cases():
    from fastat.ops.losses import triton_kernels as ls
    from fastat.ops.noise import triton_kernels as nz
    from fastat.ops.noisy_input import triton_kernels as ni
    from fastat.ops.perturbation import triton_kernels as pt

    T = dict(BLOCK_B=1, BLOCK_D=4096)  # GPU tiles: one long row slice / many short rows
    T2 = dict(BLOCK_B=256, BLOCK_D=16)
    CASES = [
        (nz._gaussian_noise_kernel, {"out": None}, dict(CHANNELS_LAST=True, **T)),
        (ni._noisy_input_fwd_kernel, dict.fromkeys(["x0", "noise", "delta", "out", "alpha_ptr", "sigma_ptr"]),
         dict(ALPHA_T=True, SIGMA_T=True, HAS_DELTA=True, SEEDED=True, CHANNELS_LAST=True, **T)),
        (ni._noisy_input_fwd_kernel, dict.fromkeys(["x0", "noise", "delta", "out", "alpha_ptr", "sigma_ptr"]),
         dict(ALPHA_T=False, SIGMA_T=False, HAS_DELTA=False, SEEDED=False, CHANNELS_LAST=False, **T2)),
        (ni._noisy_input_bwd_kernel, dict.fromkeys(["grad", "grad_x0", "grad_noise", "alpha_ptr", "sigma_ptr"]),
         dict(ALPHA_T=True, SIGMA_T=False, WANT_X0=True, WANT_NOISE=True, **T)),
        (pt._pgd_stats_kernel, {"delta": None, "grad": None, "partials": "fp32"}, dict(L2=True, **T)),
        (pt._pgd_apply_kernel, dict.fromkeys(["delta", "grad", "base", "out", "xout", "step_ptr", "rad_ptr"]) | {"partials": "fp32"},
         dict(STEP_T=True, RAD_T=True, L2=True, NORMALIZE=True, HAS_BASE=True, FUSED=False, NSPLIT_P2=32, **T)),
        (pt._pgd_apply_kernel, dict.fromkeys(["delta", "grad", "base", "out", "xout", "step_ptr", "rad_ptr"]) | {"partials": "fp32"},
         dict(STEP_T=False, RAD_T=False, L2=False, NORMALIZE=True, HAS_BASE=False, FUSED=True, NSPLIT_P2=1, **T2)),
        (pt._pgd_apply_kernel, dict.fromkeys(["delta", "grad", "base", "out", "xout", "step_ptr", "rad_ptr"]) | {"partials": "fp32"},
         dict(STEP_T=False, RAD_T=True, L2=True, NORMALIZE=False, HAS_BASE=False, FUSED=False, NSPLIT_P2=1, **T)),
        (pt._randn_sumsq_kernel, {"seed_ptr": "i64", "partials": "fp32"}, dict(**T)),
        (pt._random_apply_kernel, {"out": None, "seed_ptr": "i64", "partials": "fp32", "rad_ptr": "fp32"},
         dict(RAD_T=True, L2=True, NORMAL=False, NSPLIT_P2=16, **T)),
        (pt._random_apply_kernel, {"out": None, "seed_ptr": "i64", "partials": "fp32", "rad_ptr": "fp32"},
         dict(RAD_T=False, L2=False, NORMAL=True, NSPLIT_P2=1, **T2)),
        (ls._loss_fwd_kernel, dict.fromkeys(["a", "b", "c", "res", "k_ptr"]) | {"partials": "fp32", "loss": "fp32"},
         dict(K_T=True, HAS_C=True, SEEDED=True, CHANNELS_LAST=True, METRIC=0, SAVE_RES=True, FINISH=False, **T)),
        (ls._loss_fwd_kernel, dict.fromkeys(["a", "b", "c", "res", "k_ptr"]) | {"partials": "fp32", "loss": "fp32"},
         dict(K_T=False, HAS_C=False, SEEDED=False, CHANNELS_LAST=False, METRIC=2, SAVE_RES=False, FINISH=True, **T2)),
        (ls._loss_bwd_kernel, dict.fromkeys(["res", "ga", "gb", "gc", "k_ptr"]) | {"gout": "fp32", "loss": "fp32"},
         dict(K_T=True, METRIC=2, WANT_A=True, WANT_B=True, WANT_C=True, **T)),
        (ls._loss_bwd_kernel, dict.fromkeys(["res", "ga", "gb", "gc", "k_ptr"]) | {"gout": "fp32", "loss": "fp32"},
         dict(K_T=False, METRIC=1, WANT_A=True, WANT_B=False, WANT_C=False, **T2)),
    ]

    return CASES


def _aot_compile(kernel, pointers, constexprs, dtype, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"alpha_s", "sigma_s", "step_s", "rad_s", "k_s", "inv_d", "huber_c", "inv_sqrt_d"}
    i64 = {"seed", "offset", "noise_offset", "numel"}
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + (pointers[name] or dtype)
        else:
            sig[name] = "fp32" if name in floats else "i64" if name in i64 else "i32"
    const = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
    warps = max(1, min(8, constexprs["BLOCK_B"] * constexprs["BLOCK_D"] // 512))  # as fastat._triton_utils.tile
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps})


def _aot_main(dtypes):
    failures = 0
    for kernel, pointers, constexprs in _aot_cases():
        for dtype in dtypes:
            start = time.time()
            try:
                out = _aot_compile(kernel, pointers, constexprs, dtype)
                assert out.asm["cubin"], "no cubin"
                print(f"ok   {kernel.fn.__name__:26s} {dtype} cubin {len(out.asm['cubin'])} B {time.time() - start:.1f}s")
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"FAIL {kernel.fn.__name__} {dtype} {constexprs}: {type(exc).__name__}: {str(exc)[:3000]}")
    print(f"{failures} failures")
    return 1 if failures else 0


@pytest.mark.slow  # ~15-30 s of CPU for 30 variants (cached afterwards in ~/.triton/cache)
def test_every_kernel_compiles_for_sm90():
    if not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia")):
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "fp32,bf16"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(_aot_main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["fp32", "bf16"]))
