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
#include "perturbation_ops.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastat {

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
