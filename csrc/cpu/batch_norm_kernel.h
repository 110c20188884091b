// CPU loops of every bnext op, templated on the input type. The entries in batch_norm_cpu.cpp
// check arguments, pick the memory format and allocate; everything here only reads and writes
// raw pointers of tensors that are contiguous in that format.
//
// Determinism: every reduction is split into pieces whose boundaries depend only on the shape
// (a channel, a fixed block of a channel's run, a fixed chunk of rows), never on the thread
// count, and the pieces are merged in a fixed order. Results are therefore bitwise identical for
// any torch.set_num_threads value and from run to run.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/layout.h"
#include "../common/math.h"

namespace bnext {
namespace cpu {

// A contiguous run of one channel is reduced in blocks of this many values with two passes
// (sum, then squared deviations); 2048 float32 values are 8 KiB, so the second pass hits L1.
constexpr int64_t kRunBlock = 2048;
// Channels-last reductions give each chunk of this many rows its own per-channel partials, then
// merge the partials in chunk order. Fixed, so results do not depend on the thread count.
constexpr int64_t kRowChunk = 256;
// Work per task below which at::parallel_for keeps a range on one thread.
constexpr int64_t kGrainElems = 32768;

template <typename acc_t>
using Welford = WelfordData<acc_t, int64_t>;
// Partials (runs, row chunks) are merged in double: with float merges every Chan step rounds the
// running mean, and a channel of many short runs accumulates several ulps of error.
using merge_t = double;

// Statistics are taken of x - pivot, with a per-channel pivot taken from the data (the channel's
// first value): with a large offset and a small spread (mean 1e4, std 1e-2 in float32) running
// means of raw values lose their low digits, shifted ones do not. The shifted mean is kept
// unrounded for the normalization (normalize_coeffs_shifted).

// Mean and M2 of x - pivot over a contiguous run, two passes (the run is at most kRunBlock long and
// stays in L1). Each term is divided by len before summing so that values near the float limit
// cannot overflow the sum.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline Welford<acc_t> run_stats(const scalar_t* p, int64_t len, acc_t pivot) {
  const acc_t inv_len = acc_t(1) / static_cast<acc_t>(len);
  acc_t mean = 0;
#pragma omp simd reduction(+ : mean)
  for (int64_t i = 0; i < len; ++i) {
    mean += (static_cast<acc_t>(p[i]) - pivot) * inv_len;
  }
  acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - pivot - mean;
    m2 += d * d;
  }
  return {mean, m2, len};
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline acc_t channel_pivot_nchw(const scalar_t* x, const Layout& l, int64_t c) {
  return l.N > 0 && l.HxW > 0 ? static_cast<acc_t>(x[c * l.HxW]) : acc_t(0);
}

// Statistics of x - pivot over channel c of an NCHW tensor: N runs of HxW values.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
inline Welford<merge_t> channel_stats_nchw(const scalar_t* x, const Layout& l, int64_t c, acc_t pivot) {
  Welford<merge_t> w{0, 0, 0};
  for (int64_t n = 0; n < l.N; ++n) {
    const scalar_t* p = x + (n * l.C + c) * l.HxW;
    for (int64_t b = 0; b < l.HxW; b += kRunBlock) {
      const auto r = run_stats<scalar_t, acc_t>(p + b, std::min(kRunBlock, l.HxW - b), pivot);
      w = welford_combine(w, Welford<merge_t>{r.mean, r.m2, r.n});
    }
  }
  return w;
}

// Statistics of every channel of a channels-last tensor (R rows of C values), relative to the
// first row (pivot_out, C values). mean_out receives the shifted means.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void rows_stats(const scalar_t* x, const Layout& l, acc_t* pivot_out, acc_t* mean_out, acc_t* var_out) {
  const int64_t R = l.rows(), C = l.C;
  const int64_t nchunks = (R + kRowChunk - 1) / kRowChunk;
  for (int64_t c = 0; c < C; ++c) {
    pivot_out[c] = R > 0 ? static_cast<acc_t>(x[c]) : acc_t(0);
  }
  const acc_t* pivot = pivot_out;
  std::vector<acc_t> pmean(nchunks * C), pm2(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* m = pmean.data() + k * C;
      acc_t* m2 = pm2.data() + k * C;
      std::fill(m, m + C, acc_t(0));
      std::fill(m2, m2 + C, acc_t(0));
      const int64_t r0 = k * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
      for (int64_t r = r0; r < r1; ++r) {
        // Welford update of all channels at once with one scalar 1/count per row.
        const acc_t inv = acc_t(1) / static_cast<acc_t>(r - r0 + 1);
        const scalar_t* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = static_cast<acc_t>(row[c]) - pivot[c];
          const acc_t d = v - m[c];
          m[c] += d * inv;
          m2[c] += d * (v - m[c]);
        }
      }
    }
  });
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, nchunks)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Welford<merge_t> w{0, 0, 0};
      for (int64_t k = 0; k < nchunks; ++k) {
        const int64_t len = std::min(R, (k + 1) * kRowChunk) - k * kRowChunk;
        w = welford_combine(w, Welford<merge_t>{pmean[k * C + c], pm2[k * C + c], len});
      }
      mean_out[c] = static_cast<acc_t>(w.mean);
      var_out[c] = static_cast<acc_t>(welford_var(w));
    }
  });
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void stats_kernel(const scalar_t* x, const Layout& l, acc_t* mean_out, acc_t* var_out) {
  if (l.channels_last) {
    std::vector<acc_t> pivot(l.C);
    rows_stats<scalar_t, acc_t>(x, l, pivot.data(), mean_out, var_out);
    for (int64_t c = 0; c < l.C; ++c) {
      mean_out[c] += pivot[c];
    }
    return;
  }
  at::parallel_for(0, l.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t pivot = channel_pivot_nchw<scalar_t, acc_t>(x, l, c);
      const auto w = channel_stats_nchw<scalar_t, acc_t>(x, l, c, pivot);
      mean_out[c] = static_cast<acc_t>(pivot + w.mean);
      var_out[c] = static_cast<acc_t>(welford_var(w));
    }
  });
}

// Per-channel normalization coefficients, one array each so channels-last rows vectorize.
template <typename acc_t>
struct NormalizeArrays {
  std::vector<acc_t> pivot, scale, shift;
  explicit NormalizeArrays(int64_t C) : pivot(C), scale(C), shift(C) {}
  void set(int64_t c, const NormalizeCoeffs<acc_t>& k) {
    pivot[c] = k.pivot;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
};

// y = (x - pivot) * scale + shift over one contiguous run with a single channel's coefficients.
template <typename scalar_t, typename acc_t>
inline void affine_run(const scalar_t* x, scalar_t* y, int64_t len, const NormalizeCoeffs<acc_t>& k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<scalar_t>(normalize(static_cast<acc_t>(x[i]), k.pivot, k.scale, k.shift));
  }
}

// The same over one row of C channels.
template <typename scalar_t, typename acc_t>
inline void affine_row(const scalar_t* x, scalar_t* y, int64_t C, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    y[c] = static_cast<scalar_t>(normalize(static_cast<acc_t>(x[c]), pivot[c], scale[c], shift[c]));
  }
}

// y = (x - pivot[c]) * scale[c] + shift[c] over the whole tensor.
template <typename scalar_t, typename acc_t>
void affine_kernel(const scalar_t* x, scalar_t* y, const Layout& l, const NormalizeArrays<acc_t>& k) {
  if (l.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.C));
    at::parallel_for(0, l.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        affine_row(x + r * l.C, y + r * l.C, l.C, k.pivot.data(), k.scale.data(), k.shift.data());
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.HxW));
  at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % l.C;
      affine_run(x + p * l.HxW, y + p * l.HxW, l.HxW, NormalizeCoeffs<acc_t>{k.pivot[c], k.scale[c], k.shift[c]});
    }
  });
}

// Training forward in one call. NCHW: each channel is normalized right after its statistics are
// taken, while its data is still in cache. Channels-last: statistics, then one elementwise pass.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void forward_kernel(
    const scalar_t* x,
    scalar_t* y,
    const Layout& l,
    const acc_t* weight,
    const acc_t* bias,
    double eps,
    acc_t* mean_out,
    acc_t* invstd_out,
    acc_t* var_out) {
  if (l.channels_last) {
    std::vector<acc_t> pivot(l.C);
    rows_stats<scalar_t, acc_t>(x, l, pivot.data(), mean_out, var_out);
    NormalizeArrays<acc_t> k(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      invstd_out[c] = invstd_from_var(var_out[c], eps);
      k.set(c, normalize_coeffs_shifted(pivot[c], mean_out[c], invstd_out[c], weight[c], bias[c]));
      mean_out[c] += pivot[c];
    }
    affine_kernel(x, y, l, k);
    return;
  }
  at::parallel_for(0, l.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const acc_t pivot = channel_pivot_nchw<scalar_t, acc_t>(x, l, c);
      const auto w = channel_stats_nchw<scalar_t, acc_t>(x, l, c, pivot);
      const acc_t var = static_cast<acc_t>(welford_var(w));
      const acc_t invstd = invstd_from_var(var, eps);
      mean_out[c] = static_cast<acc_t>(pivot + w.mean);
      var_out[c] = var;
      invstd_out[c] = invstd;
      const auto k = normalize_coeffs_shifted(pivot, static_cast<acc_t>(w.mean), invstd, weight[c], bias[c]);
      for (int64_t n = 0; n < l.N; ++n) {
        const int64_t off = (n * l.C + c) * l.HxW;
        affine_run(x + off, y + off, l.HxW, k);
      }
    }
  });
}

// sum(dy) and sum(dy * (x - mean)) over one contiguous run of one channel, added to s_dy and
// s_dyxmu. Blocks of kRunBlock are summed in acc_t and the block sums in merge_t: a float32
// running sum stops growing at 2**24 ones, a channel of a large batch has far more values.
template <typename scalar_t, typename acc_t>
inline void reduce_run(const scalar_t* dy, const scalar_t* x, int64_t len, acc_t mean, merge_t& s_dy, merge_t& s_dyxmu) {
  for (int64_t b0 = 0; b0 < len; b0 += kRunBlock) {
    const int64_t b1 = std::min(len, b0 + kRunBlock);
    acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = b0; i < b1; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      a += g;
      b += g * (static_cast<acc_t>(x[i]) - mean);
    }
    s_dy += a;
    s_dyxmu += b;
  }
}

template <typename scalar_t, typename acc_t>
inline void channel_reduce_nchw(
    const scalar_t* dy,
    const scalar_t* x,
    const Layout& l,
    int64_t c,
    acc_t mean,
    acc_t& sum_dy,
    acc_t& sum_dy_xmu) {
  merge_t s_dy = 0, s_dyxmu = 0;
  for (int64_t n = 0; n < l.N; ++n) {
    const int64_t off = (n * l.C + c) * l.HxW;
    reduce_run(dy + off, x + off, l.HxW, mean, s_dy, s_dyxmu);
  }
  sum_dy = static_cast<acc_t>(s_dy);
  sum_dy_xmu = static_cast<acc_t>(s_dyxmu);
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void rows_reduce(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const int64_t R = l.rows(), C = l.C;
  const int64_t nchunks = (R + kRowChunk - 1) / kRowChunk;
  std::vector<acc_t> pa(nchunks * C), pb(nchunks * C);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t* a = pa.data() + k * C;
      acc_t* b = pb.data() + k * C;
      std::fill(a, a + C, acc_t(0));
      std::fill(b, b + C, acc_t(0));
      const int64_t r0 = k * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* g = dy + r * C;
        const scalar_t* v = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gc = static_cast<acc_t>(g[c]);
          a[c] += gc;
          b[c] += gc * (static_cast<acc_t>(v[c]) - mean[c]);
        }
      }
    }
  });
  std::vector<merge_t> sa(C, 0), sb(C, 0);
  for (int64_t k = 0; k < nchunks; ++k) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sa[c] += pa[k * C + c];
      sb[c] += pb[k * C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sum_dy[c] = static_cast<acc_t>(sa[c]);
    sum_dy_xmu[c] = static_cast<acc_t>(sb[c]);
  }
}

template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void backward_reduce_kernel(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  if (l.channels_last) {
    rows_reduce<scalar_t, acc_t>(dy, x, l, mean, sum_dy, sum_dy_xmu);
    return;
  }
  at::parallel_for(0, l.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      channel_reduce_nchw(dy, x, l, c, mean[c], sum_dy[c], sum_dy_xmu[c]);
    }
  });
}

// dx = a * dy + b * (x - mean) + d over one contiguous run with a single channel's coefficients.
template <typename scalar_t, typename acc_t>
inline void backward_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, const BackwardCoeffs<acc_t>& k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    dx[i] = static_cast<scalar_t>(
        backward_elemt(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), k.mean, k.a, k.b, k.d));
  }
}

template <typename scalar_t, typename acc_t>
void backward_elemt_kernel(
    const scalar_t* dy,
    const scalar_t* x,
    scalar_t* dx,
    const Layout& l,
    const BackwardCoeffs<acc_t>* coeffs) {
  if (l.channels_last) {
    const int64_t C = l.C;
    std::vector<acc_t> m(C), a(C), b(C), d(C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = coeffs[c].mean;
      a[c] = coeffs[c].a;
      b[c] = coeffs[c].b;
      d[c] = coeffs[c].d;
    }
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C));
    at::parallel_for(0, l.rows(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = dy + r * C;
        const scalar_t* v = x + r * C;
        scalar_t* o = dx + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          o[c] = static_cast<scalar_t>(
              backward_elemt(static_cast<acc_t>(g[c]), static_cast<acc_t>(v[c]), m[c], a[c], b[c], d[c]));
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.HxW));
  at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t off = p * l.HxW;
      backward_run(dy + off, x + off, dx + off, l.HxW, coeffs[p % l.C]);
    }
  });
}

// Training backward in one call: per-channel reduction, then dx with the closed form. NCHW does
// both for one channel before moving on, while the channel is still in cache.
template <typename scalar_t, typename acc_t = acc_type_t<scalar_t>>
void backward_kernel(
    const scalar_t* dy,
    const scalar_t* x,
    scalar_t* dx,
    const Layout& l,
    const acc_t* weight,
    const acc_t* mean,
    const acc_t* invstd,
    acc_t* sum_dy,
    acc_t* sum_dy_xmu) {
  const acc_t inv_count = l.rows() > 0 ? acc_t(1) / static_cast<acc_t>(l.rows()) : acc_t(0);
  if (l.channels_last) {
    rows_reduce<scalar_t, acc_t>(dy, x, l, mean, sum_dy, sum_dy_xmu);
    std::vector<BackwardCoeffs<acc_t>> coeffs(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      coeffs[c] = backward_coeffs(mean[c], invstd[c], weight[c], sum_dy[c] * inv_count, sum_dy_xmu[c] * inv_count);
    }
    backward_elemt_kernel(dy, x, dx, l, coeffs.data());
    return;
  }
  at::parallel_for(0, l.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      channel_reduce_nchw(dy, x, l, c, mean[c], sum_dy[c], sum_dy_xmu[c]);
      const auto k = backward_coeffs(mean[c], invstd[c], weight[c], sum_dy[c] * inv_count, sum_dy_xmu[c] * inv_count);
      for (int64_t n = 0; n < l.N; ++n) {
        const int64_t off = (n * l.C + c) * l.HxW;
        backward_run(dy + off, x + off, dx + off, l.HxW, k);
      }
    }
  });
}

}  // namespace cpu
}  // namespace bnext
