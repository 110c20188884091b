// Which instruction set the CPU kernels run with on this machine.
#pragma once

#include <string>

namespace bnext {
namespace cpu {

// Name of the CPU kernel variant in use: "avx512bf16", "avx512", "avx2" or "baseline" (the portable x86-64 /
// aarch64 build). BNEXT_CPU_ISA forces a supported variant.
const char* active_isa();

// The variants this CPU can run, best first, comma separated.
std::string supported_isas();

}  // namespace cpu
}  // namespace bnext
