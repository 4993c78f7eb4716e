// Paged attention for a few query tokens per sequence on top of its cached context: the
// verification step of speculative decoding (the newest token and the drafts after it).
//
//   q: [T, num_heads, D]; sequence b owns rows query_start[b] .. query_start[b + 1] - 1, the
//   last q_len positions of its seq_lens[b] tokens (their K/V are already in the cache).
//   Caches and block tables as in paged_attention.cpp (K transposed per block).
//
// Work is split over (sequence, kv head) as in the decode kernel, and all q_len x G query rows
// of a task share one read of each K/V block: the point of verifying drafts is that the cache
// is streamed once for several tokens. Row (i, g) attends keys [0, seq_len - q_len + i], or in a
// sliding-window layer (window > 0) the last ``window`` of them: blocks before the first row's
// window are not read at all.
//
// With q_len x G rows multiplying each key, vector FMAs made this kernel compute-bound (5 query
// tokens x 3 heads: 2.8x the decode kernel's time). In bf16 on AVX-512-BF16 the scores run on
// pair dot products (scores_pairs: 3.61 -> 3.25 ms a layer, 150 sequences x 350 tokens, 5
// tokens x 3 heads, Zen 5). In bf16 with head_dim 64 and at most 16
// rows, on a CPU with AMX, the products run on tiles instead: each 16-key chunk of K^T and each
// 32 keys of V are repacked into the tiles' pair-interleaved layout on the fly (a permute per 64
// bytes), S = Q K^T and O = P V are tile dot products, and P is split into two bf16 parts as in
// prefill_attention.cpp.
#include <ATen/ATen.h>
#include "common/registration.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "x86/amx/amx.h"
#include "common/attention_common.h"
#include "common/vec_math.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using pagedllm::kFarAhead;
using pagedllm::load16;
using pagedllm::prefetch_slice;
using pagedllm::softmax;
using pagedllm::store16;
using pagedllm::v16f;

constexpr int64_t kMaxRows = 64;  // q_len x query heads per kv head
constexpr int kScoreRows = 8;      // query rows per register pass over a K block

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if defined(__AVX512BF16__)
// bf16 scores without AMX: S = Q K^T on vdpbf16ps (bf16 products are exact in fp32, so only the
// summation order differs from the FMA path), the softmax scale applied to the sums. Each
// 16-key column of K^T is interleaved into pairs of dims once (one permute per 64 bytes) and
// shared by R query rows: ~half the instructions of converting K to fp32 and 64 FMAs a row.
// (P V stays on fp32 FMAs: in bf16 pairs P would be rounded, or split in two at no gain.)
template <int R>
inline void scores_pairs(const uint16_t* qb, int64_t qld, const uint16_t* kt, int64_t bs,
                         int64_t c, int D, __m512i interleave, float scale, float* s,
                         int64_t ld) {
  __m512 a[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int dp = 0; dp < D / 2; ++dp) {
    const uint16_t* r0 = kt + 2 * dp * bs + c;
    const __m512i x =
        bs == 16 ? _mm512_loadu_si512(r0)
                 : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
                                          reinterpret_cast<const __m256i*>(r0))),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + bs)),
                                      1);
    const __m512bh kv = (__m512bh)_mm512_permutexvar_epi16(interleave, x);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, qb + r * qld + 2 * dp, 4);
      a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(pair), kv);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(s + r * ld, _mm512_mul_ps(a[r], sc));
}

// Element 2j <- element j, 2j + 1 <- element 16 + j: K^T rows 2dp and 2dp + 1 (16 keys each,
// the two halves of one register) -> 16 pairs.
inline __m512i pair_rows_index() {
  alignas(64) uint16_t r[32];
  for (int j = 0; j < 16; ++j) r[2 * j] = j, r[2 * j + 1] = 16 + j;
  return _mm512_load_si512(r);
}
#endif

template <typename T, typename C, int D>
void multi_query_impl(const T* q, const C* k_cache, const C* v_cache, const int64_t* tables,
                      const int64_t* seq_lens, const int64_t* query_start, T* out,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t bs,
                      int64_t max_blocks, float scale, int64_t max_seq_len,
                      int64_t max_query_len, int64_t window) {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  constexpr int NV = D / 16;
  // Rows per register pass over a V block: NV accumulators each, 16 at most.
  constexpr int kValueRows = std::max(1, std::min(8, 16 / NV));
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = D * bs;
  const int64_t block_stride = num_kv_heads * head_stride;
  const int64_t ld = round_up(std::max<int64_t>(max_seq_len, 1), bs);
  // bf16 queries and cache on AVX-512-BF16: scores on pair dot products (4 to 16 rows a pass).
#if defined(__AVX512BF16__)
  constexpr bool kPairs =
      std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, c10::BFloat16>;
  const __m512i interleave = pair_rows_index();
#else
  constexpr bool kPairs = false;
#endif
  const int64_t rows_alloc = round_up(max_query_len * group, 16 * kValueRows);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(rows_alloc * ld), qf(rows_alloc * D), acc(rows_alloc * D);
    std::vector<uint16_t> qb(kPairs ? rows_alloc * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, hk = task % num_kv_heads;
      const int64_t len = seq_lens[b], q0 = query_start[b];
      const int64_t q_len = query_start[b + 1] - q0;
      const int64_t rows = q_len * group;
      // Score rows computed: pair passes take 4, 8, 12 or 16 rows (a plain decode among the
      // verified sequences, 1 token x 3 heads, computes 4 rows, not 8).
      const int64_t rows_k = round_up(rows, kPairs ? 4 : kScoreRows);
      const int64_t rows_v = round_up(rows, kValueRows);
      const int64_t nblocks = (len + bs - 1) / bs;
      // The first key any row sees (row 0's window), and its block.
      const int64_t first_key = window > 0 ? std::max<int64_t>(0, len - q_len + 1 - window) : 0;
      const int64_t blk0 = first_key / bs;
      const int64_t* table = tables + b * max_blocks;
      // Row r = i * group + g: query token i, query head hk * group + g. Pad rows stay zero;
      // bf16 rows for pair dot products are not scaled (scores_pairs scales the sums).
      if constexpr (kPairs) {
        std::fill(qb.begin(), qb.begin() + rows_k * D, uint16_t{0});
        for (int64_t i = 0; i < q_len; ++i)
          std::memcpy(qb.data() + i * group * D, q + ((q0 + i) * num_heads + hk * group) * D,
                      group * D * sizeof(T));
      } else {
        std::fill(qf.begin(), qf.begin() + std::max(rows_k, rows_v) * D, 0.f);
        for (int64_t i = 0; i < q_len; ++i) {
          const T* qi = q + ((q0 + i) * num_heads + hk * group) * D;
          for (int64_t x = 0; x < group * D; ++x)
            qf[i * group * D + x] = static_cast<float>(qi[x]) * scale;
        }
      }
      // As in the decode kernel: the first blocks' prefetches, which the loops' kFarAhead
      // prefetch does not cover (of K here, of V before the softmax, and of the next task's K
      // while V is read).
      for (int64_t blk = blk0 + 1; blk < std::min(nblocks, blk0 + kFarAhead); ++blk)
        prefetch_slice<1>(k_cache + table[blk] * block_stride + hk * head_stride, head_stride);
      for (int64_t blk = blk0; blk < nblocks; ++blk) {
        const C* __restrict kt = k_cache + table[blk] * block_stride + hk * head_stride;
        if (blk + 1 < nblocks)
          prefetch_slice(k_cache + table[blk + 1] * block_stride + hk * head_stride, head_stride);
        if (blk + kFarAhead < nblocks)
          prefetch_slice<1>(k_cache + table[blk + kFarAhead] * block_stride + hk * head_stride,
                            head_stride);
#if defined(__AVX512BF16__)
        if constexpr (kPairs) {
          const auto* kt16 = reinterpret_cast<const uint16_t*>(kt);
          for (int64_t c = 0; c < bs; c += 16) {
            for (int64_t r0 = 0; r0 < rows_k; r0 += 16) {
              auto pass = [&](auto r_tag) {
                scores_pairs<decltype(r_tag)::value>(qb.data() + r0 * D, D, kt16, bs, c, D,
                                                     interleave, scale,
                                                     scores.data() + r0 * ld + blk * bs + c, ld);
              };
              switch (std::min<int64_t>(16, rows_k - r0)) {  // a multiple of 4
                case 4: pass(std::integral_constant<int, 4>{}); break;
                case 8: pass(std::integral_constant<int, 8>{}); break;
                case 12: pass(std::integral_constant<int, 12>{}); break;
                default: pass(std::integral_constant<int, 16>{});
              }
            }
          }
          continue;
        }
#endif
        for (int64_t c = 0; c < bs; c += 16) {
          for (int64_t r0 = 0; r0 < rows_k; r0 += kScoreRows) {
            const float* __restrict qr = qf.data() + r0 * D;
            v16f a[kScoreRows] = {};
            for (int d = 0; d < D; ++d) {
              const v16f kv = load16(kt + d * bs + c);
#pragma GCC unroll 8
              for (int r = 0; r < kScoreRows; ++r) a[r] += qr[r * D + d] * kv;
            }
#pragma GCC unroll 8
            for (int r = 0; r < kScoreRows; ++r)
              store16(scores.data() + (r0 + r) * ld + blk * bs + c, a[r]);
          }
        }
      }
      const int64_t padded_len = nblocks * bs;
      for (int64_t blk = blk0; blk < std::min(nblocks, blk0 + kFarAhead); ++blk)
        prefetch_slice<1>(v_cache + table[blk] * block_stride + hk * head_stride, head_stride);
      for (int64_t r = 0; r < rows_v; ++r) {
        float* s = scores.data() + r * ld;
        const int64_t visible = r < rows ? len - q_len + 1 + r / group : 0;
        const int64_t lo = blk0 * bs;  // the first key read
        // The row's window [from, visible) (pad rows: empty); keys outside it weigh 0.
        const int64_t from = window > 0 ? std::max(lo, visible - window) : 0;
        const int64_t to = std::max(from, visible);
        if (visible > from) softmax(s + from, visible - from);
        std::fill(s + lo, s + from, 0.f);
        std::fill(s + to, s + padded_len, 0.f);
      }
      std::fill(acc.begin(), acc.begin() + rows_v * D, 0.f);
      prefetch_slice(v_cache + table[blk0] * block_stride + hk * head_stride, head_stride);
      if (task + 1 < end) {
        const int64_t b2 = (task + 1) / num_kv_heads, hk2 = (task + 1) % num_kv_heads;
        const int64_t len2 = seq_lens[b2], q_len2 = query_start[b2 + 1] - query_start[b2];
        const int64_t first2 =
            window > 0 ? std::max<int64_t>(0, len2 - q_len2 + 1 - window) / bs : 0;
        const int64_t* table2 = tables + b2 * max_blocks;
        for (int64_t blk = first2; blk < std::min((len2 + bs - 1) / bs, first2 + kFarAhead);
             ++blk)
          prefetch_slice<1>(k_cache + table2[blk] * block_stride + hk2 * head_stride,
                            head_stride);
      }
      for (int64_t blk = blk0; blk < nblocks; ++blk) {
        const C* __restrict vb = v_cache + table[blk] * block_stride + hk * head_stride;
        if (blk + 1 < nblocks)
          prefetch_slice(v_cache + table[blk + 1] * block_stride + hk * head_stride, head_stride);
        if (blk + kFarAhead < nblocks)
          prefetch_slice<1>(v_cache + table[blk + kFarAhead] * block_stride + hk * head_stride,
                            head_stride);
        const int64_t n = std::min<int64_t>(bs, len - blk * bs);
        for (int64_t r0 = 0; r0 < rows_v; r0 += kValueRows) {
          float* __restrict ar = acc.data() + r0 * D;
          const float* __restrict p0 = scores.data() + r0 * ld + blk * bs;
          v16f va[kValueRows][NV];
#pragma GCC unroll 8
          for (int r = 0; r < kValueRows; ++r)
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) va[r][c] = load16(ar + r * D + 16 * c);
          for (int64_t j = 0; j < n; ++j) {
            v16f vv[NV];
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) vv[c] = load16(vb + j * D + 16 * c);
#pragma GCC unroll 8
            for (int r = 0; r < kValueRows; ++r) {
              const float p = p0[r * ld + j];
#pragma GCC unroll 16
              for (int c = 0; c < NV; ++c) va[r][c] += p * vv[c];
            }
          }
#pragma GCC unroll 8
          for (int r = 0; r < kValueRows; ++r)
#pragma GCC unroll 16
            for (int c = 0; c < NV; ++c) store16(ar + r * D + 16 * c, va[r][c]);
        }
      }
      for (int64_t i = 0; i < q_len; ++i) {
        T* oi = out + ((q0 + i) * num_heads + hk * group) * D;
        for (int64_t x = 0; x < group * D; ++x) oi[x] = static_cast<T>(acc[i * group * D + x]);
      }
    }
  });
}

#ifdef PAGEDLLM_AMX

using pagedllm::accumulate_pv;
using pagedllm::configure_tiles;
using pagedllm::softmax_split_rows;
using pagedllm::store_output_tiles;
using pagedllm::store_scaled_row;

constexpr int kAmxDim = 64;   // head_dim
constexpr int kAmxRows = 16;  // query rows of a task: one tile

// Permutes that interleave two rows of 16 bf16: element 2j <- a[j], 2j + 1 <- b[j]. `rows`: a
// and b are the halves of one register (K^T rows 2dp and 2dp + 1); `lo` / `hi`: the first /
// second 16 elements of two registers (V rows 2kp and 2kp + 1).
struct Interleave {
  __m512i rows, lo, hi;
  Interleave() {
    alignas(64) uint16_t r[32], l[32], h[32];
    for (int j = 0; j < 16; ++j) {
      r[2 * j] = j, r[2 * j + 1] = 16 + j;
      l[2 * j] = j, l[2 * j + 1] = 32 + j;
      h[2 * j] = 16 + j, h[2 * j + 1] = 48 + j;
    }
    rows = _mm512_load_si512(r), lo = _mm512_load_si512(l), hi = _mm512_load_si512(h);
  }
};

// 16 keys of K^T [64][bs] (columns c .. c + 15) -> the two B tiles of S = Q K^T:
//   out[dp][j][e] = K^T[2 dp + e][c + j]   (dp 0..15, then 16..31)
inline void repack_keys(const uint16_t* kt, int64_t bs, int64_t c, const Interleave& il,
                        uint16_t* out) {
  for (int dp = 0; dp < kAmxDim / 2; ++dp) {
    const uint16_t* r0 = kt + 2 * dp * bs + c;
    const __m512i x =
        bs == 16 ? _mm512_loadu_si512(r0)
                 : _mm512_inserti64x4(
                       _mm512_castsi256_si512(_mm256_loadu_si256(
                           reinterpret_cast<const __m256i*>(r0))),
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + bs)), 1);
    _mm512_storeu_si512(out + dp * 32, _mm512_permutexvar_epi16(il.rows, x));
  }
}

// Keys k0 .. k0 + 31 of V (rows of 64) -> the four B tiles of O = P V (16 dims each):
//   out[c][kp][d][e] = V[k0 + 2 kp + e][16 c + d]; keys at or past len are zeros.
inline void repack_values(const uint16_t* v_cache, const int64_t* table, int64_t block_stride,
                          int64_t head_offset, int64_t bs, int64_t k0, int64_t len,
                          const Interleave& il, uint16_t* out) {
  for (int kp = 0; kp < 16; ++kp) {
    const int64_t j = k0 + 2 * kp;  // j and j + 1 share a block: bs is even
    __m512i a0, a1, b0, b1;
    if (j < len) {
      const uint16_t* ra =
          v_cache + table[j / bs] * block_stride + head_offset + (j % bs) * kAmxDim;
      a0 = _mm512_loadu_si512(ra), a1 = _mm512_loadu_si512(ra + 32);
      if (j + 1 < len) {
        b0 = _mm512_loadu_si512(ra + kAmxDim), b1 = _mm512_loadu_si512(ra + kAmxDim + 32);
      } else {
        b0 = b1 = _mm512_setzero_si512();
      }
    } else {
      a0 = a1 = b0 = b1 = _mm512_setzero_si512();
    }
    _mm512_storeu_si512(out + 0 * 512 + kp * 32, _mm512_permutex2var_epi16(a0, il.lo, b0));
    _mm512_storeu_si512(out + 1 * 512 + kp * 32, _mm512_permutex2var_epi16(a0, il.hi, b0));
    _mm512_storeu_si512(out + 2 * 512 + kp * 32, _mm512_permutex2var_epi16(a1, il.lo, b1));
    _mm512_storeu_si512(out + 3 * 512 + kp * 32, _mm512_permutex2var_epi16(a1, il.hi, b1));
  }
}

void multi_query_amx(const c10::BFloat16* q, const c10::BFloat16* k_cache,
                     const c10::BFloat16* v_cache, const int64_t* tables,
                     const int64_t* seq_lens, const int64_t* query_start, c10::BFloat16* out,
                     int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t bs,
                     int64_t max_blocks, float scale, int64_t max_seq_len) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = kAmxDim * bs;
  const int64_t block_stride = num_kv_heads * head_stride;
  const int64_t ld = round_up(std::max<int64_t>(max_seq_len, 1), 32);
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache);
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache);
  const Interleave il;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<float> scores(kAmxRows * ld);
    std::vector<uint16_t> p(2 * kAmxRows * ld);
    alignas(64) uint16_t qtile[kAmxRows * kAmxDim];
    alignas(64) uint16_t kbuf[kAmxDim / 2 * 32];
    alignas(64) uint16_t vbuf[4 * 512];
    alignas(64) float otile[kAmxRows * kAmxDim];
    float inv_sum[kAmxRows];
    int64_t visible[kAmxRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, hk = task % num_kv_heads;
      const int64_t len = seq_lens[b], q0 = query_start[b];
      const int64_t q_len = query_start[b + 1] - q0;
      const int rows = static_cast<int>(q_len * group);
      const int64_t* table = tables + b * max_blocks;
      const int64_t head_offset = hk * head_stride;
      std::memset(qtile, 0, sizeof(qtile));
      for (int64_t i = 0; i < q_len; ++i) {
        std::memcpy(qtile + i * group * kAmxDim, q + ((q0 + i) * num_heads + hk * group) * kAmxDim,
                    group * kAmxDim * 2);
        for (int64_t g = 0; g < group; ++g) visible[i * group + g] = len - q_len + 1 + i;
      }
      _tile_loadd(1, qtile, kAmxDim * 2);
      _tile_loadd(2, qtile + 32, kAmxDim * 2);
      const int64_t nblocks = (len + bs - 1) / bs;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const uint16_t* kt = kc + table[blk] * block_stride + head_offset;
        if (blk + 1 < nblocks)
          prefetch_slice(kc + table[blk + 1] * block_stride + head_offset, head_stride);
        if (blk + kFarAhead < nblocks)
          prefetch_slice<1>(kc + table[blk + kFarAhead] * block_stride + head_offset,
                            head_stride);
        for (int64_t c = 0; c < bs && blk * bs + c < len; c += 16) {
          repack_keys(kt, bs, c, il, kbuf);
          _tile_zero(0);
          _tile_loadd(3, kbuf, 64);
          _tile_dpbf16ps(0, 1, 3);
          _tile_loadd(3, kbuf + 16 * 32, 64);
          _tile_dpbf16ps(0, 2, 3);
          _tile_stored(0, scores.data() + blk * bs + c, ld * 4);
        }
      }
      const int64_t padded = round_up(len, 32);
      softmax_split_rows(scores.data(), ld, rows, visible, scale, p.data(), ld, padded, inv_sum);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t k0 = 0; k0 < len; k0 += 32) {
        const int64_t blk = k0 / bs;
        if (blk + kFarAhead < nblocks && k0 % bs == 0)
          prefetch_slice<1>(vc + table[blk + kFarAhead] * block_stride + head_offset,
                            head_stride);
        repack_values(vc, table, block_stride, head_offset, bs, k0, len, il, vbuf);
        accumulate_pv(p.data() + k0, p.data() + kAmxRows * ld + k0, ld * 2, vbuf, 512, 64);
      }
      store_output_tiles(otile);
      for (int r = 0; r < rows; ++r)
        store_scaled_row(otile + r * kAmxDim, inv_sum[r],
                         out + ((q0 + r / group) * num_heads + hk * group + r % group) * kAmxDim);
    }
    _tile_release();
  });
}

#endif  // PAGEDLLM_AMX

template <typename T, typename C>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& tables, const at::Tensor& seq_lens,
                       const at::Tensor& query_start, at::Tensor& out, double scale,
                       int64_t max_seq_len, int64_t max_query_len, int64_t window) {
  auto run = [&](auto d_tag) {
    multi_query_impl<T, C, decltype(d_tag)::value>(
        q.data_ptr<T>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(),
        tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
        query_start.data_ptr<int64_t>(), out.data_ptr<T>(), seq_lens.size(0), q.size(1),
        k_cache.size(1), k_cache.size(3), tables.size(1), static_cast<float>(scale),
        max_seq_len, max_query_len, window);
  };
  switch (q.size(2)) {
    case 16: run(std::integral_constant<int, 16>{}); break;
    case 32: run(std::integral_constant<int, 32>{}); break;
    case 64: run(std::integral_constant<int, 64>{}); break;
    case 80: run(std::integral_constant<int, 80>{}); break;
    case 96: run(std::integral_constant<int, 96>{}); break;
    case 128: run(std::integral_constant<int, 128>{}); break;
    case 256: run(std::integral_constant<int, 256>{}); break;
    default: TORCH_CHECK(false, "paged_attention_multi: unsupported head_dim ", q.size(2));
  }
}

at::Tensor paged_attention_multi(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                 double scale, int64_t max_seq_len, int64_t max_query_len,
                                 int64_t window) {
  TORCH_CHECK(window >= 0, "paged_attention_multi: window must be >= 0");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "q [T, H, D], k_cache [NB, Hkv, D, BS], v_cache [NB, Hkv, BS, D] (no int8 cache)");
  TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.size(3) == q.size(2) &&
                  v_cache.size(2) == k_cache.size(3),
              "head_dim or block_size mismatch between q, k_cache and v_cache");
  TORCH_CHECK(k_cache.size(3) % 16 == 0, "block_size must be a multiple of 16");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(max_query_len >= 1 && max_query_len * (q.size(1) / k_cache.size(1)) <= kMaxRows,
              "max_query_len x query heads per kv head must be in [1, ", kMaxRows, "]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  query_start_loc.scalar_type() == at::kLong,
              "block_tables, seq_lens and query_start_loc must be int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == seq_lens.size(0) &&
                  query_start_loc.dim() == 1 && query_start_loc.size(0) == seq_lens.size(0) + 1,
              "block_tables [B, nb], seq_lens [B], query_start_loc [B + 1]");
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  auto qs = query_start_loc.contiguous();
  const int64_t* s = sl.data_ptr<int64_t>();
  const int64_t* st = qs.data_ptr<int64_t>();
  TORCH_CHECK(st[0] >= 0 && st[seq_lens.size(0)] <= q.size(0), "query_start_loc out of range");
  for (int64_t b = 0; b < seq_lens.size(0); ++b) {
    const int64_t ql = st[b + 1] - st[b];
    TORCH_CHECK(ql >= 1 && ql <= max_query_len && ql <= s[b] && s[b] <= max_seq_len &&
                    (s[b] + k_cache.size(3) - 1) / k_cache.size(3) <= bt.size(1),
                "sequence ", b, ": needs 1 <= q_len <= max_query_len, q_len <= seq_len <= "
                "max_seq_len, and a block table that covers seq_len");
  }
  auto out = at::zeros_like(q);
  const bool mixed = q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == q.scalar_type() || mixed),
              "the cache must have q's dtype, or be bf16 under fp32 q");
#ifdef PAGEDLLM_AMX
  if (q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
      q.size(2) == kAmxDim && max_query_len * (q.size(1) / k_cache.size(1)) <= kAmxRows &&
      window == 0 && pagedllm::amx_usable()) {
    multi_query_amx(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                    v_cache.data_ptr<c10::BFloat16>(), bt.data_ptr<int64_t>(), s, st,
                    out.data_ptr<c10::BFloat16>(), seq_lens.size(0), q.size(1), k_cache.size(1),
                    k_cache.size(3), bt.size(1), static_cast<float>(scale), max_seq_len);
    return out;
  }
#endif
  if (mixed) {
    dispatch_head_dim<float, c10::BFloat16>(q, k_cache, v_cache, bt, sl, qs, out, scale,
                                            max_seq_len, max_query_len, window);
    return out;
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float, float>(q, k_cache, v_cache, bt, sl, qs, out, scale, max_seq_len,
                                      max_query_len, window);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16, c10::BFloat16>(q, k_cache, v_cache, bt, sl, qs, out,
                                                      scale, max_seq_len, max_query_len, window);
      break;
    case at::kHalf:
      dispatch_head_dim<c10::Half, c10::Half>(q, k_cache, v_cache, bt, sl, qs, out, scale,
                                              max_seq_len, max_query_len, window);
      break;
    default:
      TORCH_CHECK(false, "paged_attention_multi: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("paged_attention_multi", &paged_attention_multi);
}
