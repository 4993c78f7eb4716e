// Batch-invariant linear (--deterministic): y = x W^T (+ bias) where every output is summed
// over k in one fixed order (k ascending, one accumulator per output) whatever the number of
// rows, a row's place among them and the split over threads. A row's result is then the same
// alone as inside any batch. (oneDNN picks its k-blocking by the row count: of 64 rows of the
// 1536-wide bf16 down projection, 6 differ from the same rows run alone; in fp32 all 64.)
//
//   x     [M, K] fp32 or bf16, rows contiguous
//   wp    the weight [N, K] in panels of P = 4 * kLanes output columns, N zero-padded to a
//         multiple of P (NativeKernels.bi_pack):
//           fp32, or bf16 without AVX512-BF16:  [N/P, K, P]       broadcast FMAs
//           bf16 with AVX512-BF16:              [N/P, K/2, P, 2]  vdpbf16ps on pairs of k
//   bias  [n] in x's dtype, or none;  n: the true output width
// -> y [M, n] in x's dtype: fp32 sums, rounded once to bf16 (to nearest even) for bf16.
//
// Work: row chunks of kChunk (their x stays in cache) one after the other; in each, the panels
// are spread over the threads and every tile of kRows rows runs through a panel's weights once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "common/batch_invariant_linear.h"
#include "common/panel_gemm.h"
#include "common/registration.h"
#include "common/vec_math.h"

namespace {

using pagedllm::panel::kChunk;
using pagedllm::panel::kP;
using pagedllm::panel::rows_panel;

template <typename T, typename W, bool Vnni>
void bi_linear_impl(const at::Tensor& x, const at::Tensor& wp, const T* bias, at::Tensor& y,
                    int64_t n) {
  const int64_t m = x.size(0), k = x.size(1), panels = wp.size(0);
  const T* xp = x.data_ptr<T>();
  const W* wptr = reinterpret_cast<const W*>(wp.data_ptr());
  T* yp = y.data_ptr<T>();
  for (int64_t r0 = 0; r0 < m; r0 += kChunk) {
    const int64_t rows = std::min<int64_t>(kChunk, m - r0);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        rows_panel<T, W, Vnni>(xp + r0 * k, k, rows, wptr + p * k * kP, k, yp + r0 * n, n,
                               p * kP, n, bias);
      }
    });
  }
}

at::Tensor bi_linear(const at::Tensor& x, const at::Tensor& wp,
                     const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == x.size(1),
              "bi_linear: x must be a contiguous [M, K]");
  TORCH_CHECK(wp.is_contiguous() && wp.size(0) * kP >= n && n > 0,
              "bi_linear: wp must be contiguous panels covering n outputs");
  const int64_t k = x.size(1);
  const bool vnni = wp.dim() == 4;
  TORCH_CHECK(vnni ? (wp.size(1) * 2 == k && wp.size(2) == kP && wp.size(3) == 2)
                   : (wp.dim() == 3 && wp.size(1) == k && wp.size(2) == kP),
              "bi_linear: wp's shape does not fit x (panel width ", kP, " on this ISA)");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bi_linear: bias must be a contiguous [n] in x's dtype");
  }
  auto y = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK(!vnni && wp.scalar_type() == at::kFloat, "bi_linear: fp32 x takes fp32 panels");
    bi_linear_impl<float, float, false>(x, wp, bias ? bias->data_ptr<float>() : nullptr, y, n);
    return y;
  }
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && wp.scalar_type() == at::kBFloat16,
              "bi_linear: x and wp must be fp32 or bf16");
  const auto* b = bias ? bias->data_ptr<c10::BFloat16>() : nullptr;
  if (vnni) {
#if defined(__AVX512BF16__)
    bi_linear_impl<c10::BFloat16, c10::BFloat16, true>(x, wp, b, y, n);
    return y;
#else
    TORCH_CHECK(false, "bi_linear: the VNNI layout needs an AVX512-BF16 build");
#endif
  }
  bi_linear_impl<c10::BFloat16, c10::BFloat16, false>(x, wp, b, y, n);
  return y;
}

}  // namespace

PAGEDLLM_IMPL(m) { m.impl("bi_linear", &bi_linear); }
