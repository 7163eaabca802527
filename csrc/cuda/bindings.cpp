// The Python module fastat._C_cuda: importing it registers the CUDA kernels of the fastat_cuda::* operators. The
// schemas are not here: fastat defines each operator once, in Python (fastat/_dispatch.py), for every backend; this
// library only contributes kernels, and the dispatcher checks each signature against the schema when it loads.
// The only translation unit that includes torch/library.h; the kernels live in light .cu files (ops.h).
// No pybind11: a bare CPython module is enough, the ops are reached through torch.ops.fastat_cuda.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastat_cuda, CUDA, m) {
  m.impl("noisy_input", &fastat::noisy_input_cuda);
  m.impl("noisy_input_backward", &fastat::noisy_input_backward_cuda);
  m.impl("gaussian_noise", &fastat::gaussian_noise_cuda);
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
