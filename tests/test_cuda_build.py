"""CPU-side checks of the CUDA backend: setup.py's build decision, the Philox/Box-Muller device code (compiled for
the host with g++ and compared with the pure-torch tl.randn reference), and nvcc compile checks.

The full nvcc compile-only check of every .cu (tools/check_cuda_compile.py, ~1-3 min on a 2-core box) runs in
.ci/run; here it runs only with FASTAT_TEST_NVCC=1.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc" / "cuda"


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastat_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # guarded by `if __name__ == "__main__"`: defines, does not build
    return module


@pytest.fixture(scope="module")
def setup_py():
    return _load_setup()


def _fake_toolkit(tmp_path: Path) -> str:
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    return str(tmp_path / "cuda")


def test_build_cuda_0_skips(setup_py):
    assert setup_py.cuda_build_plan({"FASTAT_BUILD_CUDA": "0"}) == ("skip", "FASTAT_BUILD_CUDA=0", {})


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_cpu_torch_skips_with_reason(setup_py):
    decision, reason, extra = setup_py.cuda_build_plan({})
    assert decision == "skip" and extra == {}
    assert "CPU-only build" in reason and torch.__version__ in reason


def test_no_torch_in_build_env_skips(setup_py, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what build isolation looks like: import torch fails
    decision, reason, _ = setup_py.cuda_build_plan({})
    assert decision == "skip" and "not importable" in reason and "--no-build-isolation" in reason
    assert setup_py.cpp_build_plan({"FASTAT_BUILD_CPP": "1"})[0] == "skip"


def test_cuda_torch_with_toolkit_builds_for_sm90_without_gpu(setup_py, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    home = _fake_toolkit(tmp_path)
    decision, reason, extra = setup_py.cuda_build_plan({"CUDA_HOME": home}, defaults=())
    assert decision == "build", reason
    # No visible GPU: torch's arch detection would raise IndexError, so the plan pins sm_90.
    assert extra == {"CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": "9.0"}
    decision, _, extra = setup_py.cuda_build_plan({"CUDA_HOME": home, "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, defaults=())
    assert decision == "build" and "TORCH_CUDA_ARCH_LIST" not in extra


def test_cuda_torch_without_toolkit_skips(setup_py, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    decision, reason, _ = setup_py.cuda_build_plan({"PATH": str(tmp_path)}, defaults=())
    assert decision == "skip" and "CUDA_HOME" in reason


def test_default_cuda_home_preferred_over_path_wrapper(setup_py, tmp_path):
    home = _fake_toolkit(tmp_path)
    assert setup_py.find_cuda_home({"PATH": "/usr/local/bin"}, defaults=(home,)) == home


def test_cpp_plan_is_opt_in(setup_py):
    assert setup_py.cpp_build_plan({})[0] == "skip"
    decision, reason = setup_py.cpp_build_plan({"FASTAT_BUILD_CPP": "1"})
    has_sources = bool(list((ROOT / "csrc" / "cpu").glob("*.cpp")))
    assert decision == ("build" if has_sources else "skip"), reason


def test_skip_prints_one_line_and_builds_pure_python(setup_py, monkeypatch):
    monkeypatch.setenv("FASTAT_BUILD_CUDA", "0")
    monkeypatch.delenv("FASTAT_BUILD_CPP", raising=False)
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ext_modules, cmdclass = setup_py.extensions()
    assert (ext_modules, cmdclass) == ([], {})
    assert out.getvalue().splitlines() == ["fastat: skipping the CUDA extension: FASTAT_BUILD_CUDA=0"]
    monkeypatch.setattr(sys, "argv", ["setup.py", "egg_info"])  # metadata hooks stay quiet
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        setup_py.extensions()
    assert out.getvalue() == ""


# ---- Philox / Box-Muller device code, compiled for the host -------------------------------------------------

HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include "philox.cuh"
int main(int argc, char** argv) {
  const unsigned long long seed = std::strtoull(argv[1], nullptr, 10);
  const unsigned long long offset = std::strtoull(argv[2], nullptr, 10);
  const long long n = std::atoll(argv[3]);
  for (long long i = 0; i < n; ++i) {
    const fastat::Philox4 r = fastat::philox4x32(seed, offset + i);
    std::printf("%u %u %.9g %.9g\n", r.c0, r.c1, (double)fastat::philox_uniform(seed, offset, i),
                (double)fastat::philox_normal(seed, offset, i));
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def philox_host(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("philox")
    (folder / "harness.cpp").write_text(HARNESS)
    exe = folder / "harness"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{CSRC}", str(folder / "harness.cpp"), "-o", str(exe)], check=True, timeout=120)
    return exe


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 7), (2**40 + 3, 2**32 - 5), (2**62 + 11, 2**33)])
def test_philox_header_matches_tl_randn_reference(philox_host, seed, offset):
    from fastat.ops.noise import reference as ref

    n = 257
    out = subprocess.run([str(philox_host), str(seed), str(offset), str(n)], capture_output=True, text=True, check=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    c0 = torch.tensor([int(r[0]) for r in rows], dtype=torch.int64)
    c1 = torch.tensor([int(r[1]) for r in rows], dtype=torch.int64)
    uniform = torch.tensor([float(r[2]) for r in rows], dtype=torch.float32)
    normal = torch.tensor([float(r[3]) for r in rows], dtype=torch.float32)

    idx = torch.arange(n, dtype=torch.int64) + offset
    zero = torch.zeros_like(idx)
    e0, e1, _, _ = ref.philox(seed, idx & ref.M32, (idx >> 32) & ref.M32, zero, zero)
    assert torch.equal(c0, e0) and torch.equal(c1, e1)  # the integer stream: bit-exact
    assert torch.equal(uniform, ref.uint_to_uniform(e0))  # tl.rand: bit-exact
    expected = ref.randn_flat(seed, offset, n, "cpu")
    # libm's logf/cosf vs torch's: a few fp32 ulp.
    torch.testing.assert_close(normal, expected, atol=2e-6, rtol=2e-6)


# ---- index arithmetic of the kernels (csrc/cuda/indexing.cuh), compiled for the host -----------------------

INDEX_HARNESS = r"""
#include <cstdio>
#include <vector>
#include "indexing.cuh"
static long failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { if (failures++ < 20) { std::printf(__VA_ARGS__); std::printf("\n"); } } } while (0)

struct Recorder {  // what a kernel functor sees: run<N>(i) for a pack of N elements starting at i
  std::vector<int>* seen; int64_t lo, hi; int pack;
  template <int N> void run(int64_t i) {
    CHECK(N == 1 || N == pack, "pack %d called with N=%d", pack, N);
    CHECK(N == 1 || i % N == 0, "unaligned pack at %lld", (long long)i);
    CHECK(i >= lo && i + N <= hi, "pack [%lld, %lld) outside [%lld, %lld)", (long long)i, (long long)(i + N), (long long)lo, (long long)hi);
    for (int k = 0; k < N; ++k) if (i + k >= lo && i + k < hi) (*seen)[i + k - lo]++;
  }
};

template <int N> void check_range(int64_t lo, int64_t hi, int64_t lanes) {
  std::vector<int> seen(hi - lo, 0);
  Recorder r{&seen, lo, hi, N};
  for (int64_t lane = 0; lane < lanes; ++lane) fastat::for_range<N>(lo, hi, lane, lanes, r);
  for (int64_t i = 0; i < hi - lo; ++i) CHECK(seen[i] == 1, "N=%d lanes=%lld: element %lld of [%lld, %lld) seen %d times", N, (long long)lanes, (long long)(lo + i), (long long)lo, (long long)hi, seen[i]);
}

int main() {
  for (int64_t lo = 0; lo < 24; ++lo)
    for (int64_t hi = lo; hi < lo + 80; ++hi)
      for (int64_t lanes : {1, 3, 32}) {
        check_range<1>(lo, hi, lanes); check_range<2>(lo, hi, lanes); check_range<4>(lo, hi, lanes); check_range<8>(lo, hi, lanes);
      }
  // Sample cursor: packs straddling samples, D smaller than the pack, indices past 2^31.
  for (int64_t d = 1; d <= 11; ++d)
    for (int64_t base : {(int64_t)0, (int64_t)1 << 31, ((int64_t)1 << 33) + 5})
      for (int64_t i = base; i < base + 120; i += 8) {
        fastat::SampleCursor cur(i, d);
        for (int k = 0; k < 8; ++k) {
          if (i + k >= cur.next) cur.advance(i + k);
          CHECK(cur.b == (i + k) / d, "cursor d=%lld i=%lld: sample %lld, want %lld", (long long)d, (long long)(i + k), (long long)cur.b, (long long)((i + k) / d));
        }
      }
  // Tiling: the tiles of each sample cover it exactly, in order; chunks keep pack alignment when D allows.
  const int64_t ds[] = {0, 1, 2, 3, 5, 48, 1023, 1024, 1025, 3072, 12288, 196608, 786432, 715827883};
  for (int64_t batch : {1, 2, 3, 7, 128})
    for (int64_t d : ds)
      for (int pack : {1, 2, 4, 8})
        for (int sms : {1, 132}) {
          if (batch * d > ((int64_t)1 << 32)) continue;
          const fastat::Tiling t = fastat::tiling_for(batch, d, pack, sms);
          CHECK(t.tiles == batch * t.chunks && t.chunk % pack == 0, "tiling B=%lld D=%lld", (long long)batch, (long long)d);
          CHECK(t.chunks <= (d > 0 ? d : 1), "too many chunks B=%lld D=%lld", (long long)batch, (long long)d);
          for (int64_t b = 0; b < batch; ++b) {
            int64_t next = b * d;
            for (int64_t c = 0; c < t.chunks; ++c) {
              const fastat::TileRange r = fastat::tile_range(t, b * t.chunks + c);
              CHECK(r.b == b && r.lo == next && r.hi >= r.lo, "tile B=%lld D=%lld b=%lld c=%lld", (long long)batch, (long long)d, (long long)b, (long long)c);
              CHECK(d % pack != 0 || r.lo % pack == 0, "unaligned chunk start D=%lld pack=%d", (long long)d, pack);
              next = r.hi;
            }
            CHECK(next == (b + 1) * d, "sample %lld of D=%lld covered up to %lld", (long long)b, (long long)d, (long long)next);
          }
        }
  std::printf("%ld failures\n", failures);
  return failures != 0;
}
"""


def test_kernel_index_arithmetic_on_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "index.cpp").write_text(INDEX_HARNESS)
    exe = tmp_path / "index"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{CSRC}", str(tmp_path / "index.cpp"), "-o", str(exe)], check=True, timeout=120)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "0 failures", proc.stdout[-3000:]


# ---- nvcc --------------------------------------------------------------------------------------------------

NVCC_SMOKE = r"""
#include <cstdint>
#include "philox.cuh"
__global__ void fill(float* out, uint64_t seed, uint64_t offset, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = fastat::philox_normal(seed, offset, i);
}
"""


def _nvcc():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_cuda_compile
    finally:
        sys.path.pop(0)
    return check_cuda_compile


def test_nvcc_compiles_philox_device_path_for_sm90(tmp_path):
    tool = _nvcc()
    nvcc = tool.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "smoke.cu"
    src.write_text(NVCC_SMOKE)
    cmd = [nvcc, "-c", str(src), "-o", str(tmp_path / "smoke.o"), "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90", f"-I{CSRC}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("FASTAT_TEST_NVCC") != "1", reason="full nvcc check: set FASTAT_TEST_NVCC=1 (CI runs it separately)")
def test_every_cuda_source_compiles_for_sm90():
    tool = _nvcc()
    assert tool.main(["--require"]) == 0
