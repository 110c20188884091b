#include "isa.h"

namespace bnext {
namespace cpu {

const char* active_isa() {
  // One portable build of the kernels, compiled for the distribution's baseline ISA.
  return "baseline";
}

}  // namespace cpu
}  // namespace bnext
