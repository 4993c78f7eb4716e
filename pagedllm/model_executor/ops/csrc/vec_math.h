// Scalar helpers shared by the native kernels, written so GCC can vectorize loops using them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace pagedllm {

// Loads to fp32 (c10's own conversions have branches that block vectorization).
inline float load_f(float x) { return x; }
inline float load_f(double x) { return static_cast<float>(x); }
inline float load_f(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}
inline float load_f(c10::Half x) { return static_cast<float>(x); }

// exp(x), vectorizable: 2^(x log2 e) as exponent bits times a degree-6 polynomial on [0, 1);
// relative error ~2e-7 over the clamped range.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.4426950408889634f;
  const int32_t ti = static_cast<int32_t>(t);
  const int32_t ii = ti - (t < static_cast<float>(ti) ? 1 : 0);  // floor, vectorizable
  const float f = t - static_cast<float>(ii);
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (ii + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

}  // namespace pagedllm
