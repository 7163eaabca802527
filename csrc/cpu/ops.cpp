// Registration of the CPU kernels for the operators of the fastat_cpp namespace. The schemas are not here: fastat
// defines each operator once, in Python (fastat/_dispatch.py), for every backend; this library only contributes
// kernels, and the dispatcher checks each function's signature against the schema when the library loads.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(fastat_cpp, CPU, m) {
  m.impl("noisy_input", &fastat_cpu::noisy_input);
  m.impl("noisy_input_backward", &fastat_cpu::noisy_input_backward);
  m.impl("gaussian_noise", &fastat_cpu::gaussian_noise);
  m.impl("pgd_step", &fastat_cpu::pgd_step);
  m.impl("random_perturbation", &fastat_cpu::random_perturbation);
  m.impl("residual_loss", &fastat_cpu::residual_loss);
  m.impl("residual_loss_backward", &fastat_cpu::residual_loss_backward);
}

// Lets setup.py's prebuilt `fastat._C` be imported as a module; the kernels register when the library loads.
// The JIT build (fastat._ext) loads the same code with torch.ops.load_library and ignores this.
static struct PyModuleDef fastat_c_module = {PyModuleDef_HEAD_INIT, "_C", "fastat CPU kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastat_c_module); }
