// bnext::_batch_norm_train: the eager training forward of bnext.batch_norm and the modules in one
// call from Python (normalization with the batch statistics, autograd node, running statistics,
// a module's num_batches_tracked);
// bnext::_batch_norm_eval: their eager inference (eval, nothing requires grad) in one call.
//
// It computes exactly what the Python path does (bnext/functional.py: BatchNormFunction, then
// _update_running_stats) with the same ops in the same order, so both give the same bits. What it
// saves is per-call cost: on a small layer ((8, 64, 8, 8) float32, two threads) the Python
// autograd.Function and the running-statistics update took about 35 us around a 14 us kernel.
//
// Device independent (CompositeImplicitAutograd): the statistics and normalization run in the
// bnext ops of the input's device, called through the dispatcher. Used only in eager mode; under
// torch.compile, and with emulated CUDA kernels, the Python path runs (see functional.py).
// Arguments are checked by the Python caller (bnext.functional.batch_norm_impl) and by the ops,
// before anything is written: the running statistics change only after the kernels succeeded.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/checks.h"

namespace bnext {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, double)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnext::batch_norm_forward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                 const Tensor&, const OptTensor&, const OptTensor&, double)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&)>& stats_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnext::batch_norm_stats", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnext::batch_norm_backward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&)>();
  return op;
}

const c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>&
backward_reduce_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnext::batch_norm_backward_reduce", "")
                             .typed<std::tuple<Tensor, Tensor>(
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  return op;
}

const c10::TypedOperatorHandle<Tensor(
    const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&)>&
elemt_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnext::batch_norm_elemt", "")
                             .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&)>();
  return op;
}

OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// a * b per channel (a alone when b is null) in a's type, rounded to `dtype`: what a * b and
// .to(dtype) give, on the host, for the CPU tensors of a first-order backward (the ATen ops cost
// about 2 us each; bfloat16 parameters need up to three of them per call). a and b are the
// contiguous per-channel outputs of the bnext ops.
Tensor channel_values(const Tensor& a, const Tensor* b, at::ScalarType dtype) {
  const int64_t C = a.numel();
  Tensor out = at::empty({C}, a.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bnext_channel_values", [&] {
    using acc_t = scalar_t;
    const Tensor a_c = a.contiguous();
    const Tensor b_c = b ? b->to(a.scalar_type()).contiguous() : Tensor();
    const acc_t* ap = a_c.const_data_ptr<acc_t>();
    const acc_t* bp = b ? b_c.const_data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bnext_channel_values_out", [&] {
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        op[c] = static_cast<scalar_t>(bp ? ap[c] * bp[c] : ap[c]);
      }
    });
  });
  return out;
}

// BatchNormFunction (bnext/autograd.py), training branch, in C++.
struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
    // Function::apply only turns grad mode off; going below autograd also skips the op's Python
    // autograd kernel, which would only re-dispatch (about 20 us a call).
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, save_mean, save_invstd, save_var] = forward_op().call(input, weight, bias, eps);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
    ctx->saved_data["bias_dtype"] = bias && bias->defined() ? c10::IValue(static_cast<int64_t>(bias->scalar_type())) : c10::IValue();
    ctx->save_for_backward({input, weight.value_or(Tensor()), save_mean, save_invstd});
    ctx->mark_non_differentiable({save_mean, save_var});
    return {output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // needs_input_grad counts the tensor arguments that were given (None weight/bias are not).
    const bool has_weight = ctx->saved_data["has_weight"].toBool();
    const bool has_bias = !ctx->saved_data["bias_dtype"].isNone();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_weight && ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    Tensor grad_out = grads[0];
    if (!grad_out.defined() || !(need_x || need_w || need_b)) {
      return {Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const OptTensor weight = opt(saved[1]);
    Tensor mean = saved[2], invstd = saved[3];
    if (grad_out.scalar_type() != input.scalar_type()) {
      grad_out = grad_out.to(input.scalar_type());
    }
    const bool create_graph = at::GradMode::is_enabled();
    // First order: the ops below their (Python) autograd kernels, which would only re-dispatch.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!create_graph) {
      below.emplace();
    } else {
      // Double backward: statistics recomputed with the differentiable ops, so second derivatives
      // flow through mean and invstd (as in BatchNormFunction._backward).
      Tensor var;
      std::tie(mean, var) = stats_op().call(input);
      invstd = at::rsqrt(var + ctx->saved_data["eps"].toDouble());
    }
    Tensor grad_input, sum_dy, sum_dy_xmu;
    if (need_x) {
      std::tie(grad_input, sum_dy, sum_dy_xmu) = backward_op().call(grad_out, input, weight, mean, invstd);
    } else {
      std::tie(sum_dy, sum_dy_xmu) = backward_reduce_op().call(grad_out, input, mean, invstd);
    }
    Tensor grad_weight, grad_bias;
    const bool host = !create_graph && input.device().is_cpu();
    if (need_w) {
      if (host) {
        grad_weight = channel_values(sum_dy_xmu, &invstd, weight->scalar_type());
      } else {
        grad_weight = sum_dy_xmu * invstd;
        if (grad_weight.scalar_type() != weight->scalar_type()) {
          grad_weight = grad_weight.to(weight->scalar_type());
        }
      }
    }
    if (need_b) {
      const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
      if (sum_dy.scalar_type() == bias_dtype) {
        grad_bias = sum_dy;
      } else {
        grad_bias = host ? channel_values(sum_dy, nullptr, bias_dtype) : sum_dy.to(bias_dtype);
      }
    }
    return {grad_input, grad_weight, grad_bias, Tensor()};
  }
};

// _blend_ of bnext/functional.py: running + momentum * (batch * scale - running), in place.
void blend(Tensor& running, Tensor batch, double momentum, double scale) {
  if (scale != 1.0) {
    batch = batch * scale;
  }
  if (batch.scalar_type() != running.scalar_type()) {
    batch = batch.to(running.scalar_type());
  }
  running.lerp_(batch, momentum);
}

// The same update for CPU tensors, on the host: batch * scale in the batch's type (as the tensor
// times a Python float rounds it), rounded to the running statistic's dtype, then lerp in that
// dtype's opmath type with one fma, as ATen's vectorized lerp_ computes it (tests/test_eager_path.py
// checks the bits against the Python path). The ATen ops above are three to five calls of 1-3.5 us
// each, most of a small layer's per-call cost next to its kernel.
template <typename run_t, typename acc_t>
void blend_values(run_t* r, int64_t stride, const acc_t* batch, int64_t C, double momentum, double scale) {
  using opmath_t = at::opmath_type<run_t>;
  const acc_t s = static_cast<acc_t>(scale);
  const opmath_t w = static_cast<opmath_t>(momentum);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t b = scale != 1.0 ? batch[c] * s : batch[c];
    run_t& v = r[c * stride];
    const opmath_t self = static_cast<opmath_t>(v), end = static_cast<opmath_t>(static_cast<run_t>(b));
    v = static_cast<run_t>(
        std::abs(w) < opmath_t(0.5) ? std::fma(w, end - self, self) : std::fma(w - opmath_t(1), end - self, end));
  }
}

void blend_cpu(Tensor& running, const Tensor& batch, double momentum, double scale) {
  const int64_t C = running.numel();
  const int64_t stride = C > 1 ? running.stride(0) : 1;
  const Tensor b = batch.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bnext_blend", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "bnext_blend_batch", [&] {
      blend_values<run_t, scalar_t>(running.mutable_data_ptr<run_t>(), stride, b.const_data_ptr<scalar_t>(), C, momentum, scale);
    });
  });
  // Written through its pointer: bump the version as the in-place op would (autograd's saved-
  // tensor checks compare it). Inference tensors have no version counter.
  if (!running.is_inference()) {
    torch::autograd::impl::bump_version(running);
  }
}

void update_running(Tensor& running, const Tensor& batch, double momentum, double scale) {
  if (running.device().is_cpu() && batch.device().is_cpu()) {
    blend_cpu(running, batch, momentum, scale);
  } else {
    blend(running, batch, momentum, scale);
  }
}

// Checked before anything runs, so that an update cannot fail half way, and so that mixed devices
// never reach the dispatcher (a meta weight with a CPU input would pick the meta kernel, which
// checks nothing). The Python caller words the error: it re-runs its own checks when an op raises.
void check_args(
    const char* op,
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must have at least 2 dimensions");
  for (const OptTensor* t : {&weight, &bias}) {
    TORCH_CHECK(
        !*t || !(*t)->defined() || (*t)->device() == input.device(), op,
        ": weight and bias must be on the input's device");
  }
  for (const OptTensor* t : {&running_mean, &running_var}) {
    if (*t) {
      check_running_stat(**t, input, op);
    }
  }
}

// num_batches_tracked += 1, as the module's num_batches_tracked.add_(1) does: a CPU int64 count on
// the host (the ATen op cost about 3.6 us a call, a tenth of a small layer's training forward).
void count_batch(Tensor& n) {
  if (n.device().is_cpu() && n.scalar_type() == at::kLong && n.numel() == 1) {
    *n.mutable_data_ptr<int64_t>() += 1;
    if (!n.is_inference()) {
      torch::autograd::impl::bump_version(n);
    }
  } else {
    at::NoGradGuard no_grad;
    n.add_(1);
  }
}

Tensor batch_norm_train(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    OptTensor running_mean,
    OptTensor running_var,
    double momentum,
    double eps,
    OptTensor num_batches_tracked) {
  check_args("bnext._batch_norm_train", input, weight, bias, running_mean, running_var);
  auto outs = TrainFunction::apply(input, weight, bias, eps);
  if (running_mean || running_var) {
    at::NoGradGuard no_grad;
    const int64_t count = input.numel() / input.size(1);
    if (running_mean) {
      update_running(*running_mean, outs[1], momentum, 1.0);
    }
    if (running_var) {
      update_running(*running_var, outs[2], momentum, count > 1 ? static_cast<double>(count) / (count - 1) : 1.0);
    }
  }
  if (num_batches_tracked && num_batches_tracked->defined()) {
    count_batch(*num_batches_tracked);
  }
  return outs[0];
}

// Inference with the running statistics (bnext.batch_norm's eval branch when nothing requires
// grad): mean and invstd = rsqrt(running_var + eps) in the accumulation type, folded into
// out = x * scale + shift (scale = invstd * weight, shift = bias - mean * scale), then the
// normalization with mean 0, invstd = scale and no weight, exactly as the Python path does.
Tensor batch_norm_eval(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const Tensor& running_mean,
    const Tensor& running_var,
    double eps) {
  check_args("bnext._batch_norm_eval", input, weight, bias, running_mean, running_var);
  const auto acc = acc_dtype(input.scalar_type());
  const Tensor mean = running_mean.detach().to(acc);
  const Tensor invstd = at::rsqrt(running_var.detach().to(acc) + eps);
  const Tensor scale = weight.has_value() && weight->defined() ? invstd * weight->detach().to(acc) : invstd;
  const Tensor shift = bias.has_value() && bias->defined() ? bias->detach().to(acc) - mean * scale : -(mean * scale);
  at::AutoDispatchBelowADInplaceOrView below;  // nothing to record: skip the op's autograd kernel
  return elemt_op().call(input, c10::nullopt, shift, at::zeros_like(scale), scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CompositeImplicitAutograd, m) {
  m.impl("_batch_norm_train", &batch_norm_train);
}

// Inference only (the Python caller uses it when nothing requires grad), so a backend kernel with
// no autograd formula: this device-generic one, and a CPU one that folds invstd into the
// coefficients (csrc/cpu/batch_norm_cpu.cpp).
TORCH_LIBRARY_IMPL(bnext, CompositeExplicitAutograd, m) {
  m.impl("_batch_norm_eval", &batch_norm_eval);
}

}  // namespace bnext
