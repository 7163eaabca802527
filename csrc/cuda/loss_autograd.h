// The autograd kernel of fastat::residual_loss in C++, for the compiled backends (cpp, cuda): the forward kernel,
// then, when a, b or c requires a gradient, one graph node whose backward calls the backward kernel. It is what the
// op's Python autograd Function (fastat/ops/losses/op.py: ResidualLossFunction) does, without the Python: the same
// arguments (the op's schema), the same gradients (da, db, dc from the stored residual), differentiable once.
// Measured with callgrind on the CPU build, 8x3x8x8 fp32, equivariant_mse forward + backward: see docs/design.md.
//
// Outputs: loss is differentiable; per_sample and residual are by-products that never require grad (the public
// functions return the loss only). The node keeps residual, per_sample, sigma and weight (no version check, as the
// Python Function, which kept them as plain references: none of them is a user tensor that could be written).
// Host-only C++ (torch/csrc/autograd): included by the library's binding file, never by a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <optional>
#include <tuple>

namespace fastat::autograd {

using LossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardKernel = LossOut (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double,
                                   int64_t, double, int64_t, std::optional<at::ScalarType>,
                                   std::optional<at::ScalarType>, std::optional<at::ScalarType>);

// With create_graph=True the gradients come back differentiable only to raise when differentiated again (unlike
// torch's once_differentiable, also when the incoming gradient has no graph: a second derivative through the
// loss, e.g. a gradient penalty, must raise rather than silently lose the loss's own second-order term).
inline torch::autograd::variable_list once_differentiable(torch::autograd::variable_list&& grads) {
  torch::autograd::variable_list fakes;
  fakes.reserve(grads.size());
  for (auto& g : grads) {
    at::Tensor fake;
    if (g.defined()) {
      fake = g.detach();
      fake.set_requires_grad(true);
    }
    fakes.push_back(std::move(fake));
  }
  torch::autograd::DelayedError error(
      "fastat: the fused losses (equivariant_mse, equivariance_regularizer, consistency_distance) are differentiable "
      "once; a second derivative through them needs the reference: fastat.use_backend('torch')",
      static_cast<int64_t>(fakes.size()));
  return error.apply(std::move(fakes));
}

template <BackwardKernel Backward, const char* BackwardLabel>
struct ResidualLossBackward final : torch::autograd::Node {
  at::Tensor residual, per_sample;
  std::optional<at::Tensor> sigma, weight;
  double sigma_s = 1.0, weight_s = 1.0, huber_c = 0.0;
  int64_t metric = 0, reduction = 0;
  std::optional<at::ScalarType> dtypes[3];  // a, b, c (none: the operand is absent)

  std::string name() const override { return "fastat::residual_loss_backward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(3);
    const at::Tensor& grad_loss = grads[0];
    std::optional<at::ScalarType> wanted[3];
    bool any = false;
    for (size_t i = 0; i < 3; ++i) {
      if (dtypes[i].has_value() && task_should_compute_output(i)) {
        wanted[i] = dtypes[i];
        any = true;
      }
    }
    if (!grad_loss.defined() || !any) return out;
    TORCH_CHECK(residual.defined(), "fastat::residual_loss: its graph was already freed (backward ran once)");
    {
      RECORD_FUNCTION(BackwardLabel, c10::ArrayRef<const c10::IValue>{});
      c10::impl::ExcludeDispatchKeyGuard below(c10::autograd_dispatch_keyset);
      std::tie(out[0], out[1], out[2]) = Backward(grad_loss, residual, per_sample, sigma, weight, sigma_s, weight_s,
                                                  metric, huber_c, reduction, wanted[0], wanted[1], wanted[2]);
    }
    for (size_t i = 0; i < 3; ++i) {
      if (!wanted[i].has_value()) out[i] = at::Tensor();
    }
    if (torch::autograd::GradMode::is_enabled()) return once_differentiable(std::move(out));
    return out;
  }

  void release_variables() override {
    residual.reset();
    per_sample.reset();
    sigma.reset();
    weight.reset();
  }
};

// The differentiable residual_loss of one backend, with the op's schema: Forward and Backward are its kernels, recorded
// for torch.profiler under Label and BackwardLabel ("fastat_cpp::residual_loss", "..._backward"), as their direct
// entries are.
template <auto Forward, BackwardKernel Backward, const char* Label, const char* BackwardLabel>
LossOut residual_loss(const at::Tensor& a, const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                      const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight, double sigma_s,
                      double weight_s, int64_t metric, double huber_c, int64_t reduction, int64_t seed, int64_t offset,
                      bool save_residual) {
  const bool grad = torch::autograd::compute_requires_grad(a, b, c);
  LossOut out;
  {
    RECORD_FUNCTION(Label, c10::ArrayRef<const c10::IValue>{});
    c10::impl::ExcludeDispatchKeyGuard below(c10::autograd_dispatch_keyset);
    out = Forward(a, b, c, sigma, weight, sigma_s, weight_s, metric, huber_c, reduction, seed, offset,
                  save_residual || grad);
  }
  if (!grad) return out;
  auto node = c10::make_intrusive<ResidualLossBackward<Backward, BackwardLabel>>();
  node->set_next_edges(torch::autograd::collect_next_edges(a, b, c));
  node->residual = std::get<2>(out);
  node->per_sample = std::get<1>(out);
  node->sigma = sigma;
  node->weight = weight;
  node->sigma_s = sigma_s;
  node->weight_s = weight_s;
  node->huber_c = huber_c;
  node->metric = metric;
  node->reduction = reduction;
  node->dtypes[0] = a.scalar_type();
  if (b.has_value() && b->defined()) node->dtypes[1] = b->scalar_type();
  if (c.has_value() && c->defined()) node->dtypes[2] = c->scalar_type();
  torch::autograd::set_history(std::get<0>(out), node);
  return out;
}

}  // namespace fastat::autograd
