// Paged attention for CPU decode: one query token per sequence, K/V read in place from the
// block-structured cache through the block table (no gather copy).
//
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
//   token j of sequence b lives at block_tables[b][j / block_size], offset j % block_size
//
// Work is split over (sequence, kv head); the G = num_heads / num_kv_heads query heads that
// share a kv head are processed together so each K/V row is loaded once (GQA reuse).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T, int D>
void decode_impl(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                 const int64_t* seq_lens, T* out, int64_t num_seqs, int64_t num_heads,
                 int64_t num_kv_heads, int64_t block_size, int64_t max_blocks, float scale,
                 int64_t max_seq_len) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * D;  // between consecutive tokens in a block
  const int64_t block_stride = block_size * row_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * std::max<int64_t>(max_seq_len, 1));
    std::vector<float> qf(group * D), acc(group * D), kv(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, hk = task % num_kv_heads;
      const int64_t len = seq_lens[b];
      const int64_t* table = block_tables + b * max_blocks;
      for (int64_t g = 0; g < group; ++g) {
        const T* qp = q + (b * num_heads + hk * group + g) * D;
        for (int d = 0; d < D; ++d) qf[g * D + d] = to_float(qp[d]) * scale;
      }
      // scores = q . k_j
      for (int64_t j = 0; j < len; ++j) {
        const T* kp = k_cache + table[j / block_size] * block_stride +
                      (j % block_size) * row_stride + hk * D;
        for (int d = 0; d < D; ++d) kv[d] = to_float(kp[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int d = 0; d < D; ++d) s += qg[d] * kv[d];
          scores[g * len + j] = s;
        }
      }
      // softmax per head
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) m = std::max(m, sg[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          sg[j] = std::exp(sg[j] - m);
          sum += sg[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
      }
      // out = sum_j p_j v_j
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < len; ++j) {
        const T* vp = v_cache + table[j / block_size] * block_stride +
                      (j % block_size) * row_stride + hk * D;
        for (int d = 0; d < D; ++d) kv[d] = to_float(vp[d]);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + j];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) ag[d] += p * kv[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* op = out + (b * num_heads + hk * group + g) * D;
        for (int d = 0; d < D; ++d) op[d] = static_cast<T>(acc[g * D + d]);
      }
    }
  });
}

template <typename T>
void dispatch_head_dim(int64_t head_dim, const at::Tensor& q, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& block_tables,
                       const at::Tensor& seq_lens, at::Tensor& out, double scale,
                       int64_t max_seq_len) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  const int64_t max_blocks = block_tables.size(1);
#define PAGEDLLM_CASE(HD)                                                                     \
  case HD:                                                                                    \
    decode_impl<T, HD>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),         \
                       block_tables.data_ptr<int64_t>(), seq_lens.data_ptr<int64_t>(),        \
                       out.data_ptr<T>(), num_seqs, num_heads, num_kv_heads, block_size,      \
                       max_blocks, static_cast<float>(scale), max_seq_len);                   \
    break;
  switch (head_dim) {
    PAGEDLLM_CASE(16)
    PAGEDLLM_CASE(32)
    PAGEDLLM_CASE(64)
    PAGEDLLM_CASE(80)
    PAGEDLLM_CASE(96)
    PAGEDLLM_CASE(128)
    PAGEDLLM_CASE(256)
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported head_dim ", head_dim);
  }
#undef PAGEDLLM_CASE
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale,
                                  int64_t max_seq_len) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], cache [NB, BS, Hkv, D]");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "block_tables and seq_lens must be int64");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  auto bt = block_tables.contiguous();
  auto sl = seq_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t head_dim = q.size(2);
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_head_dim<float>(head_dim, q, k_cache, v_cache, bt, sl, out, scale, max_seq_len);
      break;
    case at::kBFloat16:
      dispatch_head_dim<c10::BFloat16>(head_dim, q, k_cache, v_cache, bt, sl, out, scale,
                                       max_seq_len);
      break;
    case at::kHalf:
      dispatch_head_dim<c10::Half>(head_dim, q, k_cache, v_cache, bt, sl, out, scale,
                                   max_seq_len);
      break;
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedllm, m) {
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int max_seq_len) -> Tensor");
  m.impl("paged_attention_decode", c10::DispatchKey::CPU, &paged_attention_decode);
}
