// Register tiles of a small GEMM against one weight panel: y[:, c0:c0+P] = x W_panel^T with
// every output summed over k in one fixed order (k ascending, one accumulator), whatever the
// number of rows. Shared by the batch-invariant linear (generic/batch_invariant_linear.cpp)
// and the GGUF linear (generic/quant_linear.cpp), which decodes its panels from ggml blocks.
//
// Panels of kP = kBiVecs * kLanes output columns:
//   fp32, or bf16 without AVX512-BF16:  [K, kP]       broadcast FMAs
//   bf16 with AVX512-BF16:              [K/2, kP, 2]  vdpbf16ps on pairs of k
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/batch_invariant_linear.h"
#include "common/tile_rows.h"
#include "common/vec_math.h"

namespace pagedllm::panel {

constexpr int kVecs = pagedllm::kBiVecs;  // registers of outputs per row in a tile
constexpr int kP = kVecs * kLanes;    // panel width
constexpr int kRows = kLanes == 16 ? 4 : 2;  // kRows x kVecs accumulators fit the registers
constexpr int64_t kChunk = 128;

// One tile's sums (fp32, [kRows][kP]) -> y's columns [c0, c0 + kP) of rows [0, m).
template <typename T>
void store_tile(const float* sums, int m, T* y, int64_t ldy, int64_t c0, int64_t n,
                const T* bias) {
  const int64_t cols = std::min<int64_t>(kP, n - c0);
  for (int i = 0; i < m; ++i) {
    T* yr = y + i * ldy + c0;
    const float* s = sums + i * kP;
    for (int64_t c = 0; c < cols; ++c) {
      float v = s[c] + (bias ? load_f(bias[c0 + c]) : 0.0f);
      if constexpr (std::is_same_v<T, float>) {
        yr[c] = v;
      } else {
        uint32_t bits = __builtin_bit_cast(uint32_t, v);
        bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
        yr[c] = c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
      }
    }
  }
}

// M rows x one panel with broadcast FMAs: w [K][kP] (fp32 or bf16, widened on load).
template <int M, typename T, typename W>
void tile_fma(const T* x, int64_t ldx, const W* w, int64_t k, float* sums) {
  vnf acc[M][kVecs] = {};
  for (int64_t c = 0; c < k; ++c) {
    float xs[M];
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) xs[i] = load_f(x[i * ldx + c]);
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      const vnf wv = loadn(w + c * kP + j * kLanes);
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) acc[i][j] += xs[i] * wv;
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < kVecs; ++j)
      std::memcpy(sums + i * kP + j * kLanes, &acc[i][j], sizeof(vnf));
}

#if defined(__AVX512BF16__)
// M rows x one panel on pairs of k: w [K/2][kP][2] bf16.
template <int M>
void tile_vnni(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t k,
               float* sums) {
  static_assert(kLanes == 16, "the VNNI tile is AVX-512");
  __m512 acc[M][kVecs];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < kVecs; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t cp = 0; cp < k / 2; ++cp) {
    __m512bh xs[M];
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) {
      uint32_t pair;
      std::memcpy(&pair, x + i * ldx + 2 * cp, 4);
      xs[i] = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
    }
#pragma GCC unroll 4
    for (int j = 0; j < kVecs; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (cp * kP + j * 16) * 2);
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xs[i], wv);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < kVecs; ++j) _mm512_storeu_ps(sums + i * kP + j * 16, acc[i][j]);
}
#endif

// Rows [0, m) x one panel, kRows at a time (the tail's rows run in the same order).
template <typename T, typename W, bool Vnni>
void rows_panel(const T* x, int64_t ldx, int64_t m, const W* w, int64_t k, T* y, int64_t ldy,
                int64_t c0, int64_t n, const T* bias) {
  alignas(64) float sums[kRows * kP];
  for (int64_t r = 0; r < m; r += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, m - r));
    const T* xr = x + r * ldx;
    auto run = [&](auto tag) {
      constexpr int R = decltype(tag)::value;
#if defined(__AVX512BF16__)
      if constexpr (Vnni) {
        tile_vnni<R>(xr, ldx, w, k, sums);
        return;
      }
#endif
      if constexpr (!Vnni) tile_fma<R>(xr, ldx, w, k, sums);
    };
    with_tile_rows(rows, "bi_linear", run);
    store_tile(sums, rows, y + r * ldy, ldy, c0, n, bias);
  }
}

}  // namespace pagedllm::panel
