// fastat_cpp::residual_loss and residual_loss_backward: the functors of csrc/cuda/losses_ops.cuh (the same
// per-element code as the CUDA kernels) run by the CPU launch templates; the batch reduction in a fixed order.
#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <ATen/ops/empty.h>

#include "host_common.h"
#include "kernels.h"
#include "launch.h"
#include "losses_ops.cuh"

namespace fastat_cpu {

using fastat::Layout;
using fastat::SampleCursor;

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss(
    const at::Tensor& a_in, const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& c_in,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, int64_t seed, int64_t offset, bool save_residual) {
  TORCH_CHECK(a_in.dim() >= 1, "fastat_cpp::residual_loss: a needs a batch dimension");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cpp::residual_loss: metric must be 0, 1 or 2, got ", metric);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastat_cpp::residual_loss: reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cpp::residual_loss: seed and offset must be >= 0");
  at::Tensor b = fastat::value_or_undefined(b_in), c = fastat::value_or_undefined(c_in);
  at::ScalarType dtype = a_in.scalar_type();
  if (b.defined()) dtype = c10::promoteTypes(dtype, b.scalar_type());
  if (c.defined()) dtype = c10::promoteTypes(dtype, c.scalar_type());
  const at::ScalarType acc = fastat::accumulation(dtype);
  fastat::check_coef(sigma, a_in, "sigma");
  fastat::check_coef(weight, a_in, "weight");
  if (c.defined()) fastat::check_coef_values(sigma, "sigma", fastat::Sign::kPositive);
  fastat::check_coef_values(weight, "weight", fastat::Sign::kAny);
  at::Tensor a = fastat::cast(a_in, dtype);
  b = fastat::cast(b, dtype);
  c = fastat::cast(c, dtype);
  const bool seeded = !b.defined();
  const Layout layout = fastat::work_layout({&a, &b, &c}, seeded);
  const int64_t batch = a.size(0), d = fastat::sample_numel(a);
  at::Tensor per_sample = at::empty({batch}, a.options().dtype(acc));
  at::Tensor loss = reduction == fastat::kReductionNone ? at::empty({batch}, a.options().dtype(acc))
                                                        : at::empty({}, a.options().dtype(acc));
  // r in the accumulation dtype: the backward rounds each gradient once, as the reference does.
  at::Tensor residual = save_residual ? fastat::empty_output(a, layout, acc) : at::empty({0}, a.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::residual_loss", [&] {
    using T = scalar_t;
    using A = fastat::acc_t<T>;
    const fastat::Coef<A> cs = fastat::make_coef<A>(sigma, sigma_s), cw = fastat::make_coef<A>(weight, weight_s);
    A* pl = loss.mutable_data_ptr<A>();
    A* pv = per_sample.mutable_data_ptr<A>();
    const fastat::LossFin<A> fin{static_cast<int>(metric), d, static_cast<A>(huber_c), cw, pv,
                                 reduction == fastat::kReductionNone ? pl : nullptr};
    const T* pa = a.const_data_ptr<T>();
    const T* pb = seeded ? nullptr : b.const_data_ptr<T>();
    A* pr = save_residual ? residual.mutable_data_ptr<A>() : nullptr;
    const fastat::LogicalIndex logical = fastat::logical_index(a, layout);
    const Tiles tiles = make_tiles(batch, d);
    if (c.defined()) {
      per_sample_passes<1, A>(tiles, fastat::ResidualOp<T, true, kLanes>{pa, pb, c.const_data_ptr<T>(), pr, cs, metric == 1, logical,
                                                                  static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)},
                       fin, NoAfter{});
    } else {
      per_sample_passes<1, A>(tiles, fastat::ResidualOp<T, false, kLanes>{pa, pb, nullptr, pr, cs, metric == 1, logical,
                                                                   static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)},
                       fin, NoAfter{});
    }
    if (reduction != fastat::kReductionNone) {
      double total = 0.0;
      for (int64_t i = 0; i < batch; ++i) total += static_cast<double>(cw(i) * pv[i]);
      if (reduction == fastat::kReductionMean && batch > 0) total /= static_cast<double>(batch);
      pl[0] = static_cast<A>(total);
    }
  });
  return {loss, per_sample, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& residual_in, const at::Tensor& per_sample_in,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, c10::optional<at::ScalarType> a_dtype,
    c10::optional<at::ScalarType> b_dtype, c10::optional<at::ScalarType> c_dtype) {
  TORCH_CHECK(residual_in.dim() >= 1, "fastat_cpp::residual_loss_backward: residual needs a batch dimension");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cpp::residual_loss_backward: metric must be 0, 1 or 2, got ", metric);
  at::Tensor residual = residual_in;
  const Layout layout = fastat::work_layout({&residual}, false);
  const at::ScalarType acc = residual.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "fastat_cpp::residual_loss_backward: the residual is float32 or float64 (the accumulation dtype), got ", acc);
  const at::ScalarType dtype = fastat::gradient_dtype(acc, a_dtype, b_dtype, c_dtype);
  const int64_t batch = residual.size(0), n = residual.numel(), d = fastat::sample_numel(residual);
  fastat::check_coef(sigma, residual, "sigma");
  fastat::check_coef(weight, residual, "weight");
  TORCH_CHECK(grad_loss.numel() == (reduction == fastat::kReductionNone ? batch : 1),
              "fastat_cpp::residual_loss_backward: grad_loss must have one value per sample for reduction none, else one");
  auto make = [&](bool want) { return want ? fastat::empty_output(residual, layout, dtype) : at::empty({0}, residual.options()); };
  at::Tensor ga = make(a_dtype.has_value()), gb = make(b_dtype.has_value()), gc = make(c_dtype.has_value());
  if (n > 0 && (a_dtype || b_dtype || c_dtype)) {
    const at::Tensor g = fastat::cast(grad_loss, acc).contiguous();
    const at::Tensor ps = fastat::cast(per_sample_in, acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::residual_loss_backward", [&] {
      using T = scalar_t;
      using A = fastat::acc_t<T>;
      elementwise(n, d, fastat::ResidualGradOp<T>{residual.const_data_ptr<A>(), g.const_data_ptr<A>(), ps.const_data_ptr<A>(),
                                               a_dtype ? ga.mutable_data_ptr<T>() : nullptr,
                                               b_dtype ? gb.mutable_data_ptr<T>() : nullptr,
                                               c_dtype ? gc.mutable_data_ptr<T>() : nullptr,
                                               fastat::make_coef<A>(sigma, sigma_s), fastat::make_coef<A>(weight, weight_s),
                                               static_cast<A>(huber_c),
                                               static_cast<A>(reduction == fastat::kReductionMean ? 1.0 / batch : 1.0),
                                               static_cast<int>(metric), reduction == fastat::kReductionNone, SampleCursor(d)});
    });
  }
  return {a_dtype ? fastat::cast(ga, *a_dtype) : ga, b_dtype ? fastat::cast(gb, *b_dtype) : gb,
          c_dtype ? fastat::cast(gc, *c_dtype) : gc};
}

}  // namespace fastat_cpu
