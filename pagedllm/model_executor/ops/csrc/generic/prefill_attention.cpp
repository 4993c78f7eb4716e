// Causal attention of prompt chunks, fp32 or bf16, on the vector units of whichever ISA this
// library is built for (AVX2 or AVX-512):
//   prefill_attention        fresh chunks (nothing cached before them), keys from k / v; on AMX
//                            in bf16 with head_dim 64 the tile kernel
//                            (x86/amx/amx_prefill_attention.cpp) runs instead;
//   prefill_attention_paged  chunks after cached tokens (chunked prefill, prefix hits), every key
//                            read through the block tables (torch SDPA over the gathered blocks
//                            took ~3x as long).
//
// torch's CPU flash attention runs the workload's 30-500-token prompts at ~50 GFLOP/s on a 2-core
// Zen 4 (bf16 and fp32), 14% of an offline bf16 run. Here, as in the AMX kernel, each
// (chunk, kv head) has its keys repacked once, 16 keys to a block, and each task takes 16
// query rows of one head with whole score rows in a buffer (the softmax is exact, O needs no
// rescaling):
//
//   S[16, n] = Q K^T     register tiles of kScoreRows rows x kScoreBlocks 16-key blocks; fp32
//                        FMAs over K^T, or in bf16 with AVX-512-BF16 pair dot products over K in
//                        pairs (vdpbf16ps: bf16 products are exact in fp32, as in a bf16 GEMM)
//   P = exp((S - max) * scale)  over the keys each row sees (causal), fp32
//   O[16, D] = P V / sum  fp32 FMAs over V read in place; in bf16 with AVX-512-BF16, pair dot
//                        products of P split into two bf16 parts (as the AMX kernel does) and
//                        V repacked in pairs of keys
//
// In a sliding-window layer (window > 0) row i sees keys i - window + 1 .. i: a task skips the
// key blocks before its first row's window.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/prefill_seqs.h"
#include "common/registration.h"
#include "common/vec_math.h"

namespace {

using pagedllm::exp_approx;
using pagedllm::expn;
using pagedllm::kLanes;
using pagedllm::load_f;
using pagedllm::loadn;
using pagedllm::PrefillSeq;
using pagedllm::storen;
using pagedllm::vnf;

constexpr int kRows = 16;  // query rows of a task
constexpr int W = kLanes;  // keys of a repacked block, dims of a value vector: one register
// Register tiles (accumulators + the operands in flight fit the 32 zmm / 16 ymm registers).
#if defined(__AVX512F__)
constexpr int kScoreRows = 4, kScoreBlocks = 4;  // S: rows x W-key blocks
constexpr int kValueRows = 4, kValueVecs = 4;    // O: rows x W-dim vectors
#else
constexpr int kScoreRows = 4, kScoreBlocks = 2;
constexpr int kValueRows = 2, kValueVecs = 4;
#endif
#if defined(__AVX512BF16__)
constexpr bool kPairDot = true;  // bf16 scores on vdpbf16ps (W == 16 keys a block)
#else
constexpr bool kPairDot = false;
#endif

inline int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }

// Keys of one (sequence, kv head), zero past len up to round16(len):
//   fp32:  kt[kb][d][j]     = K[W kb + j][d]            (K^T, W keys a row)
//   pairs: kp[kb][dp][j][e] = K[16 kb + j][2 dp + e]    (bf16 pairs, one vdpbf16ps operand)
template <typename T, typename K, int D>
void repack_keys(const T* k, int64_t row_stride, int64_t len, K* out) {
  const int64_t padded = round16(len);
  std::memset(out, 0, padded * D * sizeof(K));
  for (int64_t j = 0; j < len; ++j) {
    const T* kr = k + j * row_stride;
    K* dst = out + (j / W) * (W * D);
    if constexpr (sizeof(K) == 2) {
      for (int dp = 0; dp < D / 2; ++dp) {
        dst[dp * 2 * W + (j % W) * 2] = kr[2 * dp].x;
        dst[dp * 2 * W + (j % W) * 2 + 1] = kr[2 * dp + 1].x;
      }
    } else {
      for (int d = 0; d < D; ++d) dst[d * W + j % W] = load_f(kr[d]);
    }
  }
}

// S rows 0 .. kScoreRows - 1, key blocks kb0 .. kb0 + NB - 1, from fp32 queries [rows][D].
template <int D, int NB>
inline void scores_fp32(const float* qf, const float* kt, int64_t kb0, float* s, int64_t ld) {
  vnf a[kScoreRows][NB] = {};
  for (int d = 0; d < D; ++d) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const vnf kv = loadn(kt + (kb0 + b) * W * D + d * W);
#pragma GCC unroll 4
      for (int r = 0; r < kScoreRows; ++r) a[r][b] += qf[r * D + d] * kv;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kScoreRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) storen(s + r * ld + (kb0 + b) * W, a[r][b]);
}

#if defined(__AVX512BF16__)
// The same from bf16 queries [rows][D] and keys in pairs.
template <int D, int NB>
inline void scores_pairs(const uint16_t* qb, const uint16_t* kp, int64_t kb0, float* s,
                         int64_t ld) {
  __m512 a[kScoreRows][NB];
#pragma GCC unroll 4
  for (int r = 0; r < kScoreRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) a[r][b] = _mm512_setzero_ps();
  for (int dp = 0; dp < D / 2; ++dp) {
    __m512bh qv[kScoreRows];
#pragma GCC unroll 4
    for (int r = 0; r < kScoreRows; ++r) {
      int32_t pair;
      std::memcpy(&pair, qb + r * D + 2 * dp, 4);
      qv[r] = (__m512bh)_mm512_set1_epi32(pair);
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + (kb0 + b) * 16 * D + dp * 32);
#pragma GCC unroll 4
      for (int r = 0; r < kScoreRows; ++r) a[r][b] = _mm512_dpbf16_ps(a[r][b], qv[r], kv);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kScoreRows; ++r)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(s + r * ld + (kb0 + b) * 16, a[r][b]);
}
#endif

// s[0, visible) <- exp((s - max) * scale), s[visible, bound) <- 0; returns 1 / the sum.
inline float exp_row(float* s, int64_t visible, int64_t bound, float scale) {
  const int64_t nv = visible / W * W;
  vnf mv = vnf{} - std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nv; j += W) {
    const vnf x = loadn(s + j);
    mv = x > mv ? x : mv;
  }
  float m = mv[0];
  for (int i = 1; i < W; ++i) m = std::max(m, mv[i]);
  for (int64_t j = nv; j < visible; ++j) m = std::max(m, s[j]);
  vnf sv = {};
  for (int64_t j = 0; j < nv; j += W) {
    const vnf e = expn((loadn(s + j) - m) * scale);
    storen(s + j, e);
    sv += e;
  }
  float sum = 0.f;
  for (int i = 0; i < W; ++i) sum += sv[i];
  for (int64_t j = nv; j < visible; ++j) {
    s[j] = exp_approx((s[j] - m) * scale);
    sum += s[j];
  }
  std::fill(s + visible, s + bound, 0.f);
  return 1.f / sum;
}

// O rows 0 .. RB - 1, dims c0 .. c0 + W NV - 1 = P[rows, 0:n] . V[0:n, dims].
template <typename T, int D, int RB, int NV>
inline void values_tile(const float* p, int64_t ld, int64_t n, const T* v, int64_t v_stride,
                        int c0, float* o) {
  vnf a[RB][NV] = {};
  for (int64_t j = 0; j < n; ++j) {
    vnf vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) vv[c] = loadn(v + j * v_stride + c0 + W * c);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const float pr = p[r * ld + j];
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) a[r][c] += pr * vv[c];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) storen(o + r * D + c0 + W * c, a[r][c]);
}

#if defined(__AVX512BF16__)
// Values of one (chunk, kv head) in pairs of keys, zero past len up to round16(len):
//   vp[jp][d][e] = V[2 jp + e][d]   (16 dims of two keys: one vdpbf16ps operand)
template <int D, typename RowOf>
void repack_value_pairs(int64_t len, RowOf&& row_of, uint16_t* out) {
  std::memset(out, 0, round16(len) * D * sizeof(uint16_t));
  for (int64_t j = 0; j < len; ++j) {
    const c10::BFloat16* v = row_of(j);
    uint16_t* dst = out + (j / 2) * 2 * D + j % 2;
    for (int d = 0; d < D; ++d) dst[2 * d] = v[d].x;
  }
}

// p[0, n) as the sum of two bf16 parts, hi = bf16(p) and lo = bf16(p - hi) (nearest even, as
// vcvtneps2bf16), zeros on to ``padded``: the probabilities of a P.V in pair dot products,
// to ~2^-16 of p (P rounded once to bf16 flipped a near-tie in a bf16 GGUF model's answer).
inline void probs_split_bf16(const float* p, int64_t n, int64_t padded, uint16_t* hi,
                             uint16_t* lo) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_loadu_ps(p + j);
    const __m256bh h = _mm512_cvtneps_pbh(x);
    const __m512 hf = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + j), (__m256i)h);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, hf)));
  }
  for (; j < n; ++j) {
    const c10::BFloat16 h(p[j]);
    hi[j] = h.x;
    lo[j] = c10::BFloat16(p[j] - static_cast<float>(h)).x;
  }
  for (; j < padded; ++j) hi[j] = lo[j] = 0;
}

// values_tile in bf16 pairs: O rows 0 .. RB - 1, dims c0 .. c0 + 16 NV - 1 = P . V over
// ``npairs`` pairs of keys, P as two bf16 parts [rows][ldp] (hi at p, lo at p + lo_off), V as
// repack_value_pairs lays it out (the products exact in fp32, as in a bf16 GEMM).
template <int D, int RB, int NV>
inline void values_pairs(const uint16_t* p, int64_t ldp, int64_t lo_off, int64_t npairs,
                         const uint16_t* vp, int c0, float* o) {
  __m512 a[RB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < npairs; ++jp) {
    __m512bh vv[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c)
      vv[c] = (__m512bh)_mm512_loadu_si512(vp + jp * 2 * D + (c0 + 16 * c) * 2);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      int32_t hi, lo;
      std::memcpy(&hi, p + r * ldp + 2 * jp, 4);
      std::memcpy(&lo, p + lo_off + r * ldp + 2 * jp, 4);
      const __m512bh ph = (__m512bh)_mm512_set1_epi32(hi), pl = (__m512bh)_mm512_set1_epi32(lo);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c)
        a[r][c] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a[r][c], ph, vv[c]), pl, vv[c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * D + c0 + 16 * c, a[r][c]);
}
#endif

// One sequence's chunk of query rows: rows q_start .. q_start + len - 1 of q / out, at positions
// ctx .. ctx + len - 1 (ctx keys were cached before it); row i sees keys 0 .. ctx + i.
struct Chunk {
  int64_t q_start, len, ctx;
  int64_t keys() const { return ctx + len; }
};

// The attention of every chunk, on keys repacked per (chunk, kv head) by ``prepare(unit)``
// (unit = chunk x num_kv_heads + kv head, run once each before the tasks) and read through
// ``keys_of(chunk, kv head)`` (repacked, round16(keys) keys) and ``values_of(chunk, kv head)``
// (V rows of the chunk's keys: a pointer and a row stride; with bf16 pairs, the values in
// pairs, round16(keys) keys).
template <typename T, int D, typename KT, typename Prepare, typename KeysOf, typename ValuesOf>
void attend_chunks(const at::Tensor& q, at::Tensor& out, int64_t hkv,
                   const std::vector<Chunk>& chunks, float scale, int64_t window,
                   Prepare&& prepare, KeysOf&& keys_of, ValuesOf&& values_of) {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  constexpr int NV = D / W;
  constexpr bool pairs = std::is_same_v<KT, uint16_t>;
  const int64_t hq = q.size(1), group = hq / hkv;
  const int64_t q_stride = q.stride(0), o_stride = out.stride(0);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  int64_t max_keys = 0;
  for (const Chunk& c : chunks) max_keys = std::max(max_keys, c.keys());
  struct Task {
    int64_t chunk, head, row0;
  };
  // (chunk, query head, 16-row block), costliest (most keys) first
  std::vector<Task> tasks;
  for (int64_t ci = 0; ci < num_chunks; ++ci)
    for (int64_t r = 0; r < chunks[ci].len; r += kRows)
      for (int64_t h = 0; h < hq; ++h) tasks.push_back({ci, h, r});
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return chunks[a.chunk].ctx + a.row0 > chunks[b.chunk].ctx + b.row0;
  });
  const int64_t num_units = num_chunks * hkv;
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t ld = round16(max_keys);
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_units; ++i) prepare(i);
    std::vector<float> sbuf(kRows * ld), obuf(kRows * D), qf(kRows * D);
    std::vector<uint16_t> qb(kRows * D), pb(pairs ? 2 * kRows * ld : 0);  // P: hi, lo
    float inv_sum[kRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < num_tasks; ++ti) {
      const Task& t = tasks[ti];
      const Chunk& c = chunks[t.chunk];
      const int rows = static_cast<int>(std::min<int64_t>(kRows, c.len - t.row0));
      const int64_t p0 = c.ctx + t.row0;  // position of the task's first row
      const int64_t n = p0 + rows;        // keys the last row sees
      // The first key block any row of the task sees (its first row's window), as a key index.
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, p0 + 1 - window) / W * W : 0;
      const KT* kb = keys_of(t.chunk, t.head / group);
      const T* q0 = qp + (c.q_start + t.row0) * q_stride + t.head * D;
      for (int i = 0; i < kRows; ++i)
        for (int d = 0; d < D; ++d) {
          const T x = i < rows ? q0[i * q_stride + d] : T(0);
          if constexpr (pairs)
            qb[i * D + d] = x.x;
          else
            qf[i * D + d] = load_f(x);
        }
      for (int r0 = 0; r0 < rows; r0 += kScoreRows) {
        // Key blocks the group's last row sees.
        const int64_t nkb = (p0 + std::min(r0 + kScoreRows, rows) + W - 1) / W;
        float* srow = sbuf.data() + r0 * ld;
        int64_t b = j0 / W;
        if constexpr (pairs) {
#if defined(__AVX512BF16__)
          const uint16_t* qr = qb.data() + r0 * D;
          for (; b + kScoreBlocks <= nkb; b += kScoreBlocks)
            scores_pairs<D, kScoreBlocks>(qr, kb, b, srow, ld);
          for (; b < nkb; ++b) scores_pairs<D, 1>(qr, kb, b, srow, ld);
#endif
        } else {
          const float* qr = qf.data() + r0 * D;
          for (; b + kScoreBlocks <= nkb; b += kScoreBlocks)
            scores_fp32<D, kScoreBlocks>(qr, kb, b, srow, ld);
          for (; b < nkb; ++b) scores_fp32<D, 1>(qr, kb, b, srow, ld);
        }
      }
      for (int i = 0; i < kRows; ++i) {
        float* srow = sbuf.data() + i * ld;
        if (i < rows) {
          const int64_t visible = p0 + i + 1;
          const int64_t from = window > 0 ? std::max(j0, visible - window) : 0;
          inv_sum[i] = exp_row(srow + from, visible - from, n - from, scale);
          std::fill(srow + j0, srow + from, 0.f);  // keys before the row's window
        } else {
          std::fill(srow + j0, srow + n, 0.f);  // pad rows of the last value tile weigh nothing
        }
      }
      if constexpr (pairs) {
#if defined(__AVX512BF16__)
        const uint16_t* vp = values_of(t.chunk, t.head / group) + j0 * D;  // from key j0 on
        const int64_t padded = (n - j0 + 1) / 2 * 2;
        for (int i = 0; i < kRows; ++i)
          probs_split_bf16(sbuf.data() + i * ld + j0, n - j0, padded,
                                     pb.data() + i * ld, pb.data() + (kRows + i) * ld);
        for (int r0 = 0; r0 < rows; r0 += kValueRows) {
          // pairs of keys from j0 of the group (its last row's keys, rounded up to a pair)
          const int64_t np = (p0 + std::min(r0 + kValueRows, rows) - j0 + 1) / 2;
          const uint16_t* prow = pb.data() + r0 * ld;
          float* orow = obuf.data() + r0 * D;
          int c0 = 0;
          for (; c0 + W * kValueVecs <= D; c0 += W * kValueVecs)
            values_pairs<D, kValueRows, kValueVecs>(prow, ld, kRows * ld, np, vp, c0, orow);
          if constexpr (NV % kValueVecs != 0)
            values_pairs<D, kValueRows, NV % kValueVecs>(prow, ld, kRows * ld, np, vp, c0,
                                                          orow);
        }
#endif
      } else {
        const auto [vb, v_stride] = values_of(t.chunk, t.head / group);
        for (int r0 = 0; r0 < rows; r0 += kValueRows) {
          // keys j0 .. nk of the group
          const int64_t nk = p0 + std::min(r0 + kValueRows, rows) - j0;
          const float* prow = sbuf.data() + r0 * ld + j0;
          const T* vj = vb + j0 * v_stride;
          float* orow = obuf.data() + r0 * D;
          int c0 = 0;
          for (; c0 + W * kValueVecs <= D; c0 += W * kValueVecs)
            values_tile<T, D, kValueRows, kValueVecs>(prow, ld, nk, vj, v_stride, c0, orow);
          if constexpr (NV % kValueVecs != 0)
            values_tile<T, D, kValueRows, NV % kValueVecs>(prow, ld, nk, vj, v_stride, c0, orow);
        }
      }
      for (int i = 0; i < rows; ++i) {
        T* dst = op + (c.q_start + t.row0 + i) * o_stride + t.head * D;
        const float* o = obuf.data() + i * D;
        for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv_sum[i]);
      }
    }
  }
}

template <typename T>
using KeyType = std::conditional_t<kPairDot && std::is_same_v<T, c10::BFloat16>, uint16_t, float>;

// Fresh chunks: keys and values are the chunk's own rows of k / v (values read in place).
template <typename T, int D>
void prefill_vec(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::vector<PrefillSeq>& seqs, at::Tensor& out, float scale,
                 int64_t window) {
  using KT = KeyType<T>;
  const int64_t hkv = k.size(1), kv_stride = k.stride(0);
  const T* kptr = k.data_ptr<T>();
  const T* vptr = v.data_ptr<T>();
  std::vector<Chunk> chunks;
  std::vector<int64_t> key_off(seqs.size() + 1, 0);  // repacked keys of chunk i, all kv heads
  for (size_t i = 0; i < seqs.size(); ++i) {
    chunks.push_back({seqs[i].start, seqs[i].len, 0});
    key_off[i + 1] = key_off[i] + round16(seqs[i].len) * hkv * D;
  }
  constexpr bool pairs = std::is_same_v<KT, uint16_t>;
  std::vector<KT> keys(key_off.back());
  std::vector<uint16_t> value_pairs(pairs ? key_off.back() : 0);  // same sizes as the keys
  auto keys_at = [&](int64_t ci, int64_t h) {
    return keys.data() + key_off[ci] + h * round16(chunks[ci].len) * D;
  };
  auto rows_at = [&](int64_t ci, int64_t h) {
    return vptr + chunks[ci].q_start * kv_stride + h * D;
  };
  attend_chunks<T, D, KT>(
      q, out, hkv, chunks, scale, window,
      [&](int64_t i) {
        const int64_t ci = i / hkv, h = i % hkv, len = chunks[ci].len;
        repack_keys<T, KT, D>(kptr + chunks[ci].q_start * kv_stride + h * D, kv_stride, len,
                              keys_at(ci, h));
        if constexpr (pairs) {
#if defined(__AVX512BF16__)
          const T* v0 = rows_at(ci, h);
          repack_value_pairs<D>(
              len, [&](int64_t j) { return v0 + j * kv_stride; },
              value_pairs.data() + (keys_at(ci, h) - keys.data()));
#endif
        }
      },
      [&](int64_t ci, int64_t h) -> const KT* { return keys_at(ci, h); },
      [&](int64_t ci, int64_t h) {
        if constexpr (pairs)
          return static_cast<const uint16_t*>(value_pairs.data() + (keys_at(ci, h) - keys.data()));
        else
          return std::make_pair(rows_at(ci, h), kv_stride);
      });
}

// Keys 0 .. len - 1 of one (sequence, kv head) from the paged cache (K^T per block,
// [num_blocks, hkv, D, bs]), repacked as repack_keys does.
template <typename C, typename K, int D>
void repack_cached_keys(const C* k_cache, const int64_t* table, int64_t bs, int64_t block_stride,
                        int64_t head_offset, int64_t len, K* out) {
  std::memset(out, 0, round16(len) * D * sizeof(K));
  for (int64_t j0 = 0; j0 < len; j0 += bs) {
    const C* kt = k_cache + table[j0 / bs] * block_stride + head_offset;
    const int64_t n = std::min(bs, len - j0);
    for (int d = 0; d < D; ++d)
      for (int64_t o = 0; o < n; ++o) {
        const int64_t j = j0 + o;
        K* dst = out + (j / W) * (W * D);
        if constexpr (sizeof(K) == 2)
          dst[(d / 2) * 2 * W + (j % W) * 2 + d % 2] = kt[d * bs + o].x;
        else
          dst[d * W + j % W] = load_f(kt[d * bs + o]);
      }
  }
}

// Chunks over cached context: every key (the context's and the chunk's own, written to the
// cache before attention) read from the paged cache, values gathered to rows once per
// (chunk, kv head). C: the cache's dtype (T, or bf16 under an fp32 model).
template <typename T, typename C, int D>
void prefill_paged_vec(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& tables, const std::vector<Chunk>& chunks,
                       at::Tensor& out, float scale, int64_t window) {
  using KT = KeyType<T>;
  const int64_t hkv = k_cache.size(1), bs = k_cache.size(3);
  const int64_t block_stride = k_cache.stride(0), table_stride = tables.stride(0);
  const C* kc = k_cache.data_ptr<C>();
  const C* vc = v_cache.data_ptr<C>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  std::vector<int64_t> key_off(chunks.size() + 1, 0), val_off(chunks.size() + 1, 0);
  for (size_t i = 0; i < chunks.size(); ++i) {
    key_off[i + 1] = key_off[i] + round16(chunks[i].keys()) * hkv * D;
    val_off[i + 1] = val_off[i] + chunks[i].keys() * hkv * D;
  }
  constexpr bool pairs = std::is_same_v<KT, uint16_t>;
  std::vector<KT> keys(key_off.back());
  std::vector<uint16_t> value_pairs(pairs ? key_off.back() : 0);  // same sizes as the keys
  std::vector<T> values(pairs ? 0 : val_off.back());
  auto keys_at = [&](int64_t ci, int64_t h) {
    return keys.data() + key_off[ci] + h * round16(chunks[ci].keys()) * D;
  };
  auto values_at = [&](int64_t ci, int64_t h) {
    return values.data() + val_off[ci] + h * chunks[ci].keys() * D;
  };
  attend_chunks<T, D, KT>(
      q, out, hkv, chunks, scale, window,
      [&](int64_t i) {
        const int64_t ci = i / hkv, h = i % hkv, len = chunks[ci].keys();
        const int64_t* table = tp + ci * table_stride;
        repack_cached_keys<C, KT, D>(kc, table, bs, block_stride, h * D * bs, len,
                                     keys_at(ci, h));
        auto row_of = [&](int64_t j) {
          return vc + table[j / bs] * block_stride + h * bs * D + (j % bs) * D;
        };
        if constexpr (pairs) {
#if defined(__AVX512BF16__)
          repack_value_pairs<D>(len, row_of, value_pairs.data() + (keys_at(ci, h) - keys.data()));
#endif
        } else {
          T* dst = values_at(ci, h);
          for (int64_t j = 0; j < len; ++j)
            for (int d = 0; d < D; ++d) dst[j * D + d] = static_cast<T>(load_f(row_of(j)[d]));
        }
      },
      [&](int64_t ci, int64_t h) -> const KT* { return keys_at(ci, h); },
      [&](int64_t ci, int64_t h) {
        if constexpr (pairs)
          return static_cast<const uint16_t*>(value_pairs.data() + (keys_at(ci, h) - keys.data()));
        else
          return std::make_pair(static_cast<const T*>(values_at(ci, h)), int64_t{D});
      });
}

// f(std::integral_constant<int, D>) for the head sizes the kernels are instantiated for.
template <typename F>
void with_head_dim(int64_t dim, const char* op, F&& f) {
  switch (dim) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 80: return f(std::integral_constant<int, 80>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
    default: TORCH_CHECK(false, op, ": head_dim ", dim, " not supported");
  }
}

// q [T, Hq, D], k/v [T, Hkv, D] (rows of several sequences, heads contiguous), fp32 or bf16;
// sequence i is rows starts[i] .. starts[i] + lens[i]; writes those rows of out [T, Hq, D].
// window > 0: a sliding-window layer's width.
void prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& starts, const at::Tensor& lens, at::Tensor& out,
                       double scale, int64_t window) {
  TORCH_CHECK(window >= 0, "prefill_attention: window must be >= 0");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat,
              "prefill_attention: fp32 or bf16 only");
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && out.scalar_type() == dtype,
              "prefill_attention: q, k, v and out must share a dtype");
  const int64_t dim = q.dim() == 3 ? q.size(2) : 0;
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(2) == dim && v.sizes() == k.sizes() &&
                  out.sizes() == q.sizes() && k.size(0) == q.size(0),
              "prefill_attention: q/out [T, Hq, D], k/v [T, Hkv, D]");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  for (const at::Tensor* t : {&q, &k, &v, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == dim, "heads must be contiguous");
  TORCH_CHECK(k.stride(0) == v.stride(0), "k and v must share a row stride");
  TORCH_CHECK(starts.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                  starts.numel() == lens.numel(),
              "starts and lens: int64, one per sequence");
  auto st = starts.contiguous();
  auto ln = lens.contiguous();
  std::vector<PrefillSeq> seqs;
  for (int64_t i = 0; i < st.numel(); ++i) {
    const int64_t s = st.data_ptr<int64_t>()[i], len = ln.data_ptr<int64_t>()[i];
    TORCH_CHECK(s >= 0 && len >= 0 && s + len <= q.size(0), "sequence rows out of range");
    if (len > 0) seqs.push_back({s, len});
  }
  if (seqs.empty()) return;
  const float sc = static_cast<float>(scale);
  if (window == 0 && pagedllm::prefill_attention_amx(q, k, v, seqs, out, sc)) return;
  with_head_dim(dim, "prefill_attention", [&](auto d) {
    if (dtype == at::kBFloat16)
      prefill_vec<c10::BFloat16, decltype(d)::value>(q, k, v, seqs, out, sc, window);
    else
      prefill_vec<float, decltype(d)::value>(q, k, v, seqs, out, sc, window);
  });
}

// Chunks whose earlier tokens are cached (chunked prefill, prefix-cache hits): q / out
// [T, Hq, D] fp32 or bf16; chunk i is rows starts[i] .. starts[i] + lens[i] at positions
// ctx_lens[i] .. ctx_lens[i] + lens[i] - 1 of the sequence whose blocks are block_tables[i]
// (every key, the chunk's own included, already in k_cache / v_cache: [num_blocks, Hkv, D, bs]
// and [num_blocks, Hkv, bs, D], of q's dtype or bf16 under fp32). window > 0: as above.
void prefill_attention_paged(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& starts, const at::Tensor& lens,
                             const at::Tensor& ctx_lens, at::Tensor& out, double scale,
                             int64_t window) {
  TORCH_CHECK(window >= 0, "prefill_attention_paged: window must be >= 0");
  const auto dtype = q.scalar_type(), cache_dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat,
              "prefill_attention_paged: fp32 or bf16 only");
  TORCH_CHECK(out.scalar_type() == dtype && v_cache.scalar_type() == cache_dtype &&
                  (cache_dtype == dtype ||
                   (dtype == at::kFloat && cache_dtype == at::kBFloat16)),
              "prefill_attention_paged: the cache holds q's dtype (or bf16 under fp32)");
  const int64_t dim = q.dim() == 3 ? q.size(2) : 0;
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_cache.dim() == 4 &&
                  k_cache.size(2) == dim && v_cache.dim() == 4 && v_cache.size(3) == dim &&
                  v_cache.size(2) == k_cache.size(3) && v_cache.size(1) == k_cache.size(1),
              "prefill_attention_paged: q/out [T, Hq, D], k_cache [NB, Hkv, D, bs], "
              "v_cache [NB, Hkv, bs, D]");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  for (const at::Tensor* t : {&q, static_cast<const at::Tensor*>(&out)})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == dim, "heads must be contiguous");
  TORCH_CHECK(starts.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                  ctx_lens.scalar_type() == at::kLong &&
                  block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 &&
                  starts.numel() == lens.numel() && ctx_lens.numel() == lens.numel() &&
                  block_tables.size(0) == lens.numel(),
              "starts, lens, ctx_lens: int64, one per chunk; block_tables [chunks, blocks]");
  auto st = starts.contiguous(), ln = lens.contiguous(), cx = ctx_lens.contiguous();
  auto tables = block_tables.contiguous();
  const int64_t bs = k_cache.size(3), num_blocks = k_cache.size(0);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < st.numel(); ++i) {
    const Chunk c{st.data_ptr<int64_t>()[i], ln.data_ptr<int64_t>()[i], cx.data_ptr<int64_t>()[i]};
    TORCH_CHECK(c.q_start >= 0 && c.len >= 0 && c.ctx >= 0 && c.q_start + c.len <= q.size(0),
                "chunk rows out of range");
    const int64_t need = (c.keys() + bs - 1) / bs;
    TORCH_CHECK(need <= tables.size(1), "block_tables too short for the chunk's keys");
    const int64_t* row = tables.data_ptr<int64_t>() + i * tables.size(1);
    for (int64_t b = 0; b < need; ++b)
      TORCH_CHECK(row[b] >= 0 && row[b] < num_blocks, "block id out of range");
    if (c.len > 0) chunks.push_back(c);
  }
  if (chunks.empty()) return;
  const float sc = static_cast<float>(scale);
  with_head_dim(dim, "prefill_attention_paged", [&](auto d) {
    constexpr int D = decltype(d)::value;
    using BF16 = c10::BFloat16;
    if (dtype == at::kBFloat16)
      prefill_paged_vec<BF16, BF16, D>(q, k_cache, v_cache, tables, chunks, out, sc, window);
    else if (cache_dtype == at::kBFloat16)
      prefill_paged_vec<float, BF16, D>(q, k_cache, v_cache, tables, chunks, out, sc, window);
    else
      prefill_paged_vec<float, float, D>(q, k_cache, v_cache, tables, chunks, out, sc, window);
  });
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("prefill_attention", &prefill_attention);
  m.impl("prefill_attention_paged", &prefill_attention_paged);
}
