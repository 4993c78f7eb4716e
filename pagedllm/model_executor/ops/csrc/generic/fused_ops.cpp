// Fused elementwise kernels for the decoder layer, so a layer is ~15 ops instead of ~60 (at
// batch 1 the per-op dispatch cost dominated the step). All math in fp32; inputs and outputs
// may be fp32, bf16 or fp16. Every kernel is parallel over tokens.
//
//   rms_norm            out = w * x / rms(x)                     (x fp32 residual stream)
//   fused_add_rms_norm  residual += delta; out = w * residual / rms(residual)
//   rotary_embedding    q, k rotated in place (HF rotate_half layout), cos/sin tables fp32
//   silu_and_mul        out = silu(x[:, :I]) * x[:, I:]
//   reshape_and_cache   K/V rows -> their slots in the paged caches
//                         k_cache [NB, Hkv, D, BS] (K^T per block), v_cache [NB, Hkv, BS, D]
#include <ATen/ATen.h>
#include "common/registration.h"
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace {

using pagedllm::exp_approx;
using pagedllm::load_f;

// Conversions the compiler can vectorize (c10's bf16 rounding has a NaN branch that blocks it).
// Round-to-nearest-even; inputs here are finite activations.

template <typename T>
inline T store_f(float f) {
  return static_cast<T>(f);
}
template <>
inline c10::BFloat16 store_f<c10::BFloat16>(float f) {
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}

template <typename T>
inline void norm_row(const float* x, const float* w, float eps, int64_t n, T* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = store_f<T>(w[i] * (x[i] * inv));
}

template <typename D, typename T>
inline void add_norm_row(float* x, const D* d, const float* w, float eps, int64_t n, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] += load_f(d[i]);
  norm_row(x, w, eps, n, out);
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rms_norm: x and weight must be fp32");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "rms_norm: contiguous tensors");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rms_norm", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) norm_row(xp + r * n, wp, eps, n, op + r * n);
    });
  });
}

void fused_add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight,
                        double eps, at::Tensor& out) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat, "fused_add_rms_norm: fp32 residual");
  TORCH_CHECK(residual.is_contiguous() && delta.is_contiguous() && out.is_contiguous(),
              "fused_add_rms_norm: contiguous tensors");
  const int64_t n = residual.size(-1), rows = residual.numel() / n;
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, delta.scalar_type(), "add_norm", [&] {
    using delta_t = scalar_t;
    const delta_t* dp = delta.data_ptr<delta_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "add_norm_o", [&] {
      using out_t = scalar_t;
      out_t* op = out.data_ptr<out_t>();
      at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          add_norm_row(rp + r * n, dp + r * n, wp, eps, n, op + r * n);
      });
    });
  });
}


template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* o, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gv = load_f(g[i]);
    o[i] = store_f<T>(gv / (1.f + exp_approx(-gv)) * load_f(u[i]));
  }
}

template <typename T>
inline void rotate_head(T* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = load_f(x[i]), x2 = load_f(x[i + half]);
    x[i] = store_f<T>(x1 * cos[i] - x2 * sin[i]);
    x[i + half] = store_f<T>(x2 * cos[i] + x1 * sin[i]);
  }
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                      const at::Tensor& cos, const at::Tensor& sin) {
  // q: [T, Hq, D], k: [T, Hk, D]; rows may be strided (views of the fused qkv output) but
  // each row's heads must be contiguous.
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  k.stride(1) == k.size(2), "rotary_embedding: heads must be contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "rotary_embedding: fp32 contiguous tables");
  const int64_t tokens = q.size(0), hq = q.size(1), hk = k.size(1), d = q.size(2);
  const int64_t half = d / 2, qs = q.stride(0), ks = k.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 8, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const float* c = cp + pos[t] * half;
        const float* s = sp + pos[t] * half;
        for (int64_t h = 0; h < hq; ++h) rotate_head(qp + t * qs + h * d, c, s, half);
        for (int64_t h = 0; h < hk; ++h) rotate_head(kp + t * ks + h * d, c, s, half);
      }
    });
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "silu_and_mul: contiguous input");
  const int64_t n = x.size(-1) / 2, rows = x.numel() / x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        silu_mul_row(xp + r * 2 * n, xp + r * 2 * n + n, op + r * n, n);
      }
    });
  });
  return out;
}

// Symmetric int8 per (token, head): x ~ q * scale, scale = max|x| / 127. Records as read by
// the int8 decode kernel: [D][BS] (K^T) or [BS][D] (V) int8 values, then BS fp32 scales.
template <typename T>
inline float quantize_row(const T* x, int64_t d, int8_t* dst, int64_t dst_stride) {
  float amax = 0.f;
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, double>) {
    pagedllm::v16f m = {};
    if (d % 16 == 0)
      for (; i < d; i += 16) {
        const pagedllm::v16f v = pagedllm::load16(x + i);
        const pagedllm::v16f a = v < 0 ? -v : v;
        m = a > m ? a : m;
      }
    for (int l = 0; l < 16; ++l) amax = std::max(amax, m[l]);
  }
  for (; i < d; ++i) amax = std::max(amax, std::fabs(load_f(x[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (i = 0; i < d; ++i)
    dst[i * dst_stride] = static_cast<int8_t>(std::nearbyint(load_f(x[i]) * inv));
  return amax / 127.f;
}

// f(t, blk, off, hh) for every token t and kv head hh, with token t's cache slot split into
// its block and the offset in it; tokens are split over the threads.
template <typename F>
void for_each_slot(const at::Tensor& slot_mapping, int64_t tokens, int64_t bs, int64_t h, F&& f) {
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t blk = slots[t] / bs, off = slots[t] % bs;
      for (int64_t hh = 0; hh < h; ++hh) f(t, blk, off, hh);
    }
  });
}

void reshape_and_cache_int8(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                            at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const int64_t tokens = k.size(0), h = k.size(1), d = k.size(2);
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kChar && k_cache.size(2) % (d + 4) == 0 &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "reshape_and_cache: int8 caches are [NB, Hkv, BS * (D + 4)]");
  const int64_t bs = k_cache.size(2) / (d + 4), rec = k_cache.size(2);
  const int64_t kst = k.stride(0), vst = v.stride(0);
  int8_t* kc = k_cache.data_ptr<int8_t>();
  int8_t* vc = v_cache.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "cache_int8", [&] {
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    for_each_slot(slot_mapping, tokens, bs, h, [&](int64_t t, int64_t blk, int64_t off,
                                                   int64_t hh) {
      int8_t* kr = kc + (blk * h + hh) * rec;
      int8_t* vr = vc + (blk * h + hh) * rec;
      const float ks = quantize_row(kp + t * kst + hh * d, d, kr + off, bs);
      const float vs = quantize_row(vp + t * vst + hh * d, d, vr + off * d, 1);
      std::memcpy(kr + bs * d + off * 4, &ks, 4);
      std::memcpy(vr + bs * d + off * 4, &vs, 4);
    });
  });
}

// Token t's K/V rows -> column `off` of its block's K^T and row `off` of its V, as C.
template <typename S, typename C>
void cache_rows(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  const int64_t tokens = k.size(0), h = k.size(1), d = k.size(2);
  const int64_t bs = v_cache.size(2), kst = k.stride(0), vst = v.stride(0);
  const S* kp = k.data_ptr<S>();
  const S* vp = v.data_ptr<S>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  auto cvt = [](S x) -> C {
    if constexpr (std::is_same_v<S, C>) return x;
    else return store_f<C>(load_f(x));
  };
  for_each_slot(slot_mapping, tokens, bs, h, [&](int64_t t, int64_t blk, int64_t off, int64_t hh) {
    const S* ks = kp + t * kst + hh * d;
    const S* vs = vp + t * vst + hh * d;
    C* kd = kc + ((blk * h + hh) * d) * bs + off;
    C* vd = vc + ((blk * h + hh) * bs + off) * d;
    for (int64_t i = 0; i < d; ++i) kd[i * bs] = cvt(ks[i]);
    for (int64_t i = 0; i < d; ++i) vd[i] = cvt(vs[i]);
  });
}

void reshape_and_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                       at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2), "reshape_and_cache: heads must be contiguous");
  if (k_cache.scalar_type() == at::kChar) {
    reshape_and_cache_int8(k, v, k_cache, v_cache, slot_mapping);
    return;
  }
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "reshape_and_cache: dtype mismatch");
  if (k.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16) {
    cache_rows<float, c10::BFloat16>(k, v, k_cache, v_cache, slot_mapping);  // RNE, as torch
    return;
  }
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type(),
              "reshape_and_cache: the cache must have the K/V dtype, or be bf16 under fp32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "cache", [&] {
    cache_rows<scalar_t, scalar_t>(k, v, k_cache, v_cache, slot_mapping);
  });
}

}  // namespace

PAGEDLLM_IMPL(m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("reshape_and_cache", &reshape_and_cache);
}
