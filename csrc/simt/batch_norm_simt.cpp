// The CUDA kernels and entries of csrc/cuda, compiled as host C++ over the SIMT emulator: the ops
// of namespace bnext_simt, for CPU tensors, with the same schemas as bnext.
#define BNEXT_SIMT 1

#include <torch/library.h>

#include "../common/schemas.h"
#include "../cuda/batch_norm_cuda.cu"

TORCH_LIBRARY(bnext_simt, m) {
  bnext::define_schemas(m);
}
