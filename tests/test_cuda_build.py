"""CPU-side checks of the CUDA backend: setup.py's build decision, the Philox/Box-Muller device code (compiled for
the host with g++ and compared with the pure-torch tl.randn reference), and nvcc compile checks.

The full nvcc compile-only check of every .cu (tools/check_cuda_compile.py, ~1-3 min on a 2-core box) runs in
.ci/run; here it runs only with FASTAT_TEST_NVCC=1.
"""
from __future__ import annotations

import contextlib
import math
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastat.ops.noise import reference as noise_ref
from fastat.ops.noisy_input import reference as ni_ref
from fastat.ops.perturbation import reference as pert_ref

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


# ---- the CPU walks' vectorised draw (csrc/cuda/philox_cpu.h) against the scalar one --------------------------

VECTOR_HARNESS = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "philox_cpu.h"
int main(int argc, char** argv) {
  const unsigned long long seed = std::strtoull(argv[1], nullptr, 10), offset = std::strtoull(argv[2], nullptr, 10);
  const long long n = std::atoll(argv[3]), c = std::atoll(argv[4]);  // c > 0: channels_last samples [c, n / 8 / c]
  const fastat::LogicalIndex logical{n / 8, c > 0 ? c : 1, c > 0 ? n / 8 / c : 1, c > 0};
  std::vector<float> out(n);
  for (long long lo = 0; lo < n; lo += 1000) fastat::fill_normals(seed, offset, logical, lo, lo + 1000 < n ? 1000 : n - lo, out.data() + lo);
  double worst = 0;
  long long equal = 0;
  for (long long i = 0; i < n; ++i) {
    const float ref = fastat::philox_normal(seed, offset, logical(i));
    worst = std::fmax(worst, std::fabs((double)out[i] - ref) / (std::fmax(std::fabs((double)ref), 0x1p-20) * 0x1p-23));
    equal += out[i] == ref;
  }
#if defined(FASTAT_PHILOX_AVX2)
  const int vector = 1;
#else
  const int vector = 0;
#endif
  std::printf("%.4f %.4f %d\n", worst, (double)equal / n, vector);
  return 0;
}
"""


@pytest.mark.parametrize("seed,offset,channels", [(11, 100, 0), (2**40 + 5, 2**32 - 3000, 0), (7, 2**32 - 20, 3), (0, 0, 5)])
def test_vector_draw_is_the_scalar_stream_within_three_ulp(tmp_path, seed, offset, channels):
    """fill_normals (AVX2 Philox, fp32 log and cospi; built as the avx2 CPU extension builds it) against philox_normal
    per element: every draw within 3 fp32 ulp, most bit for bit, in spans that start and end anywhere (the padded
    partial groups), across the 2^32 counter carry and at channels_last logical indices."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from fastat import _ext

    (tmp_path / "vector.cpp").write_text(VECTOR_HARNESS)
    flags = list(_ext.ISA_CFLAGS["avx2"]) if _ext.isa_level() == "avx2" else []
    exe = tmp_path / "vector"
    subprocess.run([cxx, "-O2", "-std=c++17", *flags, f"-I{CSRC}", str(tmp_path / "vector.cpp"), "-o", str(exe)],
                   check=True, timeout=120)
    out = subprocess.run([str(exe), str(seed), str(offset), str(8 * 3 * 5 * 7 * 40), str(channels)], capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    worst, equal, vector = float(out[0]), float(out[1]), int(out[2])
    assert vector == (_ext.isa_level() == "avx2")
    assert worst <= 3.0 and equal >= (0.85 if vector else 1.0)


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
  // seek: from any earlier position (or a fresh cursor) to any later one, forwards in steps or far jumps.
  for (int64_t d = 1; d <= 11; ++d)
    for (int64_t step : {1, 3, 8, 16, 100}) {
      fastat::SampleCursor cur(d);
      for (int64_t i = 0; i < 400; i += step) {
        cur.seek(i);
        CHECK(cur.b == i / d && cur.next == (i / d + 1) * d, "seek d=%lld i=%lld: sample %lld", (long long)d, (long long)i, (long long)cur.b);
      }
    }
  // Logical index of channels_last memory: a permutation of each sample, position s*C + c -> c*S + s.
  for (int64_t c : {1, 3, 4})
    for (int64_t sp : {1, 5, 12}) {
      const int64_t d = c * sp;
      const fastat::LogicalIndex li{d, c, sp, true};
      std::vector<int> hit(3 * d, 0);
      for (int64_t i = 0; i < 3 * d; ++i) {
        const int64_t j = li(i), b = i / d, p = i % d;
        CHECK(j / d == b && j % d == (p % c) * sp + p / c, "logical c=%lld s=%lld i=%lld -> %lld", (long long)c, (long long)sp, (long long)i, (long long)j);
        hit[j]++;
      }
      for (int v : hit) CHECK(v == 1, "logical index is not a permutation (c=%lld s=%lld)", (long long)c, (long long)sp);
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


# ---- the kernels' functors (csrc/cuda/*_ops.cuh) compiled for the host and run against the float64 reference --

FUNCTOR_HARNESS = r"""
// Host driver for the CUDA kernels' functors (csrc/cuda/*_ops.cuh): the launch templates of common.cuh are
// replayed serially (several "threads" over the grid-stride walk, 32 "lanes" per tile), so the per-element and
// per-sample code that runs on the GPU runs here on the CPU. Inputs and outputs are raw files written/read by
// tests/test_cuda_build.py.  usage: functors <f32|f16|bf16|f64> <op> <dir> <B> <D> <vec 0|1> [op args]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "losses_ops.cuh"
#include "noisy_input_ops.cuh"
#include "perturbation_ops.cuh"

using namespace fastat;

template <typename X> std::vector<X> read(const std::string& path, int64_t n) {
  std::vector<X> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(X), n, f) != static_cast<size_t>(n)) { std::fprintf(stderr, "cannot read %s\n", path.c_str()); std::exit(2); }
  std::fclose(f);
  return v;
}

template <typename X> void write(const std::string& path, const std::vector<X>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  std::fwrite(v.data(), sizeof(X), v.size(), f);
  std::fclose(f);
}

constexpr int64_t kLanes = 5;  // grid-stride "threads" of an elementwise launch

template <int P, typename F> void elementwise(int64_t n, bool vec, F f) {
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    if (vec) for_range<P>(0, n, lane, kLanes, f);
    else for_range<1>(0, n, lane, kLanes, f);
  }
}

template <int P, int K, typename A, typename F> std::vector<A> tile_reduce(const Tiling& t, bool vec, const F& f) {
  std::vector<A> partials(t.tiles * K);
  for (int64_t tile = 0; tile < t.tiles; ++tile) {
    const TileRange r = tile_range(t, tile);
    A total[K] = {};
    for (int64_t lane = 0; lane < 32; ++lane) {
      F g = f;
      g.reset(r.b);
      if (vec) for_range<P>(r.lo, r.hi, lane, 32, g);
      else for_range<1>(r.lo, r.hi, lane, 32, g);
      A s[K];
      g.partials(s);
      for (int k = 0; k < K; ++k) total[k] += s[k];
    }
    for (int k = 0; k < K; ++k) partials[tile * K + k] = total[k];
  }
  return partials;
}

template <int K, typename A, typename Fin> void finalize(const Tiling& t, const std::vector<A>& partials, const Fin& fin) {
  for (int64_t b = 0; b < t.batch; ++b) {  // as finalize_kernel: fp64 sum over the chunks in order
    double total[K] = {};
    for (int64_t c = 0; c < t.chunks; ++c)
      for (int k = 0; k < K; ++k) total[k] += static_cast<double>(partials[(b * t.chunks + c) * K + k]);
    A s[K];
    for (int k = 0; k < K; ++k) s[k] = static_cast<A>(total[k]);
    fin(b, s);
  }
}

template <typename T> int run(const std::string& op, const std::string& dir, int64_t B, int64_t D, bool vec, char** extra) {
  using A = acc_t<T>;
  constexpr int P = pack_size<T>();
  const int64_t n = B * D;
  const std::string in = dir + "/";
  const int sms = 3;  // a small "GPU": several chunks per sample for D >= 1024 * 3 * 64 / B
  std::vector<float> coef_a = read<float>(in + "coef_a.bin", B), coef_b = read<float>(in + "coef_b.bin", B);
  const Coef<A> ca{coef_a.data(), false, A(0)}, cb{coef_b.data(), false, A(0)};
  if (op == "noisy_input") {  // extra: seeded (0|1)
    const bool seeded = std::atoi(extra[0]) != 0;
    auto x0 = read<T>(in + "x.bin", n), noise = read<T>(in + "y.bin", n), delta = read<T>(in + "z.bin", n);
    std::vector<T> out(n);
    elementwise<P>(n, vec, NoisyInputOp<T>{x0.data(), seeded ? nullptr : noise.data(), delta.data(), out.data(), ca, cb,
                                           LogicalIndex{D, 1, 1, false}, 7, 11, SampleCursor(D)});
    write(in + "out.bin", out);
  } else if (op == "pgd_l2" || op == "pgd_linf") {  // extra: normalize (0|1); coef_a = step, coef_b = radius
    const bool normalize = std::atoi(extra[0]) != 0;
    auto delta = read<T>(in + "x.bin", n), grad = read<T>(in + "y.bin", n), base = read<T>(in + "z.bin", n);
    std::vector<T> out(n), xout(n);
    if (op == "pgd_l2") {
      const Tiling t = tiling_for(B, D, vec ? P : 1, sms);
      auto partials = tile_reduce<P, 4, A>(t, vec, L2StatsOp<T>{delta.data(), grad.data()});
      std::vector<A> coef(2 * B);
      finalize<4>(t, partials, L2CoefFin<A>{ca, cb, normalize, coef.data()});
      elementwise<P>(n, vec, L2ApplyOp<T>{delta.data(), grad.data(), out.data(), base.data(), xout.data(), coef.data(), SampleCursor(D)});
    } else {
      std::vector<int> bad(B, 0);
      elementwise<P>(n, vec, LinfStepOp<T>{delta.data(), grad.data(), out.data(), base.data(), xout.data(), bad.data(), ca, cb, normalize, SampleCursor(D)});
      elementwise<P>(n, vec, RestoreOp<T>{delta.data(), out.data(), base.data(), xout.data(), bad.data(), SampleCursor(D)});
    }
    write(in + "out.bin", out);
    write(in + "xout.bin", xout);
  } else if (op == "residual") {  // extra: metric, huber_c, seeded; coef_a = divisor k; coef_b = grad of the loss
    const int metric = std::atoi(extra[0]);
    const A huber_c = static_cast<A>(std::atof(extra[1]));
    const bool seeded = std::atoi(extra[2]) != 0;
    auto a = read<T>(in + "x.bin", n), b = read<T>(in + "y.bin", n), c = read<T>(in + "z.bin", n);
    std::vector<A> residual(n);  // kept in the accumulation dtype
    std::vector<T> ga(n), gb(n), gc(n);
    const Tiling t = tiling_for(B, D, vec ? P : 1, sms);
    auto partials = tile_reduce<P, 1, A>(t, vec, ResidualOp<T, true>{a.data(), seeded ? nullptr : b.data(), c.data(), residual.data(), ca, metric == 1,
                                                                     LogicalIndex{D, 1, 1, false}, 7, 11});
    std::vector<A> loss(B), gl(B);
    const Coef<A> one{nullptr, false, A(1)};
    finalize<1>(t, partials, LossFin<A>{metric, D, huber_c, one, loss.data(), nullptr});
    for (int64_t i = 0; i < B; ++i) gl[i] = static_cast<A>(coef_b[i]);
    elementwise<P>(n, vec, ResidualGradOp<T>{residual.data(), gl.data(), loss.data(), ga.data(), gb.data(), gc.data(), ca, one, huber_c,
                                             A(1), metric, true, SampleCursor(D)});
    std::vector<double> loss_d(loss.begin(), loss.end());
    write(in + "loss.bin", loss_d);
    write(in + "ga.bin", ga);
    write(in + "gb.bin", gb);
    write(in + "gc.bin", gc);
  } else if (op == "random") {  // extra: l2 (0|1), normal (0|1); coef_b = radius
    const bool l2 = std::atoi(extra[0]) != 0, normal = std::atoi(extra[1]) != 0;
    const int64_t seed = 12345;
    std::vector<T> out(n);
    if (l2) {
      const Tiling t = tiling_for(B, D, vec ? P : 1, sms);
      auto partials = tile_reduce<P, 1, A>(t, vec, NormalSumOp<A>{&seed, LogicalIndex{D, 1, 1, false}});
      std::vector<A> coef(B);
      finalize<1>(t, partials, BallCoefFin<A>{&seed, cb, D, n, normal, coef.data()});
      elementwise<P>(n, vec, RandomApplyOp<T>{out.data(), &seed, cb, coef.data(), 0, LogicalIndex{D, 1, 1, false}, SampleCursor(D)});
    } else {
      elementwise<P>(n, vec, RandomApplyOp<T>{out.data(), &seed, cb, nullptr, normal ? 2 : 1, LogicalIndex{D, 1, 1, false}, SampleCursor(D)});
    }
    write(in + "out.bin", out);
  } else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 7) return 2;
  const std::string dtype = argv[1], op = argv[2], dir = argv[3];
  const int64_t B = std::atoll(argv[4]), D = std::atoll(argv[5]);
  const bool vec = std::atoi(argv[6]) != 0;
  if (dtype == "f32") return run<float>(op, dir, B, D, vec, argv + 7);
  if (dtype == "f64") return run<double>(op, dir, B, D, vec, argv + 7);
  if (dtype == "f16") return run<c10::Half>(op, dir, B, D, vec, argv + 7);
  if (dtype == "bf16") return run<c10::BFloat16>(op, dir, B, D, vec, argv + 7);
  return 2;
}
"""

HOST_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64}
HOST_TOL = {"f32": (2e-5, 2e-5), "f64": (1e-10, 1e-10), "f16": (2e-3, 4e-3), "bf16": (1.6e-2, 3.2e-2)}


@pytest.fixture(scope="module")
def functors(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    folder = tmp_path_factory.mktemp("functors")
    (folder / "functors.cpp").write_text(FUNCTOR_HARNESS)
    exe = folder / "functors"
    cmd = [cxx, "-O1", "-std=c++17", f"-I{CSRC}", f"-I{include_paths()[0]}", str(folder / "functors.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True, timeout=300)
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _load(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.int16 if dtype == torch.bfloat16 else dtype)
    return raw.view(dtype).reshape(shape).clone() if dtype == torch.bfloat16 else raw.reshape(shape).clone()


def _run_host(exe, tmp_path, dtype_name, op, B, D, vec, extra, x, y, z, coef_a, coef_b):
    for name, t in (("x", x), ("y", y), ("z", z)):
        (tmp_path / f"{name}.bin").write_bytes(_raw(t))
    (tmp_path / "coef_a.bin").write_bytes(_raw(coef_a.float()))
    (tmp_path / "coef_b.bin").write_bytes(_raw(coef_b.float()))
    cmd = [str(exe), dtype_name, op, str(tmp_path), str(B), str(D), str(int(vec))] + [str(e) for e in extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _inputs(B, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


HOST_CASES = [(3, 7), (4, 1030), (1, 1), (2, 13000)]  # odd D (packs straddle samples), several chunks per sample


@pytest.mark.parametrize("dtype_name", list(HOST_DTYPES))
@pytest.mark.parametrize("vec", [True, False])
def test_host_functors_noisy_input(functors, tmp_path, dtype_name, vec):
    dtype = HOST_DTYPES[dtype_name]
    atol, rtol = HOST_TOL[dtype_name]
    for B, D in HOST_CASES:
        x0, noise, delta = _inputs(B, D, dtype, B * D)
        alpha, sigma = torch.rand(B) + 0.1, torch.rand(B) + 0.1
        for seeded in (0, 1):
            _run_host(functors, tmp_path, dtype_name, "noisy_input", B, D, vec, [seeded], x0, noise, delta, alpha, sigma)
            out = _load(tmp_path / "out.bin", dtype, (B, D))
            eps = noise_ref.randn_flat(7, 11, B * D, "cpu").view(B, D).double() if seeded else noise.double()
            ref = ni_ref.noisy_input(x0.double(), eps, delta.double(), alpha.double(), sigma.double(), 0.0, 0.0, 0, 0, torch.float64)
            # seeded noise is an fp32 draw (libm vs torch log/cos: a few fp32 ulp), whatever the data dtype
            tol = (max(atol, 2e-6), max(rtol, 2e-6)) if seeded else (atol, rtol)
            torch.testing.assert_close(out.double(), ref, atol=tol[0], rtol=tol[1])


@pytest.mark.parametrize("dtype_name", list(HOST_DTYPES))
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("normalize", [1, 0])
def test_host_functors_pgd_step(functors, tmp_path, dtype_name, norm, normalize):
    dtype = HOST_DTYPES[dtype_name]
    atol, rtol = HOST_TOL[dtype_name]
    for B, D in HOST_CASES:
        for vec in (True, False):
            delta, grad, base = _inputs(B, D, dtype, B + D)
            delta = (delta.double() * 0.1).to(dtype)
            if B > 2:
                grad[1, D // 2] = float("inf")  # the non-finite policy: sample 1 keeps its delta
            step = torch.rand(B) + 0.05
            radius = torch.linspace(0.05, 3.0, B) * (1.0 if norm == "l2" else 0.05)
            _run_host(functors, tmp_path, dtype_name, f"pgd_{norm}", B, D, vec, [normalize], delta, grad, base, step, radius)
            out = _load(tmp_path / "out.bin", dtype, (B, D))
            xout = _load(tmp_path / "xout.bin", dtype, (B, D))
            ref, ref_x = pert_ref.pgd_step(delta.double(), grad.double(), base.double(), step.double(), radius.double(), 0.0, 0.0,
                                           norm == "l2", bool(normalize))
            # The reference rounds once (fp64 -> dtype); the kernel's fp32 arithmetic adds a few ulp of fp32.
            torch.testing.assert_close(out.double(), ref, atol=atol * 2, rtol=rtol * 2)
            torch.testing.assert_close(xout.double(), ref_x, atol=atol * 2, rtol=rtol * 2)
            if B > 2:
                assert torch.equal(out[1], delta[1])


@pytest.mark.parametrize("dtype_name", list(HOST_DTYPES))
@pytest.mark.parametrize("metric,huber_c", [(0, 0.0), (1, 0.0), (2, 0.05)])
def test_host_functors_residual_loss(functors, tmp_path, dtype_name, metric, huber_c):
    dtype = HOST_DTYPES[dtype_name]
    atol, rtol = HOST_TOL[dtype_name]
    for B, D in HOST_CASES:
        for vec, seeded in ((True, 0), (False, 0), (True, 1)):
            a, b, c = _inputs(B, D, dtype, 3 * B + D)
            k = torch.rand(B) + 0.3
            gl = torch.randn(B)
            _run_host(functors, tmp_path, dtype_name, "residual", B, D, vec, [metric, huber_c, seeded], a, b, c, k, gl)
            loss = _load(tmp_path / "loss.bin", torch.float64, (B,))
            a64, b64, c64 = (t.double().requires_grad_() for t in (a, b, c))
            if seeded:
                b64 = noise_ref.randn_flat(7, 11, B * D, "cpu").view(B, D).double().requires_grad_()
            r = a64 - b64 - c64 / k.double()[:, None]
            ref = {0: (r * r).mean(1), 1: r.abs().mean(1), 2: ((r * r).sum(1) + huber_c**2).sqrt() - huber_c}[metric]
            if seeded:
                atol, rtol = max(atol, 2e-6), max(rtol, 2e-6)
            torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=rtol)
            grads = torch.autograd.grad((ref * gl.double()).sum(), (a64, b64, c64))
            for name, expected in zip(("ga", "gb", "gc"), grads):
                got = _load(tmp_path / f"{name}.bin", dtype, (B, D)).double()
                # grads are r (kept in fp32) times a per-sample factor, rounded once: relative to the largest entry
                scale = expected.abs().max().item() + 1e-30
                torch.testing.assert_close(got / scale, expected / scale, atol=atol * 4, rtol=rtol * 4)


@pytest.mark.parametrize("dtype_name", ["f32", "f16"])
@pytest.mark.parametrize("l2,normal", [(1, 0), (1, 1), (0, 0), (0, 1)])
def test_host_functors_random_perturbation(functors, tmp_path, dtype_name, l2, normal):
    dtype = HOST_DTYPES[dtype_name]
    B, D = 64, 300
    radius = torch.linspace(0.5, 2.0, B)
    dummy = torch.zeros(B, D, dtype=dtype)
    _run_host(functors, tmp_path, dtype_name, "random", B, D, True, [l2, normal], dummy, dummy, dummy, radius, radius)
    out = _load(tmp_path / "out.bin", dtype, (B, D)).double()
    ref = pert_ref.random_perturbation(dummy, torch.tensor([12345]), radius, 0.0, bool(l2), bool(normal), dtype).double()
    # the same Philox draws as the pure-torch reference (the per-sample uniform of the ball at counter B*D + b)
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    r = radius.double()[:, None]
    if l2:
        assert bool((out.norm(dim=1) <= radius.double() * (1 + 2e-3)).all())
    else:
        assert bool((out.abs() <= r * (1 + 1e-3)).all())


# ---- the CUDA kernels' signatures against the one schema of each op (no GPU, no nvcc: host C++ only) ----------

SCHEMA_HARNESS = r"""
// Prints the schema torch infers from each CUDA entry point (what TORCH_LIBRARY_IMPL checks when fastat._C_cuda
// loads on a GPU machine), so a CPU box can compare it with the schema fastat defines in Python.
#include <ATen/core/op_registration/infer_schema.h>
#include <iostream>
#include "ops.h"
#define SHOW(name, fn) std::cout << name << " " << c10::inferFunctionSchemaFlattenedReturns<decltype(fn)>() << "\n"
int main() {
  SHOW("noisy_input", fastat::noisy_input_cuda);
  SHOW("noisy_input_backward", fastat::noisy_input_backward_cuda);
  SHOW("gaussian_noise", fastat::gaussian_noise_cuda);
  SHOW("pgd_step", fastat::pgd_step_cuda);
  SHOW("random_perturbation", fastat::random_perturbation_cuda);
  SHOW("residual_loss", fastat::residual_loss_cuda);
  SHOW("residual_loss_backward", fastat::residual_loss_backward_cuda);
}
"""


def _types(schema: str):
    """The argument and return types of a schema string, without names or defaults."""
    args, returns = schema.split("(", 1)[1].rsplit(") -> ", 1)
    arg_types = [a.strip().rsplit(" ", 1)[0] for a in args.split(",") if a.strip()]
    return_types = [r.strip().split(" ")[0] for r in returns.strip("()").split(",") if r.strip()]
    return arg_types, return_types


def test_cuda_entry_points_match_the_op_schemas(tmp_path):
    """Every CUDA kernel registered in bindings.cpp has exactly the argument and return types of its op."""
    import fastat
    from fastat import _dispatch
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "schemas.cpp").write_text(SCHEMA_HARNESS)
    exe = tmp_path / "schemas"
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    libs = library_paths()[0]
    cmd = [cxx, "-O0", "-std=c++17", abi, f"-I{CSRC}", *[f"-I{d}" for d in include_paths()], str(tmp_path / "schemas.cpp"),
           f"-L{libs}", f"-Wl,-rpath,{libs}", "-lc10", "-ltorch_cpu", "-o", str(exe)]
    built = subprocess.run(cmd, timeout=300, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60).stdout
    inferred = dict(line.split(" ", 1) for line in out.strip().splitlines())
    bound = set(re.findall(r'm\.impl\("(\w+)"', (CSRC / "bindings.cpp").read_text()))
    assert bound == set(inferred) == {name for name, op in _dispatch.OPS.items() if "cuda" in op.support}
    for name, schema in inferred.items():
        assert _types(schema) == _types(str(_dispatch.OPS[name].overload._schema)), (name, schema)
    assert fastat  # the ops are defined on import


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
