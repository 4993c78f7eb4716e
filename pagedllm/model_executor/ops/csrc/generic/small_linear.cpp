// y = x W^T (+ bias) for steps of few rows (decode, short verifies), straight from the
// row-major weight the model already holds: no second copy, fp32 or bf16 (widened in registers,
// so a bf16 weight streams half the bytes on a CPU without bf16 dot products).
//
// Such steps read every weight once for a few FMAs each: memory bound, and oneDNN's packed GEMM
// leaves the bandwidth unused while it computes (the 30 layers + lm_head of SmolLM2-135M in
// fp32, 16 rows, weights cold: 41.6 ms, 12.9 GB/s, against 32.1 ms here, Intel Xeon model 207,
// 2 cores, ~22 GB/s from DRAM). So:
//   - each thread takes a contiguous run of blocks of kN weight rows, and prefetches (to L2) the
//     block kPrefetchBlocks ahead, spread evenly over the work of the current one, so DRAM
//     streams while the FMAs run;
//   - a block meets the rows of x kM at a time (kM x kN accumulators of one register each,
//     summed over k lane-wise), in chunks of kChunk columns, so the block's chunk and x's chunk
//     both stay in L1 between the row groups;
//   - each accumulator is summed across its lanes once, at the end (16 of them at a time by a
//     shuffle tree on AVX-512, 8 by hadds on AVX2), in one order for every tile: a row's result
//     does not depend on the rows beside it.
//
//   x [M, K] fp32 contiguous, 1 <= M <= kMaxRows;  w [N, K] fp32 or bf16 contiguous;
//   bias [N] fp32 or none;  K a multiple of 16.  -> y [M, N] fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "common/registration.h"
#include "common/tile_rows.h"
#include "common/vec_math.h"

namespace {

using pagedllm::kLanes;
using pagedllm::loadn;
using pagedllm::vnf;

constexpr int kN = 4;                        // weight rows (outputs) per block
constexpr int kM = kLanes == 16 ? 4 : 2;     // rows of x per tile: kM x kN registers
constexpr int64_t kChunk = 256;              // columns per chunk
constexpr int64_t kMaxRows = 64;
constexpr int64_t kPrefetchBlocks = 2;

// Lines of a later block to prefetch while a tile runs, spread over its vector steps: a cursor
// walked a line at a time (an address computed per step with a division and a modulo cost 4-8%
// at 16 rows, weights cold; 17% with them in L2).
struct Prefetch {
  const char* next = nullptr;  // the next line to prefetch
  int64_t row_skip = 0;        // from past a row's last line in the chunk to the next row's first
  int lines_per_row = 1;
  int col = 0;                 // lines of the current row already prefetched
  int left = 0;                // lines still to prefetch
  int per_step = 0;

  inline void step() {
    for (int q = 0; q < per_step && left > 0; ++q, --left) {
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64;
      if (++col == lines_per_row) {
        col = 0;
        next += row_skip;
      }
    }
  }
};

// One accumulator's lanes summed in the order the trees in lane_sums sum them, so a row's
// result is the same whichever tile it ran in (alone, or among others).
inline float lane_sum(vnf a) {
#if defined(__AVX512F__)
  float r[8], s[4];
  for (int j = 0; j < 8; ++j) r[j] = a[j] + a[j + 8];
  for (int j = 0; j < 4; ++j) s[j] = r[j] + r[j + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
#else
  float p[4];
  for (int j = 0; j < 4; ++j) p[j] = a[2 * j] + a[2 * j + 1];
  return (p[0] + p[1]) + (p[2] + p[3]);
#endif
}

// Lane sums of M x NO accumulators -> sums[m * NO + o].
template <int M, int NO>
inline void lane_sums(vnf (&acc)[M][NO], float* sums) {
#if defined(__AVX512F__)
  if constexpr (M * NO == 16) {
    __m512 a[16], r[8], s[4], t[2];
    for (int m = 0; m < M; ++m)
      for (int o = 0; o < NO; ++o) std::memcpy(&a[m * NO + o], &acc[m][o], 64);
    for (int i = 0; i < 8; ++i)  // halves of a pair: lanes 0-7 from a[2i], 8-15 from a[2i+1]
      r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // quarters: one from each of a[4i .. 4i+3]
      s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(r[2 * i], r[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)
      t[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44),
                           _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    // Lane 4q + i of u holds the sum of a[4i + q]; put it at 4i + q.
    const __m512 u =
        _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0x88), _mm512_shuffle_ps(t[0], t[1], 0xDD));
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(sums, _mm512_permutexvar_ps(idx, u));
    return;
  }
#else
  if constexpr (M * NO == 8) {
    __m256 a[8];
    for (int m = 0; m < M; ++m)
      for (int o = 0; o < NO; ++o) std::memcpy(&a[m * NO + o], &acc[m][o], 32);
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    // u0's lanes j and 4 + j hold the halves of a[j]'s sum (u1: of a[4 + j]).
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                         _mm256_permute2f128_ps(u0, u1, 0x31)));
    return;
  }
#endif
  for (int m = 0; m < M; ++m)
    for (int o = 0; o < NO; ++o) sums[m * NO + o] = lane_sum(acc[m][o]);
}

// Rows [0, M) of x times NO weight rows over columns [c0, c1); partial sums carried in `part`
// (unreduced) from chunk to chunk; the last chunk writes the lane sums to `sums`.
template <int M, int NO, typename W>
inline void tile(const float* x, int64_t k, const W* w, int64_t c0, int64_t c1, vnf* part,
                 bool first, bool last, Prefetch& pf, float* sums) {
  vnf acc[M][NO];
  for (int m = 0; m < M; ++m)
    for (int o = 0; o < NO; ++o) acc[m][o] = first ? vnf{} : part[m * NO + o];
  for (int64_t c = c0; c < c1; c += kLanes) {
    vnf wv[NO];
#pragma GCC unroll 4
    for (int o = 0; o < NO; ++o) wv[o] = loadn(w + o * k + c);
    pf.step();
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const vnf xv = loadn(x + m * k + c);
#pragma GCC unroll 4
      for (int o = 0; o < NO; ++o) acc[m][o] += xv * wv[o];
    }
  }
  if (!last) {
    for (int m = 0; m < M; ++m)
      for (int o = 0; o < NO; ++o) part[m * NO + o] = acc[m][o];
    return;
  }
  lane_sums<M, NO>(acc, sums);
}

// Every row of x times NO weight rows starting at output n0 (w points at the first of them).
template <int NO, typename W>
void block(const float* x, int64_t m, int64_t k, const W* w, int64_t n0, int64_t n,
           const float* bias, float* y, const W* later) {
  vnf part[kMaxRows * NO];
  alignas(64) float sums[kM * NO];
  const int groups = static_cast<int>((m + kM - 1) / kM);
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t c1 = std::min(k, c0 + kChunk);
    const int steps = static_cast<int>((c1 - c0) / kLanes);
    Prefetch pf;
    if (later != nullptr) {
      pf.next = reinterpret_cast<const char*>(later + c0);
      pf.lines_per_row = static_cast<int>((c1 - c0) * sizeof(W) / 64);
      pf.row_skip = k * static_cast<int64_t>(sizeof(W)) - pf.lines_per_row * 64;
      pf.left = NO * pf.lines_per_row;
      pf.per_step = (pf.left + groups * steps - 1) / (groups * steps);
    }
    for (int64_t r = 0; r < m; r += kM) {
      const int rows = static_cast<int>(std::min<int64_t>(kM, m - r));
      auto run = [&](auto tag) {
        constexpr int R = decltype(tag)::value;
        tile<R, NO>(x + r * k, k, w, c0, c1, part + r * NO, c0 == 0, c1 == k, pf, sums);
      };
      pagedllm::with_tile_rows(rows, "small_linear", run);
      if (c1 == k)
        for (int i = 0; i < rows; ++i)
          for (int o = 0; o < NO; ++o)
            y[(r + i) * n + n0 + o] = sums[i * NO + o] + (bias ? bias[n0 + o] : 0.f);
    }
  }
}

template <typename W>
void small_linear_impl(const float* x, int64_t m, int64_t k, const W* w, int64_t n,
                       const float* bias, float* y) {
  const int64_t blocks = n / kN;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const W* later = b + kPrefetchBlocks < b1 ? w + (b + kPrefetchBlocks) * kN * k : nullptr;
      block<kN>(x, m, k, w + b * kN * k, b * kN, n, bias, y, later);
    }
  });
  for (int64_t o = blocks * kN; o < n; ++o)  // the last n % kN outputs
    block<1>(x, m, k, w + o * k, o, n, bias, y, static_cast<const W*>(nullptr));
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "small_linear: x must be a contiguous fp32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1) &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "small_linear: w must be a contiguous fp32 or bf16 [N, K]");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "small_linear: 1 to ", kMaxRows, " rows, got ", m);
  TORCH_CHECK(k % 16 == 0, "small_linear: K must be a multiple of 16, got ", k);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "small_linear: bias must be a contiguous fp32 [N]");
  }
  auto y = at::empty({m, n}, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  if (w.scalar_type() == at::kFloat) {
    small_linear_impl(x.data_ptr<float>(), m, k, w.data_ptr<float>(), n, b, y.data_ptr<float>());
  } else {
    small_linear_impl(x.data_ptr<float>(), m, k, w.data_ptr<c10::BFloat16>(), n, b,
                      y.data_ptr<float>());
  }
  return y;
}

}  // namespace

PAGEDLLM_IMPL(m) { m.impl("small_linear", &small_linear); }
