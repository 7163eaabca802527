// Shared helpers for fastat's CPU kernels: per-sample coefficients, layout handling, chunked
// per-sample reductions. Light headers only (no torch/extension.h): each kernel file compiles fast.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastat_cpu {

// Elements per work item. A sample longer than this is split into fixed-size chunks whose partial
// sums are added in a fixed order, so results never depend on the thread count (deterministic).
// 16384 fp32 elements = 64 KiB per tensor: two or three operands of one chunk stay in L2.
constexpr int64_t kChunk = 16384;
// Independent accumulators per reduction: lets the compiler vectorise sums without -ffast-math
// (each lane is its own running sum, so no reassociation is needed) and keeps them deterministic.
constexpr int kLanes = 16;
// Below this many elements per task a thread hand-off costs more than it saves.
constexpr int64_t kGrainElements = 32768;

// A per-sample coefficient: one value per sample (a [B] tensor) or the same float for all.
struct Coef {
  std::vector<double> values;  // empty when uniform
  double uniform = 0.0;
  double operator[](int64_t i) const { return values.empty() ? uniform : values[i]; }
};

inline Coef make_coef(const c10::optional<at::Tensor>& per_sample, double uniform, int64_t batch, const char* name) {
  Coef coef;
  coef.uniform = uniform;
  if (per_sample.has_value() && per_sample->defined()) {
    const at::Tensor& t = *per_sample;
    TORCH_CHECK(t.numel() == batch, "fastat_cpu: ", name, " must have one value per sample (", batch, "), got ",
                t.numel());
    TORCH_CHECK(t.device().is_cpu(), "fastat_cpu: ", name, " must be a CPU tensor");
    at::Tensor d = t.detach().to(at::kDouble).contiguous();
    const double* p = d.const_data_ptr<double>();
    coef.values.assign(p, p + batch);
  }
  return coef;
}

inline int64_t sample_numel(const at::Tensor& t) {
  int64_t d = 1;
  for (int64_t k = 1; k < t.dim(); ++k) d *= t.size(k);
  return d;
}

// True when every tensor has the same sizes and strides, is dense and non-overlapping, and each
// sample is one contiguous block of D elements (row-major, channels_last, any dense permutation
// that keeps the batch dim outermost). Such tensors are processed as flat buffers: elementwise
// work and per-sample sums do not depend on the order inside a sample.
inline bool flat_compatible(const std::vector<const at::Tensor*>& ts) {
  const at::Tensor& ref = *ts[0];
  if (!ref.is_non_overlapping_and_dense()) return false;
  if (ref.dim() > 1 && ref.size(0) > 1 && ref.stride(0) != sample_numel(ref)) return false;
  for (const at::Tensor* t : ts) {
    if (t->sizes() != ref.sizes() || t->strides() != ref.strides()) return false;
  }
  return true;
}

// Make the defined tensors of `ts` flat-compatible: unchanged when they already are (keeps
// channels_last), otherwise row-major contiguous copies.
inline void make_flat(std::vector<at::Tensor*> ts) {
  std::vector<const at::Tensor*> defined;
  for (at::Tensor* t : ts)
    if (t->defined()) defined.push_back(t);
  if (defined.empty() || flat_compatible(defined)) return;
  for (at::Tensor* t : ts)
    if (t->defined()) *t = t->contiguous();
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "fastat_cpu: ", an, " (", a.scalar_type(), ") and ", bn, " (",
              b.scalar_type(), ") must have one dtype (the Python glue casts them)");
  TORCH_CHECK(a.sizes() == b.sizes(), "fastat_cpu: ", an, " ", a.sizes(), " and ", bn, " ", b.sizes(),
              " must have one shape");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "fastat_cpu: ", an, " and ", bn, " must be CPU tensors");
}

// Work split for per-sample reductions: item = (sample, chunk), chunk length <= kChunk.
struct Split {
  int64_t batch, numel, chunks, chunk_len;
  int64_t items() const { return batch * chunks; }
  int64_t grain() const { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(chunk_len, 1)); }
  int64_t begin(int64_t item) const { return (item / chunks) * numel + (item % chunks) * chunk_len; }
  int64_t end(int64_t item) const {
    const int64_t c = item % chunks;
    return (item / chunks) * numel + std::min(numel, (c + 1) * chunk_len);
  }
};

inline Split make_split(int64_t batch, int64_t numel) {
  const int64_t chunks = numel <= kChunk ? 1 : (numel + kChunk - 1) / kChunk;
  const int64_t chunk_len = numel <= kChunk ? numel : kChunk;
  return Split{batch, numel, chunks, chunk_len};
}

// Sum lanes in a fixed order (double, so the lane partials lose nothing when added).
template <typename acc_t>
inline double sum_lanes(const acc_t* lanes) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(lanes[l]);
  return s;
}

}  // namespace fastat_cpu
