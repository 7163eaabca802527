// Noise-injected input (docs/maths.md §4.1): x_t = alpha_b * x0 + sigma_b * noise (+ delta), one pass, fp32 accumulation,
// its backward, and seeded Gaussian noise (triton's tl.randn stream, see philox.cuh) generated in-kernel so it is
// never stored. The per-element code is the functors of noisy_input_ops.cuh, shared with csrc/cpu.
#include "common.cuh"
#include "noisy_input_ops.cuh"
#include "ops.h"

namespace fastat {

at::Tensor noisy_input_cuda(const at::Tensor& x0_in, const c10::optional<at::Tensor>& noise_in,
                            const c10::optional<at::Tensor>& delta_in, const c10::optional<at::Tensor>& alpha,
                            const c10::optional<at::Tensor>& sigma, double alpha_s, double sigma_s, int64_t seed,
                            int64_t offset, at::ScalarType dtype, const c10::optional<at::Tensor>& timesteps) {
  check_data(x0_in, "x0");
  at::Tensor noise = value_or_undefined(noise_in), delta = value_or_undefined(delta_in);
  if (noise.defined()) check_like(noise, x0_in, "noise", "x0");
  if (delta.defined()) check_like(delta, x0_in, "delta", "x0");
  check_coef(alpha, x0_in, "alpha", timesteps);
  check_coef(sigma, x0_in, "sigma", timesteps);
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cuda: seed and offset must be >= 0, got ", seed, " and ", offset);
  c10::cuda::CUDAGuard guard(x0_in.device());
  // Half-precision data (x0, noise) with fp32 delta and output, the training case: read as they are (Tin).
  const at::ScalarType data = x0_in.scalar_type();
  const bool mixed = dtype == at::kFloat && (data == at::kBFloat16 || data == at::kHalf) &&
                     (!noise.defined() || noise.scalar_type() == data) && (!delta.defined() || delta.scalar_type() == dtype);
  at::Tensor x0 = mixed ? x0_in : cast(x0_in, dtype);
  if (!mixed) noise = cast(noise, dtype);
  delta = cast(delta, dtype);
  const bool seeded = !noise.defined();
  const Layout layout = work_layout({&x0, &noise, &delta}, seeded);
  at::Tensor out = empty_output(x0, layout, dtype);
  const int64_t n = out.numel(), d = sample_numel(out);
  if (n == 0) return out;
  const bool vec = aligned16({&x0, &noise, &delta, &out});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (mixed) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(data, "fastat_cuda::noisy_input (mixed)", [&] {
      using Tin = scalar_t;
      launch_elementwise<pack_size<float>()>(
          n, vec,
          NoisyInputOp<float, Tin>{x0.data_ptr<Tin>(), seeded ? nullptr : noise.data_ptr<Tin>(),
                                   delta.defined() ? delta.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                   make_coef<float>(alpha, alpha_s, timesteps), make_coef<float>(sigma, sigma_s, timesteps),
                                   logical_index(out, layout),
                                   static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), SampleCursor(d)},
          stream);
    });
    return out;
  }
  FASTAT_DISPATCH(dtype, "fastat_cuda::noisy_input", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int P = pack_size<T>();
    launch_elementwise<P>(n, vec,
                          NoisyInputOp<T>{x0.data_ptr<T>(), seeded ? nullptr : noise.data_ptr<T>(),
                                          delta.defined() ? delta.data_ptr<T>() : nullptr, out.data_ptr<T>(),
                                          make_coef<A>(alpha, alpha_s, timesteps), make_coef<A>(sigma, sigma_s, timesteps),
                                          logical_index(out, layout),
                                          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), SampleCursor(d)},
                          stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> noisy_input_backward_cuda(const at::Tensor& grad_in, const c10::optional<at::Tensor>& alpha,
                                                             const c10::optional<at::Tensor>& sigma, double alpha_s,
                                                             double sigma_s, c10::optional<at::ScalarType> x0_dtype,
                                                             c10::optional<at::ScalarType> noise_dtype) {
  check_data(grad_in, "grad");
  check_coef(alpha, grad_in, "alpha");
  check_coef(sigma, grad_in, "sigma");
  c10::cuda::CUDAGuard guard(grad_in.device());
  at::Tensor grad = grad_in;
  const Layout layout = work_layout({&grad}, false);
  const at::ScalarType dtype = grad.scalar_type();
  auto make = [&](bool want) { return want ? empty_output(grad, layout, dtype) : at::empty({0}, grad.options()); };
  at::Tensor gx = make(x0_dtype.has_value()), gn = make(noise_dtype.has_value());
  const int64_t n = grad.numel(), d = sample_numel(grad);
  if (n > 0 && (x0_dtype || noise_dtype)) {
    const bool vec = aligned16({&grad, &gx, &gn});
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    FASTAT_DISPATCH(dtype, "fastat_cuda::noisy_input_backward", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      constexpr int P = pack_size<T>();
      launch_elementwise<P>(n, vec,
                            NoisyInputGradOp<T>{grad.data_ptr<T>(), x0_dtype ? gx.data_ptr<T>() : nullptr,
                                                noise_dtype ? gn.data_ptr<T>() : nullptr, make_coef<A>(alpha, alpha_s),
                                                make_coef<A>(sigma, sigma_s), SampleCursor(d)},
                            stream);
    });
  }
  return {x0_dtype ? cast(gx, *x0_dtype) : gx, noise_dtype ? cast(gn, *noise_dtype) : gn};
}

at::Tensor gaussian_noise_cuda(const at::Tensor& like, int64_t seed, int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(like.is_cuda() && like.dim() >= 1, "fastat_cuda: like must be a CUDA tensor with a batch dim, got ", like.device());
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cuda: seed and offset must be >= 0, got ", seed, " and ", offset);
  c10::cuda::CUDAGuard guard(like.device());
  const bool cl = is_channels_last(like);
  const at::MemoryFormat format =
      !cl ? at::MemoryFormat::Contiguous : (like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype).memory_format(format));
  if (out.numel() == 0) return out;
  const bool vec = aligned16({&out});
  const LogicalIndex logical = logical_index(out, Layout{!cl, cl});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTAT_DISPATCH(dtype, "fastat_cuda::gaussian_noise", [&] {
    constexpr int P = pack_size<scalar_t>();
    launch_elementwise<P>(out.numel(), vec,
                          GaussianOp<scalar_t>{out.data_ptr<scalar_t>(), logical, static_cast<uint64_t>(seed),
                                               static_cast<uint64_t>(offset)},
                          stream);
  });
  return out;
}

}  // namespace fastat
