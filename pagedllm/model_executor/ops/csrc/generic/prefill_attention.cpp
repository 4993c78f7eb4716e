// Causal attention of fresh prompt chunks (nothing cached before them), fp32 or bf16, on the
// vector units of whichever ISA this library is built for (AVX2 or AVX-512); on AMX in bf16 with
// head_dim 64 the tile kernel (x86/amx/amx_prefill_attention.cpp) runs instead.
//
// torch's CPU flash attention runs the workload's 30-500-token prompts at ~50 GFLOP/s on a 2-core
// Zen 4 (bf16 and fp32), 14% of an offline bf16 run. Here, as in the AMX kernel, each
// (sequence, kv head) has its keys repacked once, 16 keys to a block, and each task takes 16
// query rows of one head with whole score rows in a buffer (the softmax is exact, O needs no
// rescaling):
//
//   S[16, n] = Q K^T     register tiles of kScoreRows rows x kScoreBlocks 16-key blocks; fp32
//                        FMAs over K^T, or in bf16 with AVX-512-BF16 pair dot products over K in
//                        pairs (vdpbf16ps: bf16 products are exact in fp32, as in a bf16 GEMM)
//   P = exp((S - max) * scale)  over the keys each row sees (causal), fp32
//   O[16, D] = P V / sum  fp32 FMAs, V read in place
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

template <typename T, int D>
void prefill_vec(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::vector<PrefillSeq>& seqs, at::Tensor& out, float scale,
                 int64_t window) {
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
  constexpr int NV = D / W;
  constexpr bool pairs = kPairDot && std::is_same_v<T, c10::BFloat16>;
  using KT = std::conditional_t<pairs, uint16_t, float>;
  const int64_t hq = q.size(1), hkv = k.size(1), group = hq / hkv;
  const int64_t q_stride = q.stride(0), kv_stride = k.stride(0), o_stride = out.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kptr = k.data_ptr<T>();
  const T* vptr = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  std::vector<int64_t> key_off(num_seqs + 1, 0);  // repacked keys of sequence i, all kv heads
  int64_t max_len = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    key_off[i + 1] = key_off[i] + round16(seqs[i].len) * hkv * D;
    max_len = std::max(max_len, seqs[i].len);
  }
  std::vector<KT> keys(key_off[num_seqs]);
  struct Task {
    int64_t seq, head, row0;
  };
  std::vector<Task> tasks;  // (sequence, query head, 16-row block), costliest (latest rows) first
  for (int64_t si = 0; si < num_seqs; ++si)
    for (int64_t r = 0; r < seqs[si].len; r += kRows)
      for (int64_t h = 0; h < hq; ++h) tasks.push_back({si, h, r});
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.row0 > b.row0; });
  const int64_t num_repack = num_seqs * hkv;
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t ld = round16(max_len);
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_repack; ++i) {
      const PrefillSeq& s = seqs[i / hkv];
      const int64_t h = i % hkv;
      repack_keys<T, KT, D>(kptr + s.start * kv_stride + h * D, kv_stride, s.len,
                            keys.data() + key_off[i / hkv] + h * round16(s.len) * D);
    }
    std::vector<float> sbuf(kRows * ld), obuf(kRows * D), qf(kRows * D);
    std::vector<uint16_t> qb(kRows * D);
    float inv_sum[kRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < num_tasks; ++ti) {
      const Task& t = tasks[ti];
      const PrefillSeq& s = seqs[t.seq];
      const int rows = static_cast<int>(std::min<int64_t>(kRows, s.len - t.row0));
      const int64_t n = t.row0 + rows;  // keys the last row sees
      // The first key block any row of the task sees (its first row's window), as a key index.
      const int64_t j0 = window > 0 ? std::max<int64_t>(0, t.row0 + 1 - window) / W * W : 0;
      const KT* kb = keys.data() + key_off[t.seq] + (t.head / group) * round16(s.len) * D;
      const T* q0 = qp + (s.start + t.row0) * q_stride + t.head * D;
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
        const int64_t nkb = (t.row0 + std::min(r0 + kScoreRows, rows) + W - 1) / W;
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
          const int64_t visible = t.row0 + i + 1;
          const int64_t from = window > 0 ? std::max(j0, visible - window) : 0;
          inv_sum[i] = exp_row(srow + from, visible - from, n - from, scale);
          std::fill(srow + j0, srow + from, 0.f);  // keys before the row's window
        } else {
          std::fill(srow + j0, srow + n, 0.f);  // pad rows of the last value tile weigh nothing
        }
      }
      const T* vb = vptr + s.start * kv_stride + (t.head / group) * D;
      for (int r0 = 0; r0 < rows; r0 += kValueRows) {
        // keys j0 .. nk of the group
        const int64_t nk = t.row0 + std::min(r0 + kValueRows, rows) - j0;
        const float* prow = sbuf.data() + r0 * ld + j0;
        const T* vj = vb + j0 * kv_stride;
        float* orow = obuf.data() + r0 * D;
        int c0 = 0;
        for (; c0 + W * kValueVecs <= D; c0 += W * kValueVecs)
          values_tile<T, D, kValueRows, kValueVecs>(prow, ld, nk, vj, kv_stride, c0, orow);
        if constexpr (NV % kValueVecs != 0)
          values_tile<T, D, kValueRows, NV % kValueVecs>(prow, ld, nk, vj, kv_stride, c0, orow);
      }
      for (int i = 0; i < rows; ++i) {
        T* dst = op + (s.start + t.row0 + i) * o_stride + t.head * D;
        const float* o = obuf.data() + i * D;
        for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv_sum[i]);
      }
    }
  }
}

template <typename T>
void prefill_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::vector<PrefillSeq>& seqs, at::Tensor& out, float scale,
                      int64_t window) {
  switch (q.size(2)) {
    case 16: return prefill_vec<T, 16>(q, k, v, seqs, out, scale, window);
    case 32: return prefill_vec<T, 32>(q, k, v, seqs, out, scale, window);
    case 64: return prefill_vec<T, 64>(q, k, v, seqs, out, scale, window);
    case 80: return prefill_vec<T, 80>(q, k, v, seqs, out, scale, window);
    case 96: return prefill_vec<T, 96>(q, k, v, seqs, out, scale, window);
    case 128: return prefill_vec<T, 128>(q, k, v, seqs, out, scale, window);
    case 256: return prefill_vec<T, 256>(q, k, v, seqs, out, scale, window);
    default: TORCH_CHECK(false, "prefill_attention: head_dim ", q.size(2), " not supported");
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
  if (dtype == at::kBFloat16)
    prefill_dispatch<c10::BFloat16>(q, k, v, seqs, out, sc, window);
  else
    prefill_dispatch<float>(q, k, v, seqs, out, sc, window);
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("prefill_attention", &prefill_attention);
}
