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

template <typename scalar_t>
struct Outputs {
  scalar_t* ptr[3] = {nullptr, nullptr, nullptr};
  double sign[3] = {0.0, 0.0, 0.0};
  bool times_k[3] = {false, false, false};
  int count = 0;
  void add(scalar_t* p, double sgn, bool k) {
    ptr[count] = p;
    sign[count] = sgn;
    times_k[count] = k;
    ++count;
  }
};

template <typename scalar_t, bool kSign, int kCount>
void chunk_backward(const at::opmath_type<scalar_t>* __restrict__ pr, scalar_t* const* out,
                    const at::opmath_type<scalar_t>* scale, int64_t b, int64_t e) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict__ p0 = out[0];
  scalar_t* __restrict__ p1 = kCount > 1 ? out[1] : nullptr;
  scalar_t* __restrict__ p2 = kCount > 2 ? out[2] : nullptr;
  const acc_t s0 = scale[0], s1 = kCount > 1 ? scale[1] : acc_t(0), s2 = kCount > 2 ? scale[2] : acc_t(0);
  for (int64_t i = b; i < e; ++i) {
    const acc_t r = pr[i];
    const acc_t f = kSign ? static_cast<acc_t>((r > acc_t(0)) - (r < acc_t(0))) : r;
    p0[i] = static_cast<scalar_t>(s0 * f);
    if (kCount > 1) p1[i] = static_cast<scalar_t>(s1 * f);
    if (kCount > 2) p2[i] = static_cast<scalar_t>(s2 * f);
  }
}

template <typename scalar_t>
using GradFn = void (*)(const at::opmath_type<scalar_t>*, scalar_t* const*, const at::opmath_type<scalar_t>*,
                        int64_t, int64_t);

template <typename scalar_t>
GradFn<scalar_t> pick_backward(bool sign, int count) {
  if (sign) {
    if (count == 1) return chunk_backward<scalar_t, true, 1>;
    if (count == 2) return chunk_backward<scalar_t, true, 2>;
    return chunk_backward<scalar_t, true, 3>;
  }
  if (count == 1) return chunk_backward<scalar_t, false, 1>;
  if (count == 2) return chunk_backward<scalar_t, false, 2>;
  return chunk_backward<scalar_t, false, 3>;
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
    // Up to three outputs, each m_j * s_i * f(r): m = +1 (a), -1 (b), -k_i (c). Packing the needed ones
    // first lets one loop per output count (and per f) vectorise with no per-element branches.
    Outputs<scalar_t> out;
    if (need_a) out.add(ga.mutable_data_ptr<scalar_t>(), 1.0, false);
    if (need_b) out.add(gb.mutable_data_ptr<scalar_t>(), -1.0, false);
    if (need_c) out.add(gc.mutable_data_ptr<scalar_t>(), -1.0, true);
    if (out.count == 0 || split.items() == 0) return;
    const acc_t* pr = residual.const_data_ptr<acc_t>();
    const GradFn<scalar_t> fn = pick_backward<scalar_t>(metric == 1, out.count);
    at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t sample = item / split.chunks;
        acc_t scale[3];
        for (int j = 0; j < out.count; ++j)
          scale[j] = static_cast<acc_t>(out.sign[j] * s[sample] * (out.times_k[j] ? kc[sample] : 1.0));
        fn(pr, out.ptr, scale, split.begin(item), split.end(item));
      }
    });
  });
  return {ga, gb, gc};
}

}  // namespace fastat_cpu
