// The copies of masked batch norm's compact route (bnext/masked.py) for CPU tensors: the real
// positions of a padded (N, C, L) batch, given as runs (row n, start, stop) in (n, l) order,
// gathered into one (1, C, K) tensor, and scattered back into (N, C, L) with zeros at the padding.
// A run of one channel is len contiguous values in both tensors, so each is one memcpy, and every
// value is read and written once, in one C++ call (torch.cat of the runs' strided slices and a
// copy_ plus a zero_ per run made a Python call per run). Figures: docs/performance.md, small and
// irregular batches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("_masked_compact", &masked_compact_cpu);
  m.impl("_masked_expand", &masked_expand_cpu);
}

}  // namespace bnext
