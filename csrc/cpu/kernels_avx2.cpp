// The CPU kernels for AVX2 + FMA (x86-64 only; picked at run time, see isa.cpp).
#if defined(__x86_64__)
#include "kernel_deps.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define BNEXT_CPU_ISA_NS avx2
#include "batch_norm_kernel.h"
#pragma GCC pop_options
#endif
