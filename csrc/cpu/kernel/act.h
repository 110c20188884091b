// The activations of the fused BN + activation (+ residual) ops on vectors (part of
// batch_norm_kernel.h: see the map there): exp and expm1 of accumulation-type vectors, and
// act_forward, act_derivative, act_inverse, act_derivative_from_output of csrc/common/act.h on
// vectors. Every formula is the one of act.h, written for vectors (selects, min/max, the same
// operations in the same order); the scalar tails of the loops call act.h itself.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/act.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// The activation as a compile-time constant: one loop per activation, no switch per vector.
template <Act A>
using ActC = std::integral_constant<Act, A>;

// f(ActC<a>()) for the activation code `code` (checked by the entries: 0 .. kNumActs - 1).
template <typename F>
inline void with_act(int64_t code, const F& f) {
  switch (static_cast<Act>(code)) {
    case Act::kRelu:
      f(ActC<Act::kRelu>());
      break;
    case Act::kLeakyRelu:
      f(ActC<Act::kLeakyRelu>());
      break;
    case Act::kElu:
      f(ActC<Act::kElu>());
      break;
    case Act::kSilu:
      f(ActC<Act::kSilu>());
      break;
    case Act::kHardswish:
      f(ActC<Act::kHardswish>());
      break;
    default:
      f(ActC<Act::kIdentity>());
  }
}

// The same for the invertible activations of the memory-saving backward (act_invertible; the
// entries refuse the others, which would run as identity here).
template <typename F>
inline void with_invertible_act(int64_t code, const F& f) {
  with_act(code, [&](auto a) {
    constexpr Act kA = decltype(a)::value;
    if constexpr (kA == Act::kLeakyRelu || kA == Act::kElu) {
      f(a);
    } else {
      f(ActC<Act::kIdentity>());
    }
  });
}

// exp(z) = 2^n * e^r with n = round(z / ln 2) and r = z - n * ln 2 (ln 2 in two parts, Cody and
// Waite, so that n * ln2_hi is exact), e^r - 1 = r + r^2 * P(r) on |r| <= ln(2) / 2: Cephes'
// expf polynomial for float (about 1 ulp), the Taylor series to r^13 for double (truncation
// below 5e-18). Keeping e^r - 1 apart gives expm1 without cancellation near 0:
// expm1(z) = 2^n * (e^r - 1) + (2^n - 1), exact in its last step for n = 0.
// z is clamped to [lo, hi] first so that 2^n is a normal number: exp underflows to exp(lo)
// (about 1e-38 in float, 1e-308 in double) instead of to a denormal or 0, and overflows past hi
// to exp(hi) rather than Inf; NaN passes the clamp (comparisons with NaN are false) and comes
// out NaN through r.
template <typename acc_t>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  typedef int32_t bits __attribute__((vector_size(kNativeBytes)));
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr int32_t bias = 127;
  static constexpr int mantissa = 23;
  // P(r), highest degree first.
  static constexpr int kTerms = 6;
  static constexpr float poly[kTerms] = {
      1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};
};
template <>
struct ExpConsts<double> {
  typedef int64_t bits __attribute__((vector_size(kNativeBytes)));
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93145751953125E-1, ln2_lo = 1.42860682030941723212E-6;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int64_t bias = 1023;
  static constexpr int mantissa = 52;
  static constexpr int kTerms = 12;  // 1/13! .. 1/2!
  static constexpr double poly[kTerms] = {
      1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
      1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 1.0 / 2.0};
};

// 2^n (t) and e^r - 1 (em1r) of z, see ExpConsts.
template <typename acc_t>
inline void vexp_parts(typename Vec<acc_t>::type z, typename Vec<acc_t>::type& t, typename Vec<acc_t>::type& em1r) {
  using vec = typename Vec<acc_t>::type;
  using K = ExpConsts<acc_t>;
  using bits = typename K::bits;
  z = z < K::lo ? vec{} + K::lo : z;
  z = z > K::hi ? vec{} + K::hi : z;
  const vec k = z * K::log2e + K::shifter;
  const vec n = k - K::shifter;
  const vec r = (z - n * K::ln2_hi) - n * K::ln2_lo;
  vec p = vec{} + K::poly[0];
  for (int i = 1; i < K::kTerms; ++i) {
    p = p * r + K::poly[i];
  }
  em1r = r + (r * r) * p;
  bits kb, sb;
  const vec s = vec{} + K::shifter;
  std::memcpy(&kb, &k, sizeof(kb));
  std::memcpy(&sb, &s, sizeof(sb));
  const bits tb = (kb - sb + K::bias) << K::mantissa;
  std::memcpy(&t, &tb, sizeof(t));
}

template <typename acc_t>
inline typename Vec<acc_t>::type vexp(typename Vec<acc_t>::type z) {
  typename Vec<acc_t>::type t, em1r;
  vexp_parts<acc_t>(z, t, em1r);
  return t * em1r + t;
}

template <typename acc_t>
inline typename Vec<acc_t>::type vexpm1(typename Vec<acc_t>::type z) {
  typename Vec<acc_t>::type t, em1r;
  vexp_parts<acc_t>(z, t, em1r);
  return t * em1r + (t - acc_t(1));
}

// act_forward of act.h.
template <Act A, typename acc_t>
inline typename Vec<acc_t>::type vact_forward(typename Vec<acc_t>::type z, acc_t p) {
  using vec = typename Vec<acc_t>::type;
  if constexpr (A == Act::kRelu) {
    return z <= acc_t(0) ? vec{} : z;  // NaN stays NaN
  } else if constexpr (A == Act::kLeakyRelu) {
    return z > acc_t(0) ? z : z * p;
  } else if constexpr (A == Act::kElu) {
    return z > acc_t(0) ? z : p * vexpm1<acc_t>(z);
  } else if constexpr (A == Act::kSilu) {
    return z / (acc_t(1) + vexp<acc_t>(-z));
  } else if constexpr (A == Act::kHardswish) {
    vec t = z + acc_t(3);
    t = t < acc_t(0) ? vec{} : (t > acc_t(6) ? vec{} + acc_t(6) : t);
    return z * t / acc_t(6);
  } else {
    return z;
  }
}

// act_derivative of act.h.
template <Act A, typename acc_t>
inline typename Vec<acc_t>::type vact_derivative(typename Vec<acc_t>::type z, acc_t p) {
  using vec = typename Vec<acc_t>::type;
  const vec one = vec{} + acc_t(1);
  if constexpr (A == Act::kRelu) {
    return z > acc_t(0) ? one : vec{};
  } else if constexpr (A == Act::kLeakyRelu) {
    return z > acc_t(0) ? one : vec{} + p;
  } else if constexpr (A == Act::kElu) {
    return z > acc_t(0) ? one : p * vexp<acc_t>(z);
  } else if constexpr (A == Act::kSilu) {
    const vec s = acc_t(1) / (acc_t(1) + vexp<acc_t>(-z));
    return s * (acc_t(1) + z * (acc_t(1) - s));
  } else if constexpr (A == Act::kHardswish) {
    return z < acc_t(-3) ? vec{} : (z <= acc_t(3) ? z / acc_t(3) + acc_t(0.5) : one);
  } else {
    return one;
  }
}

// act_inverse of act.h (invertible activations only). elu's log1p is taken lane by lane with
// std::log1p (the memory-saving elu backward only; no vector log1p here).
template <Act A, typename acc_t>
inline typename Vec<acc_t>::type vact_inverse(typename Vec<acc_t>::type y, acc_t p) {
  static_assert(A == Act::kIdentity || A == Act::kLeakyRelu || A == Act::kElu);
  if constexpr (A == Act::kLeakyRelu) {
    return y > acc_t(0) ? y : y / p;
  } else if constexpr (A == Act::kElu) {
    const typename Vec<acc_t>::type q = y / p;
    typename Vec<acc_t>::type z = y;
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
      if (!(y[j] > acc_t(0))) {
        z[j] = std::log1p(elu_inverse_arg(q[j]));
      }
    }
    return z;
  } else {
    return y;
  }
}

// act_derivative_from_output of act.h.
template <Act A, typename acc_t>
inline typename Vec<acc_t>::type vact_derivative_from_output(typename Vec<acc_t>::type y, acc_t p) {
  using vec = typename Vec<acc_t>::type;
  static_assert(A == Act::kIdentity || A == Act::kLeakyRelu || A == Act::kElu);
  if constexpr (A == Act::kLeakyRelu) {
    return y > acc_t(0) ? vec{} + acc_t(1) : vec{} + p;
  } else if constexpr (A == Act::kElu) {
    return y > acc_t(0) ? vec{} + acc_t(1) : y + p;
  } else {
    return vec{} + acc_t(1);
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
