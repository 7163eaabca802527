// The Python module fastat._C_cuda: importing it registers the fastat_cuda::* ops (schemas + CUDA kernels).
// The only translation unit that includes torch/library.h; the kernels live in light .cu files (ops.h).
// No pybind11: a bare CPython module is enough, the ops are reached through torch.ops.fastat_cuda.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "ops.h"

TORCH_LIBRARY(fastat_cuda, m) {
  m.def("noisy_input(Tensor x0, Tensor noise, Tensor? alpha, Tensor? sigma, float alpha_s, float sigma_s, Tensor? delta) -> Tensor");
  m.def(
      "noisy_input_seeded(Tensor x0, int seed, int offset, Tensor? alpha, Tensor? sigma, float alpha_s, float sigma_s, "
      "Tensor? delta) -> Tensor");
  m.def("gaussian_noise(Tensor like, int seed, int offset, ScalarType dtype) -> Tensor");
  m.def("scale_per_sample(Tensor grad, Tensor? coef, float coef_s) -> Tensor");
  m.def(
      "pgd_step(Tensor delta, Tensor grad, Tensor? base, Tensor? step_size, Tensor? radius, float step_size_s, "
      "float radius_s, bool l2, bool normalize) -> (Tensor, Tensor)");
  m.def("random_perturbation(Tensor like, Tensor seed, Tensor? radius, float radius_s, bool l2, bool normal, ScalarType dtype) -> Tensor");
  m.def(
      "residual_loss(Tensor a, Tensor? b, Tensor? c, Tensor? k, float k_s, int metric, float huber_c, bool save_residual, "
      "int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "residual_loss_backward(Tensor grad_loss, Tensor residual, Tensor loss, Tensor? k, float k_s, int metric, float huber_c, "
      "bool need_a, bool need_b, bool need_c) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastat_cuda, CUDA, m) {
  m.impl("noisy_input", &fastat::noisy_input_cuda);
  m.impl("noisy_input_seeded", &fastat::noisy_input_seeded_cuda);
  m.impl("gaussian_noise", &fastat::gaussian_noise_cuda);
  m.impl("scale_per_sample", &fastat::scale_per_sample_cuda);
  m.impl("pgd_step", &fastat::pgd_step_cuda);
  m.impl("random_perturbation", &fastat::random_perturbation_cuda);
  m.impl("residual_loss", &fastat::residual_loss_cuda);
  m.impl("residual_loss_backward", &fastat::residual_loss_backward_cuda);
}

static struct PyModuleDef fastat_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                                "fastat's CUDA kernels; the ops live in torch.ops.fastat_cuda", -1, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* module = PyModule_Create(&fastat_cuda_module);
  if (module != nullptr) {
    // Build fact compared with the running torch by fastat._ext (an ABI mismatch warns instead of crashing later).
    PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION);
  }
  return module;
}
