// AddressSanitizer driver (`make asan`): the emulated CUDA entries and kernels, built with
// -fsanitize=address into one executable with libtorch, run over a small matrix of shapes, memory
// formats, storage offsets and dtypes that launches every kernel variant. Any out-of-bounds read
// or write in a kernel (or in the emulator) aborts with ASan's report. Each result is also checked
// against an ATen float64 reference, and the emulator's own error detection is exercised with
// deliberately broken kernels.
//
// Not part of the Python extension: csrc/simt/*.cpp is globbed by setup.py, this subdirectory is not.
#include "../batch_norm_simt.cpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace {

using at::Tensor;
using namespace bnext::cuda;

int failures = 0;

void expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& what) {
  const bool same_shape = got.sizes() == want.sizes();
  const double err = same_shape && got.numel() > 0 ? (got.to(at::kDouble) - want).abs().max().item<double>() : 0.0;
  const double scale = want.numel() > 0 ? want.abs().max().item<double>() + 1.0 : 1.0;
  if (!same_shape || err > tol * scale) {
    std::fprintf(stderr, "MISMATCH %s: max abs error %g (tolerance %g)\n", what.c_str(), err, tol * scale);
    ++failures;
  }
}

void check_case(at::IntArrayRef shape, at::MemoryFormat fmt, bool misaligned, at::ScalarType dtype) {
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const double tol = dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-4 : 3e-2;
  Tensor x64 = at::randn(shape, at::kDouble) * 2 + 0.5;
  Tensor x;
  if (misaligned) {
    Tensor buf = at::empty({x64.numel() + 1}, dtype);
    x = buf.slice(0, 1).view(shape);
    x.copy_(x64);
  } else {
    x = x64.to(dtype).contiguous(fmt);
  }
  const Tensor xr = x.to(at::kDouble);
  const Tensor dy = at::randn(shape, at::kDouble).to(dtype).contiguous(fmt);
  const Tensor dyr = dy.to(at::kDouble);
  const int64_t C = shape[1];
  std::vector<int64_t> red{0};
  std::vector<int64_t> bc(shape.size(), 1);
  bc[1] = C;
  for (size_t d = 2; d < shape.size(); ++d) {
    red.push_back(static_cast<int64_t>(d));
  }
  const Tensor w = at::randn({C}, at::kDouble), b = at::randn({C}, at::kDouble);
  const double eps = 1e-5;
  const Tensor mean = xr.mean(red), var = xr.var(red, /*unbiased=*/false);
  const Tensor invstd = (var + eps).rsqrt();
  const Tensor xhat = (xr - mean.view(bc)) * invstd.view(bc);
  const Tensor y = xhat * w.view(bc) + b.view(bc);
  const Tensor sum_dy = dyr.sum(red), sum_dy_xmu = (dyr * (xr - mean.view(bc))).sum(red);
  const double M = static_cast<double>(x.numel() / std::max<int64_t>(C, 1));
  // dx of a given dz (dz = dy for batch norm itself).
  const auto grad_input = [&](const Tensor& dz) {
    const Tensor s_dz = dz.sum(red), s_dzx = (dz * (xr - mean.view(bc))).sum(red);
    return (w * invstd).view(bc) *
        (dz - (s_dz / M).view(bc) - (xr - mean.view(bc)) * (invstd * invstd * s_dzx / M).view(bc));
  };
  const Tensor dx = grad_input(dyr);
  const std::string tag = std::string(c10::toString(dtype)) + " " + c10::str(shape) +
      (fmt == at::MemoryFormat::ChannelsLast ? " channels_last" : "") + (misaligned ? " misaligned" : "");

  const auto [s_mean, s_var] = batch_norm_stats_cuda(x);
  expect_close(s_mean, mean, tol, "stats mean " + tag);
  expect_close(s_var, var, tol, "stats var " + tag);
  const auto [out, f_mean, f_invstd, f_var] = batch_norm_forward_cuda(x, w.to(acc), b.to(acc), eps);
  expect_close(out, y, tol * 10, "forward output " + tag);
  expect_close(f_invstd, invstd, tol * 10, "forward invstd " + tag);
  const Tensor e_out = batch_norm_elemt_cuda(x, w.to(acc), b.to(acc), mean.to(acc), invstd.to(acc));
  expect_close(e_out, y, tol * 10, "elemt " + tag);
  const auto [r_sum_dy, r_sum_dy_xmu] = batch_norm_backward_reduce_cuda(dy, x, mean.to(acc), invstd.to(acc));
  expect_close(r_sum_dy, sum_dy, tol * 10, "backward_reduce sum_dy " + tag);
  expect_close(r_sum_dy_xmu, sum_dy_xmu, tol * 10, "backward_reduce sum_dy_xmu " + tag);
  const Tensor e_dx = batch_norm_backward_elemt_cuda(
      dy, x, mean.to(acc), invstd.to(acc), w.to(acc), (sum_dy / M).to(acc), (sum_dy_xmu / M).to(acc));
  expect_close(e_dx, dx, tol * 10, "backward_elemt " + tag);
  const auto [b_dx, b_sum_dy, b_sum_dy_xmu] = batch_norm_backward_cuda(dy, x, w.to(acc), mean.to(acc), invstd.to(acc));
  expect_close(b_dx, dx, tol * 10, "backward dx " + tag);
  expect_close(b_sum_dy, sum_dy, tol * 10, "backward sum_dy " + tag);

  // Fused BN + activation + residual (relu from the input, leaky_relu from the output).
  const Tensor r = at::randn(shape, at::kDouble).to(dtype).contiguous(fmt);
  const Tensor z = y + r.to(at::kDouble);
  const auto relu = static_cast<int64_t>(bnext::Act::kRelu), leaky = static_cast<int64_t>(bnext::Act::kLeakyRelu);
  const auto [a_out, a_mean, a_invstd, a_var] = batch_norm_act_forward_cuda(x, w.to(acc), b.to(acc), r, eps, relu, 0.0);
  expect_close(a_out, at::relu(z), tol * 10, "act_forward relu " + tag);
  const Tensor rm = at::randn({C}, at::kDouble), rv = at::rand({C}, at::kDouble) + 0.5;
  const Tensor ze = (xr - rm.view(bc)) * (w / (rv + eps).sqrt()).view(bc) + b.view(bc) + r.to(at::kDouble);
  const Tensor a_eval = batch_norm_act_eval_cuda(x, w.to(acc), b.to(acc), rm.to(acc), rv.to(acc), r, eps, leaky, 0.1);
  expect_close(a_eval, at::leaky_relu(ze, 0.1), tol * 10, "act_eval leaky_relu " + tag);
  const Tensor dz_relu = dyr * z.gt(0).to(at::kDouble);
  const auto [a_dx, a_dr, a_sdz, a_sdzx] =
      batch_norm_act_backward_cuda(dy, x, r, w.to(acc), b.to(acc), mean.to(acc), invstd.to(acc), relu, 0.0, false);
  expect_close(a_dx, grad_input(dz_relu), tol * 10, "act_backward relu dx " + tag);
  expect_close(a_dr, dz_relu, tol * 10, "act_backward relu grad_residual " + tag);
  expect_close(a_sdz, dz_relu.sum(red), tol * 10, "act_backward relu sum_dz " + tag);
  const Tensor yl = at::leaky_relu(y, 0.1).to(dtype).contiguous(fmt);
  const Tensor dz_leaky = dyr * at::where(y.gt(0), at::ones_like(y), at::full_like(y, 0.1));
  const auto [o_dx, o_dr, o_sdz, o_sdzx] = batch_norm_act_backward_cuda(
      dy, yl, c10::nullopt, w.to(acc), b.to(acc), mean.to(acc), invstd.to(acc), leaky, 0.1, true);
  const double otol = dtype == at::kDouble ? tol * 10 : tol * 100;  // x - mean recovered from a rounded y
  expect_close(o_dx, grad_input(dz_leaky), otol, "act_backward from output dx " + tag);
  expect_close(o_sdzx, (dz_leaky * (xr - mean.view(bc))).sum(red), otol, "act_backward from output sum_dz_xmu " + tag);
  if (o_dr.numel() != 0) {
    std::fprintf(stderr, "MISMATCH act_backward without residual: grad_residual not empty %s\n", tag.c_str());
    ++failures;
  }
}

// Masked batch norm's mask-taking ops on (N, C, L) input (misaligned: the scalar elementwise kernel)
// against the float64 definition on the real positions; the padding of x and dy holds NaN, which
// must never reach a result, and the outputs are zero there.
void check_masked_case(at::IntArrayRef shape, bool misaligned, at::ScalarType dtype) {
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const double tol = dtype == at::kDouble ? 1e-10 : dtype == at::kFloat ? 1e-4 : 3e-2;
  const int64_t N = shape[0], C = shape[1], L = shape[2];
  Tensor mask = at::rand({N, L}) < 0.7;
  mask.view(-1).slice(0, 0, 2).fill_(true);
  const Tensor m3 = mask.unsqueeze(1).expand(shape), real = m3.to(at::kDouble);
  const double K = mask.sum().item<double>();
  const Tensor nan = at::full({}, std::nan(""), at::kDouble);
  const Tensor xr = at::where(m3, at::randn(shape, at::kDouble) * 2 + 0.5, nan);
  const Tensor dyr = at::where(m3, at::randn(shape, at::kDouble), nan);
  auto put = [&](const Tensor& v) {
    if (!misaligned) {
      return v.to(dtype);
    }
    Tensor buf = at::empty({v.numel() + 1}, dtype);
    Tensor t = buf.slice(0, 1).view(shape);
    t.copy_(v);
    return t;
  };
  const Tensor x = put(xr), dy = put(dyr);
  const Tensor x0 = at::where(m3, x.to(at::kDouble), 0), dy0 = at::where(m3, dy.to(at::kDouble), 0);
  const Tensor w = at::randn({C}, at::kDouble), b = at::randn({C}, at::kDouble);
  const double eps = 1e-5;
  const Tensor mean = x0.sum({0, 2}) / K;
  const Tensor xmu = at::where(m3, x0 - mean.view({1, C, 1}), 0);
  const Tensor var = (xmu * xmu).sum({0, 2}) / K, invstd = (var + eps).rsqrt();
  const Tensor y = xmu * (w * invstd).view({1, C, 1}) + real * b.view({1, C, 1});
  const Tensor sum_dy = dy0.sum({0, 2}), sum_dy_xmu = (dy0 * xmu).sum({0, 2});
  const Tensor dx = real * (w * invstd).view({1, C, 1}) *
      (dy0 - (sum_dy / K).view({1, C, 1}) - xmu * (invstd * invstd * sum_dy_xmu / K).view({1, C, 1}));
  const std::string tag = std::string(c10::toString(dtype)) + (misaligned ? " misaligned" : "");
  const auto [out, f_mean, f_invstd, f_var] = batch_norm_masked_forward_cuda(x, mask, w.to(acc), b.to(acc), eps);
  expect_close(out, y, tol, "masked_forward out " + tag);
  expect_close(f_mean, mean, tol, "masked_forward mean " + tag);
  expect_close(f_var, var, tol, "masked_forward var " + tag);
  const auto [g_dx, g_sum_dy, g_sum_dy_xmu] =
      batch_norm_masked_backward_cuda(dy, x, mask, w.to(acc), mean.to(acc), invstd.to(acc));
  expect_close(g_dx, dx, tol * 10, "masked_backward dx " + tag);
  expect_close(g_sum_dy, sum_dy, tol * 10, "masked_backward sum_dy " + tag);
  expect_close(g_sum_dy_xmu, sum_dy_xmu, tol * 10, "masked_backward sum_dy_xmu " + tag);
}

// Deliberately broken kernels: the emulator must report each instead of computing garbage.
__global__ void early_exit_before_shuffle_kernel(float* out) {
  if (threadIdx.x == 0) {
    return;  // lane 0 leaves, the others shuffle with a full mask: undefined on a GPU
  }
  out[threadIdx.x] = shfl_down(1.0f, 1);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = shfl_down(1.0f, 1);  // half a warp in a full-mask shuffle
  } else {
    __syncthreads();
  }
}

template <typename Kernel>
void expect_emulator_error(Kernel kernel, const char* name, dim3 grid, dim3 block, const char* fragment) {
  std::vector<float> out(64);
  try {
    bnext::simt::launch(name, kernel, grid, block, 0, out.data());
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find(fragment) != std::string::npos) {
      return;
    }
    std::fprintf(stderr, "EMULATOR %s: unexpected error: %s\n", name, e.what());
    ++failures;
    return;
  }
  std::fprintf(stderr, "EMULATOR %s: no error reported\n", name);
  ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto nchw = at::MemoryFormat::Contiguous;
  struct Case {
    std::vector<int64_t> shape;
    at::MemoryFormat fmt;
    bool misaligned;
  };
  const std::vector<Case> cases = {
      {{4, 5, 3, 3}, nchw, false},    {{2, 3, 20, 20}, nchw, false}, {{9, 2, 3, 4}, nchw, false},
      {{2, 7, 3, 5}, nchw, false},    {{1, 4, 6, 6}, nchw, false},   {{2, 3, 5, 7}, nchw, true},
      {{2, 3, 20, 20}, nchw, true},   {{5, 130}, nchw, false},       {{4, 6, 5, 5}, cl, false},
      {{2, 100, 1, 3}, cl, false},    {{3, 6, 12, 10}, cl, false},   {{0, 3, 2, 2}, nchw, false},
  };
  // (N, C, L) for the masked ops: 32- and 64-bit indexing, L = 1 (the channels-last reduction),
  // vector tails, misaligned storage.
  const std::vector<Case> masked_cases = {
      {{4, 5, 9}, nchw, false}, {{2, 3, 400}, nchw, false}, {{8, 3, 1}, nchw, false},
      {{700, 3, 1}, nchw, false}, {{2, 3, 35}, nchw, true}, {{2, 3, 400}, nchw, true},
  };
  for (const auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    for (const auto& c : cases) {
      if (c.shape[0] == 0) {
        const auto [mean, var] = batch_norm_stats_cuda(at::empty(c.shape, dtype));
        expect_close(mean, at::zeros({c.shape[1]}, at::kDouble), 0, "empty stats");
        const Tensor e = at::empty(c.shape, dtype);
        const auto fwd = batch_norm_act_forward_cuda(e, c10::nullopt, c10::nullopt, e, 1e-5, 1, 0.0);
        const auto bwd = batch_norm_act_backward_cuda(
            e, e, e, c10::nullopt, c10::nullopt, std::get<1>(fwd), std::get<2>(fwd), 1, 0.0, false);
        expect_close(std::get<3>(bwd), at::zeros({c.shape[1]}, at::kDouble), 0, "empty act_backward");
        continue;
      }
      check_case(c.shape, c.fmt, c.misaligned, dtype);
    }
    for (const auto& c : masked_cases) {
      check_masked_case(c.shape, c.misaligned, dtype);
    }
  }
  expect_emulator_error(
      early_exit_before_shuffle_kernel, "early_exit_before_shuffle_kernel", dim3(1), dim3(32), "exited");
  expect_emulator_error(divergent_barrier_kernel, "divergent_barrier_kernel", dim3(1), dim3(32), "deadlock");
  expect_emulator_error(divergent_barrier_kernel, "divergent_barrier_kernel", dim3(1), dim3(2048), "invalid block");
  expect_emulator_error(divergent_barrier_kernel, "divergent_barrier_kernel", dim3(1, 70000), dim3(32), "invalid grid");
  if (failures != 0) {
    std::fprintf(stderr, "simt_asan: %d failures\n", failures);
    return 1;
  }
  std::printf(
      "simt_asan: %zu cases x 4 dtypes x 9 ops, %zu masked cases x 4 dtypes x 2 ops and 4 emulator error checks "
      "passed\n",
      cases.size(), masked_cases.size());
  return 0;
}
