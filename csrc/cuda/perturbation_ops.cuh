// Functors of perturbation.cu and csrc/cpu/perturbation.cpp: the one source of the per-element and per-sample maths
// of the PGD steps and the random starts, on the GPU and on the CPU. Free of ATen, so that g++ compiles it for the
// CPU kernels and tests/test_cuda_build.py checks it against the float64 reference. Each functor has the formula,
// the GPU walk `run<N>(i)` and the CPU walk `span(lo, hi, ...)` (a plain loop over memory that g++ vectorises).
#pragma once

#include "kernel_utils.cuh"

namespace fastat {

template <typename A> FASTAT_HD bool finite(A v) { return isfinite(v); }

// xout = base + T(v): the perturbed model input from the rounded perturbation.
template <int N, typename T, typename A>
FASTAT_HD void add_base(const T* __restrict__ base, T* __restrict__ xout, int64_t i, const A (&v)[N]) {
  A bv[N];
  load<N>(base, i, bv);
#pragma unroll
  for (int k = 0; k < N; ++k) bv[k] += to_acc(from_acc<T>(v[k]));
  store<N>(xout, i, bv);
}

// CPU: xout = base + T(delta') over [lo, hi).
template <typename T>
void add_base_span(const T* __restrict__ base, const T* __restrict__ delta_new, T* __restrict__ xout, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) xout[i] = from_acc<T>(to_acc(base[i]) + to_acc(delta_new[i]));
}

// ---- L2 -----------------------------------------------------------------------------------------------------

// Per-sample ||g||^2, <delta, g>, ||delta||^2 and the count of non-finite g, in LANES independent partial sums
// (1 on the GPU; 16 on the CPU, where they let g++ vectorise without reassociating), added in a fixed order.
template <typename T, int LANES = 1>
struct L2StatsOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  const T* __restrict__ grad;
  A gg[LANES], dg[LANES], dd[LANES], bad[LANES];
  FASTAT_HD void reset(int64_t) {
#pragma unroll
    for (int l = 0; l < LANES; ++l) gg[l] = dg[l] = dd[l] = bad[l] = A(0);
  }
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int l = k % LANES;
      gg[l] += gv[k] * gv[k];
      dg[l] += dv[k] * gv[k];
      dd[l] += dv[k] * dv[k];
      bad[l] += finite(gv[k]) ? A(0) : A(1);
    }
  }
  FASTAT_HD void partials(A (&out)[4]) const {
    out[0] = out[1] = out[2] = out[3] = A(0);
#pragma unroll
    for (int l = 0; l < LANES; ++l) {
      out[0] += gg[l];
      out[1] += dg[l];
      out[2] += dd[l];
      out[3] += bad[l];
    }
  }

  void span(int64_t lo, int64_t hi) {
    int64_t i = lo;
    auto add = [&](int l, int64_t j) {
      const A d = to_acc(delta[j]), g = to_acc(grad[j]);
      gg[l] += g * g;
      dg[l] += d * g;
      dd[l] += d * d;
      bad[l] += finite(g) ? A(0) : A(1);
    };
    for (; i + LANES <= hi; i += LANES)
      for (int l = 0; l < LANES; ++l) add(l, i + l);
    for (int l = 0; i < hi; ++i, ++l) add(l, i);
  }
};

template <typename A>
struct L2CoefFin {
  Coef<A> step, radius;
  bool normalize;
  A* __restrict__ coef;  // [B, 2]: (cd, cg); unused by the one-launch sweep, which calls value()
  // (cd, cg) of sample b: delta' = cd * delta + cg * g; (1, 0) for a sample with a non-finite gradient.
  FASTAT_HD Pair<A> value(int64_t b, const A (&s)[4]) const {
    A cd = A(1), cg = A(0);
    if (s[3] == A(0)) {
      const A gg = s[0], dg = s[1], dd = s[2];
      A c = step(b);
      if (normalize) c = c / fmax(sqrt(gg), A(kNormFloor));
      A vv = dd;
      if (c != A(0)) vv += A(2) * c * dg + c * c * gg;
      vv = fmax(vv, A(0));  // rounding can push ||v||^2 below 0 when delta ~ -c g
      const A scale = fmin(A(1), radius(b) / fmax(sqrt(vv), A(kNormFloor)));
      cd = scale;
      cg = scale * c;
    }
    return Pair<A>{cd, cg};
  }
  FASTAT_HD void operator()(int64_t b, const A (&s)[4]) const {
    const Pair<A> c = value(b, s);
    coef[2 * b] = c.first;
    coef[2 * b + 1] = c.second;
  }
};

template <typename T>
struct L2ApplyOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  const T* __restrict__ grad;
  T* __restrict__ out;
  const T* __restrict__ base;  // optional: x' = base + delta' (delta' rounded to T first, as the reference)
  T* __restrict__ xout;
  const A* __restrict__ coef;
  SampleCursor cur;
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
    // cg == 0 for skipped samples: never multiply a NaN/Inf gradient into the kept delta.
    for_pack<N>(cur, i, [&](int64_t b) { return Pair<A>{coef[2 * b], coef[2 * b + 1]}; },
                [&](int k, const Pair<A>& c) { dv[k] = c.second != A(0) ? c.first * dv[k] + c.second * gv[k] : c.first * dv[k]; });
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }

  bool uniform() const { return false; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const A cd = coef[2 * b], cg = coef[2 * b + 1];
    if (cg != A(0)) {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>(cd * to_acc(delta[i]) + cg * to_acc(grad[i]));
    } else {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>(cd * to_acc(delta[i]));
    }
    if (base != nullptr) add_base_span(base, out, xout, lo, hi);
  }
  // Elements i .. i+N-1 of one sample whose (cd, cg) is c (the one-launch sweep).
  template <int N> FASTAT_HD void run_sample(int64_t i, const Pair<A>& c) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) dv[k] = c.second != A(0) ? c.first * dv[k] + c.second * gv[k] : c.first * dv[k];
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }
};

// ---- Linf ---------------------------------------------------------------------------------------------------

template <typename A>
struct LinfCoef {
  A step, radius;
  bool keep;  // the sample's gradient is not finite: delta' = delta
};

template <typename T>
struct LinfStepOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  const T* __restrict__ grad;
  T* __restrict__ out;
  const T* __restrict__ base;
  T* __restrict__ xout;
  int* __restrict__ bad;
  Coef<A> step, radius;
  bool normalize;
  SampleCursor cur;
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
    bool all_finite = true;
#pragma unroll
    for (int k = 0; k < N; ++k) all_finite = all_finite && finite(gv[k]);
    if (!all_finite) {  // rare: flag the samples of the non-finite elements (a flag: any order gives the same result)
      SampleCursor at(i, cur.d);
      for (int k = 0; k < N; ++k) {
        at.advance(i + k);
        if (!finite(gv[k])) {
#if defined(__CUDA_ARCH__)
          atomicOr(bad + at.b, 1);
#else
          __atomic_fetch_or(bad + at.b, 1, __ATOMIC_RELAXED);  // CPU tasks may share a sample
#endif
        }
      }
    }
    if (normalize) {
#pragma unroll
      for (int k = 0; k < N; ++k) gv[k] = A((gv[k] > A(0)) - (gv[k] < A(0)));
    }
    for_pack<N>(cur, i, [&](int64_t b) { return Pair<A>{step(b), radius(b)}; },
                [&](int k, const Pair<A>& c) { dv[k] = clamp_box(dv[k] + c.first * gv[k], c.second); });
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }

  bool uniform() const { return false; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const A s = step(b), r = radius(b);
    int nonfinite = 0;  // g - g is NaN exactly when g is NaN or infinite (an integer OR: g++ vectorises it)
    for (int64_t i = lo; i < hi; ++i) {
      const A g = to_acc(grad[i]);
      nonfinite |= !(g - g == A(0));
    }
    if (nonfinite) __atomic_fetch_or(bad + b, 1, __ATOMIC_RELAXED);  // CPU tasks may share a sample
    if (normalize) {
      for (int64_t i = lo; i < hi; ++i) {
        const A g = to_acc(grad[i]);
        out[i] = from_acc<T>(clamp_box(to_acc(delta[i]) + s * A((g > A(0)) - (g < A(0))), r));
      }
    } else {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>(clamp_box(to_acc(delta[i]) + s * to_acc(grad[i]), r));
    }
    if (base != nullptr) add_base_span(base, out, xout, lo, hi);
  }
  // Elements i .. i+N-1 of one sample with coefficients c (the one-launch sweep: no flags, no restore pass).
  template <int N> FASTAT_HD void run_sample(int64_t i, const LinfCoef<A>& c) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    if (!c.keep) {
      load<N>(grad, i, gv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A dir = normalize ? A((gv[k] > A(0)) - (gv[k] < A(0))) : gv[k];
        dv[k] = fmax(fmin(dv[k] + c.step * dir, c.radius), -c.radius);
      }
    }
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }
};

// The one-launch Linf sweep: the count of non-finite g per sample (first sweep), then LinfStepOp::run_sample.
template <typename T>
struct NonfiniteCountOp {
  using A = acc_t<T>;
  const T* __restrict__ grad;
  A bad;
  FASTAT_HD void reset(int64_t) { bad = A(0); }
  template <int N> FASTAT_HD void run(int64_t i) {
    A gv[N];
    load<N>(grad, i, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) bad += finite(gv[k]) ? A(0) : A(1);
  }
  FASTAT_HD void partials(A (&out)[1]) const { out[0] = bad; }
};

template <typename A>
struct LinfCoefFin {
  Coef<A> step, radius;
  FASTAT_HD LinfCoef<A> value(int64_t b, const A (&s)[1]) const { return LinfCoef<A>{step(b), radius(b), s[0] != A(0)}; }
};

template <typename T>
struct RestoreOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  T* __restrict__ out;
  const T* __restrict__ base;
  T* __restrict__ xout;
  const int* __restrict__ bad;
  SampleCursor cur;
  template <int N> FASTAT_HD void run(int64_t i) {
    cur.seek(i);
    if (i + N <= cur.next && !bad[cur.b]) return;  // the common case: a pack of one finite sample
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) cur.advance(i + k);
      if (bad[cur.b]) {
        out[i + k] = delta[i + k];
        if (base != nullptr) xout[i + k] = from_acc<T>(to_acc(base[i + k]) + to_acc(delta[i + k]));
      }
    }
  }

  bool uniform() const { return false; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    if (!bad[b]) return;
    for (int64_t i = lo; i < hi; ++i) out[i] = delta[i];
    if (base != nullptr) add_base_span(base, delta, xout, lo, hi);
  }
};

// ---- random starts ------------------------------------------------------------------------------------------

// Draws come from (seed, logical index) -- the same values whatever the memory layout, and the same stream as the
// Triton kernels -- with seed read from a device tensor, so a torch.Generator can supply it without a host sync
// (graph capture); the L2 forms regenerate the same draws in both passes instead of storing them.
template <typename A, int LANES = 1>
struct NormalSumOp {
  const int64_t* __restrict__ seed;
  LogicalIndex logical;
  A nn[LANES];
  FASTAT_HD void reset(int64_t) {
#pragma unroll
    for (int l = 0; l < LANES; ++l) nn[l] = A(0);
  }
  template <int N> FASTAT_HD void run(int64_t i) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A v = philox_normal(sd, 0, logical(i + k));
      nn[k % LANES] += v * v;
    }
  }
  FASTAT_HD void partials(A (&out)[1]) const {
    A s = A(0);
#pragma unroll
    for (int l = 0; l < LANES; ++l) s += nn[l];
    out[0] = s;
  }

  void span(int64_t lo, int64_t hi) {  // the draws a block at a time (philox_cpu.h), element k into lane k % LANES
    const uint64_t sd = static_cast<uint64_t>(*seed);
    float e[kNormalBlock];
    int l = 0;
    for (int64_t i0 = lo; i0 < hi; i0 += kNormalBlock) {
      const int64_t m = hi - i0 < kNormalBlock ? hi - i0 : kNormalBlock;
      fill_normals(sd, 0, logical, i0, m, e);
      for (int64_t k = 0; k < m; ++k, l = l + 1 == LANES ? 0 : l + 1) {
        const A v = e[k];
        nn[l] += v * v;
      }
    }
  }
};

template <typename A>
struct BallCoefFin {
  const int64_t* __restrict__ seed;
  Coef<A> radius;
  int64_t d, numel;  // numel: elements of the whole tensor (the per-sample uniforms are drawn past them)
  bool normal;  // true: N(0, (R/sqrt(D))^2) projected on the ball; false: uniform in the ball
  A* __restrict__ coef;  // unused by the one-launch sweep, which calls value()
  FASTAT_HD void operator()(int64_t b, const A (&s)[1]) const { coef[b] = value(b, s); }
  // Multiplier of sample b's normal draws.
  FASTAT_HD A value(int64_t b, const A (&s)[1]) const {
    const A norm = sqrt(s[0]);
    const A r = radius(b);
    A c;
    if (normal) {
      const A scale = r / sqrt(A(d > 1 ? d : 1));
      c = scale * fmin(A(1), r / fmax(norm * scale, A(kNormFloor)));
    } else {
      // ||delta|| = R * U^(1/D), U = tl.rand(seed, numel + b) (counters past the elements'), the power in fp64.
      const double u = philox_uniform(static_cast<uint64_t>(*seed), 0, numel + b);
      const double root = pow(u, 1.0 / static_cast<double>(d > 1 ? d : 1));
      c = static_cast<A>(root) * r / fmax(norm, A(kNormFloor));
    }
    return c;
  }
};

template <typename T>
struct RandomApplyOp {
  using A = acc_t<T>;
  T* __restrict__ out;
  const int64_t* __restrict__ seed;
  Coef<A> radius;      // Linf forms
  const A* __restrict__ coef;  // L2 forms: per-sample multiplier of the normal draw
  int mode;            // 0: L2 (n * coef_b), 1: Linf uniform box, 2: Linf normal clamped
  LogicalIndex logical;
  SampleCursor cur;
  template <int N> FASTAT_HD void run(int64_t i) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
    A o[N];
    A u[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int64_t j = logical(i + k);
      u[k] = mode == 1 ? A(2) * A(philox_uniform(sd, 0, j)) - A(1) : A(philox_normal(sd, 0, j));
    }
    for_pack<N>(cur, i, [&](int64_t b) { return mode == 0 ? coef[b] : radius(b); },
                [&](int k, A c) {
                  const A v = u[k] * c;
                  o[k] = mode == 2 ? clamp_box(v, c) : v;
                });
    store<N>(out, i, o);
  }

  bool uniform() const { return mode != 0 && radius.ptr == nullptr; }
  void span(int64_t lo, int64_t hi, int64_t b) const {
    const uint64_t sd = static_cast<uint64_t>(*seed);
    const A c = mode == 0 ? coef[b] : radius(b);
    if (mode == 1) {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_acc<T>((A(2) * A(philox_uniform(sd, 0, logical(i))) - A(1)) * c);
      return;
    }
    float e[kNormalBlock];  // the normal forms: the draws a block at a time (philox_cpu.h)
    for (int64_t i0 = lo; i0 < hi; i0 += kNormalBlock) {
      const int64_t m = hi - i0 < kNormalBlock ? hi - i0 : kNormalBlock;
      fill_normals(sd, 0, logical, i0, m, e);
      for (int64_t k = 0; k < m; ++k) {
        const A v = A(e[k]) * c;
        out[i0 + k] = from_acc<T>(mode == 2 ? clamp_box(v, c) : v);
      }
    }
  }
  // L2 forms, elements i .. i+N-1 of one sample whose multiplier is c (the one-launch sweep).
  template <int N> FASTAT_HD void run_sample(int64_t i, A c) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
    A o[N];
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = A(philox_normal(sd, 0, logical(i + k))) * c;
    store<N>(out, i, o);
  }
};

}  // namespace fastat
