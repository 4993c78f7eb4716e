// Multi-LoRA: for every token, its own adapter's y += (x A^T) B^T, in place, for one Linear.
// Each token runs only its adapter (tokens of the base model, slot -1, are skipped), so the
// work is the adapters' own flops whatever the mix; the tokens of one adapter go in tiles of 8
// that share each weight load. (Stacking every adapter's A into one torch matmul with a mask
// does L times the work with L adapters in a step: a 4-adapter mix lost 18% of its
// throughput that way, against 11% here; docs/benchmarks.md.)
//
//   y      [N, out]          the layer's base output (rows contiguous), updated in place
//   x      [N, in]           the layer's input
//   slots  [N] int64         each token's adapter slot, -1 = none
//   bounds [shards + 1]      the shards' (checkpoint projections': q, k, v) output columns;
//                            column o of shard k reads t[k * r : (k + 1) * r], t = x A^T
// and the weights in NativeKernels.lora_pack's layout, ranks zero-padded to r, the stacked
// rank Rt = shards * r rounded up to 16:
//   fp32, or bf16 without AVX512-BF16:  a [S, in, Rt] (A transposed), bt [S, r, out]
//     broadcast FMAs over the ISA's lanes (16 on AVX-512, 8 on AVX2);
//   bf16 with AVX512-BF16:  a [S, in / 2, Rt, 2], bt [S, r / 2, out, 2] (VNNI pairs, r even)
//     vdpbf16ps of a broadcast pair of x (or of t, rounded to bf16 as a bf16 matmul's output
//     is) against 16 output lanes.
// Sums in fp32; y is rounded once (bf16: to nearest even).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/registration.h"
#include "common/vec_math.h"

namespace {

using pagedllm::kLanes;
using pagedllm::load_f;
using pagedllm::loadn;
using pagedllm::vnf;
using pagedllm::vnu16;
using pagedllm::vnu32;

inline void add_store(float* y, vnf delta) {
  vnf v = loadn(y) + delta;
  std::memcpy(y, &v, sizeof(v));
}

inline void add_store(c10::BFloat16* y, vnf delta) {
  const vnf v = loadn(y) + delta;
  vnu32 bits = reinterpret_cast<vnu32>(v);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
  const vnu16 h = __builtin_convertvector(bits, vnu16);
  std::memcpy(y, &h, sizeof(h));
}

inline void add_scalar(float* y, float delta) { *y += delta; }
inline void add_scalar(c10::BFloat16* y, float delta) {
  *y = c10::BFloat16(load_f(*y) + delta);
}

constexpr int kTokens = 8;  // tokens of one slot sharing each weight load

// The tiles: up to kTokens tokens of one slot each, in batch order within a slot.
struct Tiles {
  std::vector<std::vector<int64_t>> by_slot;
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (slot, first index in by_slot[slot])
  Tiles(const int64_t* slots, int64_t n, int64_t num_slots) : by_slot(num_slots) {
    for (int64_t i = 0; i < n; ++i) {
      if (slots[i] >= 0) by_slot[slots[i]].push_back(i);
    }
    for (int64_t s = 0; s < num_slots; ++s) {
      for (int64_t i = 0; i < static_cast<int64_t>(by_slot[s].size()); i += kTokens) {
        tiles.emplace_back(s, i);
      }
    }
  }
};

// One tile with broadcast FMAs over the ISA's lanes: a is the slot's [in, rt] (A transposed,
// rt a multiple of 16), bt its [r, out]; t: scratch [kTokens, rt].
template <typename T>
void lora_tile(T* y, const T* x, const int64_t* toks, int m, const T* a, const T* bt,
               const std::vector<int64_t>& bounds, int64_t in, int64_t out, int64_t rt,
               int64_t rank, int64_t y_stride, float* t) {
  for (int64_t kb = 0; kb < rt; kb += kLanes) {
    vnf acc[kTokens];
    for (int i = 0; i < m; ++i) acc[i] = vnf{};
    for (int64_t c = 0; c < in; ++c) {
      const vnf w = loadn(a + c * rt + kb);
      for (int i = 0; i < m; ++i) acc[i] += load_f(x[toks[i] * in + c]) * w;
    }
    for (int i = 0; i < m; ++i) std::memcpy(t + i * rt + kb, &acc[i], sizeof(vnf));
  }
  const int64_t shards = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t sh = 0; sh < shards; ++sh) {
    int64_t ob = bounds[sh];
    for (; ob + kLanes <= bounds[sh + 1]; ob += kLanes) {
      vnf acc[kTokens];
      for (int i = 0; i < m; ++i) acc[i] = vnf{};
      for (int64_t j = 0; j < rank; ++j) {
        const vnf w = loadn(bt + j * out + ob);
        for (int i = 0; i < m; ++i) acc[i] += t[i * rt + sh * rank + j] * w;
      }
      for (int i = 0; i < m; ++i) add_store(y + toks[i] * y_stride + ob, acc[i]);
    }
    for (; ob < bounds[sh + 1]; ++ob) {
      for (int i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (int64_t j = 0; j < rank; ++j)
          acc += t[i * rt + sh * rank + j] * load_f(bt[j * out + ob]);
        add_scalar(y + toks[i] * y_stride + ob, acc);
      }
    }
  }
}

template <typename T>
void lora_lanes(at::Tensor& y, const at::Tensor& x, const int64_t* slots, const at::Tensor& a,
                const at::Tensor& bt, const std::vector<int64_t>& bounds) {
  const int64_t in = x.size(1), out = y.size(1), rt = a.size(2), rank = bt.size(1);
  const Tiles tiles(slots, x.size(0), a.size(0));
  T* yp = y.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = bt.data_ptr<T>();
  const int64_t count = static_cast<int64_t>(tiles.tiles.size());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(kTokens * rt);
    for (int64_t w = begin; w < end; ++w) {
      const auto [s, first] = tiles.tiles[w];
      const auto& toks = tiles.by_slot[s];
      const int m = static_cast<int>(std::min<int64_t>(kTokens, toks.size() - first));
      lora_tile(yp, xp, toks.data() + first, m, ap + s * in * rt, bp + s * rank * out, bounds,
                in, out, rt, rank, y.stride(0), t.data());
    }
  });
}

#if defined(__AVX512BF16__)

inline __m512 load_bf16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512bh bcast_pair(const c10::BFloat16* p) {
  uint32_t pair;
  std::memcpy(&pair, p, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
}

// One tile: up to kTokens tokens of one adapter slot. a: the slot's [in / 2, rt, 2]; bt: its
// [r / 2, out, 2]. t / tb: scratch for x A^T in fp32 and bf16.
void lora_tile_vnni(c10::BFloat16* y, const c10::BFloat16* x, const int64_t* toks, int m,
                    const c10::BFloat16* a, const c10::BFloat16* bt,
                    const std::vector<int64_t>& bounds, int64_t in, int64_t out, int64_t rt,
                    int64_t rank, int64_t y_stride, float* t, c10::BFloat16* tb) {
  // shrink: t_i[k] = sum_c x_i[c] a[c][k], 16 k at a time, each weight load shared by the tile
  for (int64_t kb = 0; kb < rt; kb += 16) {
    __m512 acc[kTokens];
    for (int i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t cp = 0; cp < in / 2; ++cp) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(a + (cp * rt + kb) * 2);
      for (int i = 0; i < m; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], w, bcast_pair(x + toks[i] * in + 2 * cp));
      }
    }
    for (int i = 0; i < m; ++i) _mm512_storeu_ps(t + i * rt + kb, acc[i]);
  }
  for (int64_t i = 0; i < m * rt; ++i) tb[i] = c10::BFloat16(t[i]);
  // expand: y_i[o] += sum_j t_i[shard(o) * r + j] bt[j][o], 16 outputs at a time
  const int64_t shards = static_cast<int64_t>(bounds.size()) - 1;
  for (int64_t sh = 0; sh < shards; ++sh) {
    for (int64_t ob = bounds[sh]; ob < bounds[sh + 1]; ob += 16) {
      const int64_t lanes = std::min<int64_t>(16, bounds[sh + 1] - ob);
      const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
      __m512 acc[kTokens];
      for (int i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t jp = 0; jp < rank / 2; ++jp) {
        const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi32(mask, bt + (jp * out + ob) * 2);
        for (int i = 0; i < m; ++i) {
          acc[i] = _mm512_dpbf16_ps(acc[i], w, bcast_pair(tb + i * rt + sh * rank + 2 * jp));
        }
      }
      for (int i = 0; i < m; ++i) {
        c10::BFloat16* yr = y + toks[i] * y_stride + ob;
        const __m512 v = _mm512_add_ps(load_bf16(yr, mask), acc[i]);
        _mm256_mask_storeu_epi16(yr, mask, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
}

void lora_vnni(at::Tensor& y, const at::Tensor& x, const int64_t* slots, const at::Tensor& a,
               const at::Tensor& bt, const std::vector<int64_t>& bounds) {
  const int64_t in = x.size(1), out = y.size(1), rt = a.size(2), rank = bt.size(1) * 2;
  const Tiles tiles(slots, x.size(0), a.size(0));
  auto* yp = y.data_ptr<c10::BFloat16>();
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* ap = a.data_ptr<c10::BFloat16>();
  const auto* bp = bt.data_ptr<c10::BFloat16>();
  const int64_t count = static_cast<int64_t>(tiles.tiles.size());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(kTokens * rt);
    std::vector<c10::BFloat16> tb(kTokens * rt);
    for (int64_t w = begin; w < end; ++w) {
      const auto [s, first] = tiles.tiles[w];
      const auto& toks = tiles.by_slot[s];
      const int m = static_cast<int>(std::min<int64_t>(kTokens, toks.size() - first));
      lora_tile_vnni(yp, xp, toks.data() + first, m, ap + s * in * rt, bp + s * rank * out,
                     bounds, in, out, rt, rank, y.stride(0), t.data(), tb.data());
    }
  });
}
#endif

void lora_apply(at::Tensor& y, const at::Tensor& x, const at::Tensor& slots, const at::Tensor& a,
                const at::Tensor& bt, at::IntArrayRef bounds) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lora_apply: x must be a contiguous [N, in]");
  TORCH_CHECK(y.dim() == 2 && y.stride(1) == 1 && y.size(0) >= x.size(0),
              "lora_apply: y must be [N, out] with contiguous rows");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                  slots.size(0) == x.size(0),
              "lora_apply: slots must be a contiguous int64 [N]");
  TORCH_CHECK(a.scalar_type() == x.scalar_type() && bt.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(),
              "lora_apply: x, y, a and bt must share a dtype");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous() && a.size(0) == bt.size(0),
              "lora_apply: a and bt must be contiguous, one slot each");
  const int64_t in = x.size(1), out = y.size(1);
  const int64_t shards = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(shards >= 1 && bounds[0] == 0 && bounds[shards] == out,
              "lora_apply: bounds must run from 0 to out");
  const int64_t num_slots = a.size(0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < x.size(0); ++i) {
    TORCH_CHECK(sp[i] < num_slots, "lora_apply: slot ", sp[i], " out of range");
  }
  const std::vector<int64_t> b(bounds.begin(), bounds.end());
  if (a.dim() == 4) {  // VNNI pairs (NativeKernels.lora_pack)
#if defined(__AVX512BF16__)
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "lora_apply: the VNNI layout is for bf16");
    TORCH_CHECK(bt.dim() == 4 && a.size(3) == 2 && bt.size(3) == 2 && a.size(1) * 2 == in &&
                    a.size(2) % 16 == 0 && bt.size(2) == out &&
                    a.size(2) >= shards * bt.size(1) * 2,
                "lora_apply: VNNI shapes do not fit x and y");
    lora_vnni(y, x, sp, a, bt, b);
    return;
#else
    TORCH_CHECK(false, "lora_apply: the VNNI layout needs an AVX512-BF16 build");
#endif
  }
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3,
              "lora_apply: a and bt must be [S, in, Rt] and [S, r, out]");
  const int64_t rank = bt.size(1);
  TORCH_CHECK(a.size(1) == in && a.size(2) % 16 == 0 && a.size(2) >= shards * rank &&
                  bt.size(2) == out,
              "lora_apply: shapes of a / bt do not fit x and y");
  switch (x.scalar_type()) {
    case at::kFloat:
      lora_lanes<float>(y, x, sp, a, bt, b);
      break;
    case at::kBFloat16:
      lora_lanes<c10::BFloat16>(y, x, sp, a, bt, b);
      break;
    default:
      TORCH_CHECK(false, "lora_apply: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace

PAGEDLLM_IMPL(m) { m.impl("lora_apply", &lora_apply); }
