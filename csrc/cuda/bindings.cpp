// The Python module fastat._C_cuda: importing it registers the CUDA kernels of the fastat_cuda::* operators (the
// operator path: torch.compile, torch.ops) and holds their direct Python entries (fastat's eager route;
// python_entry.h). The schemas are not here: fastat defines each operator once, in Python (fastat/_dispatch.py),
// for every backend; the dispatcher checks each signature against the schema when the library loads.
// The only translation unit that includes torch/library.h; the kernels live in light .cu files (ops.h).
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include "loss_autograd.h"
#include "ops.h"
#include "python_entry.h"

namespace {
// residual_loss with its autograd node in C++ (loss_autograd.h, shared with the cpp library): the eager route's
// differentiable call.
constexpr char kLoss[] = "fastat_cuda::residual_loss";
constexpr char kLossBackward[] = "fastat_cuda::residual_loss_backward";
constexpr auto residual_loss_autograd =
    &fastat::autograd::residual_loss<&fastat::residual_loss_cuda, &fastat::residual_loss_backward_cuda, kLoss,
                                     kLossBackward>;
}  // namespace

TORCH_LIBRARY_IMPL(fastat_cuda, CUDA, m) {
  m.impl("noisy_input", &fastat::noisy_input_cuda);
  m.impl("noisy_input_backward", &fastat::noisy_input_backward_cuda);
  m.impl("gaussian_noise", &fastat::gaussian_noise_cuda);
  m.impl("pgd_step", &fastat::pgd_step_cuda);
  m.impl("random_perturbation", &fastat::random_perturbation_cuda);
  m.impl("residual_loss", &fastat::residual_loss_cuda);
  m.impl("residual_loss_backward", &fastat::residual_loss_backward_cuda);
}

static PyMethodDef fastat_cuda_methods[] = {
    FASTAT_ENTRY("noisy_input", fastat::noisy_input_cuda),
    FASTAT_ENTRY("noisy_input_backward", fastat::noisy_input_backward_cuda),
    FASTAT_ENTRY("gaussian_noise", fastat::gaussian_noise_cuda),
    FASTAT_ENTRY("pgd_step", fastat::pgd_step_cuda),
    FASTAT_ENTRY("random_perturbation", fastat::random_perturbation_cuda),
    FASTAT_ENTRY("residual_loss", fastat::residual_loss_cuda),
    FASTAT_ENTRY("residual_loss_backward", fastat::residual_loss_backward_cuda),
    FASTAT_AUTOGRAD_ENTRY("residual_loss_autograd", residual_loss_autograd),
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef fastat_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                                                "fastat's CUDA kernels; the ops live in torch.ops.fastat_cuda", -1,
                                                nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* module = fastat::python::add_entries(PyModule_Create(&fastat_cuda_module), fastat_cuda_methods, "fastat_cuda");
  if (module != nullptr) {
    // Build fact compared with the running torch by fastat._ext (an ABI mismatch warns instead of crashing later).
    PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION);
  }
  return module;
}
