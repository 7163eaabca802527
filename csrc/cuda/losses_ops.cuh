// Functors of losses.cu.
// Per-element / per-sample code of the kernels (functors run by the launch templates of common.cuh), free of
// ATen so that tests/test_cuda_build.py compiles it for the host and checks it against the float64 reference.
#pragma once

#include "kernel_utils.cuh"

namespace fastat {

// The metric and the residual store are warp-uniform runtime switches, not template parameters: the branch
// costs nothing in a memory-bound loop and keeps the instantiation count (and nvcc time) down.
template <typename T, bool HAS_C>
struct ResidualOp {
  using A = acc_t<T>;
  const T* __restrict__ a;
  const T* __restrict__ b;
  const T* __restrict__ c;
  T* __restrict__ residual;
  Coef<A> k;
  bool abs_metric;  // metric 1 sums |r|, the others r^2
  bool seeded;  // b drawn from (seed, offset) at the flat index (contiguous inputs: flat = logical index)
  uint64_t seed, offset;
  A kb, sum;
  FASTAT_HD void reset(int64_t sample) {
    kb = HAS_C ? k(sample) : A(1);
    sum = A(0);
  }
  template <int N> FASTAT_HD void run(int64_t i) {
    A av[N], bv[N], cv[N];
    load<N>(a, i, av);
    if (seeded) {
#pragma unroll
      for (int j = 0; j < N; ++j) bv[j] = static_cast<A>(philox_normal(seed, offset, i + j));
    } else {
      load<N>(b, i, bv);
    }
    if constexpr (HAS_C) load<N>(c, i, cv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A r = av[j] - bv[j];
      if constexpr (HAS_C) r -= cv[j] / kb;
      av[j] = r;
      sum += abs_metric ? fabs(r) : r * r;
    }
    if (residual != nullptr) store<N>(residual, i, av);
  }
  FASTAT_HD void partials(A (&out)[1]) const { out[0] = sum; }
};

template <typename A>
struct LossFin {
  int metric;
  int64_t d;
  A huber_c;
  A* __restrict__ loss;
  FASTAT_HD void operator()(int64_t b, const A (&s)[1]) const {
    if (metric == 2) {
      loss[b] = sqrt(s[0] + huber_c * huber_c) - huber_c;
    } else {
      loss[b] = s[0] / A(d > 1 ? d : 1);
    }
  }
};

template <typename T>
struct ResidualGradOp {
  using A = acc_t<T>;
  const T* __restrict__ residual;
  const A* __restrict__ grad_loss;
  const A* __restrict__ loss;
  T* __restrict__ out_a;
  T* __restrict__ out_b;
  T* __restrict__ out_c;
  Coef<A> k;
  A huber_c;
  int metric;
  int64_t d;
  FASTAT_HD A factor(int64_t b) const {
    const A g = grad_loss[b];
    if (metric == 0) return A(2) * g / A(d);
    if (metric == 1) return g / A(d);
    return g / (loss[b] + huber_c);  // d/dr sqrt(S + c^2) = r / sqrt(S + c^2), and sqrt(S + c^2) = loss + c
  }
  template <int N> FASTAT_HD void run(int64_t i) {
    A r[N], ga[N], gb[N], gc[N];
    load<N>(residual, i, r);
    SampleCursor cur(i, d);
    A f = factor(cur.b), kb = out_c != nullptr ? k(cur.b) : A(1);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (i + j >= cur.next) {
        cur.advance(i + j);
        f = factor(cur.b);
        if (out_c != nullptr) kb = k(cur.b);
      }
      const A v = metric == 1 ? A((r[j] > A(0)) - (r[j] < A(0))) : r[j];
      ga[j] = f * v;
      gb[j] = -ga[j];
      gc[j] = -ga[j] / kb;
    }
    if (out_a != nullptr) store<N>(out_a, i, ga);
    if (out_b != nullptr) store<N>(out_b, i, gb);
    if (out_c != nullptr) store<N>(out_c, i, gc);
  }
};

}  // namespace fastat
