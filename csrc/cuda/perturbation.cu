// Perturbation steps (docs/maths.md §4.2) with per-sample step size and radius, and random starts. The per-element and
// per-sample code is the functors of perturbation_ops.cuh, shared with csrc/cpu.
//
// L2 step: per sample ||g||^2, <delta, g>, ||delta||^2 and the count of non-finite g, then
//       c = step / max(||g||, 1e-8) (c = step unnormalised),
//       ||v||^2 = ||delta||^2 + 2c<delta, g> + c^2 ||g||^2   for v = delta + c g  (no pass over v),
//       s = min(1, R / max(||v||, 1e-8)),  delta' = s * delta + (s c) * g
// (and x' = base + delta' when a model-input base is given, so the next attack input costs no extra pass).
// Linf step: delta' = clamp(delta + step * sign(g), -R, R). Policy of the reference: a sample whose gradient holds a
// NaN/Inf keeps its perturbation unchanged.
// Samples of up to kSweepMaxD elements (when `use_sweep`): one launch (common.cuh sweep_kernel: statistics,
// coefficients and update per sample, the second read from L2). Otherwise: L2 = tile reduction + finalize +
// elementwise update (delta and g read twice); Linf = flags zeroed, one elementwise pass that also flags samples
// with a non-finite gradient, and a pass that restores delta for flagged samples only (no traffic for the others).
#include "common.cuh"
#include "ops.h"
#include "perturbation_ops.cuh"

#include <c10/core/ScalarType.h>

namespace fastat {

std::tuple<at::Tensor, at::Tensor> pgd_step_cuda(const at::Tensor& delta_in, const at::Tensor& grad_in,
                                                 const c10::optional<at::Tensor>& base_in,
                                                 const c10::optional<at::Tensor>& step_size, const c10::optional<at::Tensor>& radius,
                                                 double step_size_s, double radius_s, bool l2, bool normalize) {
  check_data(delta_in, "delta");
  check_like(grad_in, delta_in, "grad", "delta");
  at::Tensor base = value_or_undefined(base_in);
  if (base.defined()) check_like(base, delta_in, "model_input_base", "delta");
  check_coef(step_size, delta_in, "step_size");
  check_coef(radius, delta_in, "radius");
  c10::cuda::CUDAGuard guard(delta_in.device());
  const at::ScalarType work = c10::promoteTypes(delta_in.scalar_type(), grad_in.scalar_type());
  at::Tensor delta = cast(delta_in, work), grad = cast(grad_in, work);
  // x' = base + delta' is written by the same pass when everything shares delta's dtype (the usual case).
  const bool fused = base.defined() && base.scalar_type() == work && delta_in.scalar_type() == work;
  const Layout layout = work_layout({&delta, &grad, &base}, false);
  at::Tensor out = empty_output(delta, layout, work);
  at::Tensor xout = fused ? empty_output(delta, layout, work) : at::empty({0}, delta_in.options());
  const int64_t n = delta.numel(), batch = delta.size(0), d = sample_numel(delta);
  if (n > 0) {
    const bool vec = aligned16({&delta, &grad, &out, fused ? &base : nullptr, fused ? &xout : nullptr});
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    FASTAT_DISPATCH(work, "fastat_cuda::pgd_step", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      constexpr int P = pack_size<T>();
      const Coef<A> cs = make_coef<A>(step_size, step_size_s), cr = make_coef<A>(radius, radius_s);
      const T* bp = fused ? base.data_ptr<T>() : nullptr;
      T* xp = fused ? xout.data_ptr<T>() : nullptr;
      const int64_t sample_bytes = d * static_cast<int64_t>(sizeof(T)) * (fused ? 3 : 2);
      const bool sweep = use_sweep(batch, d);
      if (sweep && l2) {
        launch_sweep<P, 4, A>(batch, d, sample_bytes, vec, L2StatsOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>()},
                              L2CoefFin<A>{cs, cr, normalize, nullptr},
                              L2ApplyOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp, nullptr,
                                           SampleCursor(d)}, stream);
      } else if (sweep) {
        launch_sweep<P, 1, A>(batch, d, sample_bytes, vec, NonfiniteCountOp<T>{grad.data_ptr<T>()}, LinfCoefFin<A>{cs, cr},
                              LinfStepOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp, nullptr, cs, cr,
                                            normalize, SampleCursor(d)}, stream);
      } else if (l2) {
        const Tiling t = make_tiling(batch, d, vec ? P : 1);
        at::Tensor partials = partials_buffer(t, 4, delta, std::is_same<A, double>::value);
        at::Tensor coef = at::empty({batch > 0 ? 2 * batch : 1}, partials.options());
        launch_tile_reduce<P, 4>(t, vec, L2StatsOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>()}, partials.data_ptr<A>(), stream);
        launch_finalize<4>(t, partials.data_ptr<A>(), L2CoefFin<A>{cs, cr, normalize, coef.data_ptr<A>()}, stream);
        launch_elementwise<P>(n, vec, L2ApplyOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp,
                                                   coef.data_ptr<A>(), SampleCursor(d)}, stream);
      } else {
        at::Tensor bad = at::zeros({batch > 0 ? batch : 1}, delta.options().dtype(at::kInt));
        launch_elementwise<P>(n, vec,
                              LinfStepOp<T>{delta.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(), bp, xp,
                                            bad.data_ptr<int>(), cs, cr, normalize, SampleCursor(d)},
                              stream);
        launch_elementwise<P>(n, vec, RestoreOp<T>{delta.data_ptr<T>(), out.data_ptr<T>(), bp, xp, bad.data_ptr<int>(),
                                                   SampleCursor(d)}, stream);
      }
    });
  }
  at::Tensor new_delta = cast(out, delta_in.scalar_type());
  if (base.defined() && !fused) {  // mixed dtypes: the reference's rounding, delta' first
    const at::ScalarType acc = accumulation(work);
    xout = base.to(acc).add(new_delta.to(acc)).to(c10::promoteTypes(base.scalar_type(), delta_in.scalar_type()));
  }
  return {new_delta, xout};
}

at::Tensor random_perturbation_cuda(const at::Tensor& like, const at::Tensor& seed, const c10::optional<at::Tensor>& radius,
                                    double radius_s, bool l2, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(like.is_cuda() && like.dim() >= 1, "fastat_cuda: like must be a CUDA tensor with a batch dim");
  TORCH_CHECK(seed.is_cuda() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastat_cuda: seed must be a one-element int64 CUDA tensor");
  check_coef(radius, like, "radius");
  c10::cuda::CUDAGuard guard(like.device());
  const bool cl = is_channels_last(like);
  const at::MemoryFormat format =
      !cl ? at::MemoryFormat::Contiguous : (like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype).memory_format(format));
  const int64_t n = out.numel(), batch = out.size(0), d = sample_numel(out);
  if (n == 0) return out;
  const bool vec = aligned16({&out});
  const LogicalIndex logical = logical_index(out, Layout{!cl, cl});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor seed_c = seed.contiguous();
  const int64_t* sd = seed_c.data_ptr<int64_t>();

  FASTAT_DISPATCH(dtype, "fastat_cuda::random_perturbation", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    const Coef<A> cr = make_coef<A>(radius, radius_s);
    if (l2 && use_sweep(batch, d)) {  // draws are regenerated, not read: the samples in flight hold no data
      launch_sweep<P, 1, A>(batch, d, 0, vec, NormalSumOp<A>{sd, logical}, BallCoefFin<A>{sd, cr, d, n, normal, nullptr},
                            RandomApplyOp<T>{out.data_ptr<T>(), sd, cr, nullptr, 0, logical, SampleCursor(d)}, stream);
    } else if (l2) {
      const Tiling t = make_tiling(batch, d, vec ? P : 1);
      at::Tensor partials = partials_buffer(t, 1, out, std::is_same<A, double>::value);
      at::Tensor coef = at::empty({batch > 0 ? batch : 1}, partials.options());
      launch_tile_reduce<P, 1>(t, vec, NormalSumOp<A>{sd, logical}, partials.data_ptr<A>(), stream);
      launch_finalize<1>(t, partials.data_ptr<A>(), BallCoefFin<A>{sd, cr, d, n, normal, coef.data_ptr<A>()}, stream);
      launch_elementwise<P>(n, vec, RandomApplyOp<T>{out.data_ptr<T>(), sd, cr, coef.data_ptr<A>(), 0, logical, SampleCursor(d)},
                            stream);
    } else {
      launch_elementwise<P>(n, vec, RandomApplyOp<T>{out.data_ptr<T>(), sd, cr, nullptr, normal ? 2 : 1, logical, SampleCursor(d)},
                            stream);
    }
  });
  return out;
}

}  // namespace fastat
