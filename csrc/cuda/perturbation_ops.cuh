// Functors of perturbation.cu.
// Per-element / per-sample code of the kernels (functors run by the launch templates of common.cuh), free of
// ATen so that tests/test_cuda_build.py compiles it for the host and checks it against the float64 reference.
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

// ---- L2 -----------------------------------------------------------------------------------------------------

template <typename T>
struct L2StatsOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  const T* __restrict__ grad;
  A gg, dg, dd, bad;
  FASTAT_HD void reset(int64_t) { gg = dg = dd = bad = A(0); }
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      gg += gv[k] * gv[k];
      dg += dv[k] * gv[k];
      dd += dv[k] * dv[k];
      bad += finite(gv[k]) ? A(0) : A(1);
    }
  }
  FASTAT_HD void partials(A (&out)[4]) const {
    out[0] = gg;
    out[1] = dg;
    out[2] = dd;
    out[3] = bad;
  }
};

template <typename A>
struct L2CoefFin {
  Coef<A> step, radius;
  bool normalize;
  A* __restrict__ coef;  // [B, 2]: (cd, cg)
  FASTAT_HD void operator()(int64_t b, const A (&s)[4]) const {
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
    coef[2 * b] = cd;
    coef[2 * b + 1] = cg;
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
  int64_t d;
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
    SampleCursor cur(i, d);
    A cd = coef[2 * cur.b], cg = coef[2 * cur.b + 1];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        cd = coef[2 * cur.b];
        cg = coef[2 * cur.b + 1];
      }
      // cg == 0 for skipped samples: never multiply a NaN/Inf gradient into the kept delta.
      dv[k] = cg != A(0) ? cd * dv[k] + cg * gv[k] : cd * dv[k];
    }
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }
};

// ---- Linf ---------------------------------------------------------------------------------------------------

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
  int64_t d;
  template <int N> FASTAT_HD void run(int64_t i) {
    A dv[N], gv[N];
    load<N>(delta, i, dv);
    load<N>(grad, i, gv);
    SampleCursor cur(i, d);
    A s = step(cur.b), r = radius(cur.b);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        s = step(cur.b);
        r = radius(cur.b);
      }
      const A g = gv[k];
      if (!finite(g)) {
#if defined(__CUDA_ARCH__)
        atomicOr(bad + cur.b, 1);  // a flag: any order gives the same result
#else
        bad[cur.b] |= 1;
#endif
      }
      const A dir = normalize ? A((g > A(0)) - (g < A(0))) : g;
      dv[k] = fmax(fmin(dv[k] + s * dir, r), -r);
    }
    store<N>(out, i, dv);
    if (base != nullptr) add_base<N>(base, xout, i, dv);
  }
};

template <typename T>
struct RestoreOp {
  using A = acc_t<T>;
  const T* __restrict__ delta;
  T* __restrict__ out;
  const T* __restrict__ base;
  T* __restrict__ xout;
  const int* __restrict__ bad;
  int64_t d;
  template <int N> FASTAT_HD void run(int64_t i) {
    SampleCursor cur(i, d);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) cur.advance(i + k);
      if (bad[cur.b]) {
        out[i + k] = delta[i + k];
        if (base != nullptr) xout[i + k] = from_acc<T>(to_acc(base[i + k]) + to_acc(delta[i + k]));
      }
    }
  }
};

// ---- random starts ------------------------------------------------------------------------------------------

// Draws come from (seed, flat index) with seed read from a device tensor, so a torch.Generator can supply it
// without a host sync (graph capture); the L2 forms regenerate the same draws in both passes instead of storing them.
template <typename A>
struct NormalSumOp {
  const int64_t* __restrict__ seed;
  A nn;
  FASTAT_HD void reset(int64_t) { nn = A(0); }
  template <int N> FASTAT_HD void run(int64_t i) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A v = philox_normal(sd, 0, i + k);
      nn += v * v;
    }
  }
  FASTAT_HD void partials(A (&out)[1]) const { out[0] = nn; }
};

template <typename A>
struct BallCoefFin {
  const int64_t* __restrict__ seed;
  Coef<A> radius;
  int64_t d;
  bool normal;  // true: N(0, (R/sqrt(D))^2) projected on the ball; false: uniform in the ball
  A* __restrict__ coef;
  FASTAT_HD void operator()(int64_t b, const A (&s)[1]) const {
    const A norm = sqrt(s[0]);
    const A r = radius(b);
    A c;
    if (normal) {
      const A scale = r / sqrt(A(d > 1 ? d : 1));
      c = scale * fmin(A(1), r / fmax(norm * scale, A(kNormFloor)));
    } else {
      // ||delta|| = R * U^(1/D), U from a separate Philox subsequence; the power in fp64 as in the reference.
      const double u = philox_uniform(static_cast<uint64_t>(*seed), 0, b, 1u);
      const double root = pow(u, 1.0 / static_cast<double>(d > 1 ? d : 1));
      c = static_cast<A>(root) * r / fmax(norm, A(kNormFloor));
    }
    coef[b] = c;
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
  int64_t d;
  template <int N> FASTAT_HD void run(int64_t i) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
    A o[N];
    SampleCursor cur(i, d);
    A c = mode == 0 ? coef[cur.b] : radius(cur.b);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        c = mode == 0 ? coef[cur.b] : radius(cur.b);
      }
      if (mode == 1) {
        o[k] = (A(2) * A(philox_uniform(sd, 0, i + k)) - A(1)) * c;
      } else {
        const A v = A(philox_normal(sd, 0, i + k)) * c;
        o[k] = mode == 0 ? v : fmax(fmin(v, c), -c);
      }
    }
    store<N>(out, i, o);
  }
};

}  // namespace fastat
