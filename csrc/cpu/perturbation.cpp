// fastat_cpp::pgd_step and random_perturbation: the functors of csrc/cuda/perturbation_ops.cuh (the same
// per-element and per-sample code as the CUDA kernels) run by the CPU launch templates. When a sample fits one
// chunk, its reduction pass, per-sample step and elementwise pass run back to back on one thread (cache-hot).
#include <ATen/Dispatch.h>
#include <ATen/ops/add.h>
#include <c10/core/ScalarType.h>

#include <vector>

#include "host_common.h"
#include "kernels.h"
#include "launch.h"
#include "perturbation_ops.cuh"

namespace fastat_cpu {

using fastat::Layout;
using fastat::SampleCursor;

std::tuple<at::Tensor, at::Tensor> pgd_step(const at::Tensor& delta_in, const at::Tensor& grad_in,
                                            const c10::optional<at::Tensor>& base_in,
                                            const c10::optional<at::Tensor>& step_size,
                                            const c10::optional<at::Tensor>& radius, double step_size_s,
                                            double radius_s, bool l2, bool normalize) {
  TORCH_CHECK(delta_in.dim() >= 1, "fastat_cpp::pgd_step: delta needs a batch dimension");
  TORCH_CHECK(grad_in.sizes() == delta_in.sizes(), "fastat_cpp::pgd_step: grad must have delta's shape");
  fastat::check_coef(step_size, delta_in, "step_size");
  fastat::check_coef(radius, delta_in, "radius");
  fastat::check_coef_values(step_size, "step_size", fastat::Sign::kNonnegative);
  fastat::check_coef_values(radius, "radius", fastat::Sign::kNonnegative);
  const at::ScalarType work = c10::promoteTypes(delta_in.scalar_type(), grad_in.scalar_type());
  at::Tensor delta = fastat::cast(delta_in, work), grad = fastat::cast(grad_in, work);
  at::Tensor base = fastat::value_or_undefined(base_in);
  // x' = base + delta' is written by the same pass when everything shares delta's dtype (the usual case).
  const bool fused = base.defined() && base.scalar_type() == work && delta_in.scalar_type() == work;
  const Layout layout = fastat::work_layout({&delta, &grad, &base}, false);
  at::Tensor out = fastat::empty_output(delta, layout, work);
  at::Tensor x = fused ? fastat::empty_output(delta, layout, work) : at::empty({0}, delta_in.options());
  const int64_t n = delta.numel(), batch = delta.size(0), d = fastat::sample_numel(delta);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work, "fastat_cpp::pgd_step", [&] {
      using T = scalar_t;
      using A = fastat::acc_t<T>;
      const T* pd = delta.const_data_ptr<T>();
      const T* pg = grad.const_data_ptr<T>();
      T* po = out.mutable_data_ptr<T>();
      const T* pb = fused ? base.const_data_ptr<T>() : nullptr;
      T* px = fused ? x.mutable_data_ptr<T>() : nullptr;
      const fastat::Coef<A> cs = fastat::make_coef<A>(step_size, step_size_s), cr = fastat::make_coef<A>(radius, radius_s);
      if (l2) {
        std::vector<A> coef(static_cast<size_t>(2 * batch));
        const fastat::L2ApplyOp<T> apply{pd, pg, po, pb, px, coef.data(), SampleCursor(d)};
        per_sample_passes<4, A>(make_tiles(batch, d), fastat::L2StatsOp<T, kLanes>{pd, pg},
                         fastat::L2CoefFin<A>{cs, cr, normalize, coef.data()}, RunAfter<fastat::L2ApplyOp<T>>{apply});
      } else {
        std::vector<int> bad(static_cast<size_t>(batch), 0);
        elementwise(n, d, fastat::LinfStepOp<T>{pd, pg, po, pb, px, bad.data(), cs, cr, normalize, SampleCursor(d)});
        bool any = false;
        for (int flag : bad) any = any || flag != 0;
        if (any) elementwise(n, d, fastat::RestoreOp<T>{pd, po, pb, px, bad.data(), SampleCursor(d)});
      }
    });
  }
  at::Tensor new_delta = fastat::cast(out, delta_in.scalar_type());
  if (base.defined() && !fused) {  // mixed dtypes: the reference's rounding, delta' first
    const at::ScalarType acc = fastat::accumulation(work);
    x = base.to(acc).add(new_delta.to(acc)).to(c10::promoteTypes(base.scalar_type(), delta_in.scalar_type()));
  }
  return {new_delta, x};
}

at::Tensor random_perturbation(const at::Tensor& like, const at::Tensor& seed, const c10::optional<at::Tensor>& radius,
                               double radius_s, bool l2, bool normal, at::ScalarType dtype) {
  TORCH_CHECK(like.dim() >= 1, "fastat_cpp::random_perturbation: like needs a batch dimension");
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "fastat_cpp::random_perturbation: seed must be a one-element int64 CPU tensor");
  fastat::check_coef(radius, like, "radius");
  fastat::check_coef_values(radius, "radius", fastat::Sign::kNonnegative);
  const bool cl = fastat::is_channels_last(like);
  const at::MemoryFormat format =
      !cl ? at::MemoryFormat::Contiguous : (like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype).memory_format(format));
  const int64_t n = out.numel(), batch = out.size(0), d = fastat::sample_numel(out);
  if (n == 0) return out;
  const at::Tensor seed_c = seed.contiguous();
  const int64_t* sd = seed_c.const_data_ptr<int64_t>();
  const fastat::LogicalIndex logical = fastat::logical_index(out, Layout{!cl, cl});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::random_perturbation", [&] {
    using T = scalar_t;
    using A = fastat::acc_t<T>;
    const fastat::Coef<A> cr = fastat::make_coef<A>(radius, radius_s);
    T* po = out.mutable_data_ptr<T>();
    if (l2) {
      std::vector<A> coef(static_cast<size_t>(batch));
      const fastat::RandomApplyOp<T> apply{po, sd, cr, coef.data(), 0, logical, SampleCursor(d)};
      per_sample_passes<1, A>(make_tiles(batch, d), fastat::NormalSumOp<A, kLanes>{sd, logical},
                       fastat::BallCoefFin<A>{sd, cr, d, n, normal, coef.data()}, RunAfter<fastat::RandomApplyOp<T>>{apply});
    } else {
      elementwise(n, d, fastat::RandomApplyOp<T>{po, sd, cr, nullptr, normal ? 2 : 1, logical, SampleCursor(d)});
    }
  });
  return out;
}

}  // namespace fastat_cpu
