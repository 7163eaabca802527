// fastat_cpp::noisy_input, noisy_input_backward and gaussian_noise: the functors of csrc/cuda/noisy_input_ops.cuh
// (the same per-element code as the CUDA kernels) run by the CPU launch templates.
#include <ATen/Dispatch.h>

#include "host_common.h"
#include "kernels.h"
#include "launch.h"
#include "noisy_input_ops.cuh"

namespace fastat_cpu {

using fastat::Layout;
using fastat::SampleCursor;

at::Tensor noisy_input(const at::Tensor& x0_in, const c10::optional<at::Tensor>& noise_in, const c10::optional<at::Tensor>& delta_in,
                       const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& sigma, double alpha_s,
                       double sigma_s, int64_t seed, int64_t offset, at::ScalarType dtype,
                       const c10::optional<at::Tensor>& timesteps) {
  TORCH_CHECK(x0_in.dim() >= 1, "fastat_cpp::noisy_input: x0 needs a batch dimension");
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cpp::noisy_input: seed and offset must be >= 0");
  fastat::check_coef(alpha, x0_in, "alpha", timesteps);
  fastat::check_coef(sigma, x0_in, "sigma", timesteps);
  fastat::check_coef_values(alpha, "alpha", fastat::Sign::kAny);
  fastat::check_coef_values(sigma, "sigma", fastat::Sign::kAny);
  at::Tensor x0 = fastat::cast(x0_in, dtype);
  at::Tensor noise = fastat::cast(fastat::value_or_undefined(noise_in), dtype);
  at::Tensor delta = fastat::cast(fastat::value_or_undefined(delta_in), dtype);
  const bool seeded = !noise.defined();
  const Layout layout = fastat::work_layout({&x0, &noise, &delta}, seeded);
  at::Tensor out = fastat::empty_output(x0, layout, dtype);
  const int64_t n = out.numel(), d = fastat::sample_numel(out);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::noisy_input", [&] {
    using T = scalar_t;
    using A = fastat::acc_t<T>;
    elementwise(n, d, fastat::NoisyInputOp<T>{x0.const_data_ptr<T>(), seeded ? nullptr : noise.const_data_ptr<T>(),
                                           delta.defined() ? delta.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(),
                                           fastat::make_coef<A>(alpha, alpha_s, timesteps),
                                           fastat::make_coef<A>(sigma, sigma_s, timesteps),
                                           fastat::logical_index(out, layout), static_cast<uint64_t>(seed),
                                           static_cast<uint64_t>(offset), SampleCursor(d)});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> noisy_input_backward(const at::Tensor& grad_in, const c10::optional<at::Tensor>& alpha,
                                                        const c10::optional<at::Tensor>& sigma, double alpha_s,
                                                        double sigma_s, c10::optional<at::ScalarType> x0_dtype,
                                                        c10::optional<at::ScalarType> noise_dtype) {
  TORCH_CHECK(grad_in.dim() >= 1, "fastat_cpp::noisy_input_backward: grad needs a batch dimension");
  fastat::check_coef(alpha, grad_in, "alpha");
  fastat::check_coef(sigma, grad_in, "sigma");
  at::Tensor grad = grad_in;
  const Layout layout = fastat::work_layout({&grad}, false);
  const at::ScalarType dtype = grad.scalar_type();
  auto make = [&](bool want) { return want ? fastat::empty_output(grad, layout, dtype) : at::empty({0}, grad.options()); };
  at::Tensor gx = make(x0_dtype.has_value()), gn = make(noise_dtype.has_value());
  const int64_t n = grad.numel(), d = fastat::sample_numel(grad);
  if (n > 0 && (x0_dtype || noise_dtype)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::noisy_input_backward", [&] {
      using T = scalar_t;
      using A = fastat::acc_t<T>;
      elementwise(n, d, fastat::NoisyInputGradOp<T>{grad.const_data_ptr<T>(), x0_dtype ? gx.mutable_data_ptr<T>() : nullptr,
                                                 noise_dtype ? gn.mutable_data_ptr<T>() : nullptr,
                                                 fastat::make_coef<A>(alpha, alpha_s), fastat::make_coef<A>(sigma, sigma_s),
                                                 SampleCursor(d)});
    });
  }
  return {x0_dtype ? fastat::cast(gx, *x0_dtype) : gx, noise_dtype ? fastat::cast(gn, *noise_dtype) : gn};
}

at::Tensor gaussian_noise(const at::Tensor& like, int64_t seed, int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(like.dim() >= 1, "fastat_cpp::gaussian_noise: like needs a batch dimension");
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cpp::gaussian_noise: seed and offset must be >= 0");
  const bool cl = fastat::is_channels_last(like);
  const at::MemoryFormat format =
      !cl ? at::MemoryFormat::Contiguous : (like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype).memory_format(format));
  const int64_t n = out.numel(), d = fastat::sample_numel(out);
  if (n == 0) return out;
  const fastat::LogicalIndex logical = fastat::logical_index(out, Layout{!cl, cl});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastat_cpp::gaussian_noise", [&] {
    elementwise(n, d, fastat::GaussianOp<scalar_t>{out.mutable_data_ptr<scalar_t>(), logical, static_cast<uint64_t>(seed),
                                                static_cast<uint64_t>(offset)});
  });
  return out;
}

}  // namespace fastat_cpu
