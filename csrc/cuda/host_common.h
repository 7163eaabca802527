// Host-side helpers shared by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): ATen only, no CUDA.
// The layout rule, output allocation, dtype casts and per-sample coefficients, so both libraries take the
// arguments of one schema (fastat/_dispatch.py) the same way.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdio>
#include <initializer_list>

#include "kernel_utils.cuh"

namespace fastat {

inline int64_t sample_numel(const at::Tensor& t) {
  int64_t d = 1;
  for (int64_t k = 1; k < t.dim(); ++k) d *= t.size(k);
  return d;
}

inline bool is_channels_last(const at::Tensor& t) {
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !t.is_contiguous();
  return false;
}

inline bool batch_outer_dense(const at::Tensor& t) {
  if (t.dim() == 0 || !t.is_non_overlapping_and_dense()) return false;
  return t.size(0) <= 1 || t.stride(0) == sample_numel(t);
}

// The layout rule of every fastat kernel (mirrored by fastat/_shapes.py `work_layout`, which the fake
// implementations use): operands sharing one batch-outer dense layout (contiguous, channels_last, any dense order
// with the batch dim outermost) are read as they are and the outputs take their strides; otherwise every operand
// is made contiguous and the outputs are contiguous. With `logical` (kernels that draw noise in-kernel at each
// element's logical index) only contiguous and channels_last layouts are kept. Undefined tensors are skipped.
struct Layout {
  bool contiguous;      // outputs contiguous (else: the strides of the first operand)
  bool channels_last;   // memory order (batch, spatial..., channel)
};

inline Layout work_layout(std::initializer_list<at::Tensor*> tensors, bool logical) {
  const at::Tensor* first = nullptr;
  bool contiguous = true;
  for (at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    if (first == nullptr) first = t;
    contiguous = contiguous && t->is_contiguous();
  }
  if (first == nullptr || contiguous) return Layout{true, false};
  bool keep = batch_outer_dense(*first) && (!logical || is_channels_last(*first));
  for (at::Tensor* t : tensors) {
    if (keep && t->defined() && t->strides() != first->strides()) keep = false;
  }
  if (keep) return Layout{false, is_channels_last(*first)};
  for (at::Tensor* t : tensors) {
    if (t->defined()) *t = t->contiguous();
  }
  return Layout{true, false};
}

// An output shaped and laid out like the first operand as read (`like`: after work_layout, so contiguous when the
// operands were copied), as fastat/_shapes.py empty_output makes it (empty_like keeps the strides of a dense tensor).
inline at::Tensor empty_output(const at::Tensor& like, const Layout& /*layout*/, at::ScalarType dtype) {
  return at::empty_like(like, like.options().dtype(dtype));
}

// The logical index of in-kernel draws for a tensor in `layout`.
inline LogicalIndex logical_index(const at::Tensor& t, const Layout& layout) {
  const int64_t d = sample_numel(t);
  if (!layout.channels_last) return LogicalIndex{d > 0 ? d : 1, 1, 1, false};
  const int64_t c = t.size(1);
  return LogicalIndex{d > 0 ? d : 1, c, c > 0 ? d / c : 1, true};
}

inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) {
  return (!t.defined() || t.scalar_type() == dtype) ? t : t.to(dtype);
}

inline at::Tensor value_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A per-sample coefficient: a contiguous [B] fp32/fp64 tensor (what the Python layer passes) or the scalar; with
// `timesteps` (contiguous int64 [B], q_sample) a contiguous per-timestep table [T] gathered at the timesteps.
inline void check_coef(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name,
                       const c10::optional<at::Tensor>& timesteps = c10::nullopt) {
  if (given(timesteps)) {
    TORCH_CHECK(timesteps->device() == like.device() && timesteps->scalar_type() == at::kLong && timesteps->dim() == 1 &&
                    timesteps->size(0) == like.size(0) && timesteps->is_contiguous(),
                "fastat: timesteps must be a contiguous int64 [B] tensor on the data's device with B=", like.size(0));
  }
  if (!given(t)) return;
  TORCH_CHECK(t->device() == like.device(), "fastat: ", name, " is on ", t->device(), " but the data is on ", like.device());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "fastat: ", name,
              " must be float32 or float64, got ", t->scalar_type());
  if (given(timesteps)) {
    TORCH_CHECK(t->dim() == 1 && t->is_contiguous(), "fastat: ", name, " must be a contiguous [T] table, got shape ", t->sizes());
    return;
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == like.size(0) && t->is_contiguous(), "fastat: ", name,
              " must be a contiguous [B] tensor with B=", like.size(0), ", got shape ", t->sizes());
}

template <typename A> Coef<A> make_coef(const c10::optional<at::Tensor>& t, double scalar,
                                        const c10::optional<at::Tensor>& timesteps = c10::nullopt) {
  if (given(t)) {
    Coef<A> c{t->data_ptr(), t->scalar_type() == at::kDouble, static_cast<A>(0)};
    if (given(timesteps)) {
      c.index = timesteps->data_ptr<int64_t>();
      c.size = t->size(0);
    }
    return c;
  }
  return Coef<A>{nullptr, false, static_cast<A>(scalar)};
}

// Values of a coefficient on the host (the CPU kernels check them while the data is at hand; the Python layer
// does it for the other backends): finite, and > 0 or >= 0 when asked. Raises ValueError with the same words as
// fastat/_checks.py. Python floats are checked in Python.
enum class Sign { kAny, kNonnegative, kPositive };

inline void check_coef_values(const c10::optional<at::Tensor>& t, const char* name, Sign sign) {
  if (!t.has_value() || !t->defined() || t->numel() == 0 || !t->device().is_cpu()) return;
  const int64_t n = t->numel();
  const bool is_double = t->scalar_type() == at::kDouble;
  const void* p = t->data_ptr();
  double low = INFINITY;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    const double v = is_double ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
    finite = finite && std::isfinite(v);
    low = v < low ? v : low;
  }
  TORCH_CHECK_VALUE(finite, name, " must be finite, got non-finite values");
  const bool ok = sign == Sign::kAny || (sign == Sign::kPositive ? low > 0 : low >= 0);
  if (!ok) {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", low);
    TORCH_CHECK_VALUE(false, name, sign == Sign::kPositive ? " must be > 0, got min " : " must be >= 0, got min ", text);
  }
}

// The accumulation dtype of a data dtype: fp64 for fp64, fp32 otherwise.
inline at::ScalarType accumulation(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype the residual losses' backward computes its gradients in, from a residual kept in the accumulation dtype:
// the promotion of the wanted gradients' dtypes (each then rounded once), or the residual's own dtype when that
// promotion accumulates in another (an fp64 residual with low-precision gradients wanted).
inline at::ScalarType gradient_dtype(at::ScalarType residual, const c10::optional<at::ScalarType>& a,
                                     const c10::optional<at::ScalarType>& b, const c10::optional<at::ScalarType>& c) {
  c10::optional<at::ScalarType> out;
  for (const auto* d : {&a, &b, &c}) {
    if (d->has_value()) out = out.has_value() ? c10::promoteTypes(*out, **d) : **d;
  }
  return out.has_value() && accumulation(*out) == residual ? *out : residual;
}

}  // namespace fastat
