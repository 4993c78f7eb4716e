// Pieces shared by the paged-attention kernels (decode, and several query tokens per sequence).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/vec_math.h"

namespace pagedllm {

// Blocks of one sequence are scattered, so the hardware prefetcher cannot run ahead across
// them (the decode kernel is DRAM-bound): fetch the next block's slice into L1 while computing
// this one (Locality 3), and the block kFarAhead ahead into L2 only (Locality 1): more misses in
// flight than the L1 fill buffers allow (+7% on a 2-core Xeon with the cache far larger than L3).
// The two prefetches are written out in both the K and the V loop on purpose: routed through a
// shared helper (function or lambda) the kernel measured 27% slower (10.8 vs 14.8 GB/s).
constexpr int64_t kFarAhead = 6;
template <int Locality = 3, typename T>
inline void prefetch_slice(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(c + off, 0, Locality);
}

// In place: s[0, len) <- softmax(s[0, len)).
inline void softmax(float* s, int64_t len) {
  const int64_t nv = len / 16 * 16;
  v16f mv = v16f{} - std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nv; j += 16) {
    const v16f x = load16(s + j);
    mv = x > mv ? x : mv;
  }
  float m = mv[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, mv[i]);
  for (int64_t j = nv; j < len; ++j) m = std::max(m, s[j]);
  v16f sv = {};
  for (int64_t j = 0; j < nv; j += 16) {
    const v16f e = exp16(load16(s + j) - m);
    store16(s + j, e);
    sv += e;
  }
  float sum = 0.f;
  for (int i = 0; i < 16; ++i) sum += sv[i];
  for (int64_t j = nv; j < len; ++j) {
    s[j] = exp_approx(s[j] - m);
    sum += s[j];
  }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < nv; j += 16) store16(s + j, load16(s + j) * inv);
  for (int64_t j = nv; j < len; ++j) s[j] *= inv;
}

// The G query heads sharing one kv head, pre-multiplied by the softmax scale, as fp32.
template <int D, typename T>
inline void load_queries(const T* q, int64_t group, float scale, float* qf) {
  for (int64_t i = 0; i < group * D; ++i) qf[i] = static_cast<float>(q[i]) * scale;
}

}  // namespace pagedllm
