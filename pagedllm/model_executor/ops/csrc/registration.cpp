// Every op's schema, in one place. The kernels register their CPU implementations next to their
// code (PAGEDLLM_IMPL); the Python side calls them through ops/native.py only.
#include "common/batch_invariant_linear.h"
#include "common/registration.h"
#include "x86/amx/amx.h"

PAGEDLLM_LIBRARY(m) {
  // Attention (generic/paged_attention*.cpp, generic/prefill_attention.cpp; on AMX
  // x86/amx/amx_prefill_attention.cpp).
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int max_seq_len, int window=0) -> Tensor");
  m.def(
      "paged_attention_multi(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor query_start_loc, float scale, int max_seq_len, "
      "int max_query_len, int window=0) -> Tensor");
  m.def(
      "prefill_attention(Tensor q, Tensor k, Tensor v, Tensor starts, Tensor lens, "
      "Tensor(a!) out, float scale, int window=0) -> ()");
  m.def(
      "prefill_attention_paged(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor starts, Tensor lens, Tensor ctx_lens, Tensor(a!) out, float scale, "
      "int window=0) -> ()");
  m.def(
      "reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
  // Norms, RoPE, activation (generic/fused_ops.cpp).
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def(
      "fused_add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, float eps, "
      "Tensor(b!) out) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, "
      "Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // Linear (generic/small_linear.cpp, generic/int8_linear.cpp, x86/amx/amx_linear.cpp).
  m.def("small_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor wp) -> Tensor");
  // Weights kept quantized: GGUF blocks, affine groups (generic/quant_linear.cpp).
  m.def(
      "quant_linear(Tensor x, Tensor w, int qtype, bool batch_invariant=False, "
      "Tensor? perm=None) -> Tensor");
  m.def("quant_dequantize(Tensor w, int qtype, Tensor(a!) out) -> ()");
  // Batch-invariant linear for --deterministic (generic/batch_invariant_linear.cpp).
  m.def("bi_linear(Tensor x, Tensor wp, Tensor? bias, int n) -> Tensor");
  m.def("bi_linear_panel() -> int", &pagedllm::bi_linear_panel);
  // Sampling (generic/argmax.cpp).
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("argmax_gap_rows(Tensor x) -> (Tensor, Tensor)");
  // Structured outputs (generic/token_bitmask.cpp).
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor rows, Tensor bitmask) -> ()");
  // Multi-LoRA (generic/lora.cpp).
  m.def(
      "lora_apply(Tensor(a!) y, Tensor x, Tensor slots, Tensor a, Tensor bt, int[] bounds) "
      "-> ()");
  // Whether this build's AMX kernels can run here (built for AMX, and granted by Linux).
  m.def("amx_supported() -> bool", &pagedllm::amx_supported);
}
