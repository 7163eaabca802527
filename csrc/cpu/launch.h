// How the CPU runs the shared functors (csrc/cuda/*_ops.cuh): the CPU counterparts of the launch templates of
// csrc/cuda/common.cuh, with at::parallel_for. A functor's CPU walk is `span` (elements [lo, hi) of one sample, a
// plain loop that g++ vectorises); per-sample sums are split into chunks of at most kChunk elements whose partials
// are added in chunk order, so results never depend on the thread count (deterministic).
//
// Why spans and not the GPU's packs here (callgrind, 8x3x8x8 fp32 noisy_input, g++ -O3 -mavx2): the pack walk
// run<16> over local arrays costs ~7 instructions per element (g++ rebuilds vectors from the stack), a loop over
// memory ~1.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "indexing.cuh"

namespace fastat_cpu {

constexpr int kLanes = 16;  // partial sums of the reduction functors (their LANES parameter): two AVX2 vectors
// Elements per work item of a reduction: 16384 fp32 = 64 KiB per operand, so a chunk's operands stay in L2.
constexpr int64_t kChunk = 16384;
// Below this many elements per task a thread hand-off costs more than it saves.
constexpr int64_t kGrainElements = 32768;

// body(lo, hi) over [0, items), in parallel only when there is enough work for more than one task.
template <typename Body>
void parallel_items(int64_t items, int64_t grain, const Body& body) {
  if (items <= 0) return;
  if (items <= grain || at::in_parallel_region()) {
    body(0, items);
    return;
  }
  at::parallel_for(0, items, grain, body);
}

// f.span over the samples of [lo, hi) (at once when its per-sample values do not depend on the sample).
template <typename F>
void walk_samples(int64_t lo, int64_t hi, int64_t d, const F& f) {
  if (f.uniform() || d <= 0) {
    f.span(lo, hi, 0);
    return;
  }
  for (int64_t i = lo; i < hi;) {
    const int64_t b = i / d, end = std::min(hi, (b + 1) * d);
    f.span(i, end, b);
    i = end;
  }
}

// An elementwise functor over [0, n) (samples of d elements), in tasks of whole chunks.
template <typename F>
void elementwise(int64_t n, int64_t d, const F& f) {
  const int64_t items = (n + kChunk - 1) / kChunk;
  parallel_items(items, std::max<int64_t>(1, kGrainElements / kChunk), [&](int64_t lo, int64_t hi) {
    walk_samples(lo * kChunk, std::min(n, hi * kChunk), d, f);
  });
}

// Per-sample tiles: sample b is split into `chunks` ranges of at most kChunk elements.
struct Tiles {
  int64_t batch, d, chunks, len;
  int64_t lo(int64_t tile) const { return (tile / chunks) * d + (tile % chunks) * len; }
  int64_t hi(int64_t tile) const { return (tile / chunks) * d + std::min(d, (tile % chunks + 1) * len); }
};

inline Tiles make_tiles(int64_t batch, int64_t d) {
  const int64_t chunks = d <= kChunk ? 1 : (d + kChunk - 1) / kChunk;
  return Tiles{batch, d, chunks, d <= kChunk ? std::max<int64_t>(d, 1) : kChunk};
}

inline int64_t sample_grain(const Tiles& t) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(t.d, 1)); }

// Per-sample reduction, then a per-sample step: f.reset(b); f.span over the sample's tiles; f.partials(K sums) per
// tile, added over the tiles in order (in double, as the CUDA finalize does); then fin(b, sums). When a sample fits
// one tile, after(b, lo, hi) runs right after fin on the same thread while its data is still in cache.
template <int K, typename A, typename F, typename Fin, typename After>
void per_sample_passes(const Tiles& t, const F& f, const Fin& fin, const After& after) {
  if (t.batch <= 0) return;
  if (t.chunks == 1) {
    parallel_items(t.batch, sample_grain(t), [&](int64_t lo, int64_t hi) {
      F g = f;
      for (int64_t b = lo; b < hi; ++b) {
        g.reset(b);
        g.span(b * t.d, (b + 1) * t.d);
        A sums[K];
        g.partials(sums);
        fin(b, sums);
        after(b, b * t.d, (b + 1) * t.d);
      }
    });
    return;
  }
  const int64_t tiles = t.batch * t.chunks;
  std::vector<A> partials(static_cast<size_t>(tiles * K));
  parallel_items(tiles, 1, [&](int64_t lo, int64_t hi) {
    F g = f;
    for (int64_t tile = lo; tile < hi; ++tile) {
      g.reset(tile / t.chunks);
      g.span(t.lo(tile), t.hi(tile));
      A sums[K];
      g.partials(sums);
      for (int k = 0; k < K; ++k) partials[tile * K + k] = sums[k];
    }
  });
  for (int64_t b = 0; b < t.batch; ++b) {
    double total[K] = {};
    for (int64_t c = 0; c < t.chunks; ++c)
      for (int k = 0; k < K; ++k) total[k] += static_cast<double>(partials[(b * t.chunks + c) * K + k]);
    A sums[K];
    for (int k = 0; k < K; ++k) sums[k] = static_cast<A>(total[k]);
    fin(b, sums);
  }
  parallel_items(tiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t tile = lo; tile < hi; ++tile) after(tile / t.chunks, t.lo(tile), t.hi(tile));
  });
}

// An `after` step that does nothing (a reduction whose result is all there is).
struct NoAfter {
  void operator()(int64_t, int64_t, int64_t) const {}
};

// An `after` step that runs an elementwise functor over the range (one sample's).
template <typename G>
struct RunAfter {
  const G& g;
  void operator()(int64_t b, int64_t lo, int64_t hi) const { g.span(lo, hi, b); }
};

}  // namespace fastat_cpu
