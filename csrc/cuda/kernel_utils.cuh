// Building blocks of the kernels with no ATen dependency (only c10's Half/BFloat16), written __host__ __device__:
// the per-element code (the functors in *_ops.cuh) is the one source of the CUDA kernels (csrc/cuda/*.cu) and of
// the CPU kernels (csrc/cpu/*.cpp, compiled by g++): fp32 accumulation, packs of N elements, per-sample coefficients.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "indexing.cuh"
#include "philox.cuh"
#include "philox_cpu.h"

namespace fastat {

// float overloads on the host too (device code has them anyway).
using std::fabs;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::pow;
using std::sqrt;

constexpr double kNormFloor = 1e-8;    // the official P1 code's max(||.||, 1e-8); exact in fp64 (A(kNormFloor))

// fp32 accumulation for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename T> FASTAT_HD acc_t<T> to_acc(T v) { return static_cast<acc_t<T>>(v); }
template <typename T, typename A> FASTAT_HD T from_acc(A v) { return static_cast<T>(v); }

// Elements per 16-byte pack.
template <typename T> constexpr int pack_size() { return 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1; }

// At most 16-byte aligned: a pack wider than 16 bytes (8 fp32 residual values beside 8 fp16 inputs) is accessed as
// 16-byte vectors, so it needs no more alignment than aligned16() checks.
template <typename T, int N> struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Device: one 16-byte access per pack (the host checks alignment before choosing N > 1). Host: a plain loop, which
// g++ vectorises with unaligned loads (the CPU kernels use packs of 16 elements whatever the alignment).
template <int N, typename T> FASTAT_HD void load(const T* p, int64_t i, acc_t<T> (&out)[N]) {
#if defined(__CUDA_ARCH__)
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_acc(pk.v[k]);
#else
  for (int k = 0; k < N; ++k) out[k] = to_acc(p[i + k]);
#endif
}

template <int N, typename T, typename A> FASTAT_HD void store(T* p, int64_t i, const A (&in)[N]) {
#if defined(__CUDA_ARCH__)
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p + i) = pk;
#else
  for (int k = 0; k < N; ++k) p[i + k] = from_acc<T>(in[k]);
#endif
}

// Per-sample coefficient: a contiguous [B] fp32/fp64 tensor (read in the accumulation type) or a scalar; with an index
// (q_sample's timesteps), a [size] table read at index[b] (NaN for an index outside the table).
template <typename A> struct Coef {
  const void* ptr;
  bool is_double;
  A scalar;
  const int64_t* index = nullptr;
  int64_t size = 0;
  FASTAT_HD A operator()(int64_t b) const {
    if (ptr == nullptr) return scalar;
    if (index != nullptr) {
      b = index[b];
      if (b < 0 || b >= size) return static_cast<A>(NAN);
    }
    return is_double ? static_cast<A>(static_cast<const double*>(ptr)[b]) : static_cast<A>(static_cast<const float*>(ptr)[b]);
  }
};

// clamp(v, -r, r) by comparisons: a NaN stays NaN (as torch.clamp / torch.minimum give), and g++ vectorises it
// (std::fmax/fmin become libm calls per element on the host).
template <typename A> FASTAT_HD A clamp_box(A v, A r) { return v > r ? r : (v < -r ? -r : v); }

template <typename A> struct Pair {
  A first, second;
};

}  // namespace fastat
