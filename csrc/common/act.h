// The activations of the fused BN + activation (+ residual) ops, per element, shared by the CPU
// loops (scalar tails; the vector loops follow the same formulas) and the CUDA kernels.
//
// The fused op computes, per channel c and element i,
//     z = (x - mean[c]) * invstd[c] * weight[c] + bias[c] (+ residual)    (BN's output, plus the skip)
//     y = act(z)
// and never stores z. Its backward needs dz = dy * act'(z): from z recomputed from the saved input
// (and residual), or, in the memory-saving mode, from the saved output y for the activations that
// are invertible (identity, leaky_relu with a positive slope, elu with a positive alpha), z then
// being act_inverse(y).
//
// Each formula is the one torch's own kernel uses (aten/src/ATen/native/cpu/Activation.cpp), so a
// fused layer agrees with BatchNorm followed by torch's activation module, boundaries included:
// relu'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha, hardswish'(-3) = 0, hardswish'(3) = 1.
// A NaN z gives a NaN y (torch's relu propagates NaN too).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "math.h"

namespace bnext {

// The activation codes of the ops' `activation` argument (bnext/_ops/conventions.py names them).
enum class Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,  // param: negative_slope
  kElu = 3,        // param: alpha
  kSilu = 4,
  kHardswish = 5,
};
constexpr int64_t kNumActs = 6;

// Whether z can be recovered from y = act(z) (the memory-saving backward): identity, leaky_relu
// with slope > 0, elu with alpha > 0. (relu loses every negative z; silu and hardswish are not
// monotonic.)
BNEXT_HOST_DEVICE bool act_invertible(Act a, double param) {
  return a == Act::kIdentity || ((a == Act::kLeakyRelu || a == Act::kElu) && param > 0);
}

template <typename T>
BNEXT_HOST_DEVICE T act_exp(T v) {
  using std::exp;
  return exp(v);
}

template <typename T>
BNEXT_HOST_DEVICE T act_expm1(T v) {
  using std::expm1;
  return expm1(v);
}

template <typename T>
BNEXT_HOST_DEVICE T act_log1p(T v) {
  using std::log1p;
  return log1p(v);
}

// y = act(z). p: the activation's parameter (negative_slope, alpha), unused by the others.
template <typename T>
BNEXT_HOST_DEVICE T act_forward(Act a, T z, T p) {
  switch (a) {
    case Act::kRelu:
      return z <= T(0) ? T(0) : z;  // NaN stays NaN
    case Act::kLeakyRelu:
      return z > T(0) ? z : z * p;
    case Act::kElu:
      return z > T(0) ? z : p * act_expm1(z);
    case Act::kSilu:
      return z / (T(1) + act_exp(-z));
    case Act::kHardswish: {
      T t = z + T(3);
      t = t < T(0) ? T(0) : (t > T(6) ? T(6) : t);
      return z * t / T(6);
    }
    default:
      return z;
  }
}

// act'(z), torch's backward formulas written as the factor applied to dy.
template <typename T>
BNEXT_HOST_DEVICE T act_derivative(Act a, T z, T p) {
  switch (a) {
    case Act::kRelu:
      return z > T(0) ? T(1) : T(0);
    case Act::kLeakyRelu:
      return z > T(0) ? T(1) : p;
    case Act::kElu:
      return z > T(0) ? T(1) : p * act_exp(z);
    case Act::kSilu: {
      const T s = T(1) / (T(1) + act_exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    case Act::kHardswish:
      return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    default:
      return T(1);
  }
}

// Memory-saving backward, invertible activations only (act_invertible): z from y, and act'(z)
// from y (elu: alpha * exp(z) = y + alpha for y <= 0, as torch's in-place elu backward computes it).
// The argument of elu's inverse log1p(y / alpha), kept above -1: elu saturates, y = alpha *
// expm1(z) is exactly -alpha for z below about log(eps) (z < -17 in float32, about -6 once stored
// in bfloat16), and log1p(-1) = -inf would make x - mean infinite and the channel's sums NaN. There
// act' = y + alpha is 0 (so dz is 0); the recovered z is log1p(-1 + eps) instead of the true one,
// and x - mean is off by that difference over weight * invstd at those values only.
template <typename T>
BNEXT_HOST_DEVICE T elu_inverse_arg(T q) {
  const T lo = T(-1) + std::numeric_limits<T>::epsilon();
  return q < lo ? lo : q;
}

template <typename T>
BNEXT_HOST_DEVICE T act_inverse(Act a, T y, T p) {
  switch (a) {
    case Act::kLeakyRelu:
      return y > T(0) ? y : y / p;
    case Act::kElu:
      return y > T(0) ? y : act_log1p(elu_inverse_arg(y / p));
    default:
      return y;
  }
}

template <typename T>
BNEXT_HOST_DEVICE T act_derivative_from_output(Act a, T y, T p) {
  switch (a) {
    case Act::kLeakyRelu:
      return y > T(0) ? T(1) : p;
    case Act::kElu:
      return y > T(0) ? T(1) : y + p;
    default:
      return T(1);
  }
}

}  // namespace bnext
