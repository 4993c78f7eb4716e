// Weights kept quantized: y = x W^T straight from the quantized rows, and a dequantizer
// (embedding rows). Two families of formats:
// - GGUF (--quantization gguf): llama.cpp's blocks, exactly as in the file (Q4_0, Q4_1, Q5_0,
//   Q8_0, Q4_K, Q6_K; F32/F16/BF16 too), decoded as ggml's dequantize_row_* does (the tests
//   compare with gguf-py's dequantize);
// - affine groups (AWQ, GPTQ, compressed-tensors checkpoints, repacked at load by
//   layers/quant_tensor.py): G = 32, 64 or 128 weights of 4 or 8 unsigned bits q sharing one
//   fp32 scale s and offset o, w = q s + o (o = -z s for a zero point z); a block is s, o, then
//   the codes (4-bit: each 32 weights as 16 bytes, weight j in the low nibble of byte j, j + 16
//   in its high one, as ggml's Q4 blocks; 8-bit: one byte each).
//
// W is [N, row_bytes] uint8: each output row is K / block weights stored as blocks. Every
// format is decoded 32 weights at a time (a "sub-block") into registers of fp32 values, in the
// order of the row.
//
// Steps of few rows (a decode step) are bound by reading W, 4-bit weights being ~4x fewer bytes
// than bf16: each weight sub-block is decoded once per group of rows of x (8 in fp32, 16 in
// bf16) and multiplied into one accumulator per row; threads split the output rows, and each
// takes a few through every group of x before the next (they stay in L1). fp32 x: fp32 FMAs on
// the decoded weights (exactly the decoded model's products); bf16 x with AVX512-BF16: the
// weights rounded to bf16 (as a bf16 model holds them) and vdpbf16ps.
// Bigger steps (40 rows and up) are bound by arithmetic: on AVX-512 each panel of 64 output
// rows is decoded once per chunk of rows of x, transposed in registers into the layout of the
// register-tiled GEMM of common/panel_gemm.h (the batch-invariant linear's), and run there.
// batch_invariant (--deterministic) keeps every step on the first kernel: each row's sums then
// run in one order whatever the number of rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common/panel_gemm.h"
#include "common/registration.h"
#include "common/vec_math.h"

#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {


// GGML type ids (ggml.h) of the GGUF formats decoded here. The unquantized ones (F32, F16, BF16)
// come too: a layer stacking q|k|v may hold both kinds, and an F16 file stays F16.
enum : int64_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14,
  kBF16 = 30,
  // Affine groups: bits * 1000 + group size (layers/quant_tensor.py's AffineType).
  kA4G32 = 4032, kA4G64 = 4064, kA4G128 = 4128, kA8G32 = 8032, kA8G64 = 8064, kA8G128 = 8128
};

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The decoders work at the ISA's own register width (vnf: 16 floats on AVX-512, 8 on AVX2):
// GCC lowers 16-float vectors on AVX2 through the stack where they meet scalars (measured
// 3 Gweights/s that way).
constexpr int kL = pagedllm::kLanes;
constexpr int kRegs = 32 / kL;  // registers per 32 weights
using pagedllm::vnf;
using pagedllm::vni;

// kL bytes zero-extended to kL int32 lanes.
inline vni widen_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vni>(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return reinterpret_cast<vni>(
      _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}

// kL int8 as floats.
inline vnf load_i8(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vnf>(_mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#else
  return reinterpret_cast<vnf>(_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#endif
}

// kL fp16 as floats.
inline vnf load_f16(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vnf>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  return reinterpret_cast<vnf>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
}

inline vnf to_f(vni v) { return __builtin_convertvector(v, vnf); }

inline vni lane_ids() {
  vni v;
  for (int i = 0; i < kL; ++i) v[i] = i;
  return v;
}

// One format: kBlock weights in kBytes bytes; decode(block, sub, w) gives weights
// 32 sub .. 32 sub + 31 in w[0 .. kRegs), kL per register, in order.
template <int64_t T>
struct Fmt;

template <>
struct Fmt<kF32> {
  static constexpr int kBlock = 32, kBytes = 128;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    for (int r = 0; r < kRegs; ++r)
      w[r] = pagedllm::loadn(reinterpret_cast<const float*>(b) + r * kL);
  }
};

template <>
struct Fmt<kF16> {
  static constexpr int kBlock = 32, kBytes = 64;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    for (int r = 0; r < kRegs; ++r) w[r] = load_f16(b + 2 * r * kL);
  }
};

template <>
struct Fmt<kBF16> {
  static constexpr int kBlock = 32, kBytes = 64;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    const auto* p = reinterpret_cast<const c10::BFloat16*>(b);
    for (int r = 0; r < kRegs; ++r) w[r] = pagedllm::loadn(p + r * kL);
  }
};

// 16 bytes of nibbles: weight j in the low nibble of byte j, weight j + 16 in its high one;
// w = a q + b.
inline void nibbles(const uint8_t* q, float a, float b, vnf* w) {
  for (int r = 0; r < kRegs / 2; ++r) {
    const vni v = widen_u8(q + r * kL);
    w[r] = to_f(v & 15) * a + b;
    w[kRegs / 2 + r] = to_f(v >> 4) * a + b;
  }
}

template <>
struct Fmt<kQ4_0> {  // d, 16 bytes of nibbles; w = (q - 8) d
  static constexpr int kBlock = 32, kBytes = 18;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    const float d = half_at(b);
    nibbles(b + 2, d, -8.f * d, w);
  }
};

template <>
struct Fmt<kQ4_1> {  // d, m, nibbles as Q4_0; w = q d + m
  static constexpr int kBlock = 32, kBytes = 20;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    nibbles(b + 4, half_at(b), half_at(b + 2), w);
  }
};

template <>
struct Fmt<kQ5_0> {  // d, 32 high bits, nibbles as Q4_0; w = ((q | high << 4) - 16) d
  static constexpr int kBlock = 32, kBytes = 22;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    const float d = half_at(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const vni h = vni{} + static_cast<int32_t>(qh);
    for (int r = 0; r < kRegs / 2; ++r) {
      const vni v = widen_u8(b + 6 + r * kL);
      const vni j = lane_ids() + r * kL;
      w[r] = to_f(((v & 15) | (((h >> j) & 1) << 4)) - 16) * d;
      w[kRegs / 2 + r] = to_f(((v >> 4) | (((h >> (j + 16)) & 1) << 4)) - 16) * d;
    }
  }
};

template <>
struct Fmt<kQ8_0> {  // d, 32 int8; w = q d
  static constexpr int kBlock = 32, kBytes = 34;
  static inline void decode(const uint8_t* b, int, vnf* w) {
    const float d = half_at(b);
    for (int r = 0; r < kRegs; ++r) w[r] = load_i8(b + 2 + r * kL) * d;
  }
};

template <>
struct Fmt<kQ4_K> {  // d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks, 128 nibbles
  static constexpr int kBlock = 256, kBytes = 144;
  static inline void decode(const uint8_t* b, int s, vnf* w) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* sc = b + 4;
    int scale, min;
    if (s < 4) {
      scale = sc[s] & 63;
      min = sc[s + 4] & 63;
    } else {
      scale = (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
      min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    const float a = d * static_cast<float>(scale), m = dmin * static_cast<float>(min);
    // 32 bytes per pair of sub-blocks: the even one in their low nibbles, the odd one high.
    const uint8_t* q = b + 16 + 32 * (s >> 1);
    const int shift = (s & 1) * 4;
    for (int r = 0; r < kRegs; ++r) w[r] = to_f((widen_u8(q + r * kL) >> shift) & 15) * a - m;
  }
};

template <>
struct Fmt<kQ6_K> {  // 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
  static constexpr int kBlock = 256, kBytes = 210;
  static inline void decode(const uint8_t* b, int s, vnf* w) {
    const int half = s >> 2, t = s & 3;  // 128-weight half, quarter within it
    const uint8_t* ql = b + 64 * half + 32 * (t & 1);
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half + 2 * t;
    const float d = half_at(b + 208);
    const int lshift = (t >> 1) * 4, hshift = 2 * t;
    for (int r = 0; r < kRegs; ++r) {
      const int j = r * kL;  // weights j .. j + kL of the sub-block, scale sc[j / 16]
      const vni q =
          ((widen_u8(ql + j) >> lshift) & 15) | (((widen_u8(qh + j) >> hshift) & 3) << 4);
      w[r] = to_f(q - 32) * (d * static_cast<float>(sc[j / 16]));
    }
  }
};

// Affine groups: s, o (fp32), then G weights' codes; w = q s + o.
template <int Bits, int G>
struct Affine {
  static constexpr int kBlock = G, kBytes = 8 + G * Bits / 8;
  static inline void decode(const uint8_t* b, int s, vnf* w) {
    float scale, offset;
    std::memcpy(&scale, b, 4);
    std::memcpy(&offset, b + 4, 4);
    if constexpr (Bits == 4) {
      nibbles(b + 8 + 16 * s, scale, offset, w);
    } else {
      for (int r = 0; r < kRegs; ++r)
        w[r] = to_f(widen_u8(b + 8 + 32 * s + r * kL)) * scale + offset;
    }
  }
};
template <> struct Fmt<kA4G32> : Affine<4, 32> {};
template <> struct Fmt<kA4G64> : Affine<4, 64> {};
template <> struct Fmt<kA4G128> : Affine<4, 128> {};
template <> struct Fmt<kA8G32> : Affine<8, 32> {};
template <> struct Fmt<kA8G64> : Affine<8, 64> {};
template <> struct Fmt<kA8G128> : Affine<8, 128> {};

inline float hsum(vnf v) {
  alignas(64) float lanes[kL];
  pagedllm::storen(lanes, v);
  float s = 0.f;
  for (int i = 0; i < kL; ++i) s += lanes[i];
  return s;
}

// Rows of x per pass over a weight row (fp32): 2 M accumulators, the decoded weights and a row
// of x fit the registers (32 zmm on AVX-512, 16 ymm on AVX2).
constexpr int kMaxRows = kL == 16 ? 8 : 4;
constexpr int64_t kRowsPerTask = 16;

// out[m, r] for r in [r0, r1) and the M rows of xf ([M, K] fp32).
template <int64_t T, int M, typename O>
void gemv_rows(const float* xf, const uint8_t* w, int64_t row_bytes, int64_t k, int64_t r0,
               int64_t r1, int64_t ldo, O* out) {
  using F = Fmt<T>;
  constexpr int kSubs = F::kBlock / 32;
  const int64_t blocks = k / F::kBlock;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    __builtin_prefetch(row + 2 * row_bytes, 0, 1);
    vnf acc[M][2] = {};
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* b = row + blk * F::kBytes;
      if ((blk & 3) == 0) __builtin_prefetch(b + 4 * row_bytes, 0, 1);
#pragma GCC unroll 8
      for (int s = 0; s < kSubs; ++s) {
        vnf wv[kRegs];
        F::decode(b, s, wv);
        const int64_t j = blk * F::kBlock + 32 * s;
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
          for (int q = 0; q < kRegs; ++q)
            acc[m][q & 1] += wv[q] * pagedllm::loadn(xf + m * k + j + q * kL);
      }
    }
    for (int m = 0; m < M; ++m) out[m * ldo + r] = static_cast<O>(hsum(acc[m][0] + acc[m][1]));
  }
}

template <int64_t T, typename O>
void gemv_f32(const float* x, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t k,
              int64_t r0, int64_t r1, int64_t n, O* out) {
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* xm = x + m0 * k;
    O* o = out + m0 * n;
    switch (std::min<int64_t>(kMaxRows, m - m0)) {
      case 1: gemv_rows<T, 1>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 2: gemv_rows<T, 2>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 3: gemv_rows<T, 3>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 4: gemv_rows<T, 4>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 5: gemv_rows<T, 5>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 6: gemv_rows<T, 6>(xm, w, row_bytes, k, r0, r1, n, o); break;
      case 7: gemv_rows<T, 7>(xm, w, row_bytes, k, r0, r1, n, o); break;
      default: gemv_rows<T, 8>(xm, w, row_bytes, k, r0, r1, n, o); break;
    }
  }
}

#if defined(__AVX512BF16__)
// r[i] (16 lanes of 32 bits) <- column i of the 16 x 16 matrix whose rows are r.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j + 0] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    t[j + 4] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    t[j + 8] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    t[j + 12] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    r[j + 0] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    r[j + 4] = _mm512_shuffle_i32x4(t[j + 4], t[12 + j], 0x88);
    r[j + 12] = _mm512_shuffle_i32x4(t[j + 4], t[12 + j], 0xdd);
  }
}

// As gemv_rows, on bf16: each decoded sub-block rounded to 32 bf16 (one register) and one
// vdpbf16ps per row of x (xb [M, K] bf16).
template <int64_t T, int M>
void gemv_rows_bf16(const c10::BFloat16* xb, const uint8_t* w, int64_t row_bytes, int64_t k,
                    int64_t r0, int64_t r1, int64_t ldo, c10::BFloat16* out) {
  using F = Fmt<T>;
  constexpr int kSubs = F::kBlock / 32;
  const int64_t blocks = k / F::kBlock;
  // Each output's 16 lane sums wait here and are added up 16 outputs at a time (a transpose and
  // 15 adds rather than a horizontal sum per output, which with K = 576 cost as much as the
  // dot products: 16 rows of x over the model's projections 10.6 -> 8.9 ms).
  static_assert(kRowsPerTask == 16, "a task's outputs are reduced 16 at a time");
  alignas(64) float parts[M][16][16];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = w + r * row_bytes;
    __builtin_prefetch(row + 2 * row_bytes, 0, 1);
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const uint8_t* b = row + blk * F::kBytes;
      if ((blk & 3) == 0) __builtin_prefetch(b + 4 * row_bytes, 0, 1);
#pragma GCC unroll 8
      for (int s = 0; s < kSubs; ++s) {
        vnf wd[kRegs];
        F::decode(b, s, wd);
        const __m512bh wv = _mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(wd[1]),
                                                reinterpret_cast<__m512>(wd[0]));
        const int64_t j = blk * F::kBlock + 32 * s;
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xb + m * k + j), wv);
      }
    }
    for (int m = 0; m < M; ++m) _mm512_store_ps(parts[m][r - r0], acc[m]);
  }
  const int rows = static_cast<int>(r1 - r0);
  for (int m = 0; m < M; ++m) {
    __m512i v[16];
    for (int i = 0; i < 16; ++i)
      v[i] = i < rows ? _mm512_load_si512(parts[m][i]) : _mm512_setzero_si512();
    transpose16(v);
    __m512 sum = reinterpret_cast<__m512>(v[0]);
    for (int l = 1; l < 16; ++l) sum = _mm512_add_ps(sum, reinterpret_cast<__m512>(v[l]));
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    for (int i = 0; i < rows; ++i) out[m * ldo + r0 + i] = c10::BFloat16(sums[i]);
  }
}

template <int64_t T>
void gemv_bf16(const c10::BFloat16* x, int64_t m, const uint8_t* w, int64_t row_bytes,
               int64_t k, int64_t r0, int64_t r1, int64_t n, c10::BFloat16* out) {
  for (int64_t m0 = 0; m0 < m;) {
    const int64_t left = m - m0;
    auto run = [&](auto tag) {
      constexpr int R = decltype(tag)::value;
      gemv_rows_bf16<T, R>(x + m0 * k, w, row_bytes, k, r0, r1, n, out + m0 * n);
      m0 += R;
    };
    if (left >= 16) run(std::integral_constant<int, 16>{});
    else if (left >= 8) run(std::integral_constant<int, 8>{});
    else if (left >= 4) run(std::integral_constant<int, 4>{});
    else if (left >= 2) run(std::integral_constant<int, 2>{});
    else run(std::integral_constant<int, 1>{});
  }
}
#endif

// Threads split the output rows into tasks of kRowsPerTask; a task's weight rows stay in cache
// while every group of x's rows passes over them.
template <typename Fn>
void for_row_tasks(int64_t n, Fn&& fn) {
  at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) fn(t * kRowsPerTask, std::min(n, (t + 1) * kRowsPerTask));
  });
}

#if !defined(__AVX512BF16__)
// AVX2: steps with at least this many rows decode W for torch's GEMM (measured on the model's
// projections: per-row decoding wins below ~64 rows in fp32, ~12 in bf16).
constexpr int64_t kDenseMinRowsF32 = 64, kDenseMinRowsBf16 = 12;
#endif

#if defined(__AVX512BF16__)
constexpr int64_t kPanelMinRows = 40;  // steps with at least this many rows take the panels
using pagedllm::panel::kP;
static_assert(kP == 64, "panels of four 16-lane registers");

// Output rows [c0, c0 + 64) of W (zeros past n) as a panel: bf16 pairs [K/2][64][2] (Pairs) or
// fp32 [K][64]. Sixteen rows' sub-blocks at a time, decoded, transposed, stored whole lines.
template <int64_t T, bool Pairs>
void decode_panel(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t c0, int64_t n,
                  void* panel) {
  using F = Fmt<T>;
  constexpr int kSubs = F::kBlock / 32;
  for (int g = 0; g < 4; ++g) {
    const int64_t row0 = c0 + 16 * g;
    for (int64_t j0 = 0; j0 < k; j0 += 32) {
      const int64_t blk = j0 / F::kBlock;
      const int s = static_cast<int>((j0 % F::kBlock) / 32);
      (void)kSubs;
      __m512i lo[16], hi[16];
      for (int i = 0; i < 16; ++i) {
        if (row0 + i >= n) {
          lo[i] = hi[i] = _mm512_setzero_si512();
          continue;
        }
        vnf wd[kRegs];
        F::decode(w + (row0 + i) * row_bytes + blk * F::kBytes, s, wd);
        if constexpr (Pairs) {
          lo[i] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(wd[1]),
                                                                reinterpret_cast<__m512>(wd[0])));
        } else {
          lo[i] = reinterpret_cast<__m512i>(wd[0]);
          hi[i] = reinterpret_cast<__m512i>(wd[1]);
        }
      }
      transpose16(lo);  // lo[i]: pair i (or k = j0 + i) of the 16 rows
      if constexpr (Pairs) {
        auto* out = static_cast<c10::BFloat16*>(panel);
        for (int i = 0; i < 16; ++i)
          _mm512_storeu_si512(out + ((j0 / 2 + i) * kP + 16 * g) * 2, lo[i]);
      } else {
        transpose16(hi);
        auto* out = static_cast<float*>(panel);
        for (int i = 0; i < 16; ++i) {
          _mm512_storeu_si512(out + (j0 + i) * kP + 16 * g, lo[i]);
          _mm512_storeu_si512(out + (j0 + 16 + i) * kP + 16 * g, hi[i]);
        }
      }
    }
  }
}

// y = x W^T for many rows: the panels spread over the threads; each thread decodes a panel
// into its buffer once and runs every row of x through it, kChunk rows at a time.
template <int64_t T, typename X>
void panel_gemm(const X* x, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t k,
                int64_t n, X* y) {
  constexpr bool kPairs = std::is_same_v<X, c10::BFloat16>;
  const int64_t panels = (n + kP - 1) / kP;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<X> buf(k * kP);
    for (int64_t p = begin; p < end; ++p) {
      decode_panel<T, kPairs>(w, row_bytes, k, p * kP, n, buf.data());
      for (int64_t r0 = 0; r0 < m; r0 += pagedllm::panel::kChunk) {
        const int64_t rows = std::min<int64_t>(pagedllm::panel::kChunk, m - r0);
        pagedllm::panel::rows_panel<X, X, kPairs>(x + r0 * k, k, rows, buf.data(), k,
                                                   y + r0 * n, n, p * kP, n, nullptr);
      }
    }
  });
}
#endif

template <int64_t T, typename O>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t k, int64_t n, O* out) {
  using F = Fmt<T>;
  constexpr int kSubs = F::kBlock / 32;
  const int64_t blocks = k / F::kBlock;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w + r * row_bytes;
      O* o = out + r * k;
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int s = 0; s < kSubs; ++s) {
          vnf wd[kRegs];
          F::decode(row + blk * F::kBytes, s, wd);
          O* dst = o + blk * F::kBlock + 32 * s;
          for (int q = 0; q < kRegs; ++q) {
            if constexpr (std::is_same_v<O, float>) {
              pagedllm::storen(dst + q * kL, wd[q]);
            } else {
              for (int i = 0; i < kL; ++i) dst[q * kL + i] = static_cast<O>(wd[q][i]);
            }
          }
        }
    }
  });
}

template <typename Fn>
void dispatch_type(int64_t qtype, Fn&& fn) {
  switch (qtype) {
#define PAGEDLLM_QTYPE(T) \
  case T: fn(std::integral_constant<int64_t, T>{}); break;
    PAGEDLLM_QTYPE(kF32) PAGEDLLM_QTYPE(kF16) PAGEDLLM_QTYPE(kBF16)
    PAGEDLLM_QTYPE(kQ4_0) PAGEDLLM_QTYPE(kQ4_1) PAGEDLLM_QTYPE(kQ5_0) PAGEDLLM_QTYPE(kQ8_0)
    PAGEDLLM_QTYPE(kQ4_K) PAGEDLLM_QTYPE(kQ6_K)
    PAGEDLLM_QTYPE(kA4G32) PAGEDLLM_QTYPE(kA4G64) PAGEDLLM_QTYPE(kA4G128)
    PAGEDLLM_QTYPE(kA8G32) PAGEDLLM_QTYPE(kA8G64) PAGEDLLM_QTYPE(kA8G128)
#undef PAGEDLLM_QTYPE
    default: TORCH_CHECK(false, "quant_linear: weight type ", qtype, " has no kernel here");
  }
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t k) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "quant_linear: w must be contiguous uint8 [N, row_bytes]");
  int64_t bw = 0, bb = 0;
  dispatch_type(qtype, [&](auto t) {
    bw = Fmt<decltype(t)::value>::kBlock;
    bb = Fmt<decltype(t)::value>::kBytes;
  });
  TORCH_CHECK(k % bw == 0, "quant_linear: K = ", k, " is not a multiple of the block (", bw, ")");
  TORCH_CHECK(w.size(1) == k / bw * bb, "quant_linear: row of ", w.size(1),
              " bytes does not hold ", k, " weights of type ", qtype);
}

// x's columns in the order perm (GPTQ's act order: the weights hold each group's inputs
// together): y[m, j] = x[m, perm[j]], rows in parallel (torch's index_select on the last
// dimension took 24 ms for 16k rows of 576 bf16).
template <typename T>
void gather_columns(const T* x, int64_t m, int64_t k, const int64_t* perm, T* y) {
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * k;
      T* yr = y + r * k;
      for (int64_t j = 0; j < k; ++j) yr[j] = xr[perm[j]];
    }
  });
}

at::Tensor permuted_columns(const at::Tensor& x, const at::Tensor& perm) {
  TORCH_CHECK(perm.dim() == 1 && perm.size(0) == x.size(1) && perm.scalar_type() == at::kLong,
              "quant_linear: perm must be int64 [K]");
  const at::Tensor xc = x.contiguous();
  const at::Tensor pc = perm.contiguous();
  auto y = at::empty_like(xc);
  const int64_t m = xc.size(0), k = xc.size(1);
  const int64_t* p = pc.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) TORCH_CHECK(p[j] >= 0 && p[j] < k, "quant_linear: bad perm");
  if (xc.element_size() == 2) {
    gather_columns(reinterpret_cast<const uint16_t*>(xc.data_ptr()), m, k, p,
                   reinterpret_cast<uint16_t*>(y.data_ptr()));
  } else {
    TORCH_CHECK(xc.element_size() == 4, "quant_linear: x must be fp32, bf16 or fp16");
    gather_columns(reinterpret_cast<const uint32_t*>(xc.data_ptr()), m, k, p,
                   reinterpret_cast<uint32_t*>(y.data_ptr()));
  }
  return y;
}

at::Tensor quant_linear_impl(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                             bool batch_invariant);

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                        bool batch_invariant, const std::optional<at::Tensor>& perm) {
  TORCH_CHECK(x.dim() == 2, "quant_linear: x [M, K]");
  if (perm.has_value() && x.size(0) > 0) {
    return quant_linear_impl(permuted_columns(x, *perm), w, qtype, batch_invariant);
  }
  return quant_linear_impl(x, w, qtype, batch_invariant);
}

at::Tensor quant_linear_impl(const at::Tensor& x, const at::Tensor& w, int64_t qtype,
                             bool batch_invariant) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  check_weight(w, qtype, k);
  auto out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
#if defined(__AVX512BF16__)
  if (m >= kPanelMinRows && !batch_invariant &&
      (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat)) {
    const at::Tensor xc = x.contiguous();
    dispatch_type(qtype, [&](auto t) {
      constexpr int64_t kT = decltype(t)::value;
      if (x.scalar_type() == at::kFloat) {
        panel_gemm<kT>(xc.data_ptr<float>(), m, wp, row_bytes, k, n, out.data_ptr<float>());
      } else {
        panel_gemm<kT>(xc.data_ptr<c10::BFloat16>(), m, wp, row_bytes, k, n,
                       out.data_ptr<c10::BFloat16>());
      }
    });
    return out;
  }
  if (x.scalar_type() == at::kBFloat16) {
    const at::Tensor xb = x.contiguous();
    const auto* xp = xb.data_ptr<c10::BFloat16>();
    auto* op = out.data_ptr<c10::BFloat16>();
    dispatch_type(qtype, [&](auto t) {
      for_row_tasks(n, [&](int64_t r0, int64_t r1) {
        gemv_bf16<decltype(t)::value>(xp, m, wp, row_bytes, k, r0, r1, n, op);
      });
    });
    return out;
  }
#endif
#if !defined(__AVX512BF16__)
  // No panels here: a big step decodes W once and runs torch's GEMM on it.
  if (m >= (x.scalar_type() == at::kFloat ? kDenseMinRowsF32 : kDenseMinRowsBf16) &&
      !batch_invariant) {
    auto dense = at::empty({n, k}, x.options());
    dispatch_type(qtype, [&](auto t) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gguf_dq", [&] {
        dequantize_rows<decltype(t)::value>(wp, row_bytes, k, n, dense.data_ptr<scalar_t>());
      });
    });
    return at::linear(x, dense);
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quant_linear", [&] {
    dispatch_type(qtype, [&](auto t) {
      for_row_tasks(n, [&](int64_t r0, int64_t r1) {
        gemv_f32<decltype(t)::value>(xf.data_ptr<float>(), m, wp, row_bytes, k, r0, r1, n,
                                     out.data_ptr<scalar_t>());
      });
    });
  });
  return out;
}

void quant_dequantize(const at::Tensor& w, int64_t qtype, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == w.size(0),
              "quant_dequantize: out [N, K] contiguous");
  check_weight(w, qtype, out.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "quant_dequantize",
                                  [&] {
    dispatch_type(qtype, [&](auto t) {
      dequantize_rows<decltype(t)::value>(w.data_ptr<uint8_t>(), w.size(1), out.size(1),
                                          w.size(0), out.data_ptr<scalar_t>());
    });
  });
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
}
