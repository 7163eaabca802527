// Functors of losses.cu and csrc/cpu/losses.cpp: the one source of the per-element maths of the residual losses,
// forward and backward, on the GPU and on the CPU. Free of ATen, so that g++ compiles it for the CPU kernels and
// tests/test_cuda_build.py checks it against the float64 reference. Each functor has the formula, the GPU walk
// `run<N>(i)` and the CPU walk `span(lo, hi, ...)` (a plain loop over memory that g++ vectorises).
//
//   r = a - b - c / sigma_b        (c optional; b may be seeded noise drawn at the logical index)
//   metric 0: v_b = sum(r^2) / D;  1: sum(|r|) / D;  2 (pseudo-Huber): sqrt(sum(r^2) + h^2) - h
//   loss = w_b * v_b (reduction none) | sum_b w_b v_b | (1/B) sum_b w_b v_b
#pragma once

#include "kernel_utils.cuh"

namespace fastat {

constexpr int kReductionNone = 0;
constexpr int kReductionSum = 1;
constexpr int kReductionMean = 2;

// The metric and the residual store are warp-uniform runtime switches, not template parameters: the branch costs
// nothing in a memory-bound loop and keeps the instantiation count (and nvcc time) down. LANES independent partial
// sums (1 on the GPU, where each warp lane is one already; 16 on the CPU, so that g++ vectorises the sum without
// reassociating it); the lanes are added in a fixed order, so the result stays deterministic.
template <typename T, bool HAS_C, int LANES = 1>
struct ResidualOp {
  using A = acc_t<T>;
  const T* __restrict__ a;
  const T* __restrict__ b;  // nullptr: seeded noise
  const T* __restrict__ c;
  A* __restrict__ residual;  // nullptr: not stored; kept in the accumulation dtype (one rounding in the backward)
  Coef<A> sigma;
  bool abs_metric;  // metric 1 sums |r|, the others r^2
  LogicalIndex logical;
  uint64_t seed, offset;
  A sb, sum[LANES];
  FASTAT_HD void reset(int64_t sample) {
    sb = HAS_C ? sigma(sample) : A(1);
#pragma unroll
    for (int l = 0; l < LANES; ++l) sum[l] = A(0);
  }
  static FASTAT_HD A residual_of(A av, A bv, A cv, A sb) { return HAS_C ? av - bv - cv / sb : av - bv; }
  FASTAT_HD A noise_at(int64_t i) const { return static_cast<A>(philox_normal(seed, offset, logical(i))); }

  template <int N> FASTAT_HD void run(int64_t i) {
    A av[N], bv[N], cv[N];
    load<N>(a, i, av);
    if (b == nullptr) {
#pragma unroll
      for (int j = 0; j < N; ++j) bv[j] = static_cast<A>(philox_normal(seed, offset, logical(i + j)));
    } else {
      load<N>(b, i, bv);
    }
    if constexpr (HAS_C) load<N>(c, i, cv);
#pragma unroll
    for (int j = 0; j < N; ++j) av[j] = residual_of(av[j], bv[j], HAS_C ? cv[j] : A(0), sb);
    if (abs_metric) {
#pragma unroll
      for (int j = 0; j < N; ++j) sum[j % LANES] += fabs(av[j]);
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) sum[j % LANES] += av[j] * av[j];
    }
    if (residual != nullptr) store<N>(residual, i, av);
  }
  FASTAT_HD void partials(A (&out)[1]) const {
    A s = A(0);
#pragma unroll
    for (int l = 0; l < LANES; ++l) s += sum[l];
    out[0] = s;
  }

  // CPU: elements [lo, hi) of the sample given to reset(), LANES at a time into the partial sums; one loop per
  // combination of the runtime switches, so each is branch-free and g++ vectorises it.
  void span(int64_t lo, int64_t hi) {
    const bool store = residual != nullptr;
    if (b == nullptr) {
      span_as<true>(lo, hi, store, abs_metric);
    } else if (store) {
      abs_metric ? span_as<false, true, true>(lo, hi) : span_as<false, true, false>(lo, hi);
    } else {
      abs_metric ? span_as<false, false, true>(lo, hi) : span_as<false, false, false>(lo, hi);
    }
  }

 private:
  template <bool SEEDED>
  void span_as(int64_t lo, int64_t hi, bool store, bool abs) {  // seeded noise: the draws a block at a time
    float e[kNormalBlock];
    int64_t l = 0;
    for (int64_t i0 = lo; i0 < hi; i0 += kNormalBlock) {
      const int64_t m = hi - i0 < kNormalBlock ? hi - i0 : kNormalBlock;
      fill_normals(seed, offset, logical, i0, m, e);
      for (int64_t k = 0; k < m; ++k, l = (l + 1) % LANES) {
        const int64_t i = i0 + k;
        const A r = residual_of(to_acc(a[i]), static_cast<A>(e[k]), HAS_C ? to_acc(c[i]) : A(0), sb);
        if (store) residual[i] = r;
        sum[l] += abs ? fabs(r) : r * r;
      }
    }
  }

  template <bool SEEDED, bool STORE, bool ABS>
  void span_as(int64_t lo, int64_t hi) {
    auto add = [&](int l, int64_t j) {
      const A r = residual_of(to_acc(a[j]), to_acc(b[j]), HAS_C ? to_acc(c[j]) : A(0), sb);
      if (STORE) residual[j] = r;
      sum[l] += ABS ? fabs(r) : r * r;
    };
    int64_t i = lo;
    for (; i + LANES <= hi; i += LANES)
      for (int l = 0; l < LANES; ++l) add(l, i + l);
    for (int l = 0; i < hi; ++i, ++l) add(l, i);
  }
};

// Per sample: v_b from the summed partial, stored in per_sample[b]; returns w_b * v_b (stored in loss[b] when the
// reduction is "none", else summed over the batch by the caller in a fixed order).
template <typename A>
struct LossFin {
  int metric;
  int64_t d;
  A huber_c;
  Coef<A> weight;
  A* __restrict__ per_sample;
  A* __restrict__ loss;  // nullptr unless reduction none
  FASTAT_HD A operator()(int64_t b, const A (&s)[1]) const {
    const A v = metric == 2 ? sqrt(s[0] + huber_c * huber_c) - huber_c : s[0] / A(d > 1 ? d : 1);
    per_sample[b] = v;
    const A w = weight(b) * v;
    if (loss != nullptr) loss[b] = w;
    return w;
  }
};

// Gradients of the loss with respect to a, b and c from the stored residual (accumulation dtype), written in T:
// with g_b the upstream gradient of sample b (grad_loss[b] for reduction none, else grad_loss[0], times 1/B for
// the mean) times w_b,
//   dL/da = g_b f(r),  dL/db = -dL/da,  dL/dc = -dL/da / sigma_b,   f(r) = 2r/D | sign(r)/D | r / (v_b + h)
// (pseudo-Huber: d/dr sqrt(S + h^2) = r / sqrt(S + h^2) = r / (v_b + h); 0 where v_b + h = 0, i.e. h = 0, r = 0).
template <typename T>
struct ResidualGradOp {
  using A = acc_t<T>;
  const A* __restrict__ residual;
  const A* __restrict__ grad_loss;
  const A* __restrict__ per_sample;
  T* __restrict__ out_a;
  T* __restrict__ out_b;
  T* __restrict__ out_c;
  Coef<A> sigma, weight;
  A huber_c, batch_scale;  // batch_scale: 1/B for the mean, else 1
  int metric;
  bool grad_per_sample;  // reduction none: one upstream gradient per sample
  SampleCursor cur;
  int64_t grad_loss_stride = 1;  // of a per-sample grad_loss (0 when autograd expands a scalar: read in place)
  FASTAT_HD A factor(int64_t b) const {
    const A g = (grad_per_sample ? grad_loss[b * grad_loss_stride] : grad_loss[0]) * batch_scale * weight(b);
    const A d = A(cur.d > 1 ? cur.d : 1);
    if (metric == 0) return A(2) * g / d;
    if (metric == 1) return g / d;
    const A denom = per_sample[b] + huber_c;
    return denom > A(0) ? g / denom : A(0);
  }
  template <int N> FASTAT_HD void run(int64_t i) {
    A r[N], ga[N], gb[N], gc[N];
    load<N>(residual, i, r);
    if (metric == 1) {
#pragma unroll
      for (int j = 0; j < N; ++j) r[j] = A((r[j] > A(0)) - (r[j] < A(0)));
    }
    const bool want_c = out_c != nullptr;
    for_pack<N>(cur, i, [&](int64_t b) { return Pair<A>{factor(b), want_c ? sigma(b) : A(1)}; },
                [&](int j, const Pair<A>& f) {
                  ga[j] = f.first * r[j];
                  gb[j] = -ga[j];
                  gc[j] = -ga[j] / f.second;
                });
    if (out_a != nullptr) store<N>(out_a, i, ga);
    if (out_b != nullptr) store<N>(out_b, i, gb);
    if (out_c != nullptr) store<N>(out_c, i, gc);
  }

  bool uniform() const { return false; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const A f = factor(b), sb = out_c != nullptr ? sigma(b) : A(1);
    auto v = [&](int64_t i) {
      const A r = residual[i];
      return metric == 1 ? A((r > A(0)) - (r < A(0))) : r;
    };
    if (out_a != nullptr)
      for (int64_t i = lo; i < hi; ++i) out_a[i] = from_acc<T>(f * v(i));
    if (out_b != nullptr)
      for (int64_t i = lo; i < hi; ++i) out_b[i] = from_acc<T>(-(f * v(i)));
    if (out_c != nullptr)
      for (int64_t i = lo; i < hi; ++i) out_c[i] = from_acc<T>(-(f * v(i)) / sb);
  }
};

}  // namespace fastat
