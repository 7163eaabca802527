// Functors of noisy_input.cu and csrc/cpu/noisy_input.cpp: the one source of the per-element maths of the noisy
// input, its backward and seeded Gaussian noise, on the GPU and on the CPU. Free of ATen, so that g++ compiles it for
// the CPU kernels and tests/test_cuda_build.py checks it against the float64 reference.
#pragma once

#include "kernel_utils.cuh"

namespace fastat {

// out = alpha_b * x0 + sigma_b * noise (+ delta). noise == nullptr: the noise is drawn from (seed, offset) at each
// element's logical index (triton's tl.randn stream, whatever the memory layout). Seeded / delta are warp-uniform
// runtime switches (free in a memory-bound loop; fewer instantiations, faster nvcc).
template <typename T>
struct NoisyInputOp {
  using A = acc_t<T>;
  const T* __restrict__ x0;
  const T* __restrict__ noise;
  const T* __restrict__ delta;
  T* __restrict__ out;
  Coef<A> alpha, sigma;
  LogicalIndex logical;
  uint64_t seed, offset;
  SampleCursor cur;

  template <int N> FASTAT_HD void run(int64_t i) {
    A x[N], e[N], dl[N], o[N];
    load<N>(x0, i, x);
    if (noise == nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) e[k] = static_cast<A>(philox_normal(seed, offset, logical(i + k)));
    } else {
      load<N>(noise, i, e);
    }
    if (delta != nullptr) load<N>(delta, i, dl);
    cur.seek(i);
    A a = alpha(cur.b), s = sigma(cur.b);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {  // a pack may straddle two samples when D is not a multiple of N
        cur.advance(i + k);
        a = alpha(cur.b);
        s = sigma(cur.b);
      }
      o[k] = a * x[k] + s * e[k];
      if (delta != nullptr) o[k] += dl[k];
    }
    store<N>(out, i, o);
  }
};

// The backward of the noisy input: d x0 = alpha_b * g, d noise = sigma_b * g (either output may be absent); the
// gradient to delta is g itself (no kernel).
template <typename T>
struct NoisyInputGradOp {
  using A = acc_t<T>;
  const T* __restrict__ grad;
  T* __restrict__ out_x0;
  T* __restrict__ out_noise;
  Coef<A> alpha, sigma;
  SampleCursor cur;

  template <int N> FASTAT_HD void run(int64_t i) {
    A g[N], gx[N], gn[N];
    load<N>(grad, i, g);
    cur.seek(i);
    A a = alpha(cur.b), s = sigma(cur.b);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        a = alpha(cur.b);
        s = sigma(cur.b);
      }
      gx[k] = a * g[k];
      gn[k] = s * g[k];
    }
    if (out_x0 != nullptr) store<N>(out_x0, i, gx);
    if (out_noise != nullptr) store<N>(out_noise, i, gn);
  }
};

// N(0, 1) noise: element with logical index j = tl.randn(seed, offset + j).
template <typename T>
struct GaussianOp {
  T* __restrict__ out;
  LogicalIndex logical;
  uint64_t seed, offset;
  template <int N> FASTAT_HD void run(int64_t i) {
    float o[N];
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = philox_normal(seed, offset, logical(i + k));
    store<N>(out, i, o);
  }
};

}  // namespace fastat
