// Every bnext schema: the functional op set is defined by bnext::define_schemas
// (csrc/common/schemas.h), shared with the emulated CUDA build (namespace bnext_simt). Kernels live
// in csrc/cpu (CPU key) and csrc/cuda (CUDA key); fake kernels and autograd formulas are registered from Python (bnext/_fake.py,
// bnext/_op_autograd.py).
#include <torch/library.h>

#include "common/schemas.h"

TORCH_LIBRARY(bnext, m) {
  bnext::define_schemas(m);
  // Not part of the op set the Python layer composes: the eager training forward of
  // bnext.batch_norm and the modules in one call, which updates the running statistics (and a
  // module's num_batches_tracked) in place,
  // and their eager inference in one call (csrc/train_forward.cpp). Never traced: under
  // torch.compile the Python path composes the functional ops instead.
  m.def(
      "_batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, float momentum, float eps, Tensor(c!)? num_batches_tracked=None) -> Tensor");
  m.def(
      "_batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean,"
      " Tensor running_var, float eps) -> Tensor");
}
