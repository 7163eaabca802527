// Index arithmetic shared by the CUDA and the CPU kernels, free of ATen and CUDA-only calls (csrc/cpu compiles it
// with g++, and tests/test_cuda_build.py checks it exhaustively): the vectorised range walk, the sample cursor,
// the logical index of in-kernel random draws and the per-sample tiling of the reductions. All indices are int64
// (tensors > 2^31 elements).
#pragma once

#include <cstdint>

#include "host_device.cuh"

namespace fastat {

// Runs f.template run<N>(i) over [lo, hi): lanes take scalar elements up to the first 16-byte boundary, then
// N-element packs, then the scalar tail. All tensors of one launch share their alignment (checked on the
// host), so a global index that is a multiple of N is 16-byte aligned in every tensor; when they are not
// aligned the host launches with N = 1.
template <int N, typename F>
FASTAT_HD void for_range(int64_t lo, int64_t hi, int64_t lane, int64_t lanes, F& f) {
  if (N == 1) {
    for (int64_t i = lo + lane; i < hi; i += lanes) f.template run<1>(i);
    return;
  }
  int64_t body_lo = (lo + N - 1) / N * N;
  if (body_lo > hi) body_lo = hi;
  int64_t body_hi = hi / N * N;
  if (body_hi < body_lo) body_hi = body_lo;
  for (int64_t i = lo + lane; i < body_lo; i += lanes) f.template run<1>(i);
  for (int64_t i = body_lo + lane * N; i < body_hi; i += lanes * N) f.template run<N>(i);
  for (int64_t i = body_hi + lane; i < hi; i += lanes) f.template run<1>(i);
}

// for_range for a range inside one sample whose per-sample coefficients `c` are known: f.template run_sample<N>(i, c).
template <typename F, typename C>
struct SampleBound {
  F& f;
  C c;  // by value: a reference would put the caller's coefficients in local memory
  template <int M> FASTAT_HD void run(int64_t i) { f.template run_sample<M>(i, c); }
};

template <int N, typename F, typename C>
FASTAT_HD void for_range_sample(int64_t lo, int64_t hi, int64_t lane, int64_t lanes, F& f, const C& c) {
  SampleBound<F, C> bound{f, c};
  for_range<N>(lo, hi, lane, lanes, bound);
}

// Sample index of flat element i and the first element of the next sample. Constructed at i it costs one 64-bit
// division; `seek` moves a kept cursor to a later element without dividing when that element is in the same or
// the next sample (the CPU walks each range in order, so only its first pack divides).
struct SampleCursor {
  int64_t b, next, d;
  FASTAT_HD explicit SampleCursor(int64_t d_ = 1) : b(-1), next(0), d(d_) {}
  FASTAT_HD SampleCursor(int64_t i, int64_t d_) : b(i / d_), next((i / d_ + 1) * d_), d(d_) {}
  FASTAT_HD void advance(int64_t i) {
    while (i >= next) { ++b; next += d; }
  }
  FASTAT_HD void seek(int64_t i) {
    if (i < next && i >= next - d) return;
    if (i >= next && i < next + d) {
      ++b;
      next += d;
      return;
    }
    b = i / d;
    next = (b + 1) * d;
  }
};

// Runs body(k, c) for the elements i + k (k < N) of a pack, with c = coefs(b) the per-sample values of the element's
// sample b: one lookup when the pack lies inside one sample (always when D is a multiple of N), so the loop over k
// is branch-free and the CPU compiler vectorises it; a pack straddling samples is walked element by element.
template <int N, typename Coefs, typename Body>
FASTAT_HD void for_pack(SampleCursor& cur, int64_t i, const Coefs& coefs, const Body& body) {
  cur.seek(i);
  auto c = coefs(cur.b);
  if (i + N <= cur.next) {
#pragma unroll
    for (int k = 0; k < N; ++k) body(k, c);
  } else {
    for (int k = 0; k < N; ++k) {
      if (i + k >= cur.next) {
        cur.advance(i + k);
        c = coefs(cur.b);
      }
      body(k, c);
    }
  }
}

// Logical (row-major) index of flat memory element i, so that in-kernel random draws do not depend on the memory
// layout: the identity for contiguous tensors; for channels_last ones (memory order batch, spatial..., channel) the
// memory position p = s * C + c inside a sample holds logical element c * S + s (S = spatial size).
struct LogicalIndex {
  int64_t d, c, s;
  bool channels_last;
  FASTAT_HD int64_t operator()(int64_t i) const {
    if (!channels_last) return i;
    const int64_t b = i / d, p = i - b * d;
    return b * d + (p % c) * s + p / c;
  }
};

// Per-sample tiling of a [B, D] reduction: each warp reduces one (sample, chunk) tile into one partial; a
// finalize kernel sums a sample's partials in chunk order (deterministic). Chunks are sized so the launch has
// about SMs * 64 warps of work (full occupancy on H100: 2048 threads per SM) but no tile is shorter than
// kMinChunk elements (two 16-byte packs per lane of fp32: a warp's fixed cost, the reset and the shuffle sum,
// stays small; with 1024 a 128x3x32x32 batch filled 48 of 132 SMs), and chunk starts stay pack-aligned when D
// is a multiple of the pack.
constexpr int64_t kMinChunk = 256;
struct Tiling {
  int64_t batch, d, chunk, chunks, tiles, blocks;
};

inline Tiling tiling_for(int64_t batch, int64_t d, int pack, int sms) {
  Tiling t{batch, d, 1, 1, 0, 1};
  if (batch <= 0) return t;
  const int64_t target_warps = static_cast<int64_t>(sms) * 64;
  int64_t chunk = (batch * d + target_warps - 1) / target_warps;
  if (chunk < kMinChunk) chunk = kMinChunk;
  if (chunk > d) chunk = d > 0 ? d : 1;
  int64_t chunks = d > 0 ? (d + chunk - 1) / chunk : 1;
  chunk = d > 0 ? (d + chunks - 1) / chunks : 1;
  chunk = (chunk + pack - 1) / pack * pack;
  chunks = d > 0 ? (d + chunk - 1) / chunk : 1;
  t.chunk = chunk;
  t.chunks = chunks;
  t.tiles = batch * chunks;
  return t;
}

// Sample and flat element range [lo, hi) of one tile.
struct TileRange {
  int64_t b, lo, hi;
};

FASTAT_HD TileRange tile_range(const Tiling& t, int64_t tile) {
  const int64_t b = tile / t.chunks;
  const int64_t c = tile - b * t.chunks;
  const int64_t end = (c + 1) * t.chunk < t.d ? (c + 1) * t.chunk : t.d;
  return TileRange{b, b * t.d + c * t.chunk, b * t.d + end};
}

}  // namespace fastat
