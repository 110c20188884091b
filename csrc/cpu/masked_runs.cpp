// The copies of masked batch norm's compact route (bnext/masked.py) for CPU tensors: the real
// positions of a padded (N, C, L) batch, given as runs (row n, start, stop) in (n, l) order,
// gathered into one (1, C, K) tensor, and scattered back into (N, C, L) with zeros at the padding.
// A run of one channel is len contiguous values in both tensors, so each is one memcpy, and every
// value is read and written once, in one C++ call (torch.cat of the runs' strided slices and a
// copy_ plus a zero_ per run made a Python call per run). Figures: docs/performance.md, small and
// irregular batches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/math.h"
#include "acc_channels.h"
#include "kernels.h"

namespace bnext {
namespace {

using at::Tensor;

// The runs table (R, 3) int64, checked: rows ascending within [0, N), each run within [0, L), not
// empty and after the previous run of its row, so that no copy below leaves its tensor. Returns
// each run's first column in the compact tensor, and the total K last.
std::vector<int64_t> checked_offsets(const Tensor& runs, int64_t N, int64_t L, const char* op) {
  TORCH_CHECK(
      runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 3,
      op, ": runs must be a CPU int64 tensor of shape (R, 3) (row, start, stop), got ", runs.scalar_type(), " of shape ",
      runs.sizes(), " on ", runs.device());
  const Tensor t = runs.contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  const int64_t R = t.size(0);
  std::vector<int64_t> offsets(R + 1, 0);
  int64_t row = -1, end = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = p[3 * r], a = p[3 * r + 1], b = p[3 * r + 2];
    TORCH_CHECK(n >= 0 && n < N && n >= row, op, ": runs must be in row order with rows in [0, ", N, "), got row ", n,
        " after row ", row);
    if (n != row) {
      row = n;
      end = 0;
    }
    TORCH_CHECK(a >= end && a < b && b <= L, op, ": run ", r, " of row ", n, " must be [start, stop) within [", end,
        ", ", L, ") and not empty, got [", a, ", ", b, ")");
    end = b;
    offsets[r + 1] = offsets[r] + (b - a);
  }
  return offsets;
}

// f(c0, c1) over blocks of `block` channels, in parallel (tasks of at least about 32K values, so
// that small batches stay on one thread). The copies are short (a run of one channel: about a KiB
// for padded sequences of a few hundred positions) and read or write rows in part, which runs below
// a clone's rate per byte; of the loop orders measured standalone (scripts/partial_rows.cpp), the
// gather was fastest channel by channel, its output then one sequential stream. The scatter goes by
// blocks of kScatterBlock channels, row after row: its output then moves one stretch of
// kScatterBlock rows of L at a time, and its input kScatterBlock sequential streams.
constexpr int64_t kScatterBlock = 16;

template <class F>
void for_channel_blocks(int64_t C, int64_t values_per_channel, int64_t block, const F& f) {
  const int64_t blocks = (C + block - 1) / block;
  const int64_t per_block = std::max<int64_t>(1, values_per_channel * block);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / per_block), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      f(b * block, std::min(C, (b + 1) * block));
    }
  });
}

Tensor masked_compact_cpu(const Tensor& input, const Tensor& runs) {
  const char* op = "bnext._masked_compact";
  TORCH_CHECK(input.dim() == 3, op, ": input must be (N, C, L), got shape ", input.sizes());
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2);
  const auto offsets = checked_offsets(runs, N, L, op);
  const int64_t R = runs.size(0), K = offsets[R];
  const Tensor x = input.contiguous();
  const Tensor table = runs.contiguous();
  Tensor out = at::empty({1, C, K}, input.options());
  if (K == 0 || C == 0) {
    return out;
  }
  const int64_t item = x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* p = table.const_data_ptr<int64_t>();
  for_channel_blocks(C, K, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t n = p[3 * r], a = p[3 * r + 1], len = p[3 * r + 2] - a;
        std::memcpy(dst + (c * K + offsets[r]) * item, src + ((n * C + c) * L + a) * item, len * item);
      }
    }
  });
  return out;
}

Tensor masked_expand_cpu(const Tensor& compact, const Tensor& runs, int64_t N, int64_t L) {
  const char* op = "bnext._masked_expand";
  TORCH_CHECK(N >= 0 && L >= 0, op, ": N and L must be non-negative, got ", N, " and ", L);
  const auto offsets = checked_offsets(runs, N, L, op);
  const int64_t R = runs.size(0), K = offsets[R];
  TORCH_CHECK(
      compact.dim() == 3 && compact.size(0) == 1 && compact.size(2) == K, op,
      ": compact must be (1, C, K) with K = ", K, " (the runs' length), got shape ", compact.sizes());
  const int64_t C = compact.size(1);
  const Tensor x = compact.contiguous();
  const Tensor table = runs.contiguous();
  Tensor out = at::empty({N, C, L}, compact.options());
  if (out.numel() == 0) {
    return out;
  }
  // first[n] .. first[n + 1]: the runs of row n.
  const int64_t* p = table.const_data_ptr<int64_t>();
  std::vector<int64_t> first(N + 1, R);
  for (int64_t r = R - 1; r >= 0; --r) {
    first[p[3 * r]] = r;
  }
  for (int64_t n = N - 1; n >= 0; --n) {
    first[n] = std::min(first[n], first[n + 1]);
  }
  const int64_t item = x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for_channel_blocks(C, N * L, kScatterBlock, [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = c0; c < c1; ++c) {
        char* row = dst + (n * C + c) * L * item;
        int64_t pos = 0;
        for (int64_t r = first[n]; r < first[n + 1]; ++r) {
          const int64_t a = p[3 * r + 1], b = p[3 * r + 2];
          std::memset(row + pos * item, 0, (a - pos) * item);  // all-zero bytes: +0.0 in every float type
          std::memcpy(row + a * item, src + (c * K + offsets[r]) * item, (b - a) * item);
          pos = b;
        }
        std::memset(row + pos * item, 0, (L - pos) * item);
      }
    }
  });
  return out;
}

// The runs (row, start, stop) of a bool mask (N, L), True at the real positions, in row order: the
// table of bnext/masked.py's _Runs in one pass over the mask (its torch ops, nonzero of the mask's
// edges and the rest, took about 0.1 ms a call).
Tensor masked_runs_cpu(const Tensor& mask) {
  const char* op = "bnext._masked_runs";
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool, op, ": mask must be a 2-D bool tensor (N, L), got ",
      mask.dim(), "-D ", mask.scalar_type());
  const Tensor m = mask.contiguous();
  const int64_t N = m.size(0), L = m.size(1);
  const bool* p = m.const_data_ptr<bool>();
  std::vector<int64_t> runs;
  for (int64_t n = 0; n < N; ++n) {
    const bool* row = p + n * L;
    for (int64_t l = 0; l < L;) {
      if (!row[l]) {
        ++l;
        continue;
      }
      const int64_t start = l;
      while (l < L && row[l]) {
        ++l;
      }
      runs.insert(runs.end(), {n, start, l});
    }
  }
  Tensor out = at::empty({static_cast<int64_t>(runs.size()) / 3, 3}, mask.options().dtype(at::kLong));
  std::copy(runs.begin(), runs.end(), out.data_ptr<int64_t>());
  return out;
}

// The masked route's own kernels (kernel/masked.h): statistics, normalization and backward of the
// real positions read in place, no compact copy. `input` (N, C, L) any strides (made contiguous),
// `runs` as above and holding at least one real position; per-channel tensors of C values.
struct MaskedCall {
  Tensor x, table;
  cpu::MaskedRuns m;
  at::ScalarType acc;
};

MaskedCall masked_call(const Tensor& input, const Tensor& runs, const char* op) {
  TORCH_CHECK(input.dim() == 3, op, ": input must be (N, C, L), got shape ", input.sizes());
  TORCH_CHECK(is_supported_dtype(input.scalar_type()), op, ": input must be float32, float64, float16 or bfloat16, got ",
      input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), L = input.size(2);
  const auto offsets = checked_offsets(runs, N, L, op);
  const int64_t R = runs.size(0), K = offsets[R];
  TORCH_CHECK(K > 0, op, ": runs must hold at least one real position, got none");
  MaskedCall call{input.contiguous(), runs.contiguous(), {}, acc_dtype(input.scalar_type())};
  call.m = cpu::MaskedRuns{N, C, L, call.table.const_data_ptr<int64_t>(), R, K};
  return call;
}

// A per-channel tensor (optional ones may be absent): C values.
void check_channels(const c10::optional<Tensor>& t, int64_t C, const char* name, const char* op) {
  TORCH_CHECK(!t.has_value() || !t->defined() || (t->dim() == 1 && t->size(0) == C), op, ": ", name,
      " must have shape (", C, "), got ", t->sizes());
}

// (output, mean, biased var, invstd) of the training forward; invstd = invstd_from_var(var, eps).
std::tuple<Tensor, Tensor, Tensor, Tensor> masked_forward_cpu(
    const Tensor& input, const Tensor& runs, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext._masked_forward";
  const MaskedCall call = masked_call(input, runs, op);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const int64_t C = call.m.C;
  check_channels(weight, C, "weight", op);
  check_channels(bias, C, "bias", op);
  const auto opts = input.options().dtype(call.acc);
  Tensor y = at::empty_like(call.x);
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts), invstd = at::empty({C}, opts);
  const auto t = input.scalar_type();
  const auto& k = cpu::kernels();
  AT_DISPATCH_FLOATING_TYPES(call.acc, "bnext_masked", [&] {
    const AccChannels<scalar_t> w(weight, C, 1), b(bias, C, 0);
    if (C >= k.masked_fused_channels) {
      k.masked_forward(t, call.x.const_data_ptr(), y.data_ptr(), call.m, w.get(), b.get(), eps, mean.data_ptr(),
          var.data_ptr(), invstd.data_ptr());
      return;
    }
    k.masked_stats(t, call.x.const_data_ptr(), call.m, mean.data_ptr(), var.data_ptr());
    std::vector<scalar_t> pivot(C), scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t s = invstd_from_var(var.const_data_ptr<scalar_t>()[c], eps);
      invstd.data_ptr<scalar_t>()[c] = s;
      const auto coeffs = normalize_coeffs<scalar_t>(mean.const_data_ptr<scalar_t>()[c], s, w.get()[c], b.get()[c]);
      pivot[c] = coeffs.pivot;
      scale[c] = coeffs.scale;
      shift[c] = coeffs.shift;
    }
    k.masked_affine(t, call.x.const_data_ptr(), y.data_ptr(), call.m, pivot.data(), scale.data(), shift.data());
  });
  return {y, mean, var, invstd};
}

// (grad_input, sum_dy, sum_dy_xmu) of the real positions; grad_input only where input_grad (else
// an empty tensor), zero at the padding.
std::tuple<Tensor, Tensor, Tensor> masked_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const Tensor& runs, const Tensor& mean, const Tensor& invstd,
    const c10::optional<Tensor>& weight, bool input_grad) {
  const char* op = "bnext._masked_backward";
  const MaskedCall call = masked_call(input, runs, op);
  TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(), op,
      ": grad_out must match input (", input.sizes(), ", ", input.scalar_type(), "), got ", grad_out.sizes(), ", ",
      grad_out.scalar_type());
  const Tensor dy = grad_out.contiguous();
  const int64_t C = call.m.C;
  check_channels(mean, C, "mean", op);
  check_channels(invstd, C, "invstd", op);
  check_channels(weight, C, "weight", op);
  const auto opts = input.options().dtype(call.acc);
  Tensor sum_dy = at::empty({C}, opts), sum_dy_xmu = at::empty({C}, opts);
  Tensor dx = input_grad ? at::empty_like(call.x) : at::empty({0}, input.options());
  const auto t = input.scalar_type();
  const auto& k = cpu::kernels();
  AT_DISPATCH_FLOATING_TYPES(call.acc, "bnext_masked", [&] {
    const AccChannels<scalar_t> m(mean, C), s(invstd, C), w(weight, C, 1);
    if (input_grad && C >= k.masked_fused_channels) {
      k.masked_backward(t, dy.const_data_ptr(), call.x.const_data_ptr(), dx.data_ptr(), call.m, w.get(), m.get(),
          s.get(), sum_dy.data_ptr(), sum_dy_xmu.data_ptr());
      return;
    }
    k.masked_backward_reduce(
        t, dy.const_data_ptr(), call.x.const_data_ptr(), call.m, m.get(), sum_dy.data_ptr(), sum_dy_xmu.data_ptr());
    if (!input_grad) {
      return;
    }
    const scalar_t K = static_cast<scalar_t>(call.m.K);
    std::vector<BackwardCoeffs<scalar_t>> coeffs(C);
    for (int64_t c = 0; c < C; ++c) {
      coeffs[c] = backward_coeffs<scalar_t>(m.get()[c], s.get()[c], w.get()[c],
          sum_dy.const_data_ptr<scalar_t>()[c] / K, sum_dy_xmu.const_data_ptr<scalar_t>()[c] / K);
    }
    k.masked_backward_elemt(t, dy.const_data_ptr(), call.x.const_data_ptr(), dx.data_ptr(), call.m, coeffs.data());
  });
  return {dx, sum_dy, sum_dy_xmu};
}

// The mask-taking ops of the CUDA route (common/schemas.h) on CPU tensors: the mask's runs, then
// the kernels above (the reference of the emulated CUDA kernels' tests). No real position: the
// results the CUDA kernels give for an empty count (mean and var 0, zeros everywhere).
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_masked_forward_cpu(
    const Tensor& input, const Tensor& mask, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    double eps) {
  const char* op = "bnext._batch_norm_masked_forward";
  check_mask_args(input, mask, op);
  check_forward_args(input, weight, bias, eps, op);
  const Tensor runs = masked_runs_cpu(mask);
  if (runs.size(0) == 0) {
    const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
    const int64_t C = input.size(1);
    return {at::zeros_like(input, at::MemoryFormat::Contiguous), at::zeros({C}, opts),
        at::full({C}, 1.0 / std::sqrt(eps), opts), at::zeros({C}, opts)};
  }
  auto [y, mean, var, invstd] = masked_forward_cpu(input, runs, weight, bias, eps);
  return {y, mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_masked_backward_cpu(
    const Tensor& grad_out, const Tensor& input, const Tensor& mask, const c10::optional<Tensor>& weight,
    const Tensor& save_mean, const Tensor& save_invstd) {
  const char* op = "bnext._batch_norm_masked_backward";
  check_mask_args(input, mask, op);
  check_backward_args(grad_out, input, weight, save_mean, save_invstd, op);
  const Tensor runs = masked_runs_cpu(mask);
  if (runs.size(0) == 0) {
    const auto opts = input.options().dtype(acc_dtype(input.scalar_type()));
    const int64_t C = input.size(1);
    return {at::zeros_like(input, at::MemoryFormat::Contiguous), at::zeros({C}, opts), at::zeros({C}, opts)};
  }
  return masked_backward_cpu(grad_out, input, runs, save_mean, save_invstd, weight, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("_masked_compact", &masked_compact_cpu);
  m.impl("_masked_expand", &masked_expand_cpu);
  m.impl("_masked_runs", &masked_runs_cpu);
  m.impl("_masked_forward", &masked_forward_cpu);
  m.impl("_masked_backward", &masked_backward_cpu);
  m.impl("_batch_norm_masked_forward", &batch_norm_masked_forward_cpu);
  m.impl("_batch_norm_masked_backward", &batch_norm_masked_backward_cpu);
}

}  // namespace bnext
