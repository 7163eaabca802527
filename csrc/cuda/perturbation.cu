// Perturbation steps (SPEC 4.2) with per-sample step size and radius.
//
// L2 step, two passes over the data whatever the options:
//   pass 1 (tile reduction): per sample ||g||^2, <delta, g>, ||delta||^2 and the count of non-finite g;
//   finalize (one thread per sample): c = step / max(||g||, 1e-8) (c = step unnormalised),
//       ||v||^2 = ||delta||^2 + 2c<delta, g> + c^2 ||g||^2   for v = delta + c g  (no pass over v),
//       s = min(1, R / max(||v||, 1e-8)),  delta' = s * delta + (s c) * g;
//   pass 2 (elementwise): delta' = cd_b * delta + cg_b * g  (and x' = base + delta' when a model-input base is
//   given, so the next attack input costs no extra pass).
// Linf step: one elementwise pass delta' = clamp(delta + step * sign(g), -R, R) that also flags samples with a
// non-finite gradient, then a pass that restores delta for flagged samples only (no traffic for the others).
// Policy of the reference: a sample whose gradient holds a NaN/Inf keeps its perturbation unchanged.
#include "common.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastat {
namespace {

template <typename A> __device__ __forceinline__ bool finite(A v) { return isfinite(v); }

// xout = base + T(v): the perturbed model input from the rounded perturbation.
template <int N, typename T, typename A>
__device__ __forceinline__ void add_base(const T* __restrict__ base, T* __restrict__ xout, int64_t i, const A (&v)[N]) {
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
  __device__ __forceinline__ void reset(int64_t) { gg = dg = dd = bad = A(0); }
  template <int N> __device__ __forceinline__ void run(int64_t i) {
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
  __device__ __forceinline__ void partials(A (&out)[4]) const {
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
  __device__ __forceinline__ void operator()(int64_t b, const A (&s)[4]) const {
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
  template <int N> __device__ __forceinline__ void run(int64_t i) {
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
  template <int N> __device__ __forceinline__ void run(int64_t i) {
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
      if (!finite(g)) atomicOr(bad + cur.b, 1);  // a flag: any order gives the same result
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
  template <int N> __device__ __forceinline__ void run(int64_t i) {
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
  __device__ __forceinline__ void reset(int64_t) { nn = A(0); }
  template <int N> __device__ __forceinline__ void run(int64_t i) {
    const uint64_t sd = static_cast<uint64_t>(*seed);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A v = philox_normal(sd, 0, i + k);
      nn += v * v;
    }
  }
  __device__ __forceinline__ void partials(A (&out)[1]) const { out[0] = nn; }
};

template <typename A>
struct BallCoefFin {
  const int64_t* __restrict__ seed;
  Coef<A> radius;
  int64_t d;
  bool normal;  // true: N(0, (R/sqrt(D))^2) projected on the ball; false: uniform in the ball
  A* __restrict__ coef;
  __device__ __forceinline__ void operator()(int64_t b, const A (&s)[1]) const {
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
  template <int N> __device__ __forceinline__ void run(int64_t i) {
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> pgd_step_cuda(const at::Tensor& delta_in, const at::Tensor& grad_in,
                                                 const c10::optional<at::Tensor>& base_in,
                                                 const c10::optional<at::Tensor>& step_size, const c10::optional<at::Tensor>& radius,
                                                 double step_size_s, double radius_s, bool l2, bool normalize) {
  check_data(delta_in, "delta");
  check_same(grad_in, delta_in, "grad", "delta");
  const bool has_base = base_in.has_value() && base_in->defined();
  at::Tensor base = has_base ? *base_in : at::Tensor();
  if (has_base) check_same(base, delta_in, "model_input_base", "delta");
  check_coef(step_size, delta_in, "step_size");
  check_coef(radius, delta_in, "radius");
  c10::cuda::CUDAGuard guard(delta_in.device());
  const bool keep = shares_batch_major_layout({&delta_in, &grad_in, &base});
  at::Tensor delta = batch_major(delta_in, keep), grad = batch_major(grad_in, keep);
  base = batch_major(base, keep);
  at::Tensor out = at::empty_like(delta);
  at::Tensor xout = has_base ? at::empty_like(delta) : at::empty({0}, delta.options());
  const int64_t n = delta.numel(), batch = delta.size(0), d = per_sample_numel(delta);
  const bool vec = aligned16({&delta, &grad, &out, &base, has_base ? &xout : nullptr});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  FASTAT_DISPATCH(delta.scalar_type(), "fastat_cuda::pgd_step", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    const Coef<A> cs = make_coef<A>(step_size, step_size_s), cr = make_coef<A>(radius, radius_s);
    const T* bp = has_base ? base.data_ptr<T>() : nullptr;
    T* xp = has_base ? xout.data_ptr<T>() : nullptr;
    if (l2) {
      const Tiling t = make_tiling(batch, d, vec ? P : 1);
      at::Tensor partials = partials_buffer(t, 4, delta, std::is_same<A, double>::value);
      at::Tensor coef = at::empty({batch > 0 ? 2 * batch : 1}, partials.options());
      launch_tile_reduce<P, 4>(t, vec, L2StatsOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>()}, partials.data_ptr<A>(), stream);
      launch_finalize<4>(t, partials.data_ptr<A>(), L2CoefFin<A>{cs, cr, normalize, coef.data_ptr<A>()}, stream);
      launch_elementwise<P>(n, vec, L2ApplyOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp, coef.data_ptr<A>(), d}, stream);
    } else {
      at::Tensor bad = at::zeros({batch > 0 ? batch : 1}, delta.options().dtype(at::kInt));
      launch_elementwise<P>(n, vec,
                            LinfStepOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp, bad.data_ptr<int>(), cs, cr, normalize, d},
                            stream);
      launch_elementwise<P>(n, vec, RestoreOp<T>{delta.data_ptr<T>(), out.data_ptr<T>(), bp, xp, bad.data_ptr<int>(), d}, stream);
    }
  });
  return {out, xout};
}

at::Tensor random_perturbation_cuda(const at::Tensor& like, const at::Tensor& seed, const c10::optional<at::Tensor>& radius,
                                    double radius_s, bool l2, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(like.is_cuda() && like.dim() >= 1, "fastat_cuda: like must be a CUDA tensor with a batch dim");
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastat_cuda: seed must be a one-element int64 CUDA tensor");
  check_coef(radius, like, "radius");
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty_like(like, like.options().dtype(dtype));
  if (!shares_batch_major_layout({&out})) out = at::empty(like.sizes(), like.options().dtype(dtype));
  const int64_t n = out.numel(), batch = out.size(0), d = per_sample_numel(out);
  const bool vec = aligned16({&out});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* sd = seed.data_ptr<int64_t>();

  FASTAT_DISPATCH(dtype, "fastat_cuda::random_perturbation", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    const Coef<A> cr = make_coef<A>(radius, radius_s);
    if (l2) {
      const Tiling t = make_tiling(batch, d, vec ? P : 1);
      at::Tensor partials = partials_buffer(t, 1, out, std::is_same<A, double>::value);
      at::Tensor coef = at::empty({batch > 0 ? batch : 1}, partials.options());
      launch_tile_reduce<P, 1>(t, vec, NormalSumOp<A>{sd}, partials.data_ptr<A>(), stream);
      launch_finalize<1>(t, partials.data_ptr<A>(), BallCoefFin<A>{sd, cr, d, normal, coef.data_ptr<A>()}, stream);
      launch_elementwise<P>(n, vec, RandomApplyOp<T>{out.data_ptr<T>(), sd, cr, coef.data_ptr<A>(), 0, d}, stream);
    } else {
      launch_elementwise<P>(n, vec, RandomApplyOp<T>{out.data_ptr<T>(), sd, cr, nullptr, normal ? 2 : 1, d}, stream);
    }
  });
  return out;
}

}  // namespace fastat
