// Causal attention of fresh prompt chunks (no cached prefix) in bf16 on AMX tiles.
//
// torch's CPU flash attention runs the workload's 30-500-token prompts at 100-350 GFLOP/s,
// a third of a prefill step. Here, per sequence and kv head, K and V are first repacked into
// the tiles' pair-interleaved (VNNI) layout; then each task takes 16 query rows of one head:
//
//   S[16, n]  = Q[16, 64] . K^T          tile dot products, 16 keys at a time
//   P[16, n]  = softmax(S * scale)       fp32 on AVX-512, causal: row i sees keys <= its own
//   O[16, 64] = P . V                    32 keys at a time into four 16x16 fp32 tiles, with P
//                                        as two bf16 parts (see split_store in amx.h)
//
// The whole score row fits in a buffer (n <= the sequence length), so the softmax is exact and
// O needs no rescaling. Only head_dim 64 and bf16: the op (generic/prefill_attention.cpp) checks
// its inputs and calls this first, and runs its vector kernel where this declines.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/prefill_seqs.h"
#include "x86/amx/amx.h"

#ifdef PAGEDLLM_AMX
#include <omp.h>
#endif

namespace {

constexpr int kDim = 64;   // head_dim
constexpr int kRows = 16;  // query rows per task (a tile's rows)

#ifdef PAGEDLLM_AMX

using pagedllm::accumulate_pv;
using pagedllm::amx_usable;
using pagedllm::configure_tiles;
using pagedllm::softmax_split_rows;
using pagedllm::store_output_tiles;
using pagedllm::store_scaled_row;

// Keys and values of one (sequence, kv head), zero-padded to `padded` (a multiple of 32) keys:
//   kp[kb][dp][j][e] = K[16 kb + j][2 dp + e]   (B tiles of S = Q K^T, 16 keys each)
//   vp[kp][d][e]     = V[2 kp + e][d]           (B tiles of O = P V, 16 dims x 32 keys each)
void repack(const c10::BFloat16* k, const c10::BFloat16* v, int64_t row_stride, int64_t len,
            int64_t padded, uint16_t* kp, uint16_t* vp) {
  std::memset(kp, 0, padded * kDim * 2);
  std::memset(vp, 0, padded * kDim * 2);
  for (int64_t j = 0; j < len; ++j) {
    const uint16_t* kr = reinterpret_cast<const uint16_t*>(k + j * row_stride);
    const uint16_t* vr = reinterpret_cast<const uint16_t*>(v + j * row_stride);
    uint16_t* kdst = kp + (j / 16) * (16 * kDim) + (j % 16) * 2;
    for (int dp = 0; dp < kDim / 2; ++dp) {
      kdst[dp * 32] = kr[2 * dp];
      kdst[dp * 32 + 1] = kr[2 * dp + 1];
    }
    uint16_t* vdst = vp + (j / 2) * (2 * kDim) + (j % 2);
    for (int d = 0; d < kDim; ++d) vdst[2 * d] = vr[d];
  }
}

struct Seq {
  int64_t start, len, padded, buf;  // first token row, tokens, keys padded to 32, repack offset
};

void prefill_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::vector<Seq>& seqs, at::Tensor& out, float scale) {
  const int64_t hq = q.size(1), hkv = k.size(1), group = hq / hkv;
  const int64_t q_stride = q.stride(0), kv_stride = k.stride(0), o_stride = out.stride(0);
  const auto* qp = q.data_ptr<c10::BFloat16>();
  const auto* kptr = k.data_ptr<c10::BFloat16>();
  const auto* vptr = v.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  int64_t total = 0, max_padded = 0;
  for (const Seq& s : seqs) {
    total = std::max(total, s.buf + s.padded * hkv * kDim);
    max_padded = std::max(max_padded, s.padded);
  }
  std::vector<uint16_t> kbuf(total), vbuf(total);
  // Tasks: (sequence, query head, 16-row block), costliest (latest rows) first.
  struct Task {
    int64_t seq, head, row0;
  };
  std::vector<Task> tasks;
  for (int64_t si = 0; si < static_cast<int64_t>(seqs.size()); ++si)
    for (int64_t r = 0; r < seqs[si].len; r += kRows)
      for (int64_t h = 0; h < hq; ++h) tasks.push_back({si, h, r});
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.row0 > b.row0; });
  const int64_t num_repack = static_cast<int64_t>(seqs.size()) * hkv;
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_repack; ++i) {
      const Seq& s = seqs[i / hkv];
      const int64_t h = i % hkv;
      const int64_t off = s.buf + h * s.padded * kDim;
      repack(kptr + s.start * kv_stride + h * kDim, vptr + s.start * kv_stride + h * kDim,
             kv_stride, s.len, s.padded, kbuf.data() + off, vbuf.data() + off);
    }
    configure_tiles();
    std::vector<float> sbuf(kRows * max_padded);
    std::vector<uint16_t> pbuf(2 * kRows * max_padded);  // high parts, then low parts
    alignas(64) uint16_t qtile[kRows * kDim];
    alignas(64) float otile[kRows * kDim];
    float inv_sum[kRows];
    int64_t visible[kRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t ti = 0; ti < num_tasks; ++ti) {
      const Task& t = tasks[ti];
      const Seq& s = seqs[t.seq];
      const int rows = static_cast<int>(std::min<int64_t>(kRows, s.len - t.row0));
      const int64_t n = t.row0 + rows;              // keys this block sees
      const int64_t n32 = (n + 31) / 32 * 32;
      const int64_t off = s.buf + (t.head / group) * s.padded * kDim;
      const uint16_t* kp = kbuf.data() + off;
      const uint16_t* vp = vbuf.data() + off;
      std::memset(qtile, 0, sizeof(qtile));
      for (int i = 0; i < rows; ++i)
        std::memcpy(qtile + i * kDim, qp + (s.start + t.row0 + i) * q_stride + t.head * kDim,
                    kDim * 2);
      _tile_loadd(1, qtile, kDim * 2);
      _tile_loadd(2, qtile + 32, kDim * 2);
      const int64_t nkb = (n + 15) / 16;
      int64_t kb = 0;
      for (; kb + 1 < nkb; kb += 2) {  // two C tiles in flight
        const uint16_t* kt = kp + kb * 16 * kDim;
        _tile_zero(0);
        _tile_zero(4);
        _tile_loadd(3, kt, 64);
        _tile_loadd(5, kt + 16 * kDim, 64);
        _tile_dpbf16ps(0, 1, 3);
        _tile_dpbf16ps(4, 1, 5);
        _tile_loadd(3, kt + 16 * 32, 64);
        _tile_loadd(5, kt + 16 * kDim + 16 * 32, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(4, 2, 5);
        _tile_stored(0, sbuf.data() + kb * 16, max_padded * 4);
        _tile_stored(4, sbuf.data() + kb * 16 + 16, max_padded * 4);
      }
      if (kb < nkb) {
        const uint16_t* kt = kp + kb * 16 * kDim;
        _tile_zero(0);
        _tile_loadd(3, kt, 64);
        _tile_dpbf16ps(0, 1, 3);
        _tile_loadd(3, kt + 16 * 32, 64);
        _tile_dpbf16ps(0, 2, 3);
        _tile_stored(0, sbuf.data() + kb * 16, max_padded * 4);
      }
      for (int i = 0; i < rows; ++i) visible[i] = t.row0 + i + 1;  // causal
      softmax_split_rows(sbuf.data(), max_padded, rows, visible, scale, pbuf.data(), max_padded,
                         n32, inv_sum);
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t kb = 0; kb < n32 / 32; ++kb) {
        accumulate_pv(pbuf.data() + kb * 32, pbuf.data() + kRows * max_padded + kb * 32,
                      max_padded * 2, vp + kb * 16 * (2 * kDim), 32, 4 * kDim);
      }
      store_output_tiles(otile);
      for (int i = 0; i < rows; ++i)
        store_scaled_row(otile + i * kDim, inv_sum[i],
                         op + (s.start + t.row0 + i) * o_stride + t.head * kDim);
    }
    _tile_release();
  }
}

#endif  // PAGEDLLM_AMX

}  // namespace

namespace pagedllm {

bool prefill_attention_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<PrefillSeq>& seqs, at::Tensor& out, float scale) {
#ifdef PAGEDLLM_AMX
  if (!amx_usable() || q.scalar_type() != at::kBFloat16 || q.size(2) != kDim) return false;
  std::vector<Seq> tiled;
  int64_t buf = 0;
  for (const PrefillSeq& s : seqs) {
    const int64_t padded = (s.len + 31) / 32 * 32;
    tiled.push_back({s.start, s.len, padded, buf});
    buf += padded * k.size(1) * kDim;
  }
  if (!tiled.empty()) prefill_amx(q, k, v, tiled, out, scale);
  return true;
#else
  (void)q, (void)k, (void)v, (void)seqs, (void)out, (void)scale;
  return false;
#endif
}

}  // namespace pagedllm
