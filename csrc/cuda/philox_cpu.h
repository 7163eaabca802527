// The seeded Gaussian stream of philox.cuh (element i = tl.randn(seed, offset + i)) for the CPU walks (`span`) of the
// functors: `fill_normals` draws a block of it sixteen at a time with AVX2 + FMA (host code only: the GPU walks
// call philox_normal per element):
//   * Philox4x32-10 on two independent groups of eight counters (two dependency chains in flight: one chain is
//     latency-bound), the high words of the 32x32 multiplies from _mm256_mul_epu32 on the even and the odd lanes,
//     the round keys computed once per call; the words are exactly fastat::philox4x32's;
//   * triton's uint -> uniform mapping, exact as in fastat::uint_to_uniform;
//   * Box-Muller sqrt(-2 log u1) cos(2 pi u2) in fp32: log by musl's logf scheme (< 1 ulp), cos(2 pi u2) as
//     cos(pi x) at x = 2 u2 (exact), reduced exactly to |r| <= 1/4 and evaluated by its Taylor series to pi^10 r^10
//     (truncation < 3e-9 relative; < 1 ulp), sqrt correctly rounded.
// Against the scalar draw (philox_normal on the host: glibc logf, the double-precision cosine) the normals
// agree to within 3 fp32 ulp (2.8 at most over 50M draws and the edge values; 93% bit-equal; tests/test_cuda_build.py).
// Why not SLEEF's log/cospi: 1.6x slower here, for 99% bit-equal instead of 93%. Every element goes through the
// vector path (a partial group is padded), so an element's value does not depend on where a span starts or ends, and
// every CPU op draws the same values. Without AVX2 and FMA (the "base" CPU build, the CUDA host pass, the host tests)
// `fill_normals` is the scalar loop.
#pragma once

#include <cstdint>

#include "indexing.cuh"
#include "philox.cuh"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDA_ARCH__)
#define FASTAT_PHILOX_AVX2 1
#include <immintrin.h>
#endif

namespace fastat {

#if defined(FASTAT_PHILOX_AVX2)
namespace philox_avx2 {

constexpr int kRounds = 10;

struct Keys {
  __m256i k0[kRounds], k1[kRounds];
  explicit Keys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kRounds; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = _mm256_set1_epi32(static_cast<int>(a));
      k1[r] = _mm256_set1_epi32(static_cast<int>(b));
    }
  }
};

// High and low 32 bits of a * m for eight unsigned lanes (m: the same constant in every lane).
inline void mul_hi_lo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

// One Philox round (fastat::philox4x32) on one group of eight counters.
inline void philox_round(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i k0, __m256i k1) {
  const __m256i m_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i hi_a, lo_a, hi_b, lo_b;
  mul_hi_lo(c0, m_a, hi_a, lo_a);
  mul_hi_lo(c2, m_b, hi_b, lo_b);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), k1);
  c1 = lo_b;
  c3 = lo_a;
}

// Words 0 and 1 of Philox4x32-10 for the counters (lo, hi, 0, 0) of two groups, the rounds interleaved.
inline void philox_words01(const Keys& keys, __m256i lo_a, __m256i hi_a, __m256i lo_b, __m256i hi_b, __m256i* w) {
  __m256i a2 = _mm256_setzero_si256(), a3 = a2, b2 = a2, b3 = a2;
  for (int r = 0; r < kRounds; ++r) {
    philox_round(lo_a, hi_a, a2, a3, keys.k0[r], keys.k1[r]);
    philox_round(lo_b, hi_b, b2, b3, keys.k0[r], keys.k1[r]);
  }
  w[0] = lo_a;
  w[1] = hi_a;
  w[2] = lo_b;
  w[3] = hi_b;
}

// fastat::uint_to_uniform on eight lanes.
inline __m256 to_uniform(__m256i x) {
  const __m256i s = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // x < 0 ? ~x : x (as int32)
  return _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(4.6566127342e-10f));
}

// log(x) for positive normal x, musl's logf: x = 2^k (1 + f) with 1 + f in [sqrt(2)/2, sqrt(2)), s = f / (2 + f),
// log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)).
inline __m256 log_ps(__m256 x) {
  __m256i ix = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(0x3f800000 - 0x3f3504f3));
  const __m256 k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(ix, 23), _mm256_set1_epi32(0x7f)));
  ix = _mm256_add_epi32(_mm256_and_si256(ix, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f3504f3));
  const __m256 f = _mm256_sub_ps(_mm256_castsi256_ps(ix), _mm256_set1_ps(1.0f));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s), w = _mm256_mul_ps(z, z);
  const __m256 t1 = _mm256_mul_ps(w, _mm256_fmadd_ps(w, _mm256_set1_ps(0.24279078841f), _mm256_set1_ps(0.40000972152f)));
  const __m256 t2 = _mm256_mul_ps(z, _mm256_fmadd_ps(w, _mm256_set1_ps(0.28498786688f), _mm256_set1_ps(0.66666662693f)));
  const __m256 half_f2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), f), f);
  __m256 r = _mm256_fmadd_ps(s, _mm256_add_ps(half_f2, _mm256_add_ps(t2, t1)), _mm256_mul_ps(k, _mm256_set1_ps(9.0580006145e-06f)));
  r = _mm256_add_ps(_mm256_sub_ps(r, half_f2), f);
  return _mm256_fmadd_ps(k, _mm256_set1_ps(6.9313812256e-01f), r);  // + k ln2 (hi part; the lo part above)
}

// cos(pi x) for x in [0, 2]: x = q/2 + r (q = nearest integer to 2x, r exact, |r| <= 1/4), then by q mod 4
// cos(pi r), -sin(pi r), -cos(pi r), sin(pi r); both by Taylor series in r^2 (the coefficients (-1)^k pi^n / n!).
inline __m256 cospi_ps(__m256 x) {
  const __m256 q = _mm256_round_ps(_mm256_add_ps(x, x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(q, _mm256_set1_ps(0.5f), x);
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 sine = _mm256_set1_ps(8.21458866111282287e-2f);
  sine = _mm256_fmadd_ps(sine, z, _mm256_set1_ps(-5.99264529320792077e-1f));
  sine = _mm256_fmadd_ps(sine, z, _mm256_set1_ps(2.55016403987734544f));
  sine = _mm256_fmadd_ps(sine, z, _mm256_set1_ps(-5.16771278004997003f));
  sine = _mm256_fmadd_ps(sine, z, _mm256_set1_ps(-8.74227766e-8f));  // pi - fp32(pi), added to the pi r term below
  sine = _mm256_fmadd_ps(r, _mm256_set1_ps(3.14159265358979324f), _mm256_mul_ps(r, sine));
  __m256 cosine = _mm256_set1_ps(-2.58068913900140507e-2f);
  cosine = _mm256_fmadd_ps(cosine, z, _mm256_set1_ps(2.35330630358893200e-1f));
  cosine = _mm256_fmadd_ps(cosine, z, _mm256_set1_ps(-1.33526276885458950f));
  cosine = _mm256_fmadd_ps(cosine, z, _mm256_set1_ps(4.05871212641676822f));
  cosine = _mm256_fmadd_ps(cosine, z, _mm256_set1_ps(-4.93480220054467931f));
  cosine = _mm256_fmadd_ps(cosine, z, _mm256_set1_ps(1.0f));
  const __m256i qi = _mm256_cvtps_epi32(q);
  const __m256 odd = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(qi, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256i negate = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(qi, _mm256_set1_epi32(1)), _mm256_set1_epi32(2)), 30);
  return _mm256_xor_ps(_mm256_blendv_ps(cosine, sine, odd), _mm256_castsi256_ps(negate));
}

// fastat::box_muller on eight lanes: sqrt(-2 log(max(u1, 1e-7))) * cos(2 pi u2).
inline __m256 box_muller(__m256 u1, __m256 u2) {
  u1 = _mm256_max_ps(u1, _mm256_set1_ps(1.0e-7f));
  const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log_ps(u1)));
  return _mm256_mul_ps(radius, cospi_ps(_mm256_add_ps(u2, u2)));
}

// The 64-bit Philox counters offset + logical(first + k), k = 0..15, split in low and high words.
inline void counters(uint64_t offset, const LogicalIndex& logical, int64_t first, int64_t valid, __m256i* lo,
                     __m256i* hi) {
  const uint64_t base = offset + static_cast<uint64_t>(logical(first));
  if (!logical.channels_last && static_cast<uint32_t>(base) <= 0xFFFFFFFFu - 15u) {  // consecutive, no carry
    const __m256i low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    lo[0] = _mm256_add_epi32(low, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    lo[1] = _mm256_add_epi32(low, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
    hi[0] = hi[1] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    return;
  }
  alignas(32) uint32_t l[16], h[16];
  for (int j = 0; j < 16; ++j) {
    const uint64_t c = j < valid ? offset + static_cast<uint64_t>(logical(first + j)) : base;  // padding: any counter
    l[j] = static_cast<uint32_t>(c);
    h[j] = static_cast<uint32_t>(c >> 32);
  }
  for (int g = 0; g < 2; ++g) {
    lo[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(l + 8 * g));
    hi[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(h + 8 * g));
  }
}

}  // namespace philox_avx2
#endif

constexpr int64_t kNormalBlock = 256;  // normals a CPU span draws at a time (on its stack)

// out[k] = N(0, 1) of memory element first + k (logical index logical(first + k)) for k in [0, count):
// philox_normal, sixteen at a time where AVX2 and FMA are built in.
inline void fill_normals(uint64_t seed, uint64_t offset, const LogicalIndex& logical, int64_t first,
                         int64_t count, float* out) {
#if defined(FASTAT_PHILOX_AVX2)
  const philox_avx2::Keys keys(seed);
  for (int64_t k = 0; k < count; k += 16) {
    const int64_t valid = count - k < 16 ? count - k : 16;
    __m256i lo[2], hi[2], w[4];
    philox_avx2::counters(offset, logical, first + k, valid, lo, hi);
    philox_avx2::philox_words01(keys, lo[0], hi[0], lo[1], hi[1], w);
    alignas(32) float n[16];
    _mm256_store_ps(n, philox_avx2::box_muller(philox_avx2::to_uniform(w[0]), philox_avx2::to_uniform(w[1])));
    _mm256_store_ps(n + 8, philox_avx2::box_muller(philox_avx2::to_uniform(w[2]), philox_avx2::to_uniform(w[3])));
    if (valid == 16) {
      _mm256_storeu_ps(out + k, _mm256_load_ps(n));
      _mm256_storeu_ps(out + k + 8, _mm256_load_ps(n + 8));
    } else {
      for (int64_t j = 0; j < valid; ++j) out[k + j] = n[j];
    }
  }
#else
  for (int64_t k = 0; k < count; ++k) out[k] = philox_normal(seed, offset, logical(first + k));
#endif
}

}  // namespace fastat
