// Fused per-sample losses (docs/maths.md §4.3). Every loss here is a function of one residual
//     r = a - b - c / sigma_b      (c optional; b may be seeded noise regenerated in-kernel from (seed, offset),
//                                   see philox.cuh, so it is never stored)
//   P1 equivariant MSE:   a = pred, b = noise, c = delta, sigma = sigma_t   (target = noise + delta/sigma)
//   P2 regulariser:       a = pred_perturbed, b = pred_clean, c = omega, sigma = 1 (invariant: no c)
//   CM distance:          a = pred, b = target, no c
// metric 0: v_b = sum(r^2) / D;  1: sum(|r|) / D;  2 (pseudo-Huber): sqrt(sum(r^2) + h^2) - h;
// loss = w_b v_b (reduction none) | sum_b w_b v_b | the sum / B.
// Forward: one tile-reduction pass (per-warp partials) that can also store r (fp32, fp64 for fp64 data), so the backward never
// re-reads a, b and c nor materialises the target; then one finalize launch: per sample (reduction none), or one
// block that also sums the batch in a fixed order (deterministic). The per-element code is the functors of
// losses_ops.cuh, shared with csrc/cpu.
#include "common.cuh"
#include "losses_ops.cuh"
#include "ops.h"

#include <c10/core/ScalarType.h>

namespace fastat {
namespace {

template <typename T, bool HAS_C>
void launch_residual(const Tiling& t, bool vec, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                     at::Tensor& residual, bool save, const Coef<acc_t<T>>& sigma, bool abs_metric, const LogicalIndex& logical,
                     uint64_t seed, uint64_t offset, acc_t<T>* partials, cudaStream_t stream) {
  constexpr int P = pack_size<T>();
  const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
  const T* cp = HAS_C ? c.data_ptr<T>() : nullptr;
  acc_t<T>* rp = save ? residual.data_ptr<acc_t<T>>() : nullptr;
  launch_tile_reduce<P, 1>(t, vec, ResidualOp<T, HAS_C>{a.data_ptr<T>(), bp, cp, rp, sigma, abs_metric, logical, seed, offset},
                           partials, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_cuda(
    const at::Tensor& a_in, const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& c_in,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, int64_t seed, int64_t offset, bool save_residual) {
  check_data(a_in, "a");
  at::Tensor b = value_or_undefined(b_in), c = value_or_undefined(c_in);
  if (b.defined()) check_like(b, a_in, "b", "a");
  if (c.defined()) check_like(c, a_in, "c", "a");
  check_coef(sigma, a_in, "sigma");
  check_coef(weight, a_in, "weight");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cuda: metric must be 0 (l2), 1 (l1) or 2 (pseudo_huber), got ", metric);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastat_cuda: reduction must be 0 (none), 1 (sum) or 2 (mean), got ", reduction);
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cuda: seed and offset must be >= 0, got ", seed, " and ", offset);
  c10::cuda::CUDAGuard guard(a_in.device());
  at::ScalarType dtype = a_in.scalar_type();
  if (b.defined()) dtype = c10::promoteTypes(dtype, b.scalar_type());
  if (c.defined()) dtype = c10::promoteTypes(dtype, c.scalar_type());
  const at::ScalarType acc = accumulation(dtype);
  at::Tensor a = cast(a_in, dtype);
  b = cast(b, dtype);
  c = cast(c, dtype);
  const Layout layout = work_layout({&a, &b, &c}, !b.defined());
  const int64_t batch = a.size(0), d = sample_numel(a);
  at::Tensor per_sample = at::empty({batch}, a.options().dtype(acc));
  at::Tensor loss = reduction == kReductionNone ? at::empty({batch}, a.options().dtype(acc)) : at::empty({}, a.options().dtype(acc));
  // r in the accumulation dtype: the backward rounds each gradient once, as the reference does.
  at::Tensor residual = save_residual ? empty_output(a, layout, acc) : at::empty({0}, a.options().dtype(acc));
  if (batch == 0) {
    if (reduction != kReductionNone) loss.zero_();
    return {loss, per_sample, residual};
  }
  const bool vec = aligned16({&a, &b, &c, save_residual ? &residual : nullptr});
  const LogicalIndex logical = logical_index(a, layout);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  FASTAT_DISPATCH(dtype, "fastat_cuda::residual_loss", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    const Tiling t = make_tiling(batch, d, vec ? P : 1);
    at::Tensor partials = partials_buffer(t, 1, a, acc == at::kDouble);
    A* pp = partials.data_ptr<A>();
    const Coef<A> cs = make_coef<A>(sigma, sigma_s), cw = make_coef<A>(weight, weight_s);
    const uint64_t sd = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
    if (c.defined()) {
      launch_residual<T, true>(t, vec, a, b, c, residual, save_residual, cs, metric == 1, logical, sd, off, pp, stream);
    } else {
      launch_residual<T, false>(t, vec, a, b, c, residual, save_residual, cs, metric == 1, logical, sd, off, pp, stream);
    }
    A* pl = loss.data_ptr<A>();
    const LossFin<A> fin{static_cast<int>(metric), d, static_cast<A>(huber_c), cw, per_sample.data_ptr<A>(),
                         reduction == kReductionNone ? pl : nullptr};
    if (reduction == kReductionNone) {
      launch_finalize<1>(t, pp, fin, stream);
    } else {
      launch_finalize_reduce<1>(t, pp, fin, pl, reduction == kReductionMean ? 1.0 / static_cast<double>(batch) : 1.0, stream);
    }
  });
  return {loss, per_sample, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& residual_in, const at::Tensor& per_sample_in,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, c10::optional<at::ScalarType> a_dtype,
    c10::optional<at::ScalarType> b_dtype, c10::optional<at::ScalarType> c_dtype) {
  check_data(residual_in, "residual");
  check_coef(sigma, residual_in, "sigma");
  check_coef(weight, residual_in, "weight");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cuda: metric must be 0, 1 or 2, got ", metric);
  const int64_t batch = residual_in.size(0);
  TORCH_CHECK(grad_loss_in.numel() == (reduction == kReductionNone ? batch : 1) && per_sample_in.numel() == batch,
              "fastat_cuda: grad_loss must have one value per sample for reduction none (else one), per_sample one per sample");
  c10::cuda::CUDAGuard guard(residual_in.device());
  at::Tensor residual = residual_in;
  const Layout layout = work_layout({&residual}, false);
  const at::ScalarType acc = residual.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "fastat_cuda: the residual is float32 or float64 (the accumulation dtype), got ", acc);
  const at::ScalarType dtype = gradient_dtype(acc, a_dtype, b_dtype, c_dtype);
  auto make = [&](bool want) { return want ? empty_output(residual, layout, dtype) : at::empty({0}, residual.options()); };
  at::Tensor ga = make(a_dtype.has_value()), gb = make(b_dtype.has_value()), gc = make(c_dtype.has_value());
  const int64_t n = residual.numel(), d = sample_numel(residual);
  if (n > 0 && (a_dtype || b_dtype || c_dtype)) {
    // grad_loss of reduction none may arrive expanded (stride 0, from a .sum()): read in place with its stride.
    const at::Tensor grad_loss = cast(grad_loss_in, acc).reshape({-1});
    const at::Tensor per_sample = cast(per_sample_in, acc).contiguous();
    const bool vec = aligned16({&residual, &ga, &gb, &gc});
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    FASTAT_DISPATCH(dtype, "fastat_cuda::residual_loss_backward", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      constexpr int P = pack_size<T>();
      launch_elementwise<P>(n, vec,
                            ResidualGradOp<T>{residual.data_ptr<A>(), grad_loss.data_ptr<A>(), per_sample.data_ptr<A>(),
                                              a_dtype ? ga.data_ptr<T>() : nullptr, b_dtype ? gb.data_ptr<T>() : nullptr,
                                              c_dtype ? gc.data_ptr<T>() : nullptr, make_coef<A>(sigma, sigma_s),
                                              make_coef<A>(weight, weight_s), static_cast<A>(huber_c),
                                              static_cast<A>(reduction == kReductionMean ? 1.0 / static_cast<double>(batch) : 1.0),
                                              static_cast<int>(metric), reduction == kReductionNone, SampleCursor(d),
                                              grad_loss.stride(0)},
                            stream);
    });
  }
  return {a_dtype ? cast(ga, *a_dtype) : ga, b_dtype ? cast(gb, *b_dtype) : gb, c_dtype ? cast(gc, *c_dtype) : gc};
}

}  // namespace fastat
