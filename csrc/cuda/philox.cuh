// Philox4x32-10 and Box-Muller exactly as triton's tl.randint4x / tl.randn (triton/language/random.py),
// usable from device code and from plain host C++ (the CPU test compiles this header with g++).
//
//   counter = (lo32(offset + i), hi32(offset + i), 0, 0), key = (lo32(seed), hi32(seed))
//   u_k     = int32(c_k) -> (c_k >= 0 ? c_k : ~c_k) * 4.6566127342e-10f        in [0, 1)
//   n       = sqrt(-2 log(max(u_0, 1e-7))) * cos(6.2831855f * u_1)
//
// The Philox words and the uniforms are bit-identical to triton's and to fastat/ops/noise/reference.py.
// The Gaussian uses CUDA's logf/sqrtf and cospif (IEEE, no fast-math); triton may lower log/cos/sqrt to other
// instruction sequences, so the normals agree to a few fp32 ulp, not bit for bit.
// Why one Philox4x32-10 per element (3 of its 4 words unused), not four normals per call (tl.randn4x): the stream
// is the contract of SeededNoise -- element i of gaussian_noise(seed, offset) is tl.randn(seed, offset + i) on every
// backend and in the torch reference -- so a seed saved in training reproduces the noise it drew. Four normals per
// call would take the draw from ~140 SASS instructions per element to ~40 but change every value; it saves at most
// the noise tensor's read (a quarter of noisy_input's bytes) and only on the seeded path at sizes that are not
// launch-bound (kernel audit, fastat/bench/audit). If adopted it would be a second stream selected per SeededNoise,
// this one kept as the default.
#pragma once

#include <cstdint>
#include <cmath>

#include "host_device.cuh"

namespace fastat {

struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

FASTAT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds; `subsequence` is counter word c2 (triton uses 0; fastat uses 1 for the
// per-sample uniforms of the L2-ball start so the two streams never overlap).
FASTAT_HD Philox4 philox4x32(uint64_t seed, uint64_t counter, uint32_t subsequence = 0) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = subsequence, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{c0, c1, c2, c3};
}

// triton's uint_to_uniform_float for 32-bit words: [0, 1), never 1.
FASTAT_HD float uint_to_uniform(uint32_t x) {
  int32_t s = static_cast<int32_t>(x);
  s = s < 0 ? ~s : s;
  return static_cast<float>(s) * 4.6566127342e-10f;
}

// cos(2 pi u2) without cosf's large-argument reduction (a local-memory table: a stack frame and spills in every
// kernel that draws): cospi on the device, the double-precision cosine on the host, both within an ulp of the exact
// value (triton's cos(6.2831855f * u2) is within a few).
FASTAT_HD float cos_two_pi(float u2) {
#if defined(__CUDA_ARCH__)
  return cospif(2.0f * u2);
#else
  return static_cast<float>(std::cos(6.283185307179586 * static_cast<double>(u2)));
#endif
}

FASTAT_HD float box_muller(float u1, float u2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  return sqrtf(-2.0f * logf(u1)) * cos_two_pi(u2);
}

// N(0, 1) for logical element `index` of a tensor filled from (seed, offset): triton's tl.randn(seed, offset + index).
FASTAT_HD float philox_normal(uint64_t seed, uint64_t offset, int64_t index) {
  const Philox4 r = philox4x32(seed, offset + static_cast<uint64_t>(index));
  return box_muller(uint_to_uniform(r.c0), uint_to_uniform(r.c1));
}

// U[0, 1) for logical element `index`: triton's tl.rand(seed, offset + index).
FASTAT_HD float philox_uniform(uint64_t seed, uint64_t offset, int64_t index, uint32_t subsequence = 0) {
  return uint_to_uniform(philox4x32(seed, offset + static_cast<uint64_t>(index), subsequence).c0);
}

}  // namespace fastat
