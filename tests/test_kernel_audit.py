"""The kernel audit (fastat.bench.audit, tools/kernel_audit.py): its readers of compiled code, its launch capture,
its transcription of the CUDA host code, and the documented launch counts of every op.

The full audit (compiling every Triton variant and CUDA kernel for sm_90, ~1-2 min) runs in .ci/run as
`python tools/kernel_audit.py --check`; here: the parts that take seconds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastat.bench.audit import checks, cuda_model, ptx

ROOT = Path(__file__).resolve().parent.parent
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SMALL_PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
.reqntid 128
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b32 	%r1, [k_param_2];
	mul.wide.s32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd1, %rd3;
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd4 + 0 ];
	ld.global.b32 	%r6, [%rd4+16];
	add.s64 	%rd5, %rd2, %rd3;
	@%p1 st.global.b16 [ %rd5 + 0 ], { %rs1 };
	ret;
}
"""


def test_ptx_accesses_are_traced_to_their_pointer_parameter():
    widths = ptx.widths_by_param(SMALL_PTX)
    assert widths == {0: {"load": {128: 1, 32: 1}, "store": {}}, 1: {"load": {}, "store": {16: 1}}}
    assert ptx.param_types(SMALL_PTX) == [".u64 .ptr", ".u64 .ptr", ".u32", ".u64 .ptr"]
    name, threads, types, per_param = ptx.fingerprint(SMALL_PTX)
    assert (name, threads, per_param) == ("k", 128, ((0, 20, 0), (1, 0, 2)))


def test_ptxas_log_and_sass_are_parsed():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    40 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 46 registers, used 0 barriers"""
    assert ptx.parse_ptxas_log(log) == {"_Z1kv": {"registers": 46, "stack": 40, "spill_stores": 8, "spill_loads": 12}}
    sass = """	Function : _Z1kv
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E.U16.CONSTANT R8, desc[UR4][R6.64] ;
        /*00a0*/                   LDG.E R9, desc[UR4][R6.64] ;
        /*00b0*/                   STG.E.64 desc[UR4][R2.64], R4 ;"""
    assert ptx.parse_sass(sass) == {"_Z1kv": {"load": {128: 1, 16: 1, 32: 1}, "store": {64: 1}}}


def test_cuda_model_tiling_is_the_host_code_tiling(tmp_path):
    """cuda_model.tiling transcribes csrc/cuda/indexing.cuh tiling_for: compiled and compared here."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cases = [(1, 1 << 24, 4, 132), (128, 3072, 4, 132), (32, 786432, 8, 132), (65536, 2, 4, 132), (7, 1000, 1, 20), (3, 5, 8, 132)]
    driver = tmp_path / "tiling.cpp"
    driver.write_text('#include <cstdio>\n#include "indexing.cuh"\nint main() {\n' + "".join(
        f'  {{ auto t = fastat::tiling_for({b}, {d}, {p}, {s}); std::printf("%lld %lld %lld\\n", (long long)t.chunk, '
        f'(long long)t.chunks, (long long)t.tiles); }}\n' for b, d, p, s in cases) + "}\n")
    exe = tmp_path / "tiling"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'cuda'}", str(driver), "-o", str(exe)], check=True,
                   capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    for (b, d, p, s), line in zip(cases, lines):
        t = cuda_model.tiling(b, d, p, s)
        assert [t["chunk"], t["chunks"], t["tiles"]] == [int(x) for x in line.split()], (b, d, p, s)


@pytest.fixture(scope="module")
def captured():
    if not INTERPRETING:
        pytest.skip("the capture runs the public API on CPU tensors under TRITON_INTERPRET=1")
    from fastat.bench.audit import stages

    return stages.capture(list(stages.AUDIT_SHAPES), ["triton", "cuda"], log=lambda m: None)["cases"]


def _gpu_launches(case):
    """(Triton launches, CUDA kernels, torch kernels) a GPU would run for one captured case."""
    triton, cuda, torch_ = [], [], []
    for e in case["events"]:
        if e.get("cpu_only"):
            continue
        if e["kind"] == "triton":
            triton.append(e["kernel"].split(":")[1])
        elif e["kind"] == "cuda":
            cuda += [l["name"] for l in cuda_model.launches(e["op"], e["args"])]
        elif e["kind"] == "torch" and e["role"] == "kernel" and e.get("origin", "fastat") == "fastat":
            torch_.append(e["op"])
    return triton, cuda, torch_


def test_every_case_is_captured_within_its_documented_launches(captured):
    assert {(c["backend"], c["case"]) for c in captured} == set(checks.EXPECTED)
    for c in captured:
        assert "error" not in c, (c["backend"], c["shape_name"], c["case"], c.get("error"))
        triton, cuda, torch_ = _gpu_launches(c)
        launches = len(triton) + len(cuda) + len(torch_)
        assert launches <= checks.EXPECTED[(c["backend"], c["case"])][0], (c["backend"], c["shape_name"], c["case"], triton, cuda, torch_)
        assert (len(triton) > 0) == (c["backend"] == "triton") and (len(cuda) > 0) == (c["backend"] == "cuda")


def test_capture_records_what_the_gpu_would_launch(captured):
    by = {(c["backend"], c["shape_name"], c["case"]): c for c in captured}
    # The Triton chain at CIFAR size: one kernel per op direction, plus the glue around the loss.
    triton, _, _ = _gpu_launches(by[("triton", "cifar", "chain")])
    assert [k for k in triton if k != "_loss_finish_kernel"] == [
        "_noisy_input_fwd_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel", "_pgd_apply_kernel"]
    # Launches are planned for the GPU (tiles of 4096 elements, 8 warps), not for the interpreter.
    launch = next(e for e in by[("triton", "cifar", "noisy_input")]["events"] if e["kind"] == "triton")
    assert launch["options"]["num_warps"] > 1 and launch["constexprs"]["BLOCK_B"] * launch["constexprs"]["BLOCK_D"] <= 4096
    # q_sample's table comes from the host: after the first call it is cached on the device (no copy per call).
    assert not any(e.get("h2d") for e in by[("triton", "cifar", "q_sample")]["events"] if not e.get("cpu_only"))
    # The CUDA L2 step: one sweep launch up to 64K elements per sample; reduction, finalize and update beyond.
    _, cuda, _ = _gpu_launches(by[("cuda", "cifar", "pgd_step_l2")])
    assert len(cuda) == 1 and cuda[0].startswith("sweep_kernel<4, 256, 4, float, L2StatsOp")
    _, cuda, _ = _gpu_launches(by[("cuda", "flat16m", "pgd_step_l2")])
    assert [name.split("<")[0] for name in cuda] == ["tile_reduce_kernel", "finalize_kernel", "elementwise_kernel"]
    # Toy samples (D = 2) are flat tiles on Triton: whole samples read as one contiguous run.
    launch = next(e for e in by[("triton", "toy2d", "pgd_step_l2")]["events"] if e["kind"] == "triton")
    assert launch["constexprs"]["FLAT"] and launch["constexprs"]["BLOCK_D"] == 2


@pytest.mark.skipif(ptx.triton_ptxas() is None, reason="no ptxas (Triton's NVIDIA backend ships one)")
def test_aot_compile_specialises_alignment_like_the_runtime(captured, tmp_path):
    """A recorded fp32 launch compiles to 128-bit accesses; the same launch on a view 4 bytes off alignment does not."""
    import copy
    import json

    launch = next(e for c in captured if (c["backend"], c["shape_name"], c["case"]) == ("triton", "cifar", "noisy_input")
                  for e in c["events"] if e["kind"] == "triton")
    shifted = copy.deepcopy(launch)
    for a in shifted["args"]:
        if a["name"] == "x0":
            a["tensor"]["offset_bytes"] = 4
    src = tmp_path / "launches.json"
    src.write_text(json.dumps([launch, shifted]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "compiled.json"
    subprocess.run([sys.executable, "-m", "fastat.bench.audit.stages", "compile", str(src), str(out)], env=env, check=True,
                   capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    aligned, misaligned = (result["variants"][k] for k in result["keys"])
    assert "x0" in aligned["divisible_16"] and "x0" not in misaligned["divisible_16"]
    assert set(aligned["per_arg"]["x0"]["load"]) == {"128"}
    assert set(misaligned["per_arg"]["x0"]["load"]) == {"32"}
    assert aligned["resources"]["spill_stores"] == 0
