// Row-wise argmax for greedy decoding, read straight from the model's logits dtype: for bf16
// logits this skips the fp32 copy (B x V x 6 bytes moved) and torch's max over it. Ties go to
// the lowest index, as torch.argmax; exact for bf16/fp16 (their fp32 conversion is exact).
#include <ATen/ATen.h>
#include "common/registration.h"
#include <ATen/Parallel.h>

#include "common/vec_math.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <utility>

namespace {

using pagedllm::load16;
using pagedllm::load_f;
using pagedllm::v16f;
using pagedllm::v16i;

template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  const int64_t nv = n / 16 * 16;
  int64_t best_i = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (nv > 0) {
    v16f bv = v16f{} - std::numeric_limits<float>::infinity();
    v16i bi = {}, idx;
    for (int i = 0; i < 16; ++i) idx[i] = i;
    for (int64_t j = 0; j < nv; j += 16) {  // per lane: the first index of its maximum
      const v16f v = load16(x + j);
      const v16i gt = v > bv;
      bv = gt ? v : bv;
      bi = gt ? idx : bi;
      idx += 16;
    }
    best = bv[0];
    best_i = bi[0];
    for (int i = 1; i < 16; ++i) {
      if (bv[i] > best || (bv[i] == best && bi[i] < best_i)) {
        best = bv[i];
        best_i = bi[i];
      }
    }
  }
  for (int64_t j = nv; j < n; ++j) {
    const float v = load_f(x[j]);
    if (v > best || (j == 0)) {
      best = v;
      best_i = j;
    }
  }
  return best_i;
}

// argmax_row plus the gap between the maximum and the runner-up value (0 on a tie, +inf for
// one-element rows): each lane also keeps its second-best value, so the pass reads the row once.
template <typename T>
std::pair<int64_t, float> argmax_gap_row(const T* x, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t nv = n / 16 * 16;
  int64_t best_i = 0;
  float best = ninf, second = ninf;
  if (nv > 0) {
    v16f bv = v16f{} + ninf, sv = v16f{} + ninf;
    v16i bi = {}, idx;
    for (int i = 0; i < 16; ++i) idx[i] = i;
    for (int64_t j = 0; j < nv; j += 16) {
      const v16f v = load16(x + j);
      const v16i gt = v > bv;
      const v16f demoted = gt ? bv : v;  // what falls out of the lane's first place
      sv = demoted > sv ? demoted : sv;
      bv = gt ? v : bv;
      bi = gt ? idx : bi;
      idx += 16;
    }
    int winner = 0;
    for (int i = 1; i < 16; ++i)
      if (bv[i] > bv[winner] || (bv[i] == bv[winner] && bi[i] < bi[winner])) winner = i;
    best = bv[winner];
    best_i = bi[winner];
    second = sv[winner];
    for (int i = 0; i < 16; ++i)
      if (i != winner) second = std::max(second, bv[i]);
  }
  for (int64_t j = nv; j < n; ++j) {
    const float v = load_f(x[j]);
    if (v > best || (j == 0 && nv == 0)) {
      second = best;
      best = v;
      best_i = j;
    } else {
      second = std::max(second, v);
    }
  }
  return {best_i, best - second};
}

// f(row_pointer, r) for every row r of a [B, V] tensor, rows split over the threads.
template <typename F>
void for_each_row(const at::Tensor& x, const char* op, F&& f) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": [B, V] with contiguous rows");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), op, ": row too long");
  const int64_t rows = x.size(0), stride = x.stride(0);
  auto run = [&](auto* xp) {
    at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(xp + r * stride, r);
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(x.data_ptr<float>()); break;
    case at::kBFloat16: run(x.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(x.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
}

at::Tensor argmax_rows(const at::Tensor& x) {
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(-1);
  for_each_row(x, "argmax_rows", [&](const auto* row, int64_t r) { op[r] = argmax_row(row, n); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> argmax_gap_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_gap_rows: [B, V] with V > 0");
  auto ids = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  auto gaps = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  int64_t* ip = ids.data_ptr<int64_t>();
  float* gp = gaps.data_ptr<float>();
  const int64_t n = x.size(1);
  for_each_row(x, "argmax_gap_rows", [&](const auto* row, int64_t r) {
    std::tie(ip[r], gp[r]) = argmax_gap_row(row, n);
  });
  return {ids, gaps};
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("argmax_gap_rows", &argmax_gap_rows);
}
