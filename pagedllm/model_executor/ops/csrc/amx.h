// AMX tile set-up and AVX-512 helpers shared by the kernels that use them (prefill_attention.cpp,
// paged_attention_multi.cpp, amx_linear.cpp).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PAGEDLLM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

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
