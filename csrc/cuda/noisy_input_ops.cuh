// Functors of noisy_input.cu and csrc/cpu/noisy_input.cpp: the one source of the per-element maths of the noisy
// input, its backward and seeded Gaussian noise, on the GPU and on the CPU. Free of ATen, so that g++ compiles it for
// the CPU kernels and tests/test_cuda_build.py checks it against the float64 reference.
//
// Each functor has the formula (a FASTAT_HD function of values), the GPU walk `run<N>(i)` (16-byte packs, see
// indexing.cuh) and the CPU walk `span(lo, hi, b)` (elements [lo, hi) of sample b, a plain loop over memory that g++
// vectorises; `uniform()` says the per-sample values do not depend on b, so a span may cross samples).
#pragma once

#include <type_traits>

#include "kernel_utils.cuh"

namespace fastat {

// out = alpha_b * x0 + sigma_b * noise (+ delta). noise == nullptr: the noise is drawn from (seed, offset) at each
// element's logical index (triton's tl.randn stream, whatever the memory layout). Seeded / delta are warp-uniform
// runtime switches (free in a memory-bound loop; fewer instantiations, faster nvcc). Tin: x0's and noise's dtype,
// when it differs from the output's (bf16 data with the fp32 perturbation of training: no widening copies).
template <typename T, typename Tin = T>
struct NoisyInputOp {
  using A = acc_t<T>;
  const Tin* __restrict__ x0;
  const Tin* __restrict__ noise;
  const T* __restrict__ delta;
  T* __restrict__ out;
  Coef<A> alpha, sigma;
  LogicalIndex logical;
  uint64_t seed, offset;
  SampleCursor cur;

  static FASTAT_HD A value(A a, A s, A x, A e, A d) { return a * x + s * e + d; }
  FASTAT_HD A draw(int64_t i) const { return static_cast<A>(philox_normal(seed, offset, logical(i))); }

  template <int N> FASTAT_HD void run(int64_t i) {
    A x[N], e[N], dl[N], o[N];
    load<N>(x0, i, x);
    if (noise == nullptr) {
#pragma unroll
      for (int k = 0; k < N; ++k) e[k] = draw(i + k);
    } else {
      load<N>(noise, i, e);
    }
    if (delta != nullptr) {
      load<N>(delta, i, dl);
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) dl[k] = A(0);
    }
    for_pack<N>(cur, i, [&](int64_t b) { return Pair<A>{alpha(b), sigma(b)}; },
                [&](int k, const Pair<A>& c) { o[k] = value(c.first, c.second, x[k], e[k], dl[k]); });
    store<N>(out, i, o);
  }

  bool uniform() const { return alpha.ptr == nullptr && sigma.ptr == nullptr; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const A a = alpha(b), s = sigma(b);
    if (noise == nullptr) {  // the draws a block at a time (philox_cpu.h)
      float e[kNormalBlock];
      for (int64_t i0 = lo; i0 < hi; i0 += kNormalBlock) {
        const int64_t m = hi - i0 < kNormalBlock ? hi - i0 : kNormalBlock;
        fill_normals(seed, offset, logical, i0, m, e);
        for (int64_t k = 0; k < m; ++k) {
          const int64_t i = i0 + k;
          out[i] = from_acc<T>(value(a, s, to_acc(x0[i]), static_cast<A>(e[k]), delta ? to_acc(delta[i]) : A(0)));
        }
      }
    } else if (delta != nullptr) {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>(value(a, s, to_acc(x0[i]), to_acc(noise[i]), to_acc(delta[i])));
    } else {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>(value(a, s, to_acc(x0[i]), to_acc(noise[i]), A(0)));
    }
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
    for_pack<N>(cur, i, [&](int64_t b) { return Pair<A>{alpha(b), sigma(b)}; },
                [&](int k, const Pair<A>& c) {
                  gx[k] = c.first * g[k];
                  gn[k] = c.second * g[k];
                });
    if (out_x0 != nullptr) store<N>(out_x0, i, gx);
    if (out_noise != nullptr) store<N>(out_noise, i, gn);
  }

  bool uniform() const { return alpha.ptr == nullptr && sigma.ptr == nullptr; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const A a = alpha(b), s = sigma(b);
    if (out_x0 != nullptr)
      for (int64_t i = lo; i < hi; ++i) out_x0[i] = from_acc<T>(a * to_acc(grad[i]));
    if (out_noise != nullptr)
      for (int64_t i = lo; i < hi; ++i) out_noise[i] = from_acc<T>(s * to_acc(grad[i]));
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

  bool uniform() const { return true; }
  void span(int64_t lo, int64_t hi, int64_t) const {  // a block at a time (philox_cpu.h), fp32 output drawn in place
    float e[kNormalBlock];
    for (int64_t i0 = lo; i0 < hi; i0 += kNormalBlock) {
      const int64_t m = hi - i0 < kNormalBlock ? hi - i0 : kNormalBlock;
      if constexpr (std::is_same<T, float>::value) {
        fill_normals(seed, offset, logical, i0, m, out + i0);
      } else {
        fill_normals(seed, offset, logical, i0, m, e);
        for (int64_t k = 0; k < m; ++k) out[i0 + k] = from_acc<T>(e[k]);
      }
    }
  }
};

}  // namespace fastat
