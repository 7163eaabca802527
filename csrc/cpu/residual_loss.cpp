// Per-sample residual losses (SPEC 4.3), the common core of equivariant_mse, equivariance_regularizer
// and consistency_distance:
//     r = a - (b + k_i * c)        (c optional; k_i = 1/sigma_i for P1's target, 1 for P2's omega)
//     metric 0 (mean square):   loss_i = sum(r^2) / D          dloss/dr = 2 r / D
//     metric 1 (mean abs):      loss_i = sum(|r|) / D          dloss/dr = sign(r) / D
//     metric 2 (pseudo-Huber):  loss_i = sqrt(sum(r^2) + c^2) - c    dloss/dr = r / (loss_i + c)
// The forward reads a, b, c once and, when a gradient is needed, writes r (fp32, fp64 for fp64) so the
// backward is one pass over r that writes grad_a = s_i f(r), grad_b = -grad_a, grad_c = -k_i grad_a.
#include "common.h"
#include "kernels.h"

namespace fastat_cpu {
namespace {

template <typename scalar_t, bool kHasC, int kMetric>
double chunk_forward(const scalar_t* pa, const scalar_t* pb, const scalar_t* pc, at::opmath_type<scalar_t> k,
                     at::opmath_type<scalar_t>* pr, int64_t b, int64_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t lanes[kLanes] = {};
  auto residual = [&](int64_t i) {
    const acc_t goal = kHasC ? static_cast<acc_t>(pb[i]) + k * static_cast<acc_t>(pc[i]) : static_cast<acc_t>(pb[i]);
    return static_cast<acc_t>(pa[i]) - goal;
  };
  auto term = [](acc_t r) { return kMetric == 1 ? std::abs(r) : r * r; };
  int64_t i = b;
  if (pr != nullptr) {
    for (; i + kLanes <= e; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const acc_t r = residual(i + l);
        pr[i + l] = r;
        lanes[l] += term(r);
      }
    for (int l = 0; i < e; ++i, ++l) {
      const acc_t r = residual(i);
      pr[i] = r;
      lanes[l] += term(r);
    }
  } else {
    for (; i + kLanes <= e; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += term(residual(i + l));
    for (int l = 0; i < e; ++i, ++l) lanes[l] += term(residual(i));
  }
  return sum_lanes(lanes);
}

template <typename scalar_t>
using ChunkFn = double (*)(const scalar_t*, const scalar_t*, const scalar_t*, at::opmath_type<scalar_t>,
                           at::opmath_type<scalar_t>*, int64_t, int64_t);

template <typename scalar_t>
ChunkFn<scalar_t> pick_forward(bool has_c, int64_t metric) {
  if (has_c) {
    if (metric == 1) return chunk_forward<scalar_t, true, 1>;
    return chunk_forward<scalar_t, true, 0>;  // metrics 0 and 2 both sum r^2
  }
  if (metric == 1) return chunk_forward<scalar_t, false, 1>;
  return chunk_forward<scalar_t, false, 0>;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> residual_loss(const at::Tensor& a_in, const at::Tensor& b_in,
                                                 const c10::optional<at::Tensor>& c_in,
                                                 const c10::optional<at::Tensor>& k_t, double k, int64_t metric,
                                                 double huber_c, bool save_residual) {
  at::Tensor a = a_in, b = b_in;
  at::Tensor c = c_in.has_value() ? *c_in : at::Tensor();
  TORCH_CHECK(a.dim() >= 1, "fastat_cpu.residual_loss: inputs need a batch dimension");
  TORCH_CHECK(metric >= 0 && metric <= 2, "fastat_cpu.residual_loss: metric must be 0, 1 or 2, got ", metric);
  check_same_dtype(a, b, "a", "b");
  if (c.defined()) check_same_dtype(a, c, "a", "c");
  make_flat({&a, &b, &c});
  const int64_t batch = a.size(0), numel = sample_numel(a);
  const Coef kc = make_coef(k_t, k, batch, "k");
  const at::ScalarType acc_type = at::toOpMathType(a.scalar_type());
  at::Tensor loss = at::empty({batch}, a.options().dtype(acc_type));
  at::Tensor residual = save_residual ? at::empty_like(a, a.options().dtype(acc_type)) : at::empty({0}, a.options().dtype(acc_type));
  const Split split = make_split(batch, numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fastat_cpu_residual_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pc = c.defined() ? c.const_data_ptr<scalar_t>() : nullptr;
    acc_t* pr = save_residual ? residual.mutable_data_ptr<acc_t>() : nullptr;
    const ChunkFn<scalar_t> fn = pick_forward<scalar_t>(pc != nullptr, metric);
    std::vector<double> partial(split.items());
    at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item)
        partial[item] = fn(pa, pb, pc, static_cast<acc_t>(kc[item / split.chunks]), pr, split.begin(item),
                           split.end(item));
    });
    acc_t* pl = loss.mutable_data_ptr<acc_t>();
    const double denom = static_cast<double>(std::max<int64_t>(numel, 1));
    for (int64_t i = 0; i < batch; ++i) {
      double s = 0.0;
      for (int64_t ch = 0; ch < split.chunks; ++ch) s += partial[i * split.chunks + ch];
      pl[i] = static_cast<acc_t>(metric == 2 ? std::sqrt(s + huber_c * huber_c) - huber_c : s / denom);
    }
  });
  return {loss, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_backward(
    const at::Tensor& residual_in, const at::Tensor& grad_loss, const at::Tensor& loss,
    const c10::optional<at::Tensor>& k_t, double k, int64_t metric, double huber_c, bool need_a, bool need_b,
    bool need_c, at::ScalarType dtype) {
  at::Tensor residual = residual_in;
  TORCH_CHECK(residual.dim() >= 1, "fastat_cpu.residual_loss_backward: residual needs a batch dimension");
  TORCH_CHECK(residual.scalar_type() == at::toOpMathType(dtype), "fastat_cpu.residual_loss_backward: residual dtype ",
              residual.scalar_type(), " does not match the accumulation type of ", dtype);
  make_flat({&residual});
  const int64_t batch = residual.size(0), numel = sample_numel(residual);
  const Coef gl = make_coef(grad_loss, 0.0, batch, "grad_loss");
  const Coef kc = make_coef(k_t, k, batch, "k");
  std::vector<double> s(batch);
  {
    const Coef l = metric == 2 ? make_coef(loss, 0.0, batch, "loss") : Coef{};
    const double denom = static_cast<double>(std::max<int64_t>(numel, 1));
    for (int64_t i = 0; i < batch; ++i)
      s[i] = metric == 0 ? 2.0 * gl[i] / denom : metric == 1 ? gl[i] / denom : gl[i] / (l[i] + huber_c);
  }
  auto make = [&](bool need) {
    return need ? at::empty_like(residual, residual.options().dtype(dtype)) : at::empty({0}, residual.options().dtype(dtype));
  };
  at::Tensor ga = make(need_a), gb = make(need_b), gc = make(need_c);
  const Split split = make_split(batch, numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpu_residual_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* pr = residual.const_data_ptr<acc_t>();
    scalar_t* pa = need_a ? ga.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pb = need_b ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pc = need_c ? gc.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t sample = item / split.chunks, b = split.begin(item), e = split.end(item);
        const acc_t si = static_cast<acc_t>(s[sample]), ki = static_cast<acc_t>(kc[sample]);
        for (int64_t i = b; i < e; ++i) {
          const acc_t r = pr[i];
          const acc_t f = metric == 1 ? static_cast<acc_t>((r > acc_t(0)) - (r < acc_t(0))) : r;
          const acc_t g = si * f;
          if (pa) pa[i] = static_cast<scalar_t>(g);
          if (pb) pb[i] = static_cast<scalar_t>(-g);
          if (pc) pc[i] = static_cast<scalar_t>(-(ki * g));
        }
      }
    });
  });
  return {ga, gb, gc};
}

}  // namespace fastat_cpu
