// The fresh prompt chunks one prefill_attention call attends: rows start .. start + len - 1 of
// its q / k / v / out (x86/amx/amx_prefill_attention.cpp and generic/prefill_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace pagedllm {

struct PrefillSeq {
  int64_t start, len;
};

// AMX tiles for bf16, head_dim 64 (x86/amx/amx_prefill_attention.cpp); false, having done nothing,
// where this build or CPU has no AMX.
bool prefill_attention_amx(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<PrefillSeq>& seqs, at::Tensor& out, float scale);

}  // namespace pagedllm
