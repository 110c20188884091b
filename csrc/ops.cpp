// Every bnext schema is defined by bnext::define_schemas (csrc/common/schemas.h), shared with the
// emulated CUDA build (namespace bnext_simt). Kernels live in csrc/cpu (CPU key) and csrc/cuda
// (CUDA key); fake kernels and autograd formulas are registered from Python (bnext/_fake.py,
// bnext/_op_autograd.py).
#include <torch/library.h>

#include "common/schemas.h"

TORCH_LIBRARY(bnext, m) {
  bnext::define_schemas(m);
}
