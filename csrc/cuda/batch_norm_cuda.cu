// CUDA entries of every bnext op: argument checks, device guard, memory format, allocation, dtype
// and index-type dispatch, then the launchers of batch_norm_kernels.cuh.
//
// Compiled twice: by nvcc for TORCH_LIBRARY_IMPL(bnext, CUDA), and as host C++ over the SIMT
// emulator (csrc/simt, BNEXT_SIMT defined) for TORCH_LIBRARY_IMPL(bnext_simt, CPU), where the
// same code runs on CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/eval.h"
#include "../common/prepare.h"
#include "batch_norm_kernels.cuh"

namespace bnext {
namespace cuda {
namespace {

using at::Tensor;

#define BNEXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// f(int32_t{}) when every element index of a tensor of `numel` elements fits 32-bit arithmetic
// (cheaper division and address math), else f(int64_t{}).
template <typename F>
void dispatch_index(int64_t numel, F&& f) {
  if (numel <= kMax32BitIndex) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// Scratch memory (per-block partials, zeroed tickets) on the input's device. The tensors are
// released when the entry returns; the caching allocator orders reuse after the kernels already
// queued on the stream.
struct Scratch {
  at::TensorOptions opts;
  std::vector<Tensor> keep;
  void* operator()(size_t bytes, bool zeroed) {
    const auto byte_opts = opts.dtype(at::kByte);
    const int64_t n = static_cast<int64_t>(bytes);
    keep.push_back(zeroed ? at::zeros({n}, byte_opts) : at::empty({n}, byte_opts));
    return keep.back().data_ptr();
  }
};

at::TensorOptions acc_options(const Tensor& input) {
  return input.options().dtype(acc_dtype(input.scalar_type()));
}

// Per-channel BackwardCoeffs<acc_t> storage (4 values a channel).
Tensor coeff_storage(const Tensor& input, int64_t count) {
  static_assert(sizeof(BackwardCoeffs<float>) == 4 * sizeof(float), "BackwardCoeffs layout");
  return at::empty({count * 4}, acc_options(input));
}

// The residual of the fused ops contiguous in the input's layout format (read element for element
// with the input); undefined when there is none.
Tensor layout_residual(const c10::optional<Tensor>& residual, const Prepared& p) {
  return residual.has_value() && residual->defined() ? residual->contiguous(p.fmt) : Tensor();
}

template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// Normalize with given per-channel tensors (the split elemt op, inference): the coefficient
// kernel, then one elementwise pass of make_op(NormalizeOp) over x and the residual `r` (may be
// undefined).
template <class MakeOp>
Tensor normalize_with(
    const Prepared& p,
    const Tensor& w,
    const Tensor& b,
    const Tensor& m,
    const Tensor& s,
    const Tensor& r,
    MakeOp&& make_op) {
  Tensor out = at::empty_like(p.x, p.fmt);
  Tensor pivot = at::empty({p.layout.C}, acc_options(p.x));
  Tensor scale = at::empty({p.layout.C}, acc_options(p.x));
  Tensor shift = at::empty({p.layout.C}, acc_options(p.x));
  BNEXT_DISPATCH(p.x.scalar_type(), "normalize_with", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    launch(
        BNEXT_KERNEL(normalize_coeffs_kernel, acc_t), channel_grid(p.layout.C), dim3(kElementwiseThreads), 0,
        stream, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), pivot.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
        p.layout.C);
    const auto op = make_op(NormalizeOp<acc_t>{
        pivot.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()});
    const ElementwiseTensors<scalar_t> t{{p.x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r)}, {out.data_ptr<scalar_t>()}};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_elementwise<std::remove_const_t<decltype(op)>, scalar_t, decltype(index)>(op, t, p.layout, stream);
    });
  });
  return out;
}

// The fused training forward: statistics, whose epilogue writes the normalize coefficients, then
// one elementwise pass of make_op(NormalizeOp) over x and the residual `r` (may be undefined).
// make_red(StatsReducer) is the reduction (the plain one, or the masked one).
template <class MakeOp, class MakeRed>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_with(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual,
    double eps,
    MakeOp&& make_op,
    MakeRed&& make_red) {
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  const int64_t C = p.layout.C;
  Tensor out = at::empty_like(p.x, p.fmt);
  Tensor mean = at::empty({C}, acc_options(input));
  Tensor invstd = at::empty({C}, acc_options(input));
  Tensor var = at::empty({C}, acc_options(input));
  if (p.x.numel() == 0) {
    // No values: mean and biased variance 0, as the CPU kernels report.
    return {out, mean.zero_(), invstd.fill_(1.0 / std::sqrt(eps)), var.zero_()};
  }
  const Tensor w = channel_vector(weight, input, 1.0), b = channel_vector(bias, input, 0.0);
  const Tensor r = layout_residual(residual, p);
  Tensor pivot = at::empty({C}, acc_options(input));
  Tensor scale = at::empty({C}, acc_options(input));
  Tensor shift = at::empty({C}, acc_options(input));
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    const auto red = make_red(StatsReducer<scalar_t, acc_t>{
        p.x.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), pivot.data_ptr<acc_t>(), scale.data_ptr<acc_t>(),
        shift.data_ptr<acc_t>(), eps});
    const auto op = make_op(NormalizeOp<acc_t>{
        pivot.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()});
    const ElementwiseTensors<scalar_t> t{{p.x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r)}, {out.data_ptr<scalar_t>()}};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(red)>, decltype(index)>(red, p.layout, stream, scratch);
      launch_elementwise<std::remove_const_t<decltype(op)>, scalar_t, decltype(index)>(op, t, p.layout, stream);
    });
  });
  return {out, mean, invstd, var};
}

// make_op / make_red of the plain ops: the elementwise op or reducer as it is.
struct Plain {
  template <class T>
  T operator()(const T& t) const {
    return t;
  }
};

template <class T, class = void>
struct is_reducer : std::false_type {};
template <class T>
struct is_reducer<T, std::void_t<typename T::State>> : std::true_type {};

// make_op / make_red of the masked ops: the real positions of `mask` only (MaskedOp, MaskedReducer).
struct MaskedOps {
  const uint8_t* mask;
  template <class T>
  auto operator()(const T& t) const {
    if constexpr (is_reducer<T>::value) {
      return MaskedReducer<T>{t, mask};
    } else {
      return MaskedOp<T>{t, mask};
    }
  }
};

// make_op of the fused activation ops.
struct WithActivation {
  int64_t activation;
  double param;
  bool residual;
  template <typename acc_t>
  ActNormalizeOp<acc_t> operator()(const NormalizeOp<acc_t>& norm) const {
    return ActNormalizeOp<acc_t>{norm, static_cast<Act>(activation), static_cast<acc_t>(param), residual};
  }
};

std::tuple<Tensor, Tensor> batch_norm_stats_cuda(const Tensor& input) {
  const char* op = "bnext.batch_norm_stats";
  check_input(input, op);
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  Tensor mean = at::empty({p.layout.C}, acc_options(input));
  Tensor var = at::empty({p.layout.C}, acc_options(input));
  if (p.x.numel() == 0) {
    return {mean.zero_(), var.zero_()};
  }
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_stats_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const StatsReducer<scalar_t, acc_t> r{
        p.x.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), nullptr, nullptr,
        nullptr, nullptr, nullptr, nullptr, 0.0};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(r)>, decltype(index)>(r, p.layout, current_stream(), scratch);
    });
  });
  return {mean, var};
}

Tensor batch_norm_elemt_cuda(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const Tensor& mean,
    const Tensor& invstd) {
  const char* op = "bnext.batch_norm_elemt";
  check_elemt_args(input, weight, bias, mean, invstd, op);
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  if (p.x.numel() == 0) {
    return at::empty_like(p.x, p.fmt);
  }
  const Tensor w = channel_vector(weight, input, 1.0), b = channel_vector(bias, input, 0.0);
  const Tensor m = acc_vector(mean, input), s = acc_vector(invstd, input);
  return normalize_with(p, w, b, m, s, Tensor(), Plain{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward_cuda(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext.batch_norm_forward";
  check_forward_args(input, weight, bias, eps, op);
  return forward_with(input, weight, bias, c10::nullopt, eps, Plain{}, Plain{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_forward_cuda(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& residual,
    double eps,
    int64_t activation,
    double activation_param) {
  const char* op = "bnext.batch_norm_act_forward";
  check_forward_args(input, weight, bias, eps, op);
  check_act_args(residual, input, activation, op);
  const bool has_residual = residual.has_value() && residual->defined();
  return forward_with(
      input, weight, bias, residual, eps, WithActivation{activation, activation_param, has_residual}, Plain{});
}

// Inference with the coefficients batch_norm_eval folds (common/eval.h) and the same coefficient
// kernel its batch_norm_elemt runs (mean 0, invstd = scale, weight 1, bias = shift): the same bits
// of BN's output, then + residual and the activation in the same pass.
Tensor batch_norm_act_eval_cuda(
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
  check_act_args(residual, input, activation, op);
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  const auto [scale, shift] = eval_scale_shift(input, weight, bias, running_mean, running_var, eps);
  const Tensor w = channel_vector(c10::nullopt, input, 1.0), b = channel_vector(shift, input, 0.0);
  const Tensor m = acc_vector(at::zeros_like(scale), input), s = acc_vector(scale, input);
  const Tensor r = layout_residual(residual, p);
  return normalize_with(p, w, b, m, s, r, WithActivation{activation, activation_param, r.defined()});
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd) {
  const char* op = "bnext.batch_norm_backward_reduce";
  check_backward_common(grad_out, input, mean, "mean", invstd, "invstd", op);
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  Tensor sum_dy = at::empty({p.layout.C}, acc_options(input));
  Tensor sum_dy_xmu = at::empty({p.layout.C}, acc_options(input));
  if (p.x.numel() == 0) {
    return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  }
  const Tensor dy = grad_out.contiguous(p.fmt);
  const Tensor m = acc_vector(mean, input);
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_reduce_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const GradReducer<scalar_t, acc_t> r{
        {dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>()},
        sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(), nullptr, nullptr, nullptr, nullptr};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(r)>, decltype(index)>(r, p.layout, current_stream(), scratch);
    });
  });
  return {sum_dy, sum_dy_xmu};
}

Tensor batch_norm_backward_elemt_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const c10::optional<Tensor>& weight,
    const Tensor& mean_dy,
    const Tensor& mean_dy_xmu) {
  const char* op = "bnext.batch_norm_backward_elemt";
  check_backward_elemt_args(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu, op);
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  Tensor dx = at::empty_like(p.x, p.fmt);
  if (p.x.numel() == 0) {
    return dx;
  }
  const Tensor dy = grad_out.contiguous(p.fmt);
  const Tensor w = channel_vector(weight, input, 1.0);
  const Tensor m = acc_vector(mean, input), s = acc_vector(invstd, input);
  const Tensor mdy = acc_vector(mean_dy, input), mdxm = acc_vector(mean_dy_xmu, input);
  Tensor coeffs = coeff_storage(input, p.layout.C);
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_elemt_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    auto* k = reinterpret_cast<BackwardCoeffs<acc_t>*>(coeffs.data_ptr<acc_t>());
    launch(
        BNEXT_KERNEL(backward_coeffs_kernel, acc_t), channel_grid(p.layout.C), dim3(kElementwiseThreads), 0,
        stream, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        mdy.const_data_ptr<acc_t>(), mdxm.const_data_ptr<acc_t>(), k, p.layout.C);
    const BackwardElemtOp<acc_t> bw{k};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_elementwise<BackwardElemtOp<acc_t>, scalar_t, decltype(index)>(
          bw, {{dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>()}, {dx.data_ptr<scalar_t>()}}, p.layout,
          stream);
    });
  });
  return dx;
}

// What the fused backward entries share: dy in the saved tensor's layout, the per-channel
// tensors in the accumulation type, the per-channel sums and backward coefficients.
struct BackwardSetup {
  Prepared p;
  Tensor dy;
  Tensor w;
  Tensor m;
  Tensor s;
  Tensor sum_dy;
  Tensor sum_dy_xmu;
  Tensor coeffs;

  BackwardSetup(const Tensor& grad_out, const Tensor& saved, const c10::optional<Tensor>& weight,
                const Tensor& save_mean, const Tensor& save_invstd)
      : p(prepare(saved)) {
    sum_dy = at::empty({p.layout.C}, acc_options(saved));
    sum_dy_xmu = at::empty({p.layout.C}, acc_options(saved));
    if (p.x.numel() == 0) {
      sum_dy.zero_();
      sum_dy_xmu.zero_();
      return;
    }
    dy = grad_out.contiguous(p.fmt);
    w = channel_vector(weight, saved, 1.0);
    m = acc_vector(save_mean, saved);
    s = acc_vector(save_invstd, saved);
    coeffs = coeff_storage(saved, p.layout.C);
  }
  template <typename acc_t>
  BackwardCoeffs<acc_t>* k() {
    return reinterpret_cast<BackwardCoeffs<acc_t>*>(coeffs.data_ptr<acc_t>());
  }
};

// The fused training backward: the backward reduction, whose epilogue writes the backward
// coefficients, then one elementwise pass of dx; make(GradReducer), make(BackwardElemtOp) are the
// kernels' reducer and op (Plain, or MaskedOps).
template <class Make>
std::tuple<Tensor, Tensor, Tensor> backward_with(
    const Tensor& grad_out,
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd,
    const Make& make) {
  const DeviceGuard guard(input.device());
  BackwardSetup b(grad_out, input, weight, save_mean, save_invstd);
  const auto& p = b.p;
  Tensor dx = at::empty_like(p.x, p.fmt);
  if (p.x.numel() == 0) {
    return {dx, b.sum_dy, b.sum_dy_xmu};
  }
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    const auto r = make(GradReducer<scalar_t, acc_t>{
        {b.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), b.m.const_data_ptr<acc_t>()},
        b.sum_dy.data_ptr<acc_t>(), b.sum_dy_xmu.data_ptr<acc_t>(), b.m.const_data_ptr<acc_t>(),
        b.s.const_data_ptr<acc_t>(), b.w.const_data_ptr<acc_t>(), b.k<acc_t>()});
    const auto bw = make(BackwardElemtOp<acc_t>{b.k<acc_t>()});
    const ElementwiseTensors<scalar_t> t{
        {b.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>()}, {dx.data_ptr<scalar_t>()}};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(r)>, decltype(index)>(r, p.layout, stream, scratch);
      launch_elementwise<std::remove_const_t<decltype(bw)>, scalar_t, decltype(index)>(bw, t, p.layout, stream);
    });
  });
  return {dx, b.sum_dy, b.sum_dy_xmu};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd) {
  const char* op = "bnext.batch_norm_backward";
  check_backward_args(grad_out, input, weight, save_mean, save_invstd, op);
  return backward_with(grad_out, input, weight, save_mean, save_invstd, Plain{});
}

// Masked batch norm (schemas.h): the fused forward and backward over the real positions of an
// (N, C, L) input made contiguous, whose flat element (n * C + c) * L + l has position n * L + l
// in both kernels' terms, whichever layout prepare() sees (L = 1 reads as rows of C: position n).
const uint8_t* mask_bytes(const Tensor& mask) {
  return reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_masked_forward_cuda(
    const Tensor& input,
    const Tensor& mask,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext._batch_norm_masked_forward";
  check_mask_args(input, mask, op);
  check_forward_args(input, weight, bias, eps, op);
  const Tensor m = mask.contiguous();
  const MaskedOps masked{mask_bytes(m)};
  return forward_with(input.contiguous(), weight, bias, c10::nullopt, eps, masked, masked);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_masked_backward_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const Tensor& mask,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd) {
  const char* op = "bnext._batch_norm_masked_backward";
  check_mask_args(input, mask, op);
  check_backward_args(grad_out, input, weight, save_mean, save_invstd, op);
  const Tensor m = mask.contiguous();
  return backward_with(grad_out, input.contiguous(), weight, save_mean, save_invstd, MaskedOps{mask_bytes(m)});
}

// The fused activation backward (schemas.h): the backward reduction with dz = dy * act'(z) in
// place of dy (ActGrad terms; its epilogue also stores the per-channel ActChannel values), then
// one elementwise pass writing dx and, with a residual, grad_residual = dz.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_act_backward_cuda(
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
  check_act_backward_args(
      grad_out, saved, residual, weight, bias, save_mean, save_invstd, activation, activation_param, from_output, op);
  const DeviceGuard guard(saved.device());
  BackwardSetup b(grad_out, saved, weight, save_mean, save_invstd);
  const auto& p = b.p;
  const int64_t C = p.layout.C;
  const bool has_residual = residual.has_value() && residual->defined();
  Tensor dx = at::empty_like(p.x, p.fmt);
  Tensor dr = has_residual ? at::empty_like(p.x, p.fmt) : at::empty({0}, saved.options());
  if (p.x.numel() == 0) {
    return {dx, dr, b.sum_dy, b.sum_dy_xmu};
  }
  const Tensor r = layout_residual(residual, p);
  const Tensor bi = channel_vector(bias, saved, 0.0);
  static_assert(sizeof(ActChannel<float>) == 6 * sizeof(float), "ActChannel layout");
  Tensor channels = at::empty({C * 6}, acc_options(saved));
  Scratch scratch{saved.options(), {}};
  BNEXT_DISPATCH(saved.scalar_type(), "batch_norm_act_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    auto* ch = reinterpret_cast<ActChannel<acc_t>*>(channels.data_ptr<acc_t>());
    const ActParams<acc_t> a{static_cast<Act>(activation), static_cast<acc_t>(activation_param), from_output};
    const ActGrad<scalar_t, acc_t> terms{
        b.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r),
        b.m.const_data_ptr<acc_t>(), b.s.const_data_ptr<acc_t>(), b.w.const_data_ptr<acc_t>(),
        bi.const_data_ptr<acc_t>(), a, ch};
    const GradReducer<scalar_t, acc_t, ActGrad<scalar_t, acc_t>> red{
        terms, b.sum_dy.data_ptr<acc_t>(), b.sum_dy_xmu.data_ptr<acc_t>(), b.m.const_data_ptr<acc_t>(),
        b.s.const_data_ptr<acc_t>(), b.w.const_data_ptr<acc_t>(), b.k<acc_t>()};
    const ActBackwardElemtOp<acc_t> bw{ch, b.k<acc_t>(), a};
    const ElementwiseTensors<scalar_t> t{
        {b.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(r)},
        {dx.data_ptr<scalar_t>(), has_residual ? dr.data_ptr<scalar_t>() : nullptr}};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(red)>, decltype(index)>(red, p.layout, stream, scratch);
      launch_elementwise<ActBackwardElemtOp<acc_t>, scalar_t, decltype(index)>(bw, t, p.layout, stream);
    });
  });
  return {dx, dr, b.sum_dy, b.sum_dy_xmu};
}

}  // namespace

#ifdef BNEXT_SIMT
#define BNEXT_CUDA_NAMESPACE bnext_simt
#define BNEXT_CUDA_KEY CPU
#else
#define BNEXT_CUDA_NAMESPACE bnext
#define BNEXT_CUDA_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(BNEXT_CUDA_NAMESPACE, BNEXT_CUDA_KEY, m) {
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_elemt", &batch_norm_elemt_cuda);
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_act_forward", &batch_norm_act_forward_cuda);
  m.impl("batch_norm_act_eval", &batch_norm_act_eval_cuda);
  m.impl("batch_norm_act_backward", &batch_norm_act_backward_cuda);
  m.impl("_batch_norm_masked_forward", &batch_norm_masked_forward_cuda);
  m.impl("_batch_norm_masked_backward", &batch_norm_masked_backward_cuda);
}

}  // namespace cuda
}  // namespace bnext
