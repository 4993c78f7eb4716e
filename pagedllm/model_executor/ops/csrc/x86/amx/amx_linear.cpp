// y = x . W^T for decode-sized batches in bf16 on AMX tiles.
//
// oneDNN's packed bf16 GEMM runs a decode step's projections well while the weights sit in
// cache, but in the engine the attention between two layers streams the KV cache through and
// every layer's weights come back from memory: 30 layers + lm_head of SmolLM2-135M took 24-25 ms
// at 96 rows and 15-17 ms at 16 rows, against 19 and 10-11 ms here. The weight is packed once
// into the tiles' pair-interleaved (VNNI) layout, one contiguous 16-column panel after another,
//
//   wp[nb][kc][r][c][e] = W[16 nb + c][32 kc + 2 r + e]     (one 1 KiB B tile per (nb, kc))
//
// and each thread streams its own run of panels once. Work goes in chunks of kChunk panel
// pairs (32 columns each): every pair of 16-row tiles of x (straight from x's rows, no packing)
// meets every pair in the chunk, while the next chunk is prefetched into L2. Batches past 1,024
// rows stay on oneDNN, which blocks over the rows as well (2,048 rows: 276 vs 355 ms here).
#include <ATen/ATen.h>
#include "common/registration.h"
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "x86/amx/amx.h"

#ifdef PAGEDLLM_AMX
#include <omp.h>
#endif

namespace {

#ifdef PAGEDLLM_AMX

using pagedllm::configure_tiles;

constexpr int64_t kTile = 16 * 32;  // bf16 elements of one packed B tile
constexpr int64_t kChunk = 4;       // panel pairs per chunk

// Rows of two 16x16 fp32 tiles side by side (buf, 32 floats a row) -> bf16 out rows.
inline void store_rows(const float* buf, int64_t rows, c10::BFloat16* out, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(buf + r * 32 + 16),
                                           _mm512_loadu_ps(buf + r * 32));
    _mm512_storeu_si512(out + r * ldo, reinterpret_cast<__m512i>(v));
  }
}

// x [m, k] (row stride lda), its last partial 16-row tile zero-padded in `tail`.
void linear_amx(const c10::BFloat16* x, int64_t lda, const c10::BFloat16* tail, int64_t m,
                int64_t k, const c10::BFloat16* wp, int64_t n, c10::BFloat16* out) {
  const int64_t kcs = k / 32, pairs = n / 32, tiles = (m + 15) / 16, full = m / 16;
  const int64_t pair_elems = 2 * kcs * kTile;
  const auto a_ptr = [&](int64_t t) { return t < full ? x + t * 16 * lda : tail; };
  const auto a_stride = [&](int64_t t) { return (t < full ? lda : k) * 2; };
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t p0 = pairs * t / nt, p1 = pairs * (t + 1) / nt;
    configure_tiles();
    alignas(64) float buf[16 * 32];
    for (int64_t c0 = p0; c0 < p1; c0 += kChunk) {
      const int64_t c1 = std::min(p1, c0 + kChunk);
      // The next chunk, spread over this chunk's k steps.
      const char* pf = reinterpret_cast<const char*>(wp + c1 * pair_elems);
      const char* pf_end =
          reinterpret_cast<const char*>(wp + std::min(p1, c1 + kChunk) * pair_elems);
      const int64_t steps = (tiles + 1) / 2 * (c1 - c0) * kcs;
      const int64_t per_step = ((pf_end - pf) / 64 + steps - 1) / steps;
      for (int64_t mt = 0; mt < tiles; mt += 2) {
        const bool two = mt + 1 < tiles;
        const c10::BFloat16 *a0 = a_ptr(mt), *a1 = a_ptr(mt + 1);
        const int64_t s0 = a_stride(mt), s1 = a_stride(mt + 1);
        for (int64_t p = c0; p < c1; ++p) {
          const c10::BFloat16* b0 = wp + p * pair_elems;
          const c10::BFloat16* b1 = b0 + kcs * kTile;
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t kc = 0; kc < kcs; ++kc) {
            _tile_loadd(4, a0 + kc * 32, s0);
            _tile_loadd(6, b0 + kc * kTile, 64);
            _tile_loadd(7, b1 + kc * kTile, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
              _tile_loadd(5, a1 + kc * 32, s1);
              _tile_dpbf16ps(2, 5, 6);
              _tile_dpbf16ps(3, 5, 7);
            }
            for (int64_t i = 0; i < per_step && pf < pf_end; ++i, pf += 64)
              _mm_prefetch(pf, _MM_HINT_T1);
          }
          _tile_stored(0, buf, 128);
          _tile_stored(1, buf + 16, 128);
          store_rows(buf, std::min<int64_t>(16, m - mt * 16), out + mt * 16 * n + p * 32, n);
          if (two) {
            _tile_stored(2, buf, 128);
            _tile_stored(3, buf + 16, 128);
            store_rows(buf, std::min<int64_t>(16, m - mt * 16 - 16),
                       out + (mt + 1) * 16 * n + p * 32, n);
          }
        }
      }
    }
    _tile_release();
  }
}

#endif  // PAGEDLLM_AMX

// x [m, k] bf16 (rows may be strided), wp the packed [n / 16, k / 32, 16, 16, 2] bf16 weight
// (see the top of this file) -> [m, n] bf16.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& wp) {
  TORCH_CHECK(pagedllm::amx_supported(), "amx_linear needs AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "amx_linear: x must be a bf16 [rows, k] matrix with contiguous rows");
  TORCH_CHECK(wp.dim() == 5 && wp.scalar_type() == at::kBFloat16 && wp.is_contiguous() &&
                  wp.size(2) == 16 && wp.size(3) == 16 && wp.size(4) == 2,
              "amx_linear: wp must be a contiguous packed [n/16, k/32, 16, 16, 2] bf16 weight");
  const int64_t m = x.size(0), k = x.size(1), n = wp.size(0) * 16;
  TORCH_CHECK(k > 0 && wp.size(1) * 32 == k, "amx_linear: x has ", k, " columns, the weight ",
              wp.size(1) * 32);
  TORCH_CHECK(n % 32 == 0, "amx_linear: output features must be a multiple of 32");
  auto out = at::empty({m, n}, x.options());
#ifdef PAGEDLLM_AMX
  if (m == 0) return out;
  const auto* xp = x.data_ptr<c10::BFloat16>();
  std::vector<c10::BFloat16> tail;
  if (m % 16) {
    tail.assign(16 * k, c10::BFloat16(0.f));
    for (int64_t r = 0; r < m % 16; ++r)
      std::memcpy(tail.data() + r * k, xp + (m / 16 * 16 + r) * x.stride(0), k * 2);
  }
  linear_amx(xp, x.stride(0), tail.data(), m, k, wp.data_ptr<c10::BFloat16>(), n,
             out.data_ptr<c10::BFloat16>());
#endif
  return out;
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("amx_linear", &amx_linear);
}
