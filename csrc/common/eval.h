// bnext::batch_norm_eval on any device whose bnext ops exist: the folded coefficients with ATen ops,
// then that namespace's batch_norm_elemt. The CPU has its own entry (csrc/cpu/batch_norm_cpu.cpp)
// that folds on the host with the same operations, so both give the same bits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>

#include "checks.h"
#include "prepare.h"

namespace bnext {

using ElemtOp = c10::TypedOperatorHandle<at::Tensor(
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
    const at::Tensor&)>;

inline ElemtOp find_elemt_op(const char* ns) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string(ns) + "::batch_norm_elemt").c_str(), "")
      .typed<at::Tensor(
          const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, const at::Tensor&,
          const at::Tensor&)>();
}

// Inference coefficients: scale = rsqrt(running_var + eps) * weight and shift = bias - running_mean
// * scale in the accumulation type (torch's eval formula; arguments checked by the caller, input
// not empty). batch_norm_eval and the CUDA batch_norm_act_eval fold with this one function.
inline std::pair<at::Tensor, at::Tensor> eval_scale_shift(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight_in,
    const c10::optional<at::Tensor>& bias_in,
    const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    double eps) {
  const auto weight = flat_channels(weight_in), bias = flat_channels(bias_in);
  const auto acc = acc_dtype(input.scalar_type());
  const at::Tensor mean = running_mean->reshape({-1}).to(acc);
  const at::Tensor invstd = at::rsqrt(running_var->reshape({-1}).to(acc) + eps);
  const at::Tensor scale = weight.has_value() && weight->defined() ? invstd * weight->to(acc) : invstd;
  const at::Tensor shift = bias.has_value() && bias->defined() ? bias->to(acc) - mean * scale : -(mean * scale);
  return {scale, shift};
}

// Inference: elemt with mean 0, invstd = scale and no weight: out = x * scale + shift.
inline at::Tensor batch_norm_eval_generic(
    const ElemtOp& elemt,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight_in,
    const c10::optional<at::Tensor>& bias_in,
    const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    double eps) {
  check_batch_norm_args("bnext.batch_norm_eval", input, weight_in, bias_in, running_mean, running_var, false, eps);
  if (input.sym_numel() == 0) {
    return input.clone();
  }
  const auto [scale, shift] = eval_scale_shift(input, weight_in, bias_in, running_mean, running_var, eps);
  return elemt.call(input, c10::nullopt, shift, at::zeros_like(scale), scale);
}

}  // namespace bnext
