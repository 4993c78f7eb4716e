// The one support check both AMX kernels (prefill_attention.cpp, amx_linear.cpp) share.
#include <torch/extension.h>

#include "amx.h"

TORCH_LIBRARY_FRAGMENT(pagedllm, m) {
  m.def("amx_supported() -> bool");
  m.impl("amx_supported", &pagedllm::amx_supported);
}
