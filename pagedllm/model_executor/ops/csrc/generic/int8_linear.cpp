// y = x W^T with W held as int8 rows and one scale per output channel (--quantization int8),
// for steps of a few rows: there the weights' bytes bound the time, and each thread streams a
// contiguous range of rows (the hardware prefetcher follows it; torch's int8 kernel measured
// ~11.5 GB/s from DRAM here). x is widened to fp32 once; each 16-byte slice of a weight row is
// widened once and used for every row of x.
#include <ATen/ATen.h>
#include "common/registration.h"
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/vec_math.h"

#include <vector>

namespace {

using pagedllm::load16;
using pagedllm::v16f;

constexpr int kMaxRows = 4;
constexpr int kOutPerIter = 4;  // weight rows processed together
constexpr int kPrefetchRows = 16;

template <int M, typename T>
void gemv_rows(const float* xf, const int8_t* w, const float* scales, int64_t k, int64_t n0,
               int64_t n1, int64_t n, T* out) {
  int64_t r = n0;
  for (; r + kOutPerIter <= n1; r += kOutPerIter) {
    v16f acc[M][kOutPerIter] = {};
    for (int64_t j = 0; j < k; j += 16) {
      v16f wv[kOutPerIter];
#pragma GCC unroll 4
      for (int o = 0; o < kOutPerIter; ++o) wv[o] = load16(w + (r + o) * k + j);
      if ((j & 63) == 0)  // DRAM-bound: keep misses in flight kPrefetchRows rows ahead
        for (int o = 0; o < kOutPerIter; ++o)
          __builtin_prefetch(w + (r + o + kPrefetchRows) * k + j, 0, 1);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const v16f xv = load16(xf + m * k + j);
#pragma GCC unroll 4
        for (int o = 0; o < kOutPerIter; ++o) acc[m][o] += wv[o] * xv;
      }
    }
    for (int m = 0; m < M; ++m)
      for (int o = 0; o < kOutPerIter; ++o) {
        alignas(64) float lanes[16];
        pagedllm::store16(lanes, acc[m][o]);
        float s = 0.f;
        for (int i = 0; i < 16; ++i) s += lanes[i];
        out[m * n + r + o] = static_cast<T>(s * scales[r + o]);
      }
  }
  for (; r < n1; ++r)
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += static_cast<float>(w[r * k + j]) * xf[m * k + j];
      out[m * n + r] = static_cast<T>(s * scales[r]);
    }
}

template <typename T, int M>
void run_rows(const float* xf, const int8_t* w, const float* scales, int64_t k, int64_t n,
              T* out) {
  // Chunks of 64 rows: balanced over the threads, each a contiguous stretch of W.
  at::parallel_for(0, (n + 63) / 64, 1, [&](int64_t b, int64_t e) {
    gemv_rows<M>(xf, w, scales, k, b * 64, std::min(n, e * 64), n, out);
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "int8_linear: x [M, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_linear: w int8");
  TORCH_CHECK(x.size(1) % 16 == 0, "int8_linear: K must be a multiple of 16");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "int8_linear: 1 to 4 rows");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  auto out = at::empty({m, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_linear", [&] {
    const float* xp = xf.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = sf.data_ptr<float>();
    scalar_t* op = out.data_ptr<scalar_t>();
    switch (m) {
      case 1: run_rows<scalar_t, 1>(xp, wp, sp, k, n, op); break;
      case 2: run_rows<scalar_t, 2>(xp, wp, sp, k, n, op); break;
      case 3: run_rows<scalar_t, 3>(xp, wp, sp, k, n, op); break;
      default: run_rows<scalar_t, 4>(xp, wp, sp, k, n, op); break;
    }
  });
  return out;
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("int8_linear", &int8_linear);
}
