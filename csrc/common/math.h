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
  // Convex form rather than a.mean + delta * nb_over_n: an infinite partial mean then gives an
  // infinite mean (inf - inf would give NaN), as a plain average does.
  out.mean = a.mean * (acc_t(1) - nb_over_n) + b.mean * nb_over_n;
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

// A running mean, one value at a time (the GPU reductions' per-thread step for mean_dy, see
// backward_coeffs): exactly the value where every value is equal; once the mean is not finite
// it sums as a plain sum would (inf + g), so Inf and NaN come out where they come out of a sum.
template <typename acc_t, typename count_t>
BNEXT_HOST_DEVICE acc_t mean_push(acc_t mean, acc_t x, count_t n) {
  return mean - mean == acc_t(0) ? mean + (x - mean) / static_cast<acc_t>(n) : mean + x;
}

// The mean of two means, f = nb / (na + nb): a + (b - a) * f, exact where a == b and accurate
// where they are close; convex where either is not finite (an infinite mean stays infinite).
template <typename acc_t>
BNEXT_HOST_DEVICE acc_t mean_combine(acc_t a, acc_t b, acc_t f) {
  if (a - a == acc_t(0) && b - b == acc_t(0)) {
    return a + (b - a) * f;
  }
  return a * (acc_t(1) - f) + b * f;
}

template <typename acc_t>
BNEXT_HOST_DEVICE acc_t invstd_from_var(acc_t var, double eps) {
  return acc_t(1) / static_cast<acc_t>(::sqrt(static_cast<double>(var) + eps));
}

// y = (x - mean) * invstd * weight + bias, evaluated per element as (x - pivot) * scale + shift.
// The pivot is a value close to the data (the mean itself, or the channel's first value when the
// statistics were taken relative to it). Folding everything into x * scale + shift instead would
// cancel two large terms when the data has a large offset and a small spread (mean 1e4, std 1e-2
// in float32 loses about two decimal digits that way); x - pivot is exact there (Sterbenz).
template <typename acc_t>
struct NormalizeCoeffs {
  acc_t pivot;
  acc_t scale;
  acc_t shift;
};

// An infinite scale (zero variance with eps = 0 in eval) has no meaningful output; use torch's own
// folded form there so NaN and Inf come out exactly where they come out of torch.
template <typename acc_t>
BNEXT_HOST_DEVICE NormalizeCoeffs<acc_t> fold_if_not_finite(NormalizeCoeffs<acc_t> c, acc_t mean, acc_t bias) {
  if (!(c.scale - c.scale == acc_t(0))) {
    c.shift = bias - mean * c.scale;
    c.pivot = acc_t(0);
  }
  return c;
}

template <typename acc_t>
BNEXT_HOST_DEVICE NormalizeCoeffs<acc_t> normalize_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t bias) {
  NormalizeCoeffs<acc_t> c;
  c.pivot = mean;
  c.scale = invstd * weight;
  c.shift = bias;
  return fold_if_not_finite(c, mean, bias);
}

// Statistics taken of x - pivot: mean = pivot + mean_shifted. The rounded mean becomes the pivot
// (x - mean is the smallest difference to round), and what rounding lost, mean_shifted - (mean -
// pivot), goes into the shift, so the normalization uses the unrounded mean.
template <typename acc_t>
BNEXT_HOST_DEVICE NormalizeCoeffs<acc_t> normalize_coeffs_shifted(
    acc_t pivot,
    acc_t mean_shifted,
    acc_t invstd,
    acc_t weight,
    acc_t bias) {
  NormalizeCoeffs<acc_t> c;
  c.pivot = pivot + mean_shifted;
  c.scale = invstd * weight;
  const acc_t lost = mean_shifted - (c.pivot - pivot);
  c.shift = bias - lost * c.scale;
  return fold_if_not_finite(c, c.pivot, bias);
}

template <typename acc_t>
BNEXT_HOST_DEVICE acc_t normalize(acc_t x, acc_t pivot, acc_t scale, acc_t shift) {
  return (x - pivot) * scale + shift;
}

// Closed-form training backward per channel:
//   dx = w * invstd * (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu)
//      = a * ((dy - mean_dy) - (x - mean) * k),  a = w * invstd,  k = invstd^2 * mean_dy_xmu
// with mean_dy = sum_dy / M and mean_dy_xmu = sum_dy_xmu / M. dy - mean_dy comes first, as in
// torch: where dy is constant over the channel (a loss through global pooling) it is exactly zero
// (given an exact mean_dy, see the reductions) and dx, truly ~0, keeps only the small k term. The
// folded form a * dy + b * (x - mean) + d, d = -a * mean_dy, cannot cancel: the rounding of
// a * mean_dy (and, without FMA, of a * dy) stays in every value, about ulp(a * dy) where the
// answer is ~0. x - mean stays unfolded for the same reason as in normalize().
template <typename acc_t>
struct BackwardCoeffs {
  acc_t mean;
  acc_t mean_dy;
  acc_t k;
  acc_t a;
};

template <typename acc_t>
BNEXT_HOST_DEVICE BackwardCoeffs<acc_t> backward_coeffs(
    acc_t mean,
    acc_t invstd,
    acc_t weight,
    acc_t mean_dy,
    acc_t mean_dy_xmu) {
  BackwardCoeffs<acc_t> c;
  c.mean = mean;
  c.mean_dy = mean_dy;
  c.k = invstd * invstd * mean_dy_xmu;
  c.a = weight * invstd;
  return c;
}

// T: acc_t, or a vector of acc_t (the CPU kernels' vector-extension types), so that every loop
// evaluates this one expression.
template <typename T>
BNEXT_HOST_DEVICE T backward_elemt(T dy, T x, T mean, T mean_dy, T k, T a) {
  return a * ((dy - mean_dy) - (x - mean) * k);
}

}  // namespace bnext
