// Argument checks shared by the CPU and CUDA entries. Every message names the op, the argument,
// what was expected and what came; the exception types are torch's for the same mistake
// (NotImplementedError for a dtype no kernel exists for, RuntimeError for shapes, devices and
// mixed dtypes, ValueError where torch.nn.functional.batch_norm raises one).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <charconv>
#include <optional>
#include <cmath>
#include <string>

#include "act.h"

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
  TORCH_CHECK_NOT_IMPLEMENTED(
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
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(),
      op, ": ", name, " must have the input's dtype ", input.scalar_type(), ", got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " must be on the input's device ", input.device(), ", got ", t.device());
}

// A per-channel tensor in the input's dtype or its accumulation type (float32 parameters under
// half/bfloat16 input, as torch allows; torch refuses other mixes with a RuntimeError), on the
// input's device.
inline void check_channel_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op) {
  const auto in_t = input.scalar_type();
  const auto acc_t = acc_dtype(in_t);
  TORCH_CHECK(
      t.scalar_type() == in_t || t.scalar_type() == acc_t,
      op, ": ", name, " must have dtype ", in_t,
      (acc_t != in_t ? std::string(" or ") + c10::toString(acc_t) : std::string()),
      " (the input's dtype", (acc_t != in_t ? " or its accumulation type" : ""), "), got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " must be on the input's device ", input.device(), ", got ", t.device());
}

// A per-channel vector: C elements, on the input's device, floating point in the input's dtype or
// its accumulation type.
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
  check_channel_dtype_device(t, name, input, op);
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

// A double as Python's repr() writes it (the shortest round trip, "-1.0" rather than "-1"), so that
// messages shared with torch.nn.functional.batch_norm read exactly as torch's.
inline std::string python_float(double v) {
  if (std::isnan(v)) {
    return "nan";
  }
  if (std::isinf(v)) {
    return v > 0 ? "inf" : "-inf";
  }
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, r.ptr);
  if (s.find_first_of(".e") == std::string::npos) {
    s += ".0";
  }
  return s;
}

// The arguments of bnext.batch_norm as a whole (the modules, the functional API, every path that
// normalizes with batch or running statistics), checked before anything is computed or written,
// in torch.nn.functional.batch_norm's order and with its exception types. Per-channel tensors may
// have any shape with C elements (as torch allows); inputs of fewer than two dimensions have
// C = 0, so only an empty one passes (torch returns it unchanged).
inline void check_batch_norm_args(
    const char* op,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    bool training,
    double eps,
    bool check_count = true) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  if (training) {
    TORCH_CHECK_VALUE(
        has_mean == has_var, op,
        ": running_mean and running_var must either both be None or neither be None");
    // torch.nn.functional.batch_norm's _verify_batch_size: N times the spatial sizes (IndexError for
    // a 0-d input, as torch's size[0]). A rank of SyncBatchNorm checks its global count instead.
    TORCH_CHECK_INDEX(
        input.dim() > 0, op, ": input must have at least 2 dimensions (N, C, ...), got a 0-d tensor");
    c10::SymInt per_channel = input.sym_size(0);
    for (int64_t d = 2; d < input.dim(); ++d) {
      per_channel = per_channel * input.sym_size(d);
    }
    TORCH_CHECK_VALUE(
        !check_count || input.dim() < 2 || per_channel != 1,
        "Expected more than 1 value per channel when training, got input size torch.Size(", input.sym_sizes(), ")");
    TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", python_float(eps));
  } else {
    TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", python_float(eps));
    TORCH_CHECK(
        has_mean && has_var, op, ": running_mean and running_var must be defined in evaluation mode (training=False), got ",
        has_mean ? "running_var" : "running_mean", " None");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      is_supported_dtype(input.scalar_type()),
      op, ": input must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      input.scalar_type());
  TORCH_CHECK(
      input.dim() >= 2 || input.sym_numel() == 0,
      op, ": input must have at least 2 dimensions (N, C, ...), got ", input.dim(), "D input of shape ",
      input.sym_sizes());
  const c10::SymInt C = input.dim() >= 2 ? input.sym_size(1) : c10::SymInt(0);
  const std::pair<const c10::optional<at::Tensor>*, const char*> channel_args[] = {
      {&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}};
  for (const auto& [t, name] : channel_args) {
    if (!t->has_value() || !(*t)->defined()) {
      continue;
    }
    TORCH_CHECK(
        (*t)->sym_numel() == C,
        op, ": ", name, " must have ", C, " elements (num_features, the input's size(1)), got shape ",
        (*t)->sym_sizes());
    check_channel_dtype_device(**t, name, input, op);
    // Running statistics are constants of the graph (torch: "the derivative for 'running_mean'
    // is not implemented").
    TORCH_CHECK(
        !(name[0] == 'r' && at::GradMode::is_enabled() && (*t)->requires_grad()), op, ": ", name,
        " requires grad, but running statistics are not differentiable; pass a tensor that does not require grad");
  }
  // Half and bfloat16 inputs take float32 parameters and statistics or ones in their own dtype, one
  // or the other for all of them (torch: "mixed dtype (CPU): expect parameter to have scalar type
  // of Float").
  const at::ScalarType in_t = input.scalar_type();
  if (acc_dtype(in_t) != in_t) {
    std::optional<at::ScalarType> common;
    for (const auto& [t, name] : channel_args) {
      if (!t->has_value() || !(*t)->defined()) {
        continue;
      }
      TORCH_CHECK(
          !common || *common == (*t)->scalar_type(), op, ": weight, bias, running_mean and running_var must have one dtype (",
          in_t, " or ", acc_dtype(in_t), " for all of them), got ", *common, " and ", (*t)->scalar_type(), " (", name, ")");
      common = (*t)->scalar_type();
    }
  }
}

// The fused BN + activation ops' own arguments (common/act.h, schemas.h).
inline void check_activation(int64_t activation, const char* op) {
  TORCH_CHECK_VALUE(
      activation >= 0 && activation < kNumActs, op,
      ": activation must be an activation code from 0 to ", kNumActs - 1,
      " (identity, relu, leaky_relu, elu, silu, hardswish), got ", activation);
}

// The residual added before the activation: the input's shape, dtype and device (any strides).
inline void check_optional_residual(
    const c10::optional<at::Tensor>& residual, const at::Tensor& input, const char* op) {
  if (residual.has_value() && residual->defined()) {
    check_like_input(*residual, "residual", input, op);
  }
}

// The memory-saving backward (from_output=True) recovers z from the output: invertible
// activations only (act_invertible: identity, leaky_relu with negative_slope > 0, elu with alpha > 0).
inline void check_from_output(bool from_output, int64_t activation, double param, const char* op) {
  TORCH_CHECK_VALUE(
      !from_output || act_invertible(static_cast<Act>(activation), param), op,
      ": from_output=True needs an invertible activation (0 identity, 2 leaky_relu with activation_param > 0, "
      "3 elu with activation_param > 0), got activation ", activation, " with activation_param ",
      python_float(param));
}

inline void check_act_args(
    const c10::optional<at::Tensor>& residual,
    const at::Tensor& input,
    int64_t activation,
    const char* op) {
  check_optional_residual(residual, input, op);
  check_activation(activation, op);
}

inline void check_act_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& saved,
    const c10::optional<at::Tensor>& residual,
    const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    int64_t activation,
    double activation_param,
    bool from_output,
    const char* op) {
  check_input(saved, op, "saved");
  check_like_input(grad_out, "grad_out", saved, op);
  check_act_args(residual, saved, activation, op);
  check_optional_channel_vector(weight, "weight", saved, op);
  check_optional_channel_vector(bias, "bias", saved, op);
  check_channel_vector(save_mean, "save_mean", saved, op);
  check_channel_vector(save_invstd, "save_invstd", saved, op);
  check_from_output(from_output, activation, activation_param, op);
}

// The fused training backward's arguments (batch_norm_backward, the masked one).
inline void check_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean,
    const at::Tensor& save_invstd,
    const char* op) {
  check_backward_common(grad_out, input, save_mean, "save_mean", save_invstd, "save_invstd", op);
  check_optional_channel_vector(weight, "weight", input, op);
}

// Masked batch norm's input (N, C, L) and mask: bool (N, L) on the input's device.
inline void check_mask_args(const at::Tensor& input, const at::Tensor& mask, const char* op) {
  check_input(input, op);
  TORCH_CHECK(input.dim() == 3, op, ": input must be (N, C, L) with a mask, got ", input.dim(), "D input of shape ",
      input.sizes());
  TORCH_CHECK(mask.defined() && mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ",
      mask.defined() ? c10::toString(mask.scalar_type()) : "an undefined tensor");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == input.size(0) && mask.size(1) == input.size(2), op,
      ": mask must have shape (N, L) = [", input.size(0), ", ", input.size(2), "], got ", mask.sizes());
  TORCH_CHECK(mask.device() == input.device(), op, ": mask must be on the input's device ", input.device(), ", got ",
      mask.device());
}

}  // namespace bnext
