// AMX tile set-up shared by the kernels that use it (prefill_attention.cpp, amx_linear.cpp).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PAGEDLLM_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace pagedllm {

// Linux hands out AMX state only on request (once per process).
inline bool amx_usable() {
  static const bool ok = [] {
    if (!__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: A = 16 x 32 bf16, B = 16 pairs x 16 x 2 bf16, C = 16 x 16 fp32.
// The configuration is per thread and other libraries (oneDNN) change it: set it per call.
inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace pagedllm

#endif

namespace pagedllm {

// Whether the AMX kernels can run: built for AMX and granted by the kernel (op `amx_supported`).
inline bool amx_supported() {
#ifdef PAGEDLLM_AMX
  return amx_usable();
#else
  return false;
#endif
}

}  // namespace pagedllm
