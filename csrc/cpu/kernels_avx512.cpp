// The CPU kernels for AVX-512 F/BW/VL/DQ (x86-64 only; picked at run time, see isa.cpp).
#if defined(__x86_64__)
#include "kernel_deps.h"

// Everything included above keeps the baseline ISA; only what follows is compiled for AVX-512.
// 512-bit vectors are preferred explicitly: GCC's generic tuning would otherwise split them.
// BNEXT_CPU_BF16 (set by kernels_avx512bf16.cpp, which includes this file) adds AVX512-BF16.
#if defined(BNEXT_CPU_BF16)
#define BNEXT_CPU_ISA_NS avx512bf16
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")
#endif
#else
#define BNEXT_CPU_BF16 0
#define BNEXT_CPU_ISA_NS avx512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif
#endif
#define BNEXT_CPU_ISA_LEVEL 2  // 0 baseline, 1 AVX2, 2 AVX-512
#include "batch_norm_kernel.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
