// The panel width of the batch-invariant linear (generic/batch_invariant_linear.cpp): output
// columns per weight panel, four of the ISA's registers. Python packs weights to it.
#pragma once

#include <cstdint>

#include "common/vec_math.h"

namespace pagedllm {

constexpr int kBiVecs = 4;
inline int64_t bi_linear_panel() { return kBiVecs * kLanes; }

}  // namespace pagedllm
