// Scalar helpers shared by the native kernels, written so GCC can vectorize loops using them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <immintrin.h>
#include <cstring>

namespace pagedllm {

// Loads to fp32 (c10's own conversions have branches that block vectorization).
inline float load_f(float x) { return x; }
inline float load_f(double x) { return static_cast<float>(x); }
inline float load_f(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}
inline float load_f(c10::Half x) { return static_cast<float>(x); }

// 2^f for f in [0, 1): degree-6 polynomial, for a float or a vector of floats.
template <typename F>
inline F exp2_fraction(F f) {
  F p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  return p * f + 1.0f;
}

// exp(x), vectorizable: 2^(x log2 e) as exponent bits times a degree-6 polynomial on [0, 1);
// relative error ~2e-7 over the clamped range.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.4426950408889634f;
  const int32_t ti = static_cast<int32_t>(t);
  const int32_t ii = ti - (t < static_cast<float>(ti) ? 1 : 0);  // floor, vectorizable
  const int32_t bits = (ii + 127) << 23;
  return exp2_fraction(t - static_cast<float>(ii)) * __builtin_bit_cast(float, bits);
}

// 16 floats as one GCC vector (one zmm on AVX-512, two ymm on AVX2). Loops written with it
// vectorize for certain: with the decode kernel's softmax written with v16f instead of
// `omp simd` loops, the kernel went from 1.48 to 1.32 ms per layer (128 sequences, bf16).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v16f load16(const c10::BFloat16* p) {
  v16u16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v16f>(__builtin_convertvector(h, v16u32) << 16);
}
inline v16f load16(const c10::Half* p) {
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

// GCC 12 scalarizes __builtin_convertvector from int8 lanes: spelled out with intrinsics.
inline v16f load16(const int8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<v16f>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  v16f v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

// exp_approx on a vector of floats (the same clamping and polynomial); VI: ints of its width.
template <typename VF, typename VI>
inline VF exp_vec(VF x) {
  x = x < -87.0f ? VF{} - 87.0f : x;
  x = x > 88.0f ? VF{} + 88.0f : x;
  const VF t = x * 1.4426950408889634f;
  const VI ti = __builtin_convertvector(t, VI);
  const VI ii = ti + (t < __builtin_convertvector(ti, VF));  // floor: true lanes are -1
  const VI bits = (ii + 127) << 23;
  return exp2_fraction(t - __builtin_convertvector(ii, VF)) * reinterpret_cast<VF>(bits);
}

inline v16f exp16(v16f x) { return exp_vec<v16f, v16i>(x); }

// The ISA's own register width: 16 lanes on AVX-512, 8 on AVX2. A kernel whose register tiles
// hold many accumulators needs it: v16f is two ymm on AVX2, and tiles of v16f spill there (the
// prefill kernel ran at 5.5 GFLOP/s on AVX2 with v16f tiles).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vnf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vni __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vnu16 __attribute__((vector_size(2 * kLanes)));
typedef uint32_t vnu32 __attribute__((vector_size(4 * kLanes)));

inline vnf loadn(const float* p) {
  vnf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vnf loadn(const c10::BFloat16* p) {
  vnu16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vnf>(__builtin_convertvector(h, vnu32) << 16);
}
inline vnf loadn(const c10::Half* p) {
  vnf v;
  for (int i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline void storen(float* p, vnf v) { std::memcpy(p, &v, sizeof(v)); }
inline vnf expn(vnf x) { return exp_vec<vnf, vni>(x); }

}  // namespace pagedllm
