// Per-element and per-channel math shared by the CPU loops and the CUDA kernels.
// Everything here is BNEXT_HOST_DEVICE so the CPU kernel, the CUDA kernel and the emulated CUDA
// build compute a value the same way.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BNEXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BNEXT_HOST_DEVICE inline
#endif

namespace bnext {

// Half and bfloat16 accumulate in float32; float64 stays float64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type_t = typename AccType<scalar_t>::type;

// Welford state of one channel (or one partial of one channel): mean and M2 = sum((x - mean)^2)
// over `n` values. count_t is int64_t on the CPU and may be a float type on the GPU.
template <typename acc_t, typename count_t>
struct WelfordData {
  acc_t mean;
  acc_t m2;
  count_t n;
};

// Chan et al. (1979) pairwise merge. Empty sides are exact no-ops, so merging partials of empty
// chunks or empty ranks never produces 0/0.
template <typename acc_t, typename count_t>
BNEXT_HOST_DEVICE WelfordData<acc_t, count_t> welford_combine(
    const WelfordData<acc_t, count_t>& a,
    const WelfordData<acc_t, count_t>& b) {
  if (b.n == 0) {
    return a;
  }
  if (a.n == 0) {
    return b;
  }
  const count_t n = a.n + b.n;
  const acc_t nb_over_n = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
  const acc_t delta = b.mean - a.mean;
  WelfordData<acc_t, count_t> out;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.n) * nb_over_n;
  out.n = n;
  return out;
}

// Welford (1962) update with one value: the per-thread step of the GPU reductions.
template <typename acc_t, typename count_t>
BNEXT_HOST_DEVICE void welford_push(WelfordData<acc_t, count_t>& w, acc_t x) {
  w.n += 1;
  const acc_t delta = x - w.mean;
  w.mean += delta / static_cast<acc_t>(w.n);
  w.m2 += delta * (x - w.mean);
}

// Biased variance of a merged state; 0 for an empty one (as for mean), never NaN from 0/0.
template <typename acc_t, typename count_t>
BNEXT_HOST_DEVICE acc_t welford_var(const WelfordData<acc_t, count_t>& w) {
  return w.n > 0 ? w.m2 / static_cast<acc_t>(w.n) : acc_t(0);
}

template <typename acc_t>
BNEXT_HOST_DEVICE acc_t invstd_from_var(acc_t var, double eps) {
  return acc_t(1) / static_cast<acc_t>(::sqrt(static_cast<double>(var) + eps));
}

// y = (x - mean) * invstd * weight + bias, folded into y = x * scale + shift once per channel.
template <typename acc_t>
struct NormalizeCoeffs {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
BNEXT_HOST_DEVICE NormalizeCoeffs<acc_t> normalize_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t bias) {
  NormalizeCoeffs<acc_t> c;
  c.scale = invstd * weight;
  c.shift = bias - mean * c.scale;
  return c;
}

// Closed-form training backward, folded per channel into dx = a * dy + b * x + d:
//   dx = w * invstd * (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu)
// with mean_dy = sum_dy / M and mean_dy_xmu = sum_dy_xmu / M.
template <typename acc_t>
struct BackwardCoeffs {
  acc_t a;
  acc_t b;
  acc_t d;
};

template <typename acc_t>
BNEXT_HOST_DEVICE BackwardCoeffs<acc_t> backward_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t mean_dy,
    acc_t mean_dy_xmu) {
  BackwardCoeffs<acc_t> c;
  c.a = weight * invstd;
  const acc_t k = invstd * invstd * mean_dy_xmu;
  c.b = -c.a * k;
  c.d = c.a * (k * mean - mean_dy);
  return c;
}

}  // namespace bnext
