// Which instruction set the CPU kernels run with on this machine.
#pragma once

namespace bnext {
namespace cpu {

// Name of the CPU kernel variant in use ("baseline" is the portable x86-64 / aarch64 build).
const char* active_isa();

}  // namespace cpu
}  // namespace bnext
