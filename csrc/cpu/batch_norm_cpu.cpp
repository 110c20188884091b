// CPU entries of every bnext op: argument checks, memory format, allocation, dtype dispatch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/prepare.h"
#include "../common/math.h"
#include "acc_channels.h"
#include "kernels.h"

namespace bnext {
namespace {

using at::Tensor;

#define BNEXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)


std::tuple<Tensor, Tensor> batch_norm_stats_cpu(const Tensor& input) {
  const char* op = "bnext.batch_norm_stats";
  check_input(input, op);
  const auto p = prepare(input);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor mean = at::empty({p.layout.C}, opts);
  Tensor var = at::empty({p.layout.C}, opts);
  cpu::kernels().stats(input.scalar_type(), p.x.const_data_ptr(), p.layout, mean.data_ptr(), var.data_ptr());
  return {mean, var};
}

// The residual contiguous in the input's chosen memory format (undefined where absent).
Tensor residual_like(const c10::optional<Tensor>& residual, const Prepared& p) {
  return residual.has_value() && residual->defined() ? residual->contiguous(p.fmt) : Tensor();
}

const void* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

// The fused ops' activation epilogue of normalize_cpu: out = act(normalized + residual).
struct ActEpilogue {
  c10::optional<Tensor> residual;
  int64_t act;
  double param;
};

// out = (x - mean[c]) * invstd * weight[c] + bias[c], the per-channel coefficients folded once,
// with invstd = to_invstd(spread[c]) in the accumulation type: the invstd itself (elemt) or the
// running variance it comes from (eval). Arguments checked by the caller.
// fold_mean (eval): out = x * scale[c] + shift[c] with scale = invstd * weight and shift = bias -
// mean * scale (-(mean * scale) without bias), torch's own eval formula: one multiply-add per
// value instead of a subtraction and a multiply-add, and no pivot vectors in the channels_last
// passes. Its error grows with |mean| / std as torch's does; the training paths keep x - mean
// unfolded. bnext.batch_norm's other eval paths (Python, autograd, device-generic) compute the
// same two coefficients with the same operations and pass them to batch_norm_elemt as mean 0,
// invstd = scale, no weight and bias = shift, which gives these coefficients again: every eval
// path gives the same bits. The fused eval op passes its epilogue (act(out + residual), one pass).
template <typename ToInvstd>
Tensor normalize_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& spread,
    const ToInvstd& to_invstd,
    bool fold_mean,
    const ActEpilogue* epilogue = nullptr) {
  const auto p = prepare(input);
  Tensor out = at::empty_like(p.x, p.fmt);
  BNEXT_DISPATCH(input.scalar_type(), "bnext_normalize_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t C = p.layout.C;
    const AccChannels<acc_t> w(weight, C, 1), b(bias, C, 0), m(mean, C), v(spread, C);
    const acc_t *wp = w.get(), *bp = b.get(), *mp = m.get(), *vp = v.get();
    std::vector<acc_t> pivot(C), scale(C), shift(C);
    const bool has_bias = bias.has_value() && bias->defined();
    for (int64_t c = 0; c < C; ++c) {
      const acc_t invstd = static_cast<acc_t>(to_invstd(vp[c]));
      NormalizeCoeffs<acc_t> k;
      if (fold_mean) {
        const acc_t sc = invstd * wp[c];
        k = normalize_coeffs(acc_t(0), acc_t(1), sc, has_bias ? bp[c] - mp[c] * sc : -(mp[c] * sc));
      } else {
        k = normalize_coeffs(mp[c], invstd, wp[c], bp[c]);
      }
      pivot[c] = k.pivot;
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
    if (epilogue != nullptr) {
      cpu::kernels().act_affine(
          input.scalar_type(), p.x.const_data_ptr(), data_or_null(residual_like(epilogue->residual, p)),
          out.data_ptr(), p.layout, pivot.data(), scale.data(), shift.data(), epilogue->act, epilogue->param);
      return;
    }
    cpu::kernels().affine(
        input.scalar_type(), p.x.const_data_ptr(), out.data_ptr(), p.layout, pivot.data(), scale.data(), shift.data());
  });
  return out;
}

Tensor batch_norm_elemt_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& invstd) {
  check_elemt_args(input, weight, bias, mean, invstd, "bnext.batch_norm_elemt");
  return normalize_cpu(input, weight, bias, mean, invstd, [](auto s) { return s; }, false);
}

// The eval ops' normalization: torch's folded coefficients (see normalize_cpu), then the fused
// ops' epilogue where given.
Tensor eval_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    double eps,
    const ActEpilogue* epilogue) {
  return normalize_cpu(input, flat_channels(weight), flat_channels(bias), *flat_channels(running_mean),
      *flat_channels(running_var), [eps](auto v) {
    using acc_t = decltype(v);
    return acc_t(1) / std::sqrt(v + static_cast<acc_t>(eps));
  }, true, epilogue);
}

// bnext::batch_norm_eval without the small ops of the device-generic version (csrc/common/eval.h):
// invstd = 1 / sqrt(running_var + eps) in the accumulation type (as torch.rsqrt(var + eps) rounds
// it) goes straight into the coefficients.
Tensor batch_norm_eval_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    double eps) {
  check_batch_norm_args("bnext.batch_norm_eval", input, weight, bias, running_mean, running_var, false, eps);
  if (input.sym_numel() == 0) {
    return input.clone();
  }
  return eval_cpu(input, weight, bias, running_mean, running_var, eps, nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext.batch_norm_forward";
  check_forward_args(input, weight, bias, eps, op);
  const auto p = prepare(input);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor out = at::empty_like(p.x, p.fmt);
  Tensor mean = at::empty({p.layout.C}, opts);
  Tensor invstd = at::empty({p.layout.C}, opts);
  Tensor var = at::empty({p.layout.C}, opts);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_forward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const AccChannels<acc_t> w(weight, p.layout.C, 1), b(bias, p.layout.C, 0);
    cpu::kernels().forward(
        input.scalar_type(), p.x.const_data_ptr(), out.data_ptr(), p.layout, w.get(), b.get(), eps, mean.data_ptr(),
        invstd.data_ptr(), var.data_ptr());
  });
  return {out, mean, invstd, var};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd) {
  const char* op = "bnext.batch_norm_backward_reduce";
  check_backward_common(grad_out, input, mean, "mean", invstd, "invstd", op);
  const auto p = prepare(input);
  const Tensor dy = grad_out.contiguous(p.fmt);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor sum_dy = at::empty({p.layout.C}, opts);
  Tensor sum_dy_xmu = at::empty({p.layout.C}, opts);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_reduce_cpu", [&] {
    const AccChannels<acc_type_t<scalar_t>> m(mean, p.layout.C);
    cpu::kernels().backward_reduce(
        input.scalar_type(), dy.const_data_ptr(), p.x.const_data_ptr(), p.layout, m.get(), sum_dy.data_ptr(),
        sum_dy_xmu.data_ptr());
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const c10::optional<Tensor>& weight,
    const Tensor& mean_dy,
    const Tensor& mean_dy_xmu) {
  const char* op = "bnext.batch_norm_backward_elemt";
  check_backward_elemt_args(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu, op);
  const auto p = prepare(input);
  const Tensor dy = grad_out.contiguous(p.fmt);
  Tensor dx = at::empty_like(p.x, p.fmt);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_elemt_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t C = p.layout.C;
    const AccChannels<acc_t> w(weight, C, 1), m(mean, C), s(invstd, C), mdy(mean_dy, C), mdxm(mean_dy_xmu, C);
    std::vector<BackwardCoeffs<acc_t>> coeffs(C);
    const acc_t* mp = m.get();
    const acc_t* sp = s.get();
    const acc_t* wp = w.get();
    const acc_t* mdyp = mdy.get();
    const acc_t* mdxmp = mdxm.get();
    for (int64_t c = 0; c < C; ++c) {
      coeffs[c] = backward_coeffs(mp[c], sp[c], wp[c], mdyp[c], mdxmp[c]);
    }
    cpu::kernels().backward_elemt(
        input.scalar_type(), dy.const_data_ptr(), p.x.const_data_ptr(), dx.data_ptr(), p.layout, coeffs.data());
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd) {
  const char* op = "bnext.batch_norm_backward";
  check_backward_args(grad_out, input, weight, save_mean, save_invstd, op);
  const auto p = prepare(input);
  const Tensor dy = grad_out.contiguous(p.fmt);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor dx = at::empty_like(p.x, p.fmt);
  Tensor sum_dy = at::empty({p.layout.C}, opts);
  Tensor sum_dy_xmu = at::empty({p.layout.C}, opts);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t C = p.layout.C;
    const AccChannels<acc_t> w(weight, C, 1), m(save_mean, C), s(save_invstd, C);
    cpu::kernels().backward(
        input.scalar_type(), dy.const_data_ptr(), p.x.const_data_ptr(), dx.data_ptr(), p.layout, w.get(), m.get(),
        s.get(), sum_dy.data_ptr(), sum_dy_xmu.data_ptr());
  });
  return {dx, sum_dy, sum_dy_xmu};
}

// Ghost batch norm's CPU path (bnext/ghost.py): batch norm of each run of `chunk_rows` consecutive
// samples (the last run holds the rest) with that run's own statistics, G = ceil(N / chunk_rows)
// runs, per-run statistics as (G, C) tensors. N is the outermost dimension of both memory formats,
// so a run is one contiguous block of the input, the output and the gradients: the kernels of
// batch_norm_forward / batch_norm_backward run on each block in place, one after another, with no
// fold of the runs into the channels and no copy, and choose streaming stores by the whole tensor
// (Layout::whole_N). Each run gets the bits those ops give on it alone.
void check_chunk_rows(int64_t chunk_rows, const char* op) {
  TORCH_CHECK_VALUE(chunk_rows >= 1, op, ": chunk_rows must be >= 1 (samples per run), got ", chunk_rows);
}

int64_t chunk_count(int64_t N, int64_t chunk_rows) {
  return (N + chunk_rows - 1) / chunk_rows;
}

// f(g, element offset of run g, layout of run g) for every run in order.
template <class F>
void for_each_chunk(const Layout& layout, int64_t chunk_rows, F&& f) {
  const int64_t G = chunk_count(layout.N, chunk_rows);
  for (int64_t g = 0; g < G; ++g) {
    Layout run = layout;
    run.N = std::min(chunk_rows, layout.N - g * chunk_rows);
    run.whole_N = layout.N;
    f(g, g * chunk_rows * layout.C * layout.HxW, run);
  }
}

// A (G, C) per-run tensor of the accumulation type, contiguous (checked by the caller).
void check_chunk_stats(const Tensor& t, const char* name, int64_t G, const Tensor& input, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
  const int64_t C = input.size(1);
  TORCH_CHECK(
      t.dim() == 2 && t.size(0) == G && t.size(1) == C, op, ": ", name, " must have shape (", G, ", ", C,
      ") (one row per run of chunk_rows samples), got shape ", t.sizes());
  TORCH_CHECK(
      t.scalar_type() == acc_dtype(input.scalar_type()) && t.device() == input.device(), op, ": ", name,
      " must be a ", acc_dtype(input.scalar_type()), " tensor on ", input.device(), ", got ", t.scalar_type(), " on ",
      t.device());
}

template <typename T>
T* at_offset(T* base, int64_t elements, size_t itemsize) {
  using byte_t = std::conditional_t<std::is_const_v<T>, const char, char>;
  return reinterpret_cast<byte_t*>(base) + elements * static_cast<int64_t>(itemsize);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward_chunks_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    double eps,
    int64_t chunk_rows) {
  const char* op = "bnext._batch_norm_forward_chunks";
  check_forward_args(input, weight, bias, eps, op);
  check_chunk_rows(chunk_rows, op);
  const auto p = prepare(input);
  const int64_t C = p.layout.C, G = chunk_count(p.layout.N, chunk_rows);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor out = at::empty_like(p.x, p.fmt);
  Tensor mean = at::empty({G, C}, opts), invstd = at::empty({G, C}, opts), var = at::empty({G, C}, opts);
  const size_t item = p.x.element_size(), acc_item = mean.element_size();
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_forward_chunks_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const AccChannels<acc_t> w(weight, C, 1), b(bias, C, 0);
    for_each_chunk(p.layout, chunk_rows, [&](int64_t g, int64_t offset, const Layout& run) {
      cpu::kernels().forward(
          input.scalar_type(), at_offset(p.x.const_data_ptr(), offset, item), at_offset(out.data_ptr(), offset, item),
          run, w.get(), b.get(), eps, at_offset(mean.data_ptr(), g * C, acc_item),
          at_offset(invstd.data_ptr(), g * C, acc_item), at_offset(var.data_ptr(), g * C, acc_item));
    });
  });
  return {out, mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_chunks_cpu(
    const Tensor& grad_out,
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd,
    int64_t chunk_rows) {
  const char* op = "bnext._batch_norm_backward_chunks";
  check_input(input, op);
  check_like_input(grad_out, "grad_out", input, op);
  check_optional_channel_vector(weight, "weight", input, op);
  check_chunk_rows(chunk_rows, op);
  const int64_t G = chunk_count(input.size(0), chunk_rows), C = input.size(1);
  check_chunk_stats(save_mean, "save_mean", G, input, op);
  check_chunk_stats(save_invstd, "save_invstd", G, input, op);
  const auto p = prepare(input);
  const Tensor dy = grad_out.contiguous(p.fmt);
  const Tensor m = save_mean.contiguous(), s = save_invstd.contiguous();
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor dx = at::empty_like(p.x, p.fmt);
  Tensor sum_dy = at::empty({G, C}, opts), sum_dy_xmu = at::empty({G, C}, opts);
  const size_t item = p.x.element_size(), acc_item = sum_dy.element_size();
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_chunks_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const AccChannels<acc_t> w(weight, C, 1);
    for_each_chunk(p.layout, chunk_rows, [&](int64_t g, int64_t offset, const Layout& run) {
      cpu::kernels().backward(
          input.scalar_type(), at_offset(dy.const_data_ptr(), offset, item), at_offset(p.x.const_data_ptr(), offset, item),
          at_offset(dx.data_ptr(), offset, item), run, w.get(), at_offset(m.const_data_ptr(), g * C, acc_item),
          at_offset(s.const_data_ptr(), g * C, acc_item), at_offset(sum_dy.data_ptr(), g * C, acc_item),
          at_offset(sum_dy_xmu.data_ptr(), g * C, acc_item));
    });
  });
  return {dx, sum_dy, sum_dy_xmu};
}

// Fused BN + activation (+ residual), common/act.h: output = act(BN(input) + residual).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_forward_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual,
    double eps,
    int64_t activation,
    double activation_param) {
  const char* op = "bnext.batch_norm_act_forward";
  check_forward_args(input, weight, bias, eps, op);
  check_optional_residual(residual, input, op);
  check_activation(activation, op);
  const auto p = prepare(input);
  const Tensor r = residual_like(residual, p);
  const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
  Tensor out = at::empty_like(p.x, p.fmt);
  Tensor mean = at::empty({p.layout.C}, opts);
  Tensor invstd = at::empty({p.layout.C}, opts);
  Tensor var = at::empty({p.layout.C}, opts);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_act_forward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const AccChannels<acc_t> w(weight, p.layout.C, 1), b(bias, p.layout.C, 0);
    cpu::kernels().act_forward(
        input.scalar_type(), p.x.const_data_ptr(), data_or_null(r), out.data_ptr(), p.layout, w.get(), b.get(), eps,
        mean.data_ptr(), invstd.data_ptr(), var.data_ptr(), activation, activation_param);
  });
  return {out, mean, invstd, var};
}

Tensor batch_norm_act_eval_cpu(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& residual,
    double eps,
    int64_t activation,
    double activation_param) {
  const char* op = "bnext.batch_norm_act_eval";
  check_batch_norm_args(op, input, weight, bias, running_mean, running_var, false, eps);
  check_optional_residual(residual, input, op);
  check_activation(activation, op);
  if (input.sym_numel() == 0) {
    return input.clone();
  }
  const ActEpilogue epilogue{residual, activation, activation_param};
  return eval_cpu(input, weight, bias, running_mean, running_var, eps, &epilogue);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cpu(
    const Tensor& grad_out,
    const Tensor& saved,
    const c10::optional<Tensor>& residual,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const Tensor& save_mean,
    const Tensor& save_invstd,
    int64_t activation,
    double activation_param,
    bool from_output) {
  const char* op = "bnext.batch_norm_act_backward";
  check_input(saved, op, "saved");
  check_like_input(grad_out, "grad_out", saved, op);
  check_channel_vector(save_mean, "save_mean", saved, op);
  check_channel_vector(save_invstd, "save_invstd", saved, op);
  check_optional_channel_vector(weight, "weight", saved, op);
  check_optional_channel_vector(bias, "bias", saved, op);
  check_optional_residual(residual, saved, op);
  check_activation(activation, op);
  check_from_output(from_output, activation, activation_param, op);
  const auto p = prepare(saved);
  const Tensor dy = grad_out.contiguous(p.fmt);
  const Tensor r = residual_like(residual, p);
  const auto opts = saved.options().dtype(acc_dtype(saved.scalar_type()));
  Tensor dx = at::empty_like(p.x, p.fmt);
  // grad_residual is dz itself (written by the same pass), in the input's dtype and format.
  Tensor dr = r.defined() ? at::empty_like(p.x, p.fmt) : at::empty({0}, saved.options());
  Tensor sum_dz = at::empty({p.layout.C}, opts);
  Tensor sum_dz_xmu = at::empty({p.layout.C}, opts);
  BNEXT_DISPATCH(saved.scalar_type(), "batch_norm_act_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const int64_t C = p.layout.C;
    const AccChannels<acc_t> w(weight, C, 1), b(bias, C, 0), m(save_mean, C), s(save_invstd, C);
    cpu::kernels().act_backward(
        saved.scalar_type(), dy.const_data_ptr(), p.x.const_data_ptr(), data_or_null(r), dx.data_ptr(),
        r.defined() ? dr.data_ptr() : nullptr, p.layout, w.get(), b.get(), m.get(), s.get(), sum_dz.data_ptr(),
        sum_dz_xmu.data_ptr(), activation, activation_param, from_output);
  });
  return {dx, dr, sum_dz, sum_dz_xmu};
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cpu);
  m.impl("batch_norm_forward", &batch_norm_forward_cpu);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cpu);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_eval", &batch_norm_eval_cpu);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act_eval", &batch_norm_act_eval_cpu);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cpu);
  m.impl("_batch_norm_forward_chunks", &batch_norm_forward_chunks_cpu);
  m.impl("_batch_norm_backward_chunks", &batch_norm_backward_chunks_cpu);
}

}  // namespace bnext
