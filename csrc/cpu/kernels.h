// Declarations of fastat's CPU kernels (implemented in the other csrc/cpu/*.cpp files, bound in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fastat_cpu {

at::Tensor noisy_input(const at::Tensor& x0, const at::Tensor& noise, const c10::optional<at::Tensor>& delta,
                       const c10::optional<at::Tensor>& alpha_t, double alpha, const c10::optional<at::Tensor>& sigma_t,
                       double sigma);

at::Tensor scale_by_sample(const at::Tensor& grad, const c10::optional<at::Tensor>& coef_t, double coef);

std::tuple<at::Tensor, at::Tensor> pgd_step(const at::Tensor& delta, const at::Tensor& grad,
                                            const c10::optional<at::Tensor>& step_t, double step,
                                            const c10::optional<at::Tensor>& radius_t, double radius, bool l2,
                                            bool normalize, const c10::optional<at::Tensor>& base);

std::tuple<at::Tensor, at::Tensor> residual_loss(const at::Tensor& a, const at::Tensor& b,
                                                 const c10::optional<at::Tensor>& c,
                                                 const c10::optional<at::Tensor>& k_t, double k, int64_t metric,
                                                 double huber_c, bool save_residual);

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_loss_backward(
    const at::Tensor& residual, const at::Tensor& grad_loss, const at::Tensor& loss,
    const c10::optional<at::Tensor>& k_t, double k, int64_t metric, double huber_c, bool need_a, bool need_b,
    bool need_c, at::ScalarType dtype);

}  // namespace fastat_cpu
