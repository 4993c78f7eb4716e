// Batch-invariant linear (--deterministic): y = x W^T (+ bias) where every output is summed
// over k in one fixed order (k ascending, one accumulator per output) whatever the number of
// rows, a row's place among them and the split over threads. A row's result is then the same
// alone as inside any batch. (oneDNN picks its k-blocking by the row count: of 64 rows of the
// 1536-wide bf16 down projection, 6 differ from the same rows run alone; in fp32 all 64.)
//
//   x     [M, K] fp32 or bf16, rows contiguous
//   wp    the weight [N, K] in panels of P = 4 * kLanes output columns, N zero-padded to a
//         multiple of P (NativeKernels.bi_pack):
//           fp32, or bf16 without AVX512-BF16:  [N/P, K, P]       broadcast FMAs
//           bf16 with AVX512-BF16:              [N/P, K/2, P, 2]  vdpbf16ps on pairs of k
//   bias  [n] in x's dtype, or none;  n: the true output width
// -> y [M, n] in x's dtype: fp32 sums, rounded once to bf16 (to nearest even) for bf16.
//
// Work: row chunks of kChunk (their x stays in cache) one after the other; in each, the panels
// are spread over the threads and every tile of kRows rows runs through a panel's weights once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "common/batch_invariant_linear.h"
#include "common/registration.h"
#include "common/vec_math.h"

namespace {

using pagedllm::kLanes;
using pagedllm::load_f;
using pagedllm::loadn;
using pagedllm::vnf;

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
    for (int j = 0; j < kVecs; ++j) std::memcpy(sums + i * kP + j * kLanes, &acc[i][j], sizeof(vnf));
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
    switch (rows) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
#if defined(__AVX512F__)
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
#endif
      default: TORCH_CHECK(false, "bi_linear: bad tile");
    }
    store_tile(sums, rows, y + r * ldy, ldy, c0, n, bias);
  }
}

template <typename T, typename W, bool Vnni>
void bi_linear_impl(const at::Tensor& x, const at::Tensor& wp, const T* bias, at::Tensor& y,
                    int64_t n) {
  const int64_t m = x.size(0), k = x.size(1), panels = wp.size(0);
  const T* xp = x.data_ptr<T>();
  const W* wptr = reinterpret_cast<const W*>(wp.data_ptr());
  T* yp = y.data_ptr<T>();
  for (int64_t r0 = 0; r0 < m; r0 += kChunk) {
    const int64_t rows = std::min<int64_t>(kChunk, m - r0);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        rows_panel<T, W, Vnni>(xp + r0 * k, k, rows, wptr + p * k * kP, k, yp + r0 * n, n,
                               p * kP, n, bias);
      }
    });
  }
}

at::Tensor bi_linear(const at::Tensor& x, const at::Tensor& wp,
                     const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1),
              "bi_linear: x must be a contiguous [M, K]");
  TORCH_CHECK(wp.is_contiguous() && wp.size(0) * kP >= n && n > 0,
              "bi_linear: wp must be contiguous panels covering n outputs");
  const int64_t k = x.size(1);
  const bool vnni = wp.dim() == 4;
  TORCH_CHECK(vnni ? (wp.size(1) * 2 == k && wp.size(2) == kP && wp.size(3) == 2)
                   : (wp.dim() == 3 && wp.size(1) == k && wp.size(2) == kP),
              "bi_linear: wp's shape does not fit x (panel width ", kP, " on this ISA)");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bi_linear: bias must be a contiguous [n] in x's dtype");
  }
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK(!vnni && wp.scalar_type() == at::kFloat, "bi_linear: fp32 x takes fp32 panels");
    bi_linear_impl<float, float, false>(x, wp, bias ? bias->data_ptr<float>() : nullptr, y, n);
    return y;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16,
              "bi_linear: x and wp must be fp32 or bf16");
  const auto* b = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  if (vnni) {
#if defined(__AVX512BF16__)
    bi_linear_impl<c10::BFloat16, c10::BFloat16, true>(x, wp, b, y, n);
    return y;
#else
    TORCH_CHECK(false, "bi_linear: the VNNI layout needs an AVX512-BF16 build");
#endif
  }
  bi_linear_impl<c10::BFloat16, c10::BFloat16, false>(x, wp, b, y, n);
  return y;
}

}  // namespace

PAGEDLLM_IMPL(m) { m.impl("bi_linear", &bi_linear); }
