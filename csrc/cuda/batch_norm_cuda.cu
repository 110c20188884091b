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
  Tensor out = at::empty_like(p.x, p.fmt);
  if (p.x.numel() == 0) {
    return out;
  }
  const Tensor w = channel_vector(weight, input, 1.0), b = channel_vector(bias, input, 0.0);
  const Tensor m = acc_vector(mean, input), s = acc_vector(invstd, input);
  Tensor pivot = at::empty({p.layout.C}, acc_options(input));
  Tensor scale = at::empty({p.layout.C}, acc_options(input));
  Tensor shift = at::empty({p.layout.C}, acc_options(input));
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_elemt_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    launch(
        BNEXT_KERNEL(normalize_coeffs_kernel, acc_t), channel_grid(p.layout.C), dim3(kElementwiseThreads), 0,
        stream, m.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), pivot.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
        p.layout.C);
    const NormalizeOp<acc_t> norm{
        pivot.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_elementwise<NormalizeOp<acc_t>, scalar_t, decltype(index)>(
          norm, p.x.const_data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), p.layout, stream);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward_cuda(
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext.batch_norm_forward";
  check_forward_args(input, weight, bias, eps, op);
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
  Tensor pivot = at::empty({C}, acc_options(input));
  Tensor scale = at::empty({C}, acc_options(input));
  Tensor shift = at::empty({C}, acc_options(input));
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_forward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    const StatsReducer<scalar_t, acc_t> r{
        p.x.const_data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), pivot.data_ptr<acc_t>(), scale.data_ptr<acc_t>(),
        shift.data_ptr<acc_t>(), eps};
    const NormalizeOp<acc_t> norm{
        pivot.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>()};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(r)>, decltype(index)>(r, p.layout, stream, scratch);
      launch_elementwise<NormalizeOp<acc_t>, scalar_t, decltype(index)>(
          norm, p.x.const_data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), p.layout, stream);
    });
  });
  return {out, mean, invstd, var};
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
        dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
        sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(), nullptr, nullptr, nullptr};
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
          bw, dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), p.layout,
          stream);
    });
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(
    const Tensor& grad_out,
    const Tensor& input,
    const c10::optional<Tensor>& weight,
    const Tensor& save_mean,
    const Tensor& save_invstd) {
  const char* op = "bnext.batch_norm_backward";
  check_backward_common(grad_out, input, save_mean, "save_mean", save_invstd, "save_invstd", op);
  check_optional_channel_vector(weight, "weight", input, op);
  const DeviceGuard guard(input.device());
  const auto p = prepare(input);
  const int64_t C = p.layout.C;
  Tensor dx = at::empty_like(p.x, p.fmt);
  Tensor sum_dy = at::empty({C}, acc_options(input));
  Tensor sum_dy_xmu = at::empty({C}, acc_options(input));
  if (p.x.numel() == 0) {
    return {dx, sum_dy.zero_(), sum_dy_xmu.zero_()};
  }
  const Tensor dy = grad_out.contiguous(p.fmt);
  const Tensor w = channel_vector(weight, input, 1.0);
  const Tensor m = acc_vector(save_mean, input), s = acc_vector(save_invstd, input);
  Tensor coeffs = coeff_storage(input, C);
  Scratch scratch{input.options(), {}};
  BNEXT_DISPATCH(input.scalar_type(), "batch_norm_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const Stream stream = current_stream();
    auto* k = reinterpret_cast<BackwardCoeffs<acc_t>*>(coeffs.data_ptr<acc_t>());
    const GradReducer<scalar_t, acc_t> r{
        dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
        sum_dy.data_ptr<acc_t>(), sum_dy_xmu.data_ptr<acc_t>(), s.const_data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), k};
    const BackwardElemtOp<acc_t> bw{k};
    dispatch_index(p.x.numel(), [&](auto index) {
      launch_reduce<std::remove_const_t<decltype(r)>, decltype(index)>(r, p.layout, stream, scratch);
      launch_elementwise<BackwardElemtOp<acc_t>, scalar_t, decltype(index)>(
          bw, dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), p.layout,
          stream);
    });
  });
  return {dx, sum_dy, sum_dy_xmu};
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
}

}  // namespace cuda
}  // namespace bnext
