// The CPU kernels for AVX2 + FMA (x86-64 only; picked at run time, see isa.cpp).
#if defined(__x86_64__)
#include "kernel_deps.h"

// Everything included above keeps the baseline ISA; only what follows is compiled for AVX2.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define BNEXT_CPU_ISA_NS avx2
#define BNEXT_CPU_ISA_LEVEL 1  // 0 baseline, 1 AVX2, 2 AVX-512
#include "batch_norm_kernel.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
