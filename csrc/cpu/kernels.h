// Declarations of fastat's CPU kernels: one function per operator, with the operator's schema (fastat/_dispatch.py
// defines it once for every backend; the registration in ops.cpp checks these signatures against it).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastat_cpu {

// noisy_input.cpp
at::Tensor noisy_input(const at::Tensor& x0, const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& delta,
                       const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& sigma, double alpha_s,
                       double sigma_s, int64_t seed, int64_t offset, at::ScalarType dtype,
                       const c10::optional<at::Tensor>& timesteps);
std::tuple<at::Tensor, at::Tensor> noisy_input_backward(const at::Tensor& grad, const c10::optional<at::Tensor>& alpha,
                                                        const c10::optional<at::Tensor>& sigma, double alpha_s,
                                                        double sigma_s, c10::optional<at::ScalarType> x0_dtype,
                                                        c10::optional<at::ScalarType> noise_dtype);
at::Tensor gaussian_noise(const at::Tensor& like, int64_t seed, int64_t offset, at::ScalarType dtype);

// perturbation.cpp
std::tuple<at::Tensor, at::Tensor> pgd_step(const at::Tensor& delta, const at::Tensor& grad,
                                            const c10::optional<at::Tensor>& base,
                                            const c10::optional<at::Tensor>& step_size,
                                            const c10::optional<at::Tensor>& radius, double step_size_s,
                                            double radius_s, bool l2, bool normalize);
at::Tensor random_perturbation(const at::Tensor& like, const at::Tensor& seed, const c10::optional<at::Tensor>& radius,
                               double radius_s, bool l2, bool normal, at::ScalarType dtype);

// losses.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss(
    const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& c,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, int64_t seed, int64_t offset, bool save_residual);
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_backward(
    const at::Tensor& grad_loss, const at::Tensor& residual, const at::Tensor& per_sample,
    const c10::optional<at::Tensor>& sigma, const c10::optional<at::Tensor>& weight, double sigma_s, double weight_s,
    int64_t metric, double huber_c, int64_t reduction, c10::optional<at::ScalarType> a_dtype,
    c10::optional<at::ScalarType> b_dtype, c10::optional<at::ScalarType> c_dtype);

}  // namespace fastat_cpu
