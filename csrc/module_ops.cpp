// The ops behind bnext.batch_norm and the modules, beside the functional kernels (schemas in
// csrc/ops.cpp):
//   _check_batch_norm_args  every argument rule of bnext.batch_norm (common/checks.h), as an op, so
//                           that the composed path (torch.compile, torch.func, forward AD, emulated
//                           kernels) raises what the eager call raises;
//   update_running_stats    the running-statistics rule (momentum blend or cumulative average,
//                           unbiased variance, num_batches_tracked), computed here and nowhere else;
//   _batch_norm_train       the eager training call: checks, the fused forward under a C++ autograd
//                           node, the update, in one call from Python;
//   _batch_norm_act_train   the same for the fused BN + activation (+ residual) layers;
//   _batch_norm_infer       the eager inference call: batch_norm_eval below autograd (the Python
//                           layer calls it only where nothing requires grad or grad mode is off);
//   batch_norm_eval         for CUDA tensors (common/eval.h; the CPU entry is in cpu/).
//
// The eager call computes what the composed path computes (bnext/functional.py: batch_norm_forward,
// then update_running_stats) with the same kernels, so both give the same bits. What it saves is
// per-call cost: on a small layer the Python autograd wrapper and the update took longer than the
// kernel (see docs/performance.md#per-call-cost). It is device independent
// (CompositeImplicitAutograd): the kernels run in the bnext ops of the input's device, called
// through the dispatcher. Arguments are checked before anything is written: the running
// statistics change only after the kernels succeeded.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "common/checks.h"
#include "common/eval.h"
#include "common/prepare.h"

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

OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

bool given(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// a * b per channel (a alone when b is null) in a's type, rounded to `dtype`: what a * b and
// .to(dtype) give, on the host, for the CPU tensors of a first-order backward (each ATen op is a
// dispatcher call, and bfloat16 parameters need up to three of them per call; see
// docs/performance.md#per-call-cost). a and b are the contiguous per-channel outputs of the bnext
// ops.
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

// What both training nodes' backward do first: grad_out in the input's dtype; and in a double
// backward (grad mode on: create_graph), the statistics recomputed with the differentiable ops, so
// second derivatives flow through mean and invstd. Returns whether it is a double backward.
bool prepare_backward(AutogradContext* ctx, const Tensor& input, Tensor& grad_out, Tensor& mean, Tensor& invstd) {
  if (grad_out.scalar_type() != input.scalar_type()) {
    grad_out = grad_out.to(input.scalar_type());
  }
  const bool create_graph = at::GradMode::is_enabled();
  if (create_graph) {
    Tensor var;
    std::tie(mean, var) = stats_op().call(input);
    invstd = at::rsqrt(var + ctx->saved_data["eps"].toDouble());
  }
  return create_graph;
}

// The parameters' gradients from the backward's per-channel sums: grad_weight = sum_dy_xmu * invstd
// and grad_bias = sum_dy, each in its parameter's dtype; undefined where its dtype is not given (no
// gradient asked for).
std::pair<Tensor, Tensor> param_grads(
    const Tensor& sum_dy, const Tensor& sum_dy_xmu, const Tensor& invstd, std::optional<at::ScalarType> weight_dtype,
    std::optional<at::ScalarType> bias_dtype, bool create_graph) {
  // The host loop reads raw memory: plain CPU tensors of a first-order backward only (grads batched
  // by vmap, as in autograd.grad(is_grads_batched=True), and tensor subclasses take the ATen ops).
  const bool host = !create_graph && sum_dy.device().is_cpu() && !at::areAnyTensorSubclassLike({sum_dy, sum_dy_xmu, invstd});
  Tensor grad_weight, grad_bias;
  if (weight_dtype) {
    if (host) {
      grad_weight = channel_values(sum_dy_xmu, &invstd, *weight_dtype);
    } else {
      grad_weight = sum_dy_xmu * invstd;
      if (grad_weight.scalar_type() != *weight_dtype) {
        grad_weight = grad_weight.to(*weight_dtype);
      }
    }
  }
  if (bias_dtype) {
    if (sum_dy.scalar_type() == *bias_dtype) {
      grad_bias = sum_dy;
    } else {
      grad_bias = host ? channel_values(sum_dy, nullptr, *bias_dtype) : sum_dy.to(*bias_dtype);
    }
  }
  return {grad_weight, grad_bias};
}

// The autograd formula of batch_norm_forward (bnext/_ops/autograd.py), for the output alone, in C++.
struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps) {
    // Function::apply only turns grad mode off; going below autograd also skips the op's Python
    // autograd kernel, which would only re-dispatch (see docs/performance.md#per-call-cost).
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
    const bool create_graph = prepare_backward(ctx, input, grad_out, mean, invstd);
    // First order: the ops below their (Python) autograd kernels, which would only re-dispatch.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!create_graph) {
      below.emplace();
    }
    Tensor grad_input, sum_dy, sum_dy_xmu;
    if (need_x) {
      std::tie(grad_input, sum_dy, sum_dy_xmu) = backward_op().call(grad_out, input, weight, mean, invstd);
    } else {
      std::tie(sum_dy, sum_dy_xmu) = backward_reduce_op().call(grad_out, input, mean, invstd);
    }
    const auto [grad_weight, grad_bias] = param_grads(
        sum_dy, sum_dy_xmu, invstd, need_w ? std::optional(weight->scalar_type()) : std::nullopt,
        need_b ? std::optional(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt())) : std::nullopt,
        create_graph);
    return {grad_input, grad_weight, grad_bias, Tensor()};
  }
};

using ActForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, int64_t, double);
using ActBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
    int64_t, double, bool);

const c10::TypedOperatorHandle<ActForwardSig>& act_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnext::batch_norm_act_forward", "").typed<ActForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<ActBackwardSig>& act_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnext::batch_norm_act_backward", "").typed<ActBackwardSig>();
  return op;
}

// The autograd formula of batch_norm_act_forward (bnext/_ops/fused.py: _forward_setup,
// _forward_backward), for the output alone, in C++: the eager training call of BatchNormAct and
// fuse_model's layers, where the Python autograd kernel and Function cost more per call than a small
// layer's kernels (see docs/performance.md#per-call-cost). Same kernels, same bits.
struct ActTrainFunction : public torch::autograd::Function<ActTrainFunction> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& residual, double eps, int64_t activation, double param) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, save_mean, save_invstd, save_var] =
        act_forward_op().call(input, weight, bias, residual, eps, activation, param);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["param"] = param;
    ctx->saved_data["weight_dtype"] = given(weight) ? c10::IValue(static_cast<int64_t>(weight->scalar_type())) : c10::IValue();
    ctx->saved_data["bias_dtype"] = given(bias) ? c10::IValue(static_cast<int64_t>(bias->scalar_type())) : c10::IValue();
    ctx->saved_data["has_residual"] = given(residual);
    ctx->save_for_backward(
        {input, weight.value_or(Tensor()), bias.value_or(Tensor()), residual.value_or(Tensor()), save_mean, save_invstd});
    ctx->mark_non_differentiable({save_mean, save_var});
    return {output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // needs_input_grad counts the tensor arguments that were given (None ones are not).
    const bool has_weight = !ctx->saved_data["weight_dtype"].isNone();
    const bool has_bias = !ctx->saved_data["bias_dtype"].isNone();
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const size_t i_bias = has_weight ? 2 : 1, i_residual = i_bias + (has_bias ? 1 : 0);
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = has_weight && ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(i_bias);
    const bool need_r = has_residual && ctx->needs_input_grad(i_residual);
    variable_list none(7);
    Tensor grad_out = grads[0];
    if (!grad_out.defined() || !(need_x || need_w || need_b || need_r)) {
      return none;
    }
    const auto saved = ctx->get_saved_variables();
    const Tensor& input = saved[0];
    const OptTensor weight = opt(saved[1]), bias = opt(saved[2]), residual = opt(saved[3]);
    Tensor mean = saved[4], invstd = saved[5];
    const bool create_graph = prepare_backward(ctx, input, grad_out, mean, invstd);
    // First order: the backward kernel below its (Python) autograd kernel. Double backward: the
    // backward op through its autograd kernel (its composite, differentiable).
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!create_graph) {
      below.emplace();
    }
    auto [grad_input, grad_residual, sum_dz, sum_dz_xmu] = act_backward_op().call(
        grad_out, input, residual, weight, bias, mean, invstd, ctx->saved_data["activation"].toInt(),
        ctx->saved_data["param"].toDouble(), false);
    const auto dtype = [&](const char* key) {
      return std::optional(static_cast<at::ScalarType>(ctx->saved_data[key].toInt()));
    };
    const auto [grad_weight, grad_bias] = param_grads(
        sum_dz, sum_dz_xmu, invstd, need_w ? dtype("weight_dtype") : std::nullopt,
        need_b ? dtype("bias_dtype") : std::nullopt, create_graph);
    return {need_x ? grad_input : Tensor(), grad_weight, grad_bias, need_r ? grad_residual : Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

// running + momentum * (batch * scale - running), in place: batch * scale (the unbiased variance)
// in the batch's type, rounded to the running statistic's dtype, then lerp.
void blend(Tensor& running, Tensor batch, double momentum, double scale) {
  if (scale != 1.0) {
    batch = batch * scale;
  }
  if (batch.scalar_type() != running.scalar_type()) {
    batch = batch.to(running.scalar_type());
  }
  running.lerp_(batch, momentum);
}

// The same update for plain CPU tensors, on the host: batch * scale in the batch's type (as the
// tensor times a Python float rounds it), rounded to the running statistic's dtype, then lerp in
// that dtype's opmath type with one fma, as ATen's vectorized lerp_ computes it
// (tests/test_eager_path.py checks the bits against the ATen ops). The ATen ops are three to five
// dispatcher calls, most of a small layer's per-call cost next to its kernel (see
// docs/performance.md#per-call-cost).
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

// Plain dense tensors on the CPU, which the host loops may read and write through raw pointers
// (not meta, fake or functorch-wrapped tensors, not subclasses).
bool plain_cpu(const Tensor& t) {
  return t.device().is_cpu() && !at::isTensorSubclassLike(t) && t.has_storage();
}

void update_running(Tensor running, const Tensor& batch, double momentum, double scale) {
  if (running.dim() != 1) {
    running = running.view({-1});
  }
  if (plain_cpu(running) && plain_cpu(batch) && running.dim() == 1) {
    blend_cpu(running, batch, momentum, scale);
  } else {
    blend(running, batch, momentum, scale);
  }
}

// num_batches_tracked += 1: a plain CPU int64 count on the host (the ATen op is a dispatcher call,
// a visible part of a small layer's training forward; see docs/performance.md#per-call-cost).
void count_batch(Tensor& n) {
  if (plain_cpu(n) && n.scalar_type() == at::kLong && n.numel() == 1) {
    *n.mutable_data_ptr<int64_t>() += 1;
    if (!n.is_inference()) {
      torch::autograd::impl::bump_version(n);
    }
  } else {
    at::NoGradGuard no_grad;
    n.add_(1);
  }
}

// torch's rule: num_batches_tracked += 1 (when given), then
//   running = (1 - factor) * running + factor * batch   (unbiased variance)
// with factor = momentum, or 1 / num_batches_tracked when momentum is None (the cumulative average;
// 0 without a count, which leaves the statistics as they are, as torch's modules do).
void update_running_stats(
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    const Tensor& mean,
    const Tensor& var,
    int64_t count,
    std::optional<double> momentum) {
  const char* op = "bnext.update_running_stats";
  for (const auto& [t, name] : {std::pair{&running_mean, "running_mean"}, std::pair{&running_var, "running_var"}}) {
    if (given(*t)) {
      TORCH_CHECK(
          (*t)->numel() == mean.numel() && (*t)->is_floating_point(), op, ": ", name, " must be a floating-point tensor of ",
          mean.numel(), " elements (the batch statistics' size), got ", (*t)->scalar_type(), " of shape ", (*t)->sizes());
    }
  }
  at::NoGradGuard no_grad;
  double factor = momentum.value_or(0.0);
  if (given(num_batches_tracked)) {
    Tensor n = *num_batches_tracked;
    count_batch(n);
    if (!momentum.has_value()) {
      // A host read, as torch's modules do (1.0 / float(num_batches_tracked)); inside a compiled
      // graph this op runs on real tensors, so the graph itself never reads the count.
      factor = 1.0 / static_cast<double>(n.item<int64_t>());
    }
  }
  if (given(running_mean)) {
    update_running(*running_mean, mean, factor, 1.0);
  }
  if (given(running_var)) {
    update_running(*running_var, var, factor, count > 1 ? static_cast<double>(count) / (count - 1) : 1.0);
  }
}

// Ghost batch norm's chunks (bnext/ghost.py) taken into the running statistics: update_running_stats
// once per chunk, in order, with that chunk's mean and biased variance (rows of the (G, C) mean and
// var) and count of values per channel (`count` for each but the last chunk, `last_count` for it),
// as the chunks going through batch norm one after another update them.
void update_running_stats_chunks(
    const OptTensor& running_mean,
    const OptTensor& running_var,
    const OptTensor& num_batches_tracked,
    const Tensor& mean,
    const Tensor& var,
    int64_t count,
    int64_t last_count,
    std::optional<double> momentum) {
  const char* op = "bnext._update_running_stats_chunks";
  TORCH_CHECK(
      mean.dim() == 2 && var.sizes() == mean.sizes(), op, ": mean and var must be (chunks, C) tensors of one shape, got ",
      mean.sizes(), " and ", var.sizes());
  const int64_t G = mean.size(0);
  for (int64_t g = 0; g < G; ++g) {
    update_running_stats(
        running_mean, running_var, num_batches_tracked, mean.select(0, g), var.select(0, g),
        g + 1 < G ? count : last_count, momentum);
  }
}

void check_batch_norm_args_op(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    bool training,
    double eps,
    bool check_count) {
  check_batch_norm_args("bnext.batch_norm", input, weight, bias, running_mean, running_var, training, eps, check_count);
}

// The running statistics after a training forward: outs = (output, batch mean, biased batch var).
void update_after_train(
    const Tensor& input, const variable_list& outs, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum) {
  const int64_t count = input.numel() / input.size(1);
  if (at::areAnyTensorSubclassLike({input, outs[1], outs[2]})) {
    // A tensor subclass sees the update as the one op it is (as torch's native batch norm's is one
    // op), not as in-place ATen steps on tensors it does not own.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("bnext::update_running_stats", "")
                               .typed<void(
                                   const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                   int64_t, std::optional<double>)>();
    op.call(running_mean, running_var, num_batches_tracked, outs[1], outs[2], count, momentum);
  } else {
    update_running_stats(running_mean, running_var, num_batches_tracked, outs[1], outs[2], count, momentum);
  }
}

Tensor batch_norm_train(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    std::optional<double> momentum,
    double eps,
    const OptTensor& num_batches_tracked) {
  check_batch_norm_args("bnext.batch_norm", input, weight, bias, running_mean, running_var, true, eps);
  auto outs = TrainFunction::apply(input, flat_channels(weight), flat_channels(bias), eps);
  update_after_train(input, outs, running_mean, running_var, num_batches_tracked, momentum);
  return outs[0];
}

// The eager training call of the fused BN + activation (+ residual) layers (bnext/functional.py
// batch_norm_act_impl): batch_norm_train's checks and update around ActTrainFunction.
Tensor batch_norm_act_train(
    const Tensor& input,
    const OptTensor& weight,
    const OptTensor& bias,
    const OptTensor& running_mean,
    const OptTensor& running_var,
    std::optional<double> momentum,
    double eps,
    const OptTensor& num_batches_tracked,
    const OptTensor& residual,
    int64_t activation,
    double activation_param) {
  check_batch_norm_args("bnext.batch_norm", input, weight, bias, running_mean, running_var, true, eps);
  auto outs = ActTrainFunction::apply(
      input, flat_channels(weight), flat_channels(bias), residual, eps, activation, activation_param);
  update_after_train(input, outs, running_mean, running_var, num_batches_tracked, momentum);
  return outs[0];
}

// Inference with nothing to record: batch_norm_eval's (Python) autograd kernel would only pass
// the call on, at the cost of a Python frame; the guard here skips it in C++, where a Python
// context manager around the call cost more than the rest of the Python layer on a small layer.
Tensor batch_norm_infer(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bnext::batch_norm_eval", "")
          .typed<Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double)>();
  at::AutoDispatchBelowAutograd guard;
  return op.call(input, weight, bias, running_mean, running_var, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CompositeImplicitAutograd, m) {
  m.impl("_batch_norm_train", &batch_norm_train);
  m.impl("_batch_norm_act_train", &batch_norm_act_train);
  m.impl("_batch_norm_infer", &batch_norm_infer);
}

TORCH_LIBRARY_IMPL(bnext, CompositeExplicitAutograd, m) {
  m.impl("_check_batch_norm_args", &check_batch_norm_args_op);
}

// A device-generic update; the meta/fake one (nothing to compute) is registered from Python.
TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("update_running_stats", &update_running_stats);
  m.impl("_update_running_stats_chunks", &update_running_stats_chunks);
}

#ifdef BNEXT_WITH_CUDA
TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  m.impl("update_running_stats", &update_running_stats);
  m.impl(
      "batch_norm_eval",
      [](const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
         const OptTensor& running_var, double eps) {
        static const auto elemt = find_elemt_op("bnext");
        return batch_norm_eval_generic(elemt, input, weight, bias, running_mean, running_var, eps);
      });
}
#endif

// Neither op has anything to differentiate: the statistics are constants of the graph (as in
// torch) and the checks return nothing. Autograd (and torch.func's grad and jvp) pass them through.
TORCH_LIBRARY_IMPL(bnext, Autograd, m) {
  m.impl("update_running_stats", torch::CppFunction::makeFallthrough());
  m.impl("_update_running_stats_chunks", torch::CppFunction::makeFallthrough());
  m.impl("_check_batch_norm_args", torch::CppFunction::makeFallthrough());
}

}  // namespace bnext
