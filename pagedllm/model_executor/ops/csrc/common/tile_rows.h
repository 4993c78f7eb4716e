// The row count of a register tile as a template argument, so that its accumulators are
// registers: 1 to 4 rows on AVX-512 (32 vector registers), 1 or 2 on AVX2 (16). Shared by the
// panel GEMM (common/panel_gemm.h) and the small-step linear (generic/small_linear.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <type_traits>

namespace pagedllm {

// f(std::integral_constant<int, rows>{}).
template <typename F>
inline void with_tile_rows(int rows, const char* op, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
#if defined(__AVX512F__)
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#endif
    default: TORCH_CHECK(false, op, ": no tile of ", rows, " rows");
  }
}

}  // namespace pagedllm
