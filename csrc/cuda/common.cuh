// Host side and launch templates of fastat's CUDA kernels: light ATen/c10 includes (no torch/extension.h,
// no ATen/cuda/CUDAContext.h, so each .cu stays a light translation unit), layout/alignment checks, the launch
// templates (grid-stride elementwise pass, per-sample tile reduction, per-sample finalize) and warp reductions.
// Layout of csrc/cuda: indexing.cuh (range walk, sample cursor, tiling) and kernel_utils.cuh (packs, fp32
// accumulation, per-sample coefficients) and the per-family functors *_ops.cuh are ATen-free and host-compilable
// (tests/test_cuda_build.py runs them on the CPU); <family>.cu holds the host entry points; bindings.cpp the ops.
//
// Hopper (sm_90) choices, and why:
//  * 16-byte vector loads/stores (LDG.128/STG.128) on the aligned body of every range, scalar head/tail:
//    every op here is memory-bound (0.1-0.5 flop/byte), so bytes per instruction is what matters.
//  * Persistent grids: at most `waves * SM count` blocks that stride over the work, so launch size does not
//    grow with N and the per-sample partial count stays bounded (fixed order -> deterministic sums).
//  * No TMA / bulk copies, no thread-block clusters, no wgmma: each element is read once and used once, so
//    staging through shared memory (TMA) only adds a hop; a cluster/DSMEM reduction would save one tiny
//    finalize kernel (~2 us) at the cost of cudaLaunchKernelEx plumbing. Noted as a possible later step.
//  * No host synchronisation anywhere (no .item(), no cudaDeviceSynchronize): all launches go to the current
//    stream with workspaces from the caching allocator, so the ops are CUDA-graph capturable.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <cuda_runtime.h>

#include "host_common.h"
#include "kernel_utils.cuh"

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

namespace fastat {

constexpr int kThreads = 256;          // 8 warps: enough loads in flight per SM with several blocks resident
constexpr int kWarps = kThreads / 32;

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  // Butterfly: every lane ends with the same, order-fixed sum (deterministic).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- host side ---------------------------------------------------------------------------------------------

// Streaming multiprocessors of the current device, cached per device (a driver attribute query, no sync).
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = n > 0 ? n : 1;
  }
  return cached[dev];
}

// Blocks for a grid-stride loop over `work` items of `per_block` each: enough for `waves` blocks per SM, no more.
inline int64_t persistent_blocks(int64_t work, int64_t per_block, int waves = 8) {
  const int64_t need = (work + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count()) * waves;
  return need < 1 ? 1 : (need < cap ? need : cap);
}

// The launch of a per-sample reduction: the tiling of indexing.cuh for this device, in persistent blocks.
inline Tiling make_tiling(int64_t batch, int64_t d, int pack) {
  Tiling t = tiling_for(batch, d, pack, sm_count());
  t.blocks = persistent_blocks(t.tiles, kWarps);
  return t;
}

// Pack width for a launch: the 16-byte pack when every defined tensor is 16-byte aligned, else 1.
inline bool aligned16(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  return true;
}

inline void check_data(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastat_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kDouble,
              "fastat_cuda: ", name, " must be float32/float16/bfloat16/float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, "fastat_cuda: ", name, " must have a batch dim");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_data(t, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastat_cuda: ", name, " has shape ", t.sizes(), " but ", ref_name, " has ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), "fastat_cuda: ", name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}


// ---- kernels shared by the families -------------------------------------------------------------------------

// Grid-stride elementwise pass over [0, n): f.template run<N>(i) handles elements i .. i+N-1 (N = 1 or the pack).
template <int N, typename F>
__global__ void __launch_bounds__(kThreads, 4) elementwise_kernel(int64_t n, F f) {
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lanes = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for_range<N>(0, n, lane, lanes, f);
}

template <int P, typename F>
void launch_elementwise(int64_t n, bool vectorize, const F& f, cudaStream_t stream) {
  if (n <= 0) return;
  if (P > 1 && vectorize) {
    elementwise_kernel<P, F><<<persistent_blocks((n + P - 1) / P, kThreads), kThreads, 0, stream>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    elementwise_kernel<1, F><<<persistent_blocks(n, kThreads), kThreads, 0, stream>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Per-sample partial sums: each warp takes (sample, chunk) tiles in a grid-stride loop, calls f.reset(b),
// f.template run<N>(i) over the tile's elements, then f.partials(out) with K per-lane sums that are
// warp-reduced (fixed butterfly order) and written by lane 0 to partials[tile * K + k].
template <int N, int K, typename A, typename F>
__global__ void __launch_bounds__(kThreads, 4) tile_reduce_kernel(Tiling t, F f, A* __restrict__ partials) {
  const int lane = threadIdx.x & 31;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t tile = first; tile < t.tiles; tile += stride) {
    const TileRange r = tile_range(t, tile);
    f.reset(r.b);
    for_range<N>(r.lo, r.hi, lane, 32, f);
    A sums[K];
    f.partials(sums);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const A s = warp_sum(sums[k]);
      if (lane == 0) partials[tile * K + k] = s;
    }
  }
}

template <int P, int K, typename A, typename F>
void launch_tile_reduce(const Tiling& t, bool vectorize, const F& f, A* partials, cudaStream_t stream) {
  if (t.tiles <= 0) return;
  if (P > 1 && vectorize) {
    tile_reduce_kernel<P, K, A, F><<<t.blocks, kThreads, 0, stream>>>(t, f, partials);
  } else {
    tile_reduce_kernel<1, K, A, F><<<t.blocks, kThreads, 0, stream>>>(t, f, partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A finalize gives each sample a whole block once it has kBlockFinalizeChunks chunks or more (its chunks are then
// summed by 256 threads in a fixed order), else one thread: one thread walking thousands of chunks is thousands of
// dependent loads (at B = 1, D = 16M: 8,400 of them, the L2 step's finalize alone longer than its two data passes).
constexpr int64_t kBlockFinalizeChunks = 32;

template <typename A> __device__ __forceinline__ void add_partials(double* total, const A* p, int k) {
  for (int j = 0; j < k; ++j) total[j] += static_cast<double>(p[j]);
}

// Sample b's K sums over its chunks, in fp64, by the threads of the block in a fixed order (thread t takes chunks
// t, t + blockDim, ... in order, then a fixed tree): the same value in every thread. Block-uniform call.
template <int K, typename A>
__device__ void block_sample_sums(int64_t b, int64_t chunks, const A* __restrict__ partials, A (&sums)[K]) {
  __shared__ double shared[K][kThreads];
  double total[K];
#pragma unroll
  for (int k = 0; k < K; ++k) total[k] = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) add_partials(total, partials + (b * chunks + c) * K, K);
#pragma unroll
  for (int k = 0; k < K; ++k) shared[k][threadIdx.x] = total[k];
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
#pragma unroll
      for (int k = 0; k < K; ++k) shared[k][threadIdx.x] += shared[k][threadIdx.x + s];
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k] = static_cast<A>(shared[k][0]);
  __syncthreads();  // the next sample reuses `shared`
}

// Sample b's K sums by one thread, chunk by chunk (in fp64: a few hundred partials of a 10^8-element sample would
// lose ~1e-4 relative in fp32; the cost is nil).
template <int K, typename A>
__device__ void thread_sample_sums(int64_t b, int64_t chunks, const A* __restrict__ partials, A (&sums)[K]) {
  double total[K];
#pragma unroll
  for (int k = 0; k < K; ++k) total[k] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) add_partials(total, partials + (b * chunks + c) * K, K);
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k] = static_cast<A>(total[k]);
}

// fin(b, sums) for every sample: a block per sample (many chunks) or a thread per sample (few), see above.
template <int K, typename A, typename Fin>
__global__ void __launch_bounds__(kThreads, 4) finalize_kernel(int64_t batch, int64_t chunks, const A* __restrict__ partials, Fin fin) {
  if (chunks >= kBlockFinalizeChunks) {
    for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
      A sums[K];
      block_sample_sums<K>(b, chunks, partials, sums);
      if (threadIdx.x == 0) fin(b, sums);
    }
    return;
  }
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A sums[K];
    thread_sample_sums<K>(b, chunks, partials, sums);
    fin(b, sums);
  }
}

template <int K, typename A, typename Fin>
void launch_finalize(const Tiling& t, const A* partials, const Fin& fin, cudaStream_t stream) {
  if (t.batch <= 0) return;
  const int64_t blocks = persistent_blocks(t.batch, t.chunks >= kBlockFinalizeChunks ? 1 : kThreads);
  finalize_kernel<K, A, Fin><<<blocks, kThreads, 0, stream>>>(t.batch, t.chunks, partials, fin);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One block: the per-sample step of finalize_kernel (a sample at a time by the whole block when samples have many
// chunks, else thread t takes samples t, t + blockDim, ...), the values fin(b, sums) added in double in a fixed
// order, then the threads' totals in a fixed tree: out[0] = total * scale. Deterministic, and one launch for the
// per-sample step and the batch sum together.
template <int K, typename A, typename Fin>
__global__ void __launch_bounds__(kThreads, 4) finalize_reduce_kernel(int64_t batch, int64_t chunks, const A* __restrict__ partials,
                                                                   Fin fin, A* __restrict__ out, double scale) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  if (chunks >= kBlockFinalizeChunks) {
    for (int64_t b = 0; b < batch; ++b) {
      A sums[K];
      block_sample_sums<K>(b, chunks, partials, sums);
      if (threadIdx.x == 0) acc += static_cast<double>(fin(b, sums));
    }
  } else {
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
      A sums[K];
      thread_sample_sums<K>(b, chunks, partials, sums);
      acc += static_cast<double>(fin(b, sums));
    }
  }
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<A>(shared[0] * scale);
}

template <int K, typename A, typename Fin>
void launch_finalize_reduce(const Tiling& t, const A* partials, const Fin& fin, A* out, double scale, cudaStream_t stream) {
  finalize_reduce_kernel<K, A, Fin><<<1, kThreads, 0, stream>>>(t.batch, t.chunks, partials, fin, out, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- whole samples in one launch ------------------------------------------------------------------------------

// Samples of at most kSweepMaxD elements (pgd_step, L2 random starts): a group of G threads (one thread for small
// samples, a warp, or the block) takes one sample at a time in a persistent grid, sums the sample's statistics in a
// first sweep (stats.reset/run/partials; a fixed-order group sum leaves the same sums in every thread), turns them
// into the sample's coefficients (fin.value, computed by every thread of the group, so nothing is exchanged through
// memory), and applies them in a second sweep (apply.run_sample). The grid keeps at most kSweepL2Bytes of samples in
// flight, so the second sweep reads from L2: one launch, and DRAM moves each tensor once.
constexpr int64_t kSweepMaxD = 1 << 16;
constexpr int64_t kSweepL2Bytes = int64_t(32) << 20;

template <int G, int K, typename A> __device__ __forceinline__ void group_sum(A (&sums)[K]) {
  if (G == 1) return;
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k] = warp_sum(sums[k]);
  if (G == kThreads) {
    __shared__ A shared[K][kWarps];
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) shared[k][threadIdx.x >> 5] = sums[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A s = A(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += shared[k][w];
      sums[k] = s;
    }
    __syncthreads();
  }
}

template <int N, int G, int K, typename A, typename Stats, typename Fin, typename Apply>
__global__ void __launch_bounds__(kThreads, 2) sweep_kernel(int64_t batch, int64_t d, Stats stats, Fin fin, Apply apply) {
  constexpr int kGroups = kThreads / G;
  const int lane = threadIdx.x % G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroups;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; b < batch; b += stride) {
    Stats s = stats;
    s.reset(b);
    for_range<N>(b * d, (b + 1) * d, lane, G, s);
    A sums[K];
    s.partials(sums);
    group_sum<G, K>(sums);
    Apply a = apply;
    const auto coef = fin.value(b, sums);
    for_range_sample<N>(b * d, (b + 1) * d, lane, G, a, coef);
  }
}

// Whether a pgd_step / L2 random start takes the one-launch sweep: samples of at most kSweepMaxD elements, and
// either small (<= 4096: a warp or a block does one in a few iterations) or enough of them (>= kSweepMinBatch) to
// fill the GPU; a few large samples run faster as tile reduction + finalize + update, whose extra bytes are few.
constexpr int64_t kSweepMinBatch = 32;
inline bool use_sweep(int64_t batch, int64_t d) { return d <= kSweepMaxD && (d <= 4096 || batch >= kSweepMinBatch); }

// Threads per sample of a sweep: 1 up to 16 elements, a warp up to 2048, the block beyond.
inline int sweep_group(int64_t d) { return d <= 16 ? 1 : (d <= 2048 ? 32 : kThreads); }

template <int P, int K, typename A, typename Stats, typename Fin, typename Apply>
void launch_sweep(int64_t batch, int64_t d, int64_t sample_bytes, bool vectorize, const Stats& stats, const Fin& fin,
                  const Apply& apply, cudaStream_t stream) {
  if (batch <= 0) return;
  const int group = sweep_group(d), groups = kThreads / group;
  const int64_t in_flight = kSweepL2Bytes / (sample_bytes > 0 ? sample_bytes : 1);
  int64_t blocks = persistent_blocks(batch, groups);
  const int64_t cap = (in_flight + groups - 1) / groups;
  if (blocks > cap) blocks = cap > 0 ? cap : 1;
#define FASTAT_SWEEP(N, G) sweep_kernel<N, G, K, A, Stats, Fin, Apply><<<blocks, kThreads, 0, stream>>>(batch, d, stats, fin, apply)
  if (P > 1 && vectorize) {
    if (group == 1) FASTAT_SWEEP(P, 1); else if (group == 32) FASTAT_SWEEP(P, 32); else FASTAT_SWEEP(P, kThreads);
  } else {
    if (group == 1) FASTAT_SWEEP(1, 1); else if (group == 32) FASTAT_SWEEP(1, 32); else FASTAT_SWEEP(1, kThreads);
  }
#undef FASTAT_SWEEP
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline at::Tensor partials_buffer(const Tiling& t, int k, const at::Tensor& like, bool fp64) {
  return at::empty({t.tiles > 0 ? t.tiles * k : 1}, like.options().dtype(fp64 ? at::kDouble : at::kFloat));
}

#define FASTAT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace fastat
