// The CPU kernels for the distribution's baseline ISA (x86-64 SSE2, or aarch64).
#include "kernel_deps.h"

#define BNEXT_CPU_ISA_NS baseline
#define BNEXT_CPU_ISA_LEVEL 0  // 0 baseline, 1 AVX2, 2 AVX-512
#include "batch_norm_kernel.h"
