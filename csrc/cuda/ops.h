// Host entry points of the CUDA kernels (defined in the .cu files, registered in bindings.cpp).
// Per-sample coefficients come as an optional contiguous [B] fp32/fp64 tensor plus a scalar used when it is absent.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace fastat {

// noisy_input.cu
at::Tensor noisy_input_cuda(const at::Tensor& x0, const at::Tensor& noise, const c10::optional<at::Tensor>& alpha,
                            const c10::optional<at::Tensor>& sigma, double alpha_s, double sigma_s,
                            const c10::optional<at::Tensor>& delta);
at::Tensor noisy_input_seeded_cuda(const at::Tensor& x0, int64_t seed, int64_t offset, const c10::optional<at::Tensor>& alpha,
                                   const c10::optional<at::Tensor>& sigma, double alpha_s, double sigma_s,
                                   const c10::optional<at::Tensor>& delta);
at::Tensor gaussian_noise_cuda(const at::Tensor& like, int64_t seed, int64_t offset, at::ScalarType dtype);
at::Tensor scale_per_sample_cuda(const at::Tensor& grad, const c10::optional<at::Tensor>& coef, double coef_s);

// perturbation.cu
// Returns (delta', base + delta'); the second is empty ([0]) when base is None.
std::tuple<at::Tensor, at::Tensor> pgd_step_cuda(const at::Tensor& delta, const at::Tensor& grad, const c10::optional<at::Tensor>& base,
                                                 const c10::optional<at::Tensor>& step_size, const c10::optional<at::Tensor>& radius,
                                                 double step_size_s, double radius_s, bool l2, bool normalize);
at::Tensor random_perturbation_cuda(const at::Tensor& like, const at::Tensor& seed, const c10::optional<at::Tensor>& radius,
                                    double radius_s, bool l2, bool normal, at::ScalarType dtype);

// losses.cu: r = a - b - c / k_b (c optional; b = seeded noise when seed >= 0), metric 0 = mean(r^2), 1 = mean(|r|), 2 = sqrt(sum r^2 + huber_c^2) - huber_c.
std::tuple<at::Tensor, at::Tensor> residual_loss_cuda(const at::Tensor& a, const c10::optional<at::Tensor>& b,
                                                      const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& k,
                                                      double k_s, int64_t metric, double huber_c, bool save_residual, int64_t seed,
                                                      int64_t offset);
std::vector<at::Tensor> residual_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& loss,
                                                    const c10::optional<at::Tensor>& k, double k_s, int64_t metric, double huber_c,
                                                    bool need_a, bool need_b, bool need_c);

}  // namespace fastat
