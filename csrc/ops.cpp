// Every bnext schema: the functional op set is defined by bnext::define_schemas
// (csrc/common/schemas.h), shared with the emulated CUDA build (namespace bnext_simt). Kernels live
// in csrc/cpu (CPU key), csrc/cuda (CUDA key) and csrc/module_ops.cpp; fake kernels, autograd
// formulas and vmap rules are registered from Python (bnext/_ops/).
#include <torch/library.h>

#include "common/schemas.h"

TORCH_LIBRARY(bnext, m) {
  bnext::define_schemas(m);
  // Not part of the kernel set the emulated build shares (csrc/module_ops.cpp): the running-
  // statistics rule, the argument rules of bnext.batch_norm, and the eager training and inference
  // calls (the training one does checks, forward and update in one call; never traced: under torch.compile, torch.func and
  // forward AD the Python layer composes the functional ops with the first two instead).
  m.def(
      "update_running_stats(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked,"
      " Tensor mean, Tensor var, int count, float? momentum) -> ()");
  m.def(
      "_check_batch_norm_args(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean,"
      " Tensor? running_var, bool training, float eps, bool check_count=True) -> ()");
  m.def(
      "_batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, float? momentum, float eps, Tensor(c!)? num_batches_tracked=None) -> Tensor");
  m.def(
      "_batch_norm_act_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean,"
      " Tensor(b!)? running_var, float? momentum, float eps, Tensor(c!)? num_batches_tracked, Tensor? residual,"
      " int activation, float activation_param) -> Tensor");
  // Ghost batch norm's eager CPU path (bnext/ghost.py): batch_norm_forward / batch_norm_backward of
  // each run of chunk_rows consecutive samples with its own statistics, (G, C) per-run tensors;
  // CPU kernels only (other devices and the traced paths fold the runs into the channels), and
  // the runs' statistics taken into the running ones.
  m.def(
      "_batch_norm_forward_chunks(Tensor input, Tensor? weight, Tensor? bias, float eps, int chunk_rows)"
      " -> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor save_var)");
  m.def(
      "_batch_norm_backward_chunks(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean,"
      " Tensor save_invstd, int chunk_rows) -> (Tensor grad_input, Tensor sum_dy, Tensor sum_dy_xmu)");
  // Its chunks taken into the running statistics: update_running_stats per chunk, in order.
  m.def(
      "_update_running_stats_chunks(Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, int count, int last_count, float? momentum) -> ()");
  // Masked batch norm (bnext/masked.py), CPU only (csrc/cpu/masked_runs.cpp): the runs (R, 3) of
  // (row, start, stop) of a bool mask (N, L); the compact route's copies of the real positions of
  // (N, C, L) into (1, C, K) and back around zeros.
  m.def("_masked_runs(Tensor mask) -> Tensor");
  m.def("_masked_compact(Tensor input, Tensor runs) -> Tensor");
  m.def("_masked_expand(Tensor compact, Tensor runs, int N, int L) -> Tensor");
  // Its CPU kernels (csrc/cpu/kernel/masked.h), reading the real positions in place and writing
  // zeros at the padding: the training forward (output, mean, biased var, invstd) and backward
  // (grad_input, empty unless input_grad; sums of dy and dy * (x - mean)).
  m.def(
      "_masked_forward(Tensor input, Tensor runs, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor mean, Tensor var, Tensor invstd)");
  m.def(
      "_masked_backward(Tensor grad_out, Tensor input, Tensor runs, Tensor mean, Tensor invstd, Tensor? weight,"
      " bool input_grad) -> (Tensor grad_input, Tensor sum_dy, Tensor sum_dy_xmu)");
  // The eager inference call: batch_norm_eval below autograd, for calls with nothing to record.
  m.def(
      "_batch_norm_infer(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean,"
      " Tensor? running_var, float eps) -> Tensor");
}
