"""The fastat:: operators on the Triton backend: opcheck (schema, fake tensors, autograd, AOT dispatch) under the
interpreter; torch.compile(fullgraph=True) and CUDA-graph capture of an AT inner step on GPU; and an ahead-of-time
compile of every registered Triton kernel (fastat._triton_utils.KERNELS) to an sm_90 cubin, which needs no GPU
(triton ships ptxas), so code the interpreter accepts but the GPU compiler would reject is caught on CPU too.

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

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.fastat


def _r(*shape, cl=False, grad=False):
    x = torch.randn(*shape, device=DEV)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _samples():
    b = 3
    alpha, sigma = torch.rand(b, device=DEV), torch.rand(b, device=DEV) + 0.2
    seed = torch.tensor([12345], device=DEV)
    yield "gaussian_noise", OPS.gaussian_noise.default, (_r(b, 4, 5), 3, 5, torch.float32)
    yield "gaussian_noise_cl", OPS.gaussian_noise.default, (_r(b, 2, 3, 4, cl=True), 3, 5, torch.float16)
    yield "noisy_input", OPS.noisy_input.default, (_r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True),
                                                   alpha, None, 0.0, 0.5, 0, 0, torch.float32)
    yield "noisy_input_seeded_cl", OPS.noisy_input.default, (_r(b, 2, 3, 4, cl=True, grad=True), None, None,
                                                             None, sigma, 0.7, 0.0, 9, 100, torch.float32)
    yield "noisy_input_backward", OPS.noisy_input_backward.default, (_r(b, 4, 5), alpha, None, 0.0, 0.3,
                                                                     torch.float32, torch.float16)
    yield "pgd_step_l2", OPS.pgd_step.default, (_r(b, 4, 5), _r(b, 4, 5), _r(b, 4, 5), alpha, None, 0.0, 0.5, True, True)
    yield "pgd_step_linf", OPS.pgd_step.default, (_r(b, 4, 5), _r(b, 4, 5), None, None, sigma, 0.1, 0.0, False, True)
    yield "random_l2", OPS.random_perturbation.default, (_r(b, 4, 5), seed, sigma, 0.0, True, False, torch.float32)
    yield "random_linf", OPS.random_perturbation.default, (_r(b, 4, 5), seed, None, 0.5, False, True, torch.float16)
    yield "residual_loss", OPS.residual_loss.default, (_r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True), _r(b, 4, 5, grad=True),
                                                      sigma, None, 0.0, 1.0, 0, 0.0, 2, 0, 0, True)
    yield "residual_loss_seeded", OPS.residual_loss.default, (_r(b, 2, 3, 4, cl=True, grad=True), None, None, None, alpha,
                                                             1.0, 0.0, 2, 0.01, 0, 4, 8, True)
    yield "residual_loss_l1_nograd", OPS.residual_loss.default, (_r(b, 4, 5), _r(b, 4, 5), None, None, None, 1.0, 2.0, 1,
                                                                0.0, 1, 0, 0, False)
    res = _r(b, 4, 5)
    yield "residual_loss_backward", OPS.residual_loss_backward.default, (torch.rand(b, device=DEV), res, torch.rand(b, device=DEV),
                                                                         sigma, alpha, 0.0, 0.0, 2, 0.1, 0, torch.float32,
                                                                         torch.float32, torch.float16)


SAMPLES = {name: (op, args) for name, op, args in _samples()}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_opcheck(name):
    op, args = SAMPLES[name]
    with fastat.use_backend("triton"):
        torch.library.opcheck(op, args)


def test_ops_are_registered_under_fastat_namespace():
    for name in ("gaussian_noise", "noisy_input", "noisy_input_backward", "pgd_step", "random_perturbation",
                 "residual_loss", "residual_loss_backward"):
        assert hasattr(torch.ops.fastat, name)


def test_every_kernel_is_registered_with_its_variants():
    """fastat._triton_utils.KERNELS lists every @triton.jit kernel of fastat (what an audit compiles ahead of time)."""
    import inspect

    from fastat import _triton_utils as tu
    from fastat.ops.losses import triton_kernels as ls
    from fastat.ops.noise import triton_kernels as nz
    from fastat.ops.noisy_input import triton_kernels as ni
    from fastat.ops.perturbation import triton_kernels as pt

    def kernels_in(module):  # @triton.jit objects named *_kernel (the others are device helpers they call)
        return {name for name, obj in inspect.getmembers(module)
                if hasattr(obj, "arg_names") and name.endswith("_kernel")
                and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__}

    jitted = set().union(*(kernels_in(m) for m in (ls, nz, ni, pt)))
    assert len(jitted) == 11
    assert jitted == set(tu.KERNELS)
    for spec in tu.KERNELS.values():
        args = set(spec.fn.arg_names)
        assert set(spec.pointers) <= args and set(spec.constexprs) <= args and set(spec.scalars) <= args, spec.name
    assert (1, 4096, 8) in tu.tile_configs() and (4096, 1, 8) in tu.tile_configs()


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
    """Two variants of every registered kernel: every mode switch at its first value with many short rows, and at its
    last value with one long row slice (the GPU tiles)."""
    from fastat import _triton_utils as tu
    from fastat.ops.losses import triton_kernels  # noqa: F401  (importing a module registers its kernels)
    from fastat.ops.noise import triton_kernels as _n  # noqa: F401
    from fastat.ops.noisy_input import triton_kernels as _ni  # noqa: F401
    from fastat.ops.perturbation import triton_kernels as _p  # noqa: F401

    cases = []
    for spec in tu.KERNELS.values():
        for pick, tile in ((0, (256, 16)), (-1, (1, 4096))):
            constexprs = {name: values[pick] for name, values in spec.constexprs.items()}
            if "BLOCK_B" in spec.fn.arg_names:
                constexprs.update(BLOCK_B=tile[0], BLOCK_D=tile[1])
            elif "BLOCK_D" in spec.fn.arg_names:  # one sample at a time (the pgd_step sweep)
                constexprs.update(BLOCK_D=tile[1])
            cases.append((spec, constexprs))
    return cases


def _aot_compile(spec, constexprs, dtype, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec.fn
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in spec.pointers:
            sig[name] = "*" + (spec.pointers[name] or dtype)
        else:
            sig[name] = spec.scalars.get(name, "i32")
    const = {(kernel.arg_names.index(n),): v for n, v in constexprs.items()}
    block = constexprs.get("BLOCK_B", 1) * constexprs.get("BLOCK_D", constexprs.get("BLOCK", 512))
    warps = max(1, min(8, block // 512))  # as fastat._triton_utils.tile
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps})


def _aot_main(dtypes):
    failures = 0
    for spec, constexprs in _aot_cases():
        for dtype in dtypes:
            start = time.time()
            try:
                out = _aot_compile(spec, constexprs, dtype)
                assert out.asm["cubin"], "no cubin"
                print(f"ok   {spec.name:26s} {dtype} cubin {len(out.asm['cubin'])} B {time.time() - start:.1f}s")
            except Exception as exc:  # report every variant, then fail
                failures += 1
                print(f"FAIL {spec.name} {dtype} {constexprs}: {type(exc).__name__}: {str(exc)[:3000]}")
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
