// The direct Python entry of a compiled kernel: a METH_FASTCALL function generated from the kernel's C++ signature
// (the same function pointer as its TORCH_LIBRARY_IMPL registration), so fastat's eager route calls the kernel
// without torch.ops' generic argument handling. Measured with callgrind on the CPU build (8x3x8x8 fp32 noisy_input):
// the kernel itself ~15k instructions, through torch.ops.fastat_cpp.noisy_input ~44k, through this entry ~19k.
// The operator path (torch.compile, torch.ops) keeps going through the dispatcher.
//
// Arguments are converted by C++ type: const at::Tensor& (a tensor), const std::optional<at::Tensor>& (a tensor or
// None), double, int64_t, bool, at::ScalarType and std::optional<at::ScalarType> (a torch.dtype or None); results
// are a tensor or a tuple of tensors. The GIL is released while the kernel runs; C++ errors become Python
// exceptions as in torch (TORCH_CHECK_VALUE -> ValueError, ...). Each call is recorded for torch.profiler under
// "<namespace>::<op>" (e.g. fastat_cpp::noisy_input; free when no profiler runs): the function's `self` is that name.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/TypeTraits.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace fastat::python {

template <typename T> struct Arg;

template <> struct Arg<at::Tensor> {
  static at::Tensor get(PyObject* o, size_t i) {
    TORCH_CHECK_TYPE(THPVariable_Check(o), "argument ", i, " must be a Tensor, got ", Py_TYPE(o)->tp_name);
    return THPVariable_Unpack(o);
  }
};

template <> struct Arg<std::optional<at::Tensor>> {
  static std::optional<at::Tensor> get(PyObject* o, size_t i) {
    if (o == Py_None) return std::nullopt;
    return Arg<at::Tensor>::get(o, i);
  }
};

template <> struct Arg<double> {
  static double get(PyObject* o, size_t i) {
    const double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) throw python_error();
    return v;
  }
};

template <> struct Arg<int64_t> {
  static int64_t get(PyObject* o, size_t i) {
    TORCH_CHECK_TYPE(PyLong_Check(o), "argument ", i, " must be an int, got ", Py_TYPE(o)->tp_name);
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) throw python_error();
    return static_cast<int64_t>(v);
  }
};

template <> struct Arg<bool> {
  static bool get(PyObject* o, size_t i) {
    TORCH_CHECK_TYPE(PyBool_Check(o), "argument ", i, " must be a bool, got ", Py_TYPE(o)->tp_name);
    return o == Py_True;
  }
};

template <> struct Arg<at::ScalarType> {
  static at::ScalarType get(PyObject* o, size_t i) {
    TORCH_CHECK_TYPE(THPDtype_Check(o), "argument ", i, " must be a torch.dtype, got ", Py_TYPE(o)->tp_name);
    return reinterpret_cast<THPDtype*>(o)->scalar_type;
  }
};

template <> struct Arg<std::optional<at::ScalarType>> {
  static std::optional<at::ScalarType> get(PyObject* o, size_t i) {
    if (o == Py_None) return std::nullopt;
    return Arg<at::ScalarType>::get(o, i);
  }
};

inline PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

template <typename... Ts> PyObject* wrap(std::tuple<Ts...> values) {
  PyObject* out = PyTuple_New(sizeof...(Ts));
  if (out == nullptr) throw python_error();
  size_t i = 0;
  std::apply([&](auto&... v) { ((PyTuple_SET_ITEM(out, i++, wrap(std::move(v)))), ...); }, values);
  return out;
}

// The GIL is released while the kernel runs (and taken back before anything touches Python again).
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

template <auto Kernel, bool BelowAutograd, typename... Params, size_t... I>
PyObject* call(const char* label, PyObject* const* args, std::index_sequence<I...>) {
  std::tuple<std::decay_t<Params>...> converted{Arg<std::decay_t<Params>>::get(args[I], I)...};
  auto result = [&] {
    RECORD_FUNCTION(label, c10::ArrayRef<const c10::IValue>{});
    ReleaseGil release;
    if constexpr (BelowAutograd) {
      // Below autograd, as a dispatcher kernel runs (the eager route calls it inside fastat's autograd Function).
      c10::impl::ExcludeDispatchKeyGuard below(c10::autograd_dispatch_keyset);
      return Kernel(std::get<I>(converted)...);
    } else {
      return Kernel(std::get<I>(converted)...);  // an autograd kernel (loss_autograd.h): records its own node
    }
  }();
  return wrap(std::move(result));
}

template <auto Kernel, bool BelowAutograd, typename List> struct Caller;

template <auto Kernel, bool BelowAutograd, typename... Params>
struct Caller<Kernel, BelowAutograd, c10::guts::typelist::typelist<Params...>> {
  static PyObject* run(const char* label, PyObject* const* args, Py_ssize_t nargs) {
    TORCH_CHECK(nargs == static_cast<Py_ssize_t>(sizeof...(Params)), "expected ", sizeof...(Params), " arguments, got ", nargs);
    return call<Kernel, BelowAutograd, Params...>(label, args, std::index_sequence_for<Params...>());
  }
};

template <auto Kernel, bool BelowAutograd = true>
PyObject* entry(PyObject* label, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  using Traits = c10::guts::infer_function_traits_t<std::remove_pointer_t<decltype(Kernel)>>;
  const char* name = PyUnicode_AsUTF8(label);  // cached by the str object
  if (name == nullptr) throw python_error();
  return Caller<Kernel, BelowAutograd, typename Traits::parameter_types>::run(name, args, nargs);
  END_HANDLE_TH_ERRORS
}

// Adds every entry of `methods` (a static table ended by a null entry) to `module` as a function whose `self` is
// its profiler name "<ns>::<name>". Returns the module, or nullptr with a Python error set.
inline PyObject* add_entries(PyObject* module, PyMethodDef* methods, const char* ns) {
  if (module == nullptr) return nullptr;
  PyObject* module_name = PyModule_GetNameObject(module);
  for (PyMethodDef* def = methods; module_name != nullptr && def->ml_name != nullptr; ++def) {
    PyObject* label = PyUnicode_FromFormat("%s::%s", ns, def->ml_name);
    PyObject* fn = label == nullptr ? nullptr : PyCFunction_NewEx(def, label, module_name);
    Py_XDECREF(label);
    if (fn == nullptr || PyModule_AddObject(module, def->ml_name, fn) < 0) {
      Py_XDECREF(fn);
      Py_DECREF(module_name);
      Py_DECREF(module);
      return nullptr;
    }
  }
  if (module_name == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_DECREF(module_name);
  return module;
}

}  // namespace fastat::python

// One line per kernel in a module's entry table (given to add_entries): FASTAT_ENTRY("noisy_input", fastat_cpu::noisy_input).
#define FASTAT_ENTRY(name, kernel)                                                                          \
  {                                                                                                         \
    name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fastat::python::entry<&kernel>)), \
        METH_FASTCALL, "the " name " kernel, called directly (the eager route of fastat._dispatch)"     \
  }
// The same for an autograd kernel (csrc/cuda/loss_autograd.h; given as a constexpr function pointer), which runs
// above autograd and records its own node.
#define FASTAT_AUTOGRAD_ENTRY(name, pointer)                                                                     \
  {                                                                                                              \
    name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fastat::python::entry<pointer, false>)), \
        METH_FASTCALL, "the differentiable " name " (its autograd kernel), called directly by fastat._dispatch"  \
  }
