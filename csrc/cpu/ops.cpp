// Registration of the CPU kernels: for the operators of the fastat_cpp namespace (the operator path: torch.compile,
// torch.ops), and as direct Python entries of this module (fastat's eager route; csrc/cuda/python_entry.h). The
// schemas are not here: fastat defines each operator once, in Python (fastat/_dispatch.py), for every backend; the
// dispatcher checks each function's signature against it when the library loads.
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"
#include "loss_autograd.h"
#include "python_entry.h"

namespace {
// residual_loss with its autograd node in C++ (loss_autograd.h): the eager route's differentiable call.
constexpr char kLoss[] = "fastat_cpp::residual_loss";
constexpr char kLossBackward[] = "fastat_cpp::residual_loss_backward";
constexpr auto residual_loss_autograd =
    &fastat::autograd::residual_loss<&fastat_cpu::residual_loss, &fastat_cpu::residual_loss_backward, kLoss,
                                     kLossBackward>;
}  // namespace

TORCH_LIBRARY_IMPL(fastat_cpp, CPU, m) {
  m.impl("noisy_input", &fastat_cpu::noisy_input);
  m.impl("noisy_input_backward", &fastat_cpu::noisy_input_backward);
  m.impl("gaussian_noise", &fastat_cpu::gaussian_noise);
  m.impl("pgd_step", &fastat_cpu::pgd_step);
  m.impl("random_perturbation", &fastat_cpu::random_perturbation);
  m.impl("residual_loss", &fastat_cpu::residual_loss);
  m.impl("residual_loss_backward", &fastat_cpu::residual_loss_backward);
}

static PyMethodDef fastat_cpp_methods[] = {
    FASTAT_ENTRY("noisy_input", fastat_cpu::noisy_input),
    FASTAT_ENTRY("noisy_input_backward", fastat_cpu::noisy_input_backward),
    FASTAT_ENTRY("gaussian_noise", fastat_cpu::gaussian_noise),
    FASTAT_ENTRY("pgd_step", fastat_cpu::pgd_step),
    FASTAT_ENTRY("random_perturbation", fastat_cpu::random_perturbation),
    FASTAT_ENTRY("residual_loss", fastat_cpu::residual_loss),
    FASTAT_ENTRY("residual_loss_backward", fastat_cpu::residual_loss_backward),
    FASTAT_AUTOGRAD_ENTRY("residual_loss_autograd", residual_loss_autograd),
    {nullptr, nullptr, 0, nullptr},
};

// The module is the prebuilt `fastat._C` (setup.py) or the just-in-time build fastat_cpu_ops_<isa> (fastat._ext);
// TORCH_EXTENSION_NAME is the build's module name either way.
#define FASTAT_STRINGIFY_(x) #x
#define FASTAT_STRINGIFY(x) FASTAT_STRINGIFY_(x)
#define FASTAT_CONCAT_(a, b) a##b
#define FASTAT_CONCAT(a, b) FASTAT_CONCAT_(a, b)

static struct PyModuleDef fastat_cpp_module = {PyModuleDef_HEAD_INIT, FASTAT_STRINGIFY(TORCH_EXTENSION_NAME),
                                               "fastat's CPU kernels", -1, nullptr};
PyMODINIT_FUNC FASTAT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return fastat::python::add_entries(PyModule_Create(&fastat_cpp_module), fastat_cpp_methods, "fastat_cpp");
}
