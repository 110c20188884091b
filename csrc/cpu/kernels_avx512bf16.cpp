// The AVX-512 kernels once more with AVX512-BF16 (x86-64 only; picked at run time, see isa.cpp):
// float -> bfloat16 rounding takes one instruction (vcvtne2ps2bf16) instead of a dozen, see
// bf16_exact_lanes in kernel/vec.h. Every other line is the AVX-512 variant's.
#define BNEXT_CPU_BF16 1
#include "kernels_avx512.cpp"
