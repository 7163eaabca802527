// Noise-injected input (SPEC 4.1): x_t = alpha_b * x0 + sigma_b * noise (+ delta), one pass, fp32 accumulation,
// plus seeded Gaussian noise (triton's tl.randn stream, see philox.cuh) generated in-kernel so it is never stored.
#include "common.cuh"
#include "noisy_input_ops.cuh"
#include "ops.h"
#include "philox.cuh"

namespace fastat {
namespace {

at::Tensor noisy_input_impl(const at::Tensor& x0_in, const c10::optional<at::Tensor>& noise_in, bool seeded, int64_t seed,
                            int64_t offset, const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& sigma,
                            double alpha_s, double sigma_s, const c10::optional<at::Tensor>& delta_in) {
  check_data(x0_in, "x0");
  const bool has_delta = delta_in.has_value() && delta_in->defined();
  if (!seeded) check_same(*noise_in, x0_in, "noise", "x0");
  if (has_delta) check_same(*delta_in, x0_in, "delta", "x0");
  check_coef(alpha, x0_in, "alpha");
  check_coef(sigma, x0_in, "sigma");
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cuda: seed and offset must be >= 0, got ", seed, " and ", offset);
  c10::cuda::CUDAGuard guard(x0_in.device());

  at::Tensor noise_t = seeded ? at::Tensor() : *noise_in;
  at::Tensor delta_t = has_delta ? *delta_in : at::Tensor();
  // Seeded noise is indexed by the logical (row-major) element index, so that form runs on contiguous tensors.
  const bool keep = !seeded && shares_batch_major_layout({&x0_in, &noise_t, &delta_t});
  at::Tensor x0 = seeded ? x0_in.contiguous() : batch_major(x0_in, keep);
  noise_t = batch_major(noise_t, keep);
  delta_t = seeded ? (has_delta ? delta_t.contiguous() : delta_t) : batch_major(delta_t, keep);
  at::Tensor out = at::empty_like(x0);
  const int64_t n = x0.numel();
  const int64_t d = per_sample_numel(x0);
  const bool vec = aligned16({&x0, &noise_t, &delta_t, &out});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  FASTAT_DISPATCH(x0.scalar_type(), "fastat_cuda::noisy_input", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* nz = seeded ? nullptr : noise_t.data_ptr<T>();
    const T* dl = has_delta ? delta_t.data_ptr<T>() : nullptr;
    const Coef<A> ca = make_coef<A>(alpha, alpha_s), cs = make_coef<A>(sigma, sigma_s);
    const uint64_t sd = static_cast<uint64_t>(seed), off = static_cast<uint64_t>(offset);
    constexpr int P = pack_size<T>();
    launch_elementwise<P>(n, vec, NoisyInputOp<T>{x0.data_ptr<T>(), nz, dl, out.data_ptr<T>(), ca, cs, d, seeded, sd, off}, stream);
  });
  return out;
}

}  // namespace

at::Tensor noisy_input_cuda(const at::Tensor& x0, const at::Tensor& noise, const c10::optional<at::Tensor>& alpha,
                            const c10::optional<at::Tensor>& sigma, double alpha_s, double sigma_s,
                            const c10::optional<at::Tensor>& delta) {
  return noisy_input_impl(x0, noise, false, 0, 0, alpha, sigma, alpha_s, sigma_s, delta);
}

at::Tensor noisy_input_seeded_cuda(const at::Tensor& x0, int64_t seed, int64_t offset, const c10::optional<at::Tensor>& alpha,
                                   const c10::optional<at::Tensor>& sigma, double alpha_s, double sigma_s,
                                   const c10::optional<at::Tensor>& delta) {
  return noisy_input_impl(x0, c10::nullopt, true, seed, offset, alpha, sigma, alpha_s, sigma_s, delta);
}

at::Tensor gaussian_noise_cuda(const at::Tensor& like, int64_t seed, int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(like.is_cuda(), "fastat_cuda: like must be a CUDA tensor, got ", like.device());
  TORCH_CHECK(seed >= 0 && offset >= 0, "fastat_cuda: seed and offset must be >= 0, got ", seed, " and ", offset);
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype));  // contiguous: flat index = logical index
  const bool vec = aligned16({&out});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTAT_DISPATCH(dtype, "fastat_cuda::gaussian_noise", [&] {
    constexpr int P = pack_size<scalar_t>();
    launch_elementwise<P>(out.numel(), vec,
                          GaussianOp<scalar_t>{out.data_ptr<scalar_t>(), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)},
                          stream);
  });
  return out;
}

at::Tensor scale_per_sample_cuda(const at::Tensor& g_in, const c10::optional<at::Tensor>& coef, double coef_s) {
  check_data(g_in, "grad");
  check_coef(coef, g_in, "coef");
  c10::cuda::CUDAGuard guard(g_in.device());
  at::Tensor g = batch_major(g_in, shares_batch_major_layout({&g_in}));
  at::Tensor out = at::empty_like(g);
  const bool vec = aligned16({&g, &out});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTAT_DISPATCH(g.scalar_type(), "fastat_cuda::scale_per_sample", [&] {
    using A = acc_t<scalar_t>;
    constexpr int P = pack_size<scalar_t>();
    launch_elementwise<P>(g.numel(), vec,
                          ScaleOp<scalar_t>{g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), make_coef<A>(coef, coef_s), per_sample_numel(g)},
                          stream);
  });
  return out;
}

}  // namespace fastat
