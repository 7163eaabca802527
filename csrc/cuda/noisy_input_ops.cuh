// Functors of noisy_input.cu.
// Per-element / per-sample code of the kernels (functors run by the launch templates of common.cuh), free of
// ATen so that tests/test_cuda_build.py compiles it for the host and checks it against the float64 reference.
#pragma once

#include "kernel_utils.cuh"

namespace fastat {

// out = alpha_b * x0 + sigma_b * noise (+ delta); noise is read, or drawn from (seed, offset) at the element's
// flat index (the seeded form runs on contiguous tensors, so flat index = logical index). Seeded / delta are
// warp-uniform runtime switches (free in a memory-bound loop; fewer instantiations, faster nvcc).
template <typename T>
struct NoisyInputOp {
  using A = acc_t<T>;
  const T* __restrict__ x0;
  const T* __restrict__ noise;
  const T* __restrict__ delta;
  T* __restrict__ out;
  Coef<A> alpha, sigma;
  int64_t d;
  bool seeded;
  uint64_t seed, offset;

  template <int N> FASTAT_HD void run(int64_t i) {
    A x[N], e[N], dl[N], o[N];
    load<N>(x0, i, x);
    if (seeded) {
#pragma unroll
      for (int k = 0; k < N; ++k) e[k] = static_cast<A>(philox_normal(seed, offset, i + k));
    } else {
      load<N>(noise, i, e);
    }
    if (delta != nullptr) load<N>(delta, i, dl);
    SampleCursor cur(i, d);
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

template <typename T>
struct GaussianOp {
  T* __restrict__ out;
  uint64_t seed, offset;
  template <int N> FASTAT_HD void run(int64_t i) {
    float o[N];
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = philox_normal(seed, offset, i + k);
    store<N>(out, i, o);
  }
};

// out = coef_b * g: the gradient of x_t with respect to x0 (coef = alpha) or noise (coef = sigma).
template <typename T>
struct ScaleOp {
  using A = acc_t<T>;
  const T* __restrict__ g;
  T* __restrict__ out;
  Coef<A> coef;
  int64_t d;
  template <int N> FASTAT_HD void run(int64_t i) {
    A v[N];
    load<N>(g, i, v);
    SampleCursor cur(i, d);
    A c = coef(cur.b);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        c = coef(cur.b);
      }
      v[k] *= c;
    }
    store<N>(out, i, v);
  }
};

}  // namespace fastat
