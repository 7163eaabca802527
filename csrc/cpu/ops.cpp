// Schemas and CPU registrations of the fastat_cpu operator library (torch.ops.fastat_cpu.*).
// Kernels live in the neighbouring .cpp files; this file only declares and binds.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY(fastat_cpu, m) {
  m.def("noisy_input(Tensor x0, Tensor noise, Tensor? delta, Tensor? alpha_t, float alpha, Tensor? sigma_t, "
        "float sigma) -> Tensor");
  m.def("scale_by_sample(Tensor grad, Tensor? coef_t, float coef) -> Tensor");
  m.def("pgd_step(Tensor delta, Tensor grad, Tensor? step_t, float step, Tensor? radius_t, float radius, bool l2, "
        "bool normalize, Tensor? base) -> (Tensor, Tensor)");
  m.def("residual_loss(Tensor a, Tensor b, Tensor? c, Tensor? k_t, float k, int metric, float huber_c, "
        "bool save_residual) -> (Tensor, Tensor)");
  m.def("residual_loss_backward(Tensor residual, Tensor grad_loss, Tensor loss, Tensor? k_t, float k, int metric, "
        "float huber_c, bool need_a, bool need_b, bool need_c, ScalarType dtype) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastat_cpu, CPU, m) {
  m.impl("noisy_input", &fastat_cpu::noisy_input);
  m.impl("scale_by_sample", &fastat_cpu::scale_by_sample);
  m.impl("pgd_step", &fastat_cpu::pgd_step);
  m.impl("residual_loss", &fastat_cpu::residual_loss);
  m.impl("residual_loss_backward", &fastat_cpu::residual_loss_backward);
}

// Lets setup.py's prebuilt `fastat._C` be imported as a module; the ops register when the library loads.
// The JIT build (fastat._ext) loads the same code with torch.ops.load_library and ignores this.
static struct PyModuleDef fastat_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastat CPU operator library", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastat_c_module); }
