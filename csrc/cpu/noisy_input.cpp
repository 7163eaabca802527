// Noise-injected input (SPEC 4.1): x_t = alpha_i * x0 + sigma_i * noise (+ delta), one pass, fp32 math
// for fp16/bf16/fp32 (fp64 for fp64), and the per-sample scaling used by its backward.
#include "common.h"
#include "kernels.h"

namespace fastat_cpu {

at::Tensor noisy_input(const at::Tensor& x0_in, const at::Tensor& noise_in, const c10::optional<at::Tensor>& delta_in,
                       const c10::optional<at::Tensor>& alpha_t, double alpha, const c10::optional<at::Tensor>& sigma_t,
                       double sigma) {
  at::Tensor x0 = x0_in, noise = noise_in;
  at::Tensor delta = delta_in.has_value() ? *delta_in : at::Tensor();
  TORCH_CHECK(x0.dim() >= 1, "fastat_cpu.noisy_input: x0 needs a batch dimension");
  check_same_dtype(x0, noise, "x0", "noise");
  if (delta.defined()) check_same_dtype(x0, delta, "x0", "delta");
  make_flat({&x0, &noise, &delta});
  const int64_t batch = x0.size(0), numel = sample_numel(x0);
  const Coef a = make_coef(alpha_t, alpha, batch, "alpha"), s = make_coef(sigma_t, sigma, batch, "sigma");
  at::Tensor out = at::empty_like(x0);
  const Split split = make_split(batch, numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "fastat_cpu_noisy_input", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x0.const_data_ptr<scalar_t>();
    const scalar_t* pn = noise.const_data_ptr<scalar_t>();
    const scalar_t* pd = delta.defined() ? delta.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t sample = item / split.chunks, b = split.begin(item), e = split.end(item);
        const acc_t ai = static_cast<acc_t>(a[sample]), si = static_cast<acc_t>(s[sample]);
        if (pd != nullptr) {
          for (int64_t k = b; k < e; ++k)
            po[k] = static_cast<scalar_t>(ai * static_cast<acc_t>(px[k]) + si * static_cast<acc_t>(pn[k]) +
                                          static_cast<acc_t>(pd[k]));
        } else {
          for (int64_t k = b; k < e; ++k)
            po[k] = static_cast<scalar_t>(ai * static_cast<acc_t>(px[k]) + si * static_cast<acc_t>(pn[k]));
        }
      }
    });
  });
  return out;
}

at::Tensor scale_by_sample(const at::Tensor& grad_in, const c10::optional<at::Tensor>& coef_t, double coef) {
  at::Tensor grad = grad_in;
  TORCH_CHECK(grad.dim() >= 1, "fastat_cpu.scale_by_sample: grad needs a batch dimension");
  make_flat({&grad});
  const int64_t batch = grad.size(0), numel = sample_numel(grad);
  const Coef c = make_coef(coef_t, coef, batch, "coef");
  at::Tensor out = at::empty_like(grad);
  const Split split = make_split(batch, numel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastat_cpu_scale_by_sample", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, split.items(), split.grain(), [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const acc_t ci = static_cast<acc_t>(c[item / split.chunks]);
        for (int64_t k = split.begin(item), e = split.end(item); k < e; ++k)
          po[k] = static_cast<scalar_t>(ci * static_cast<acc_t>(pg[k]));
      }
    });
  });
  return out;
}

}  // namespace fastat_cpu
