// Argument checks shared by the CPU and CUDA entries. Every message names the op, the argument,
// what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace bnext {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const at::Tensor& input, const char* op, const char* name = "input") {
  TORCH_CHECK(input.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(
      input.dim() >= 2,
      op, ": ", name, " must have at least 2 dimensions (N, C, ...), got ", input.dim(),
      "D input of shape ", input.sizes());
  TORCH_CHECK_TYPE(
      is_supported_dtype(input.scalar_type()),
      op, ": ", name, " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      input.scalar_type());
}

// A tensor with the same shape, dtype and device as `input` (grad_output against input).
inline void check_like_input(
    const at::Tensor& t,
    const char* name,
    const at::Tensor& input,
    const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  TORCH_CHECK(
      t.sizes() == input.sizes(),
      op, ": ", name, " must have the input's shape ", input.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(
      t.scalar_type() == input.scalar_type(),
      op, ": ", name, " must have the input's dtype ", input.scalar_type(), ", got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " must be on the input's device ", input.device(), ", got ", t.device());
}

// A per-channel vector: C elements, on the input's device, floating point in the input's dtype or
// its accumulation type (float32 parameters under half/bfloat16 input, as torch allows).
inline void check_channel_vector(
    const at::Tensor& t,
    const char* name,
    const at::Tensor& input,
    const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  const int64_t C = input.size(1);
  TORCH_CHECK(
      t.dim() == 1 && t.numel() == C,
      op, ": ", name, " must be a 1-D tensor with ", C, " elements (num_features, the input's size(1)), got shape ",
      t.sizes());
  const auto in_t = input.scalar_type();
  const auto acc_t = acc_dtype(in_t);
  TORCH_CHECK_TYPE(
      t.scalar_type() == in_t || t.scalar_type() == acc_t,
      op, ": ", name, " must have dtype ", in_t,
      (acc_t != in_t ? std::string(" or ") + c10::toString(acc_t) : std::string()),
      " (the input's dtype", (acc_t != in_t ? " or its accumulation type" : ""), "), got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " must be on the input's device ", input.device(), ", got ", t.device());
}

inline void check_optional_channel_vector(
    const c10::optional<at::Tensor>& t,
    const char* name,
    const at::Tensor& input,
    const char* op) {
  if (t.has_value() && t->defined()) {
    check_channel_vector(*t, name, input, op);
  }
}

// A running statistic (running_mean, running_var) of any floating dtype: C elements on the
// input's device. The eager entries check it before anything is written; the Python layer words
// the error for users (bnext.functional._check_args).
inline void check_running_stat(const at::Tensor& t, const at::Tensor& input, const char* op) {
  TORCH_CHECK(
      t.dim() == 1 && t.numel() == input.size(1) && t.is_floating_point() && t.device() == input.device(), op,
      ": running statistics must be floating-point 1-D tensors of ", input.size(1),
      " elements on the input's device");
}

inline void check_eps(double eps, const char* op) {
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be non-negative, got ", eps);
}

// All checks of one op's arguments, shared by its CPU and CUDA entries.
inline void check_elemt_args(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const char* op) {
  check_input(input, op);
  check_optional_channel_vector(weight, "weight", input, op);
  check_optional_channel_vector(bias, "bias", input, op);
  check_channel_vector(mean, "mean", input, op);
  check_channel_vector(invstd, "invstd", input, op);
}

inline void check_forward_args(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    double eps,
    const char* op) {
  check_input(input, op);
  check_optional_channel_vector(weight, "weight", input, op);
  check_optional_channel_vector(bias, "bias", input, op);
  check_eps(eps, op);
}

// grad_out and input of the backward ops, plus the per-channel tensors every backward op takes.
inline void check_backward_common(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const char* mean_name,
    const at::Tensor& invstd,
    const char* invstd_name,
    const char* op) {
  check_input(input, op);
  check_like_input(grad_out, "grad_out", input, op);
  check_channel_vector(mean, mean_name, input, op);
  check_channel_vector(invstd, invstd_name, input, op);
}

inline void check_backward_elemt_args(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean_dy,
    const at::Tensor& mean_dy_xmu,
    const char* op) {
  check_backward_common(grad_out, input, mean, "mean", invstd, "invstd", op);
  check_optional_channel_vector(weight, "weight", input, op);
  check_channel_vector(mean_dy, "mean_dy", input, op);
  check_channel_vector(mean_dy_xmu, "mean_dy_xmu", input, op);
}

}  // namespace bnext
