// Paged attention for CPU decode: one query token per sequence, K/V read in place from the
// block-structured cache through the block table (no gather copy).
//
//   k_cache: [num_blocks, num_kv_heads, head_dim, block_size]   (K transposed per block)
//   v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
//   token j of sequence b lives in block block_tables[b][j / block_size], slot j % block_size
//
// With K stored transposed, the scores of a whole block are block_size-wide vector FMAs
// (q[d] broadcast times row d of K^T): no horizontal reductions. Work is split over
// (sequence, kv head); the G = num_heads / num_kv_heads query heads sharing a kv head are
// processed together so each K/V element is loaded once (GQA reuse). With window > 0 (a
// sliding-window layer) a sequence attends only its last ``window`` keys: the blocks before
// them are not read (KeyRange).
#include <ATen/ATen.h>
#include "common/registration.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/attention_common.h"
#include "common/vec_math.h"

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using pagedllm::exp_approx;
using pagedllm::kFarAhead;
using pagedllm::load_f;
using pagedllm::load_queries;
using pagedllm::prefetch_slice;
using pagedllm::softmax;

constexpr int kMaxGroup = 16;

// The keys a query at the end of a sequence of ``full`` tokens attends: all of them, or with a
// sliding window (window > 0) the last ``window``. Whole blocks before the window are skipped
// (``skip``, the block table read from there on); the kept range is ``len`` keys from the first
// kept block, of which the first ``masked`` (before the window) get probability 0.
struct KeyRange {
  int64_t skip = 0, len = 0, masked = 0;
  KeyRange(int64_t full, int64_t window, int64_t bs) : len(full) {
    if (window > 0 && full > window) {
      const int64_t start = full - window;
      skip = start / bs;
      len = full - skip * bs;
      masked = start - skip * bs;
    }
  }
};

// softmax over s[masked, len); s[0, masked) <- 0.
inline void windowed_softmax(float* s, int64_t len, int64_t masked) {
  softmax(s + masked, len - masked);
  std::fill(s, s + masked, 0.f);
}
// Independent partial sums over head_dim in the score loops (head_dim % kSplit == 0).
constexpr int kSplit = 4;

using pagedllm::kLanes;
using pagedllm::loadn;
using pagedllm::vnf;

// Partial score sums per (query head, register) for 16-key blocks of NB registers: kSplit on
// AVX-512 (32 zmm); on AVX2 as many as keep G x NB x S accumulators within 12 of 16 ymm.
constexpr int score_splits(int G, int NB) {
  if (kLanes == 16) return kSplit;
  const int fit = 12 / (G * NB);
  return fit >= 2 ? 2 : 1;
}

// Registers of V accumulators per query head per pass over the values: all NVT on AVX-512;
// on AVX2 the largest divisor of NVT with G x NC <= 12.
constexpr int value_chunk(int G, int NVT) {
  if (kLanes == 16) return NVT;
  int nc = NVT;
  while (nc > 1 && (G * nc > 12 || NVT % nc != 0)) --nc;
  return nc;
}

using pagedllm::exp16;
using pagedllm::load16;
using pagedllm::v16f;

inline v16f sum_partials(const v16f (&p)[kSplit]) {
  static_assert(kSplit == 4, "sum_partials adds four partial sums");
  return (p[0] + p[1]) + (p[2] + p[3]);
}

// T: the dtype of q and out; C: the cache's (T, or bf16 under an fp32 model with
// --kv-cache-dtype bfloat16). BS > 0: compile-time block size (vectorizes to full registers);
// BS == 0: runtime. G > 0: compile-time query heads per kv head (accumulators stay in
// registers); 0: runtime.
template <typename T, typename C, int D, int BS, int G>
void decode_impl(const T* q, const C* k_cache, const C* v_cache, const int64_t* block_tables,
                 const int64_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads,
                 int64_t num_kv_heads, int64_t block_size_rt, int64_t max_blocks, float scale,
                 int64_t max_seq_len, int64_t window) {
  const int64_t bs = BS > 0 ? BS : block_size_rt;
  const int64_t group = G > 0 ? G : num_heads / num_kv_heads;
  const int64_t head_stride = D * bs;  // one kv head's slice of a block (K and V alike)
  const int64_t block_stride = num_kv_heads * head_stride;
  const int64_t max_len_padded = ((std::max<int64_t>(max_seq_len, 1) + bs - 1) / bs) * bs;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * max_len_padded);
    std::vector<float> qf(group * D), acc(group * D), buf(std::max<int64_t>(bs, D));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, hk = task % num_kv_heads;
      const KeyRange keys(seq_lens[b], window, bs);
      const int64_t len = keys.len, masked = keys.masked;
      const int64_t nblocks = (len + bs - 1) / bs;
      const int64_t* table = block_tables + b * max_blocks + keys.skip;
      load_queries<D>(q + (b * num_heads + hk * group) * D, group, scale, qf.data());
      // The loop prefetches kFarAhead blocks ahead: start its first kFarAhead here.
      for (int64_t blk = 1; blk < std::min(nblocks, kFarAhead); ++blk)
        prefetch_slice<1>(k_cache + table[blk] * block_stride + hk * head_stride, head_stride);
      // scores[g, j] = q_g . k_j, one block (bs keys) at a time
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const C* __restrict kt = k_cache + table[blk] * block_stride + hk * head_stride;
        if (blk + 1 < nblocks)
          prefetch_slice(k_cache + table[blk + 1] * block_stride + hk * head_stride, head_stride);
        if (blk + kFarAhead < nblocks)
          prefetch_slice<1>(k_cache + table[blk + kFarAhead] * block_stride + hk * head_stride,
                            head_stride);
        float* __restrict s0 = scores.data() + blk * bs;
        if constexpr (BS == 16 && G > 0) {
          // kSplit partial sums per query head: G chains alone would wait on the FMA latency.
          // A block's 16 keys are NB registers of the ISA's width; S partial sums per query
          // head cover the FMA latency within the register file (16 ymm on AVX2).
          constexpr int NB = 16 / kLanes;
          constexpr int S = score_splits(G, NB);
          vnf sacc[G][NB][S] = {};
          for (int d = 0; d < D; d += S) {
#pragma GCC unroll 4
            for (int u = 0; u < S; ++u) {
#pragma GCC unroll 2
              for (int nb = 0; nb < NB; ++nb) {
                const vnf kv = loadn(kt + (d + u) * 16 + nb * kLanes);
#pragma GCC unroll 16
                for (int g = 0; g < G; ++g) sacc[g][nb][u] += qf[g * D + d + u] * kv;
              }
            }
          }
#pragma GCC unroll 16
          for (int g = 0; g < G; ++g) {
#pragma GCC unroll 2
            for (int nb = 0; nb < NB; ++nb) {
              const vnf* a = sacc[g][nb];
              const vnf sum = S == 4 ? (a[0] + a[1]) + (a[2 % S] + a[3 % S])
                              : S == 2 ? a[0] + a[1 % S]
                                       : a[0];
              pagedllm::storen(s0 + g * max_len_padded + nb * kLanes, sum);
            }
          }
        } else if constexpr (BS > 0) {
          // Register-resident accumulators: group x BS floats.
          constexpr int kRows = G > 0 ? G : kMaxGroup;
          float sacc[kRows][BS] = {};
          for (int d = 0; d < D; ++d) {
            float kf[BS];
#pragma omp simd
            for (int j = 0; j < BS; ++j) kf[j] = load_f(kt[d * BS + j]);
            for (int64_t g = 0; g < group; ++g) {
              const float qd = qf[g * D + d];
#pragma omp simd
              for (int j = 0; j < BS; ++j) sacc[g][j] += qd * kf[j];
            }
          }
          for (int64_t g = 0; g < group; ++g)
            std::copy(sacc[g], sacc[g] + BS, s0 + g * max_len_padded);
        } else {
          for (int64_t g = 0; g < group; ++g) std::fill(s0 + g * max_len_padded,
                                                        s0 + g * max_len_padded + bs, 0.f);
          for (int d = 0; d < D; ++d) {
            const C* row = kt + d * bs;
            float* kf = buf.data();
            for (int64_t j = 0; j < bs; ++j) kf[j] = load_f(row[j]);
            for (int64_t g = 0; g < group; ++g) {
              const float qd = qf[g * D + d];
              float* sg = s0 + g * max_len_padded;
#pragma omp simd
              for (int64_t j = 0; j < bs; ++j) sg[j] += qd * kf[j];
            }
          }
        }
      }
      // V's first blocks load while the softmax runs.
      prefetch_slice(v_cache + table[0] * block_stride + hk * head_stride, head_stride);
      for (int64_t blk = 1; blk < std::min(nblocks, kFarAhead); ++blk)
        prefetch_slice<1>(v_cache + table[blk] * block_stride + hk * head_stride, head_stride);
      for (int64_t g = 0; g < group; ++g)
        windowed_softmax(scores.data() + g * max_len_padded, len, masked);
      if (task + 1 < end) {  // and the next task's first K blocks while V is read
        const int64_t nb2 = task + 1, b2 = nb2 / num_kv_heads, hk2 = nb2 % num_kv_heads;
        const KeyRange keys2(seq_lens[b2], window, bs);
        const int64_t* table2 = block_tables + b2 * max_blocks + keys2.skip;
        const int64_t n2 = std::min<int64_t>((keys2.len + bs - 1) / bs, kFarAhead);
        for (int64_t blk = 0; blk < n2; ++blk)
          prefetch_slice<1>(k_cache + table2[blk] * block_stride + hk2 * head_stride, head_stride);
      }
      // out_g = sum_j p_gj v_j
      if constexpr (G > 0 && D % kLanes == 0) {
        // G x D accumulators, NC registers per query head at a time: one pass over V on
        // AVX-512; on AVX2 (3 x 64 floats = 24 ymm of 16) two, the second from L2.
        constexpr int NVT = D / kLanes;
        constexpr int NC = value_chunk(G, NVT);
        alignas(64) float res[G][D];  // see decode_int8_impl
        for (int c0 = 0; c0 < NVT; c0 += NC) {
          vnf vacc[G][NC] = {};
          for (int64_t blk = 0; blk < nblocks; ++blk) {
            const C* __restrict vb = v_cache + table[blk] * block_stride + hk * head_stride;
            if (c0 == 0 && blk + 1 < nblocks)
              prefetch_slice(v_cache + table[blk + 1] * block_stride + hk * head_stride,
                             head_stride);
            if (c0 == 0 && blk + kFarAhead < nblocks)
              prefetch_slice<1>(v_cache + table[blk + kFarAhead] * block_stride +
                                    hk * head_stride,
                                head_stride);
            const int64_t n = std::min<int64_t>(bs, len - blk * bs);
            const float* __restrict p0 = scores.data() + blk * bs;
            for (int64_t j = 0; j < n; ++j) {
              vnf vv[NC];
#pragma GCC unroll 16
              for (int c = 0; c < NC; ++c) vv[c] = loadn(vb + j * D + kLanes * (c0 + c));
#pragma GCC unroll 16
              for (int g = 0; g < G; ++g) {
                const float p = p0[g * max_len_padded + j];
#pragma GCC unroll 16
                for (int c = 0; c < NC; ++c) vacc[g][c] += p * vv[c];
              }
            }
          }
          for (int g = 0; g < G; ++g)
            for (int c = 0; c < NC; ++c)
              pagedllm::storen(&res[g][kLanes * (c0 + c)], vacc[g][c]);
        }
        for (int g = 0; g < G; ++g) {
          T* op = out + (b * num_heads + hk * group + g) * D;
          for (int d = 0; d < D; ++d) op[d] = static_cast<T>(res[g][d]);
        }
        continue;
      }
      constexpr int kAccRows = G > 0 ? G : 1;
      float local_acc[kAccRows][D] = {};
      float* __restrict ac = G > 0 ? &local_acc[0][0] : acc.data();
      if (G == 0) std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const C* __restrict vb = v_cache + table[blk] * block_stride + hk * head_stride;
        const int64_t n = std::min<int64_t>(bs, len - blk * bs);
        const float* __restrict p0 = scores.data() + blk * bs;
        for (int64_t j = 0; j < n; ++j) {
          float vf[D];
#pragma omp simd
          for (int d = 0; d < D; ++d) vf[d] = load_f(vb[j * D + d]);
          for (int64_t g = 0; g < group; ++g) {
            const float p = p0[g * max_len_padded + j];
#pragma omp simd
            for (int d = 0; d < D; ++d) ac[g * D + d] += p * vf[d];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* op = out + (b * num_heads + hk * group + g) * D;
        for (int d = 0; d < D; ++d) op[d] = static_cast<T>(ac[g * D + d]);
      }
    }
  });
}

// out[g] = sum_j p[g][j] * scale_j * v_j over an int8 V cache. A function of its own:
// inlined into the kernel, GCC kept the accumulators in memory and stored all of them in every
// iteration (with it, applying the scale here beat a separate pass folding it into p: 1.19 vs
// 1.47 ms per layer, 160 sequences x 310 tokens).
template <typename T, int D, int BS, int G>
__attribute__((noinline)) void int8_weighted_sum_v(
    const int8_t* v_cache, const int64_t* table, int64_t nblocks, int64_t block_stride,
    int64_t head_offset, int64_t bs_rt, int64_t len, const float* scores,
    int64_t max_len_padded, int64_t group_rt, T* out) {
  constexpr int kG = G > 0 ? G : kMaxGroup;
  constexpr int NV = D / 16;
  const int64_t bs = BS > 0 ? BS : bs_rt;
  const int64_t group = G > 0 ? G : group_rt;
  const int64_t head_stride = bs * (D + 4);
  prefetch_slice(v_cache + table[0] * block_stride + head_offset, head_stride);
  v16f vacc[kG][NV] = {};
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int8_t* __restrict vb = v_cache + table[blk] * block_stride + head_offset;
    if (blk + 1 < nblocks)
      prefetch_slice(v_cache + table[blk + 1] * block_stride + head_offset, head_stride);
    if (blk + kFarAhead < nblocks)
      prefetch_slice<1>(v_cache + table[blk + kFarAhead] * block_stride + head_offset,
                        head_stride);
    const int64_t n = std::min<int64_t>(bs, len - blk * bs);
    const float* __restrict p0 = scores + blk * bs;
    const float* vsc = reinterpret_cast<const float*>(vb + bs * D);
    for (int64_t j = 0; j < n; ++j) {
      const float s = vsc[j];
      v16f vv[NV];
#pragma GCC unroll 16
      for (int c = 0; c < NV; ++c) vv[c] = load16(vb + j * D + 16 * c);
#pragma GCC unroll 16
      for (int g = 0; g < kG; ++g) {
        if (G == 0 && g >= group) break;
        const float p = p0[g * max_len_padded + j] * s;
#pragma GCC unroll 16
        for (int c = 0; c < NV; ++c) vacc[g][c] += p * vv[c];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    alignas(64) float res[D];
    for (int c = 0; c < NV; ++c) pagedllm::store16(res + 16 * c, vacc[g][c]);
    for (int d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(res[d]);
  }
}

// int8 cache (--kv-cache-dtype int8): half the bytes of bf16 for a kernel bound by reading
// them. One record per (block, kv head), contiguous so a block costs one stream of reads:
//   K: int8 [D][BS] (K^T, as above) then BS fp32 scales;  V: int8 [BS][D] then BS fp32 scales
// with k = k_int8 * k_scale per (token, head). The scales are applied once per 16 scores (K)
// and to each probability (V). Needs BS % 16 == 0 and D % 16 == 0.
template <typename T, int D, int BS, int G>
void decode_int8_impl(const T* q, const int8_t* k_cache, const int8_t* v_cache,
                      const int64_t* block_tables, const int64_t* seq_lens, T* out,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t bs_rt,
                      int64_t max_blocks, float scale, int64_t max_seq_len, int64_t window) {
  const int64_t bs = BS > 0 ? BS : bs_rt;
  static_assert(D % 16 == 0, "int8 decode needs head_dim % 16 == 0");
  constexpr int kG = G > 0 ? G : kMaxGroup;
  constexpr int NV = D / 16;
  const int64_t group = G > 0 ? G : num_heads / num_kv_heads;
  const int64_t head_stride = bs * (D + 4);  // bytes of one record
  const int64_t block_stride = num_kv_heads * head_stride;
  const int64_t max_len_padded = ((std::max<int64_t>(max_seq_len, 1) + bs - 1) / bs) * bs;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * max_len_padded);
    std::vector<float> qf(group * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, hk = task % num_kv_heads;
      const KeyRange keys(seq_lens[b], window, bs);
      const int64_t len = keys.len;
      const int64_t nblocks = (len + bs - 1) / bs;
      const int64_t* table = block_tables + b * max_blocks + keys.skip;
      load_queries<D>(q + (b * num_heads + hk * group) * D, group, scale, qf.data());
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int8_t* __restrict kt = k_cache + table[blk] * block_stride + hk * head_stride;
        if (blk + 1 < nblocks)
          prefetch_slice(k_cache + table[blk + 1] * block_stride + hk * head_stride, head_stride);
        if (blk + kFarAhead < nblocks)
          prefetch_slice<1>(k_cache + table[blk + kFarAhead] * block_stride + hk * head_stride,
                            head_stride);
        const float* ksc = reinterpret_cast<const float*>(kt + bs * D);
        for (int64_t c = 0; c < bs; c += 16) {
          v16f sacc[kG][kSplit] = {};
          for (int d = 0; d < D; d += kSplit) {
#pragma GCC unroll 4
            for (int u = 0; u < kSplit; ++u) {
              const v16f kv = load16(kt + (d + u) * bs + c);
#pragma GCC unroll 16
              for (int g = 0; g < (G > 0 ? G : group); ++g) sacc[g][u] += qf[g * D + d + u] * kv;
            }
          }
          const v16f sc = load16(ksc + c);
          for (int g = 0; g < (G > 0 ? G : group); ++g) {
            const v16f sum = sum_partials(sacc[g]);
            pagedllm::store16(scores.data() + g * max_len_padded + blk * bs + c, sum * sc);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        windowed_softmax(scores.data() + g * max_len_padded, len, keys.masked);
      int8_weighted_sum_v<T, D, BS, G>(v_cache, table, nblocks, block_stride,
                                       hk * head_stride, bs, len, scores.data(), max_len_padded,
                                       group, out + (b * num_heads + hk * group) * D);
    }
  });
}

// f(std::integral_constant<int, G>) with the GQA group sizes that have compiled kernels
// (accumulators in registers); G = 0 is the runtime-group kernel.
template <typename F>
void with_group(int64_t group, F&& f) {
  switch (group) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

template <typename T, int D>
void dispatch_int8_group(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, at::Tensor& out, double scale,
                         int64_t max_seq_len, int64_t window) {
  if constexpr (D % 16 != 0) {
    TORCH_CHECK(false, "int8 KV cache needs head_dim % 16 == 0, got ", D);
  } else {
    const int64_t block_size = k_cache.size(2) / (D + 4);
    TORCH_CHECK(block_size * (D + 4) == k_cache.size(2) && block_size % 16 == 0,
                "int8 KV cache: records of block_size * (head_dim + 4) bytes, "
                "block_size % 16 == 0");
    auto run = [&](auto bs_tag, auto g_tag) {
      decode_int8_impl<T, D, decltype(bs_tag)::value, decltype(g_tag)::value>(
          q.data_ptr<T>(), k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(),
          block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(), out.data_ptr<T>(),
          q.size(0), q.size(1), k_cache.size(1), block_size, block_tables.size(1),
          static_cast<float>(scale), max_seq_len, window);
    };
    auto run_g = [&](auto g_tag) {
      if (block_size == 16)
        run(std::integral_constant<int, 16>{}, g_tag);
      else
        run(std::integral_constant<int, 0>{}, g_tag);
    };
    with_group(q.size(1) / k_cache.size(1), run_g);
  }
}

template <typename T, typename C, int D>
void dispatch_block_size(const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& block_tables,
                         const at::Tensor& seq_lens, at::Tensor& out, double scale,
                         int64_t max_seq_len, int64_t window) {
  const int64_t block_size = k_cache.size(3);
  const int64_t group = q.size(1) / k_cache.size(1);
  auto run_g = [&](auto bs_tag, auto g_tag) {
    constexpr int BS = decltype(bs_tag)::value;
    constexpr int G = decltype(g_tag)::value;
    decode_impl<T, C, D, BS, G>(q.data_ptr<T>(), k_cache.data_ptr<C>(), v_cache.data_ptr<C>(),
                          block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),
                          out.data_ptr<T>(), q.size(0), q.size(1), k_cache.size(1), block_size,
                          block_tables.size(1), static_cast<float>(scale), max_seq_len, window);
  };
  auto run = [&](auto bs_tag) { with_group(group, [&](auto g_tag) { run_g(bs_tag, g_tag); }); };
  // The default block size gets its own instance; any other runs the runtime-size loop
  // (instances per ISA library multiply the build time).
  if (block_size == 16) {
    run(std::integral_constant<int, 16>{});
  } else {
    run(std::integral_constant<int, 0>{});
  }
}

// By cache dtype: int8 records, the model's own dtype, or bf16 under an fp32 model.
template <typename T, int D>
void dispatch_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out,
                    double scale, int64_t max_seq_len, int64_t window) {
  if (k_cache.scalar_type() == at::kChar) {
    dispatch_int8_group<T, D>(q, k_cache, v_cache, block_tables, seq_lens, out, scale,
                              max_seq_len, window);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (k_cache.scalar_type() == at::kBFloat16) {
      dispatch_block_size<float, c10::BFloat16, D>(q, k_cache, v_cache, block_tables, seq_lens,
                                                   out, scale, max_seq_len, window);
      return;
    }
  }
  dispatch_block_size<T, T, D>(q, k_cache, v_cache, block_tables, seq_lens, out, scale,
                               max_seq_len, window);
}

template <typename T>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens,
                       at::Tensor& out, double scale, int64_t max_seq_len, int64_t window) {
#define PAGEDLLM_CASE(HD)                                                                    \
  case HD:                                                                                   \
    dispatch_cache<T, HD>(q, k_cache, v_cache, block_tables, seq_lens, out, scale,           \
                          max_seq_len, window);                                              \
    break;
  switch (q.size(2)) {
    PAGEDLLM_CASE(16)
    PAGEDLLM_CASE(32)
    PAGEDLLM_CASE(64)
    PAGEDLLM_CASE(80)
    PAGEDLLM_CASE(96)
    PAGEDLLM_CASE(128)
    PAGEDLLM_CASE(256)
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported head_dim ", q.size(2));
  }
#undef PAGEDLLM_CASE
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale,
                                  int64_t max_seq_len, int64_t window) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "inputs must be contiguous");
  if (k_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() &&
                    v_cache.scalar_type() == at::kChar,
                "int8 caches: q [B, H, D], k_cache and v_cache [NB, Hkv, BS * (D + 4)]");
  } else {
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
                "q [B, H, D], k_cache [NB, Hkv, D, BS], v_cache [NB, Hkv, BS, D]");
    TORCH_CHECK(k_cache.size(2) == q.size(2) && v_cache.size(3) == q.size(2),
                "head_dim mismatch");
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                    (k_cache.scalar_type() == q.scalar_type() ||
                     (k_cache.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kFloat)),
                "the cache must have q's dtype, or be bf16 under fp32 q");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(q.size(1) / k_cache.size(1) <= kMaxGroup, "too many query heads per kv head");
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  auto out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(q, k_cache, v_cache, bt, sl, out, scale, max_seq_len, window);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(q, k_cache, v_cache, bt, sl, out, scale, max_seq_len,
                                       window);
      break;
    case at::kHalf:
      dispatch_head_dim<c10::Half>(q, k_cache, v_cache, bt, sl, out, scale, max_seq_len, window);
      break;
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("paged_attention_decode", &paged_attention_decode);
}
