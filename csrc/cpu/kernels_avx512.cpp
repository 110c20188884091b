// The CPU kernels for AVX-512 (F, BW, VL, DQ) (x86-64 only; picked at run time, see isa.cpp).
#if defined(__x86_64__)
#include "kernel_deps.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define BNEXT_CPU_ISA_NS avx512
#include "batch_norm_kernel.h"
#pragma GCC pop_options
#endif
