// Every bnext schema, as one function, so the real library (csrc/ops.cpp, namespace bnext) and the
// emulated CUDA build (csrc/simt, namespace bnext_simt) define identical schemas that cannot drift.
//
// All ops are functional: none mutates an argument, so each can carry an autograd formula and be
// traced by torch.compile. Running statistics are updated by the Python modules.
//
// batch_norm_eval is inference with the running statistics (the running statistics are constants of
// the graph, as in torch): out = x * scale + shift with scale = weight * rsqrt(running_var + eps)
// and shift = bias - running_mean * scale, torch's own eval formula, folded in one place per
// device (csrc/cpu/batch_norm_cpu.cpp, csrc/common/eval.h).
//
// Statistics are returned in the accumulation type: float32 for float16/bfloat16/float32 input,
// float64 for float64 input. `var` is the biased variance. `sum_dy_xmu` is sum(dy * (x - mean)).
#pragma once

#include <torch/library.h>

namespace bnext {

inline void define_schemas(torch::Library& m) {
  // Split ops (multi-process training composes these with collectives in between).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd)"
      " -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd)"
      " -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd,"
      " Tensor? weight, Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var,"
      " float eps) -> Tensor");
  // Fused single-device ops: statistics and normalization (or reduction and elementwise) in one call.
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor save_var)");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean,"
      " Tensor save_invstd) -> (Tensor grad_input, Tensor sum_dy, Tensor sum_dy_xmu)");
  // Fused BN + activation (+ residual add), csrc/common/act.h: output = act(BN(input) + residual),
  // `activation` an Act code, `activation_param` its negative_slope / alpha. BN(input) is never
  // stored. The backward takes the saved tensor `saved`: the input (from_output=False: z is
  // recomputed from it and the residual), or the output (from_output=True, the memory-saving
  // mode of the invertible activations: z = act_inverse(output), input - mean recovered from z,
  // residual, weight and bias; channels whose weight * invstd is 0 give no usable values there and
  // are recomputed by the caller from the input it kept for them). grad_residual is dz =
  // dy * act'(z) when a residual is given, else an empty tensor; sum_dz = sum(dz), sum_dz_xmu =
  // sum(dz * (input - mean)).
  m.def(
      "batch_norm_act_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, float eps,"
      " int activation, float activation_param)"
      " -> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor save_var)");
  m.def(
      "batch_norm_act_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean,"
      " Tensor? running_var, Tensor? residual, float eps, int activation, float activation_param) -> Tensor");
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor saved, Tensor? residual, Tensor? weight, Tensor? bias,"
      " Tensor save_mean, Tensor save_invstd, int activation, float activation_param, bool from_output)"
      " -> (Tensor grad_input, Tensor grad_residual, Tensor sum_dz, Tensor sum_dz_xmu)");
  // Masked batch norm (bnext/masked.py), the eager training route on CUDA: input (N, C, L), mask
  // (N, L) bool, True at the real positions. batch_norm_forward / batch_norm_backward of the real
  // positions only (their statistics, sums and coefficients), zeros in the output and grad_input
  // at the padding. Private: the layer's own kernels (on CPU, reference implementations over
  // bnext::_masked_forward / _masked_backward, which take the mask's runs).
  m.def(
      "_batch_norm_masked_forward(Tensor input, Tensor mask, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor output, Tensor save_mean, Tensor save_invstd, Tensor save_var)");
  m.def(
      "_batch_norm_masked_backward(Tensor grad_out, Tensor input, Tensor mask, Tensor? weight, Tensor save_mean,"
      " Tensor save_invstd) -> (Tensor grad_input, Tensor sum_dy, Tensor sum_dy_xmu)");
}

}  // namespace bnext
