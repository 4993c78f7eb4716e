// The op namespace of this build: one library per ISA (pagedllm_avx2, pagedllm_avx512,
// pagedllm_amx), so that all of them load into one process and the tests run each. The build
// passes -DPAGEDLLM_NS=<namespace>; schemas are in registration.cpp, kernels register with
// PAGEDLLM_IMPL.
#pragma once

#include <torch/library.h>

#ifndef PAGEDLLM_NS
#error "build with -DPAGEDLLM_NS=pagedllm_<isa> (pagedllm/model_executor/ops/loader.py does)"
#endif

#define PAGEDLLM_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define PAGEDLLM_LIBRARY(m) PAGEDLLM_LIBRARY_(PAGEDLLM_NS, m)
#define PAGEDLLM_IMPL_(ns, m) TORCH_LIBRARY_IMPL(ns, CPU, m)
#define PAGEDLLM_IMPL(m) PAGEDLLM_IMPL_(PAGEDLLM_NS, m)
