// AMX tile set-up and AVX-512 helpers shared by the kernels that use them (prefill_attention.cpp,
// paged_attention_multi.cpp, amx_linear.cpp).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PAGEDLLM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace pagedllm {

// Linux hands out AMX state only on request (once per process).
inline bool amx_usable() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: A = 16 x 32 bf16, B = 16 pairs x 16 x 2 bf16, C = 16 x 16 fp32.
// The configuration is per thread and other libraries (oneDNN) change it: set it per call.
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 2^x for x <= 0 (clamped at -126): a degree-4 polynomial on the fraction (relative error
// 5e-6, far below the bf16 rounding of the probabilities), scaled by 2^floor(x).
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 fl = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, fl);
  __m512 p = _mm512_set1_ps(0.013511536f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.051989668f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.241508717f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.692974317f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000005253f));
  return _mm512_scalef_ps(p, fl);
}

// x as the sum of two bf16 values (16 significant bits): P . V as two tile products keeps the
// probabilities about as exact as fp32, so the output's only rounding is its own to bf16 (max
// error against fp32 attention 0.0078, against 0.0091 with one bf16 P, as torch's flash
// attention has), for ~15% more kernel time.
inline void split_store(__m512 x, uint16_t* hi, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(x, _mm512_cvtpbh_ps(h)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), reinterpret_cast<__m256i>(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), reinterpret_cast<__m256i>(l));
}

// Score rows -> p = exp((s - max) * scale) over each row's first visible[i] keys, as bf16 high
// parts (rows 0..15 of p) and low parts (rows 16..31), zero from there up to `padded` (and whole
// rows at or past `rows`); inv_sum[i] = 1 / the row's sum (the output rows are scaled by it, so
// p needs no second pass).
inline void softmax_split_rows(const float* s, int64_t s_stride, int rows, const int64_t* visible,
                               float scale, uint16_t* p, int64_t p_stride, int64_t padded,
                               float* inv_sum) {
  const __m512 k = _mm512_set1_ps(scale * 1.4426950408889634f);
  for (int i = 0; i < 16; ++i) {
    uint16_t* hi = p + i * p_stride;
    uint16_t* lo = p + (i + 16) * p_stride;
    if (i >= rows) {
      std::memset(hi, 0, padded * 2);
      std::memset(lo, 0, padded * 2);
      inv_sum[i] = 0.f;
      continue;
    }
    const float* sr = s + i * s_stride;
    const int64_t n = visible[i];
    const int64_t nv = n / 16 * 16;
    const int tail = static_cast<int>(n - nv);
    const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < nv; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sr + j));
    if (tail) mv = _mm512_mask_max_ps(mv, tail_mask, mv, _mm512_maskz_loadu_ps(tail_mask, sr + nv));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nv; j += 16) {
      const __m512 e = exp2_neg(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m), k));
      sum = _mm512_add_ps(sum, e);
      split_store(e, hi + j, lo + j);
    }
    int64_t done = nv;
    if (tail) {
      const __m512 x =
          _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail_mask, sr + nv), m), k);
      const __m512 e = _mm512_maskz_mov_ps(tail_mask, exp2_neg(x));
      sum = _mm512_add_ps(sum, e);
      split_store(e, hi + nv, lo + nv);
      done += 16;
    }
    inv_sum[i] = 1.f / _mm512_reduce_add_ps(sum);
    std::memset(hi + done, 0, (padded - done) * 2);
    std::memset(lo + done, 0, (padded - done) * 2);
  }
}

// Tiles 4..7 (O, 16 rows x 64 dims) -> `o` [16][64] fp32.
inline void store_output_tiles(float* o) {
  _tile_stored(4, o, 64 * 4);
  _tile_stored(5, o + 16, 64 * 4);
  _tile_stored(6, o + 32, 64 * 4);
  _tile_stored(7, o + 48, 64 * 4);
}

// One output row: 64 fp32 values x inv_sum, rounded to bf16.
inline void store_scaled_row(const float* o, float inv_sum, c10::BFloat16* dst) {
  for (int c = 0; c < 64; c += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o + c), _mm512_set1_ps(inv_sum));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
  }
}

// Tiles 4..7 (O, 16 rows x 64 dims in four 16-column tiles) += P . V for 32 keys, with P as its
// bf16 high and low parts (A tiles, `p_stride` bytes per row) and V's four B tiles at `v`,
// `v + v_step`, ... (`v_stride` bytes per row). Uses tiles 0..3.
inline void accumulate_pv(const uint16_t* p_hi, const uint16_t* p_lo, int64_t p_stride,
                          const uint16_t* v, int64_t v_step, int64_t v_stride) {
  _tile_loadd(1, p_hi, p_stride);
  _tile_loadd(0, p_lo, p_stride);
  _tile_loadd(2, v, v_stride);
  _tile_dpbf16ps(4, 1, 2);
  _tile_dpbf16ps(4, 0, 2);
  _tile_loadd(3, v + v_step, v_stride);
  _tile_dpbf16ps(5, 1, 3);
  _tile_dpbf16ps(5, 0, 3);
  _tile_loadd(2, v + 2 * v_step, v_stride);
  _tile_dpbf16ps(6, 1, 2);
  _tile_dpbf16ps(6, 0, 2);
  _tile_loadd(3, v + 3 * v_step, v_stride);
  _tile_dpbf16ps(7, 1, 3);
  _tile_dpbf16ps(7, 0, 3);
}

}  // namespace pagedllm

#endif

namespace pagedllm {

// Whether the AMX kernels can run: built for AMX and granted by the kernel (op `amx_supported`).
inline bool amx_supported() {
#ifdef PAGEDLLM_AMX
  return amx_usable();
#else
  return false;
#endif
}

}  // namespace pagedllm
