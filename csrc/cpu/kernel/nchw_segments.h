// NCHW segment walks (part of batch_norm_kernel.h: see the map there): the reductions and
// elementwise passes over one contiguous run of one channel.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/nchw_segments.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// Contiguous segments of one channel (NCHW). A block of a channel is several segments (runs); the
// vector accumulators carry over from one segment to the next and are reduced once per block, so
// short runs (7x7, 14x14) cost no horizontal sum each. Four accumulators hide add latency.
template <typename acc_t>
struct VecSum {
  using vec = typename Vec<acc_t>::type;
  vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  acc_t tail = 0;
  acc_t total() const {
    return hsum<acc_t>((a0 + a1) + (a2 + a3)) + tail;
  }
  // Accumulator K (0-3) of the four chains.
  template <int K>
  vec& at() {
    static_assert(K >= 0 && K < 4);
    if constexpr (K == 0) {
      return a0;
    } else if constexpr (K == 1) {
      return a1;
    } else if constexpr (K == 2) {
      return a2;
    } else {
      return a3;
    }
  }
};

template <int K>
using Slot = std::integral_constant<int, K>;

// Walks one segment of a run for the reductions: vadd(Slot<k>, v) for each whole vector v, k
// (0-3, one accumulator chain each) fixed by the vector's place in the run; vtail(v, n) for the
// last n < W values as one masked vector where the ISA has them (lanes >= n load as zero; vtail
// zeroes its terms there), else sadd(x) for each of them.
template <typename scalar_t, typename acc_t, typename VecAdd, typename TailAdd, typename ScalarAdd>
inline void seg_walk(const scalar_t* p, int64_t len, const VecAdd& vadd, const TailAdd& vtail, const ScalarAdd& sadd) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    typename Vec<acc_t>::type v0, v1, v2, v3;
    vload2<scalar_t, acc_t>(p + i, v0, v1);
    vload2<scalar_t, acc_t>(p + i + 2 * W, v2, v3);
    vadd(Slot<0>(), v0);
    vadd(Slot<1>(), v1);
    vadd(Slot<2>(), v2);
    vadd(Slot<3>(), v3);
  }
  // The last (up to three) vectors of a run into different accumulators: runs of 7x7 or 14x14
  // values end with two or three, and one accumulator made them a chain of dependent adds.
  if (i + 2 * W <= len) {
    vadd(Slot<0>(), vload<scalar_t, acc_t>(p + i));
    vadd(Slot<1>(), vload<scalar_t, acc_t>(p + i + W));
    i += 2 * W;
  }
  if (i + W <= len) {
    vadd(Slot<2>(), vload<scalar_t, acc_t>(p + i));
    i += W;
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      vtail(vload_part<scalar_t, acc_t>(p + i, len - i), len - i);
    }
  } else {
    for (; i < len; ++i) {
      sadd(load<scalar_t, acc_t>(p, i));
    }
  }
}

// Adds term(x) of every value of a segment into s.
template <typename scalar_t, typename acc_t, typename VecTerm, typename Term>
inline void seg_accumulate(const scalar_t* p, int64_t len, VecSum<acc_t>& s, const VecTerm& vterm, const Term& term) {
  using vec = typename Vec<acc_t>::type;
  seg_walk<scalar_t, acc_t>(
      p, len, [&](auto k, vec v) { s.template at<k.value>() += vterm(v); },
      [&](auto v, int64_t n) { s.a3 += first_lanes<acc_t>(vterm(v), n); }, [&](acc_t v) { s.tail += term(v); });
}

// Sum of (x - pivot) * inv_count.
template <typename scalar_t, typename acc_t>
inline void seg_mean(const scalar_t* p, int64_t len, acc_t pivot, acc_t inv_count, VecSum<acc_t>& s) {
  using vec = typename Vec<acc_t>::type;
  const vec pv = vec{} + pivot, iv = vec{} + inv_count;
  seg_accumulate<scalar_t, acc_t>(
      p, len, s, [&](vec v) { return (v - pv) * iv; }, [&](acc_t v) { return (v - pivot) * inv_count; });
}

// Sums of d = x - center into s1 and of d * d into s2, over one segment: the one pass of 16-bit
// statistics (center: the pivot) and the second pass of two-pass statistics (center: the first
// pass's mean, see two_pass_welford).
template <typename scalar_t, typename acc_t>
inline void seg_moments(const scalar_t* p, int64_t len, acc_t center, VecSum<acc_t>& sum1, VecSum<acc_t>& sum2) {
  using vec = typename Vec<acc_t>::type;
  const vec cv = vec{} + center;
  // Local copies: the caller's sums could alias p as far as the compiler knows (float vectors and
  // float values), which kept them in memory, stored and reloaded around every load of p.
  VecSum<acc_t> s1 = sum1, s2 = sum2;
  seg_walk<scalar_t, acc_t>(
      p, len,
      [&](auto k, vec v) {
        const vec d = v - cv;
        s1.template at<k.value>() += d;
        s2.template at<k.value>() += d * d;
      },
      [&](auto v, int64_t n) {  // generic: instantiated only where masked tails exist
        const vec d = first_lanes<acc_t>(v - cv, n);
        s1.a3 += d;
        s2.a3 += d * d;
      },
      [&](acc_t v) {
        const acc_t d = v - center;
        s1.tail += d;
        s2.tail += d * d;
      });
  sum1 = s1;
  sum2 = s2;
}

// sum(dy) into a, sum(dy * (x - mean)) into b, over one segment.
template <typename scalar_t, typename acc_t>
inline void seg_reduce(
    const scalar_t* dy, const scalar_t* x, int64_t len, acc_t mean, VecSum<merge_t>& sum_a, VecSum<acc_t>& sum_b) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec m = vec{} + mean;
  VecSum<merge_t> a = sum_a;  // local copies, as in seg_moments
  VecSum<acc_t> b = sum_b;
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    vec g0, g1, g2, g3, x0, x1, x2, x3;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(dy + i + 2 * W, g2, g3);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    vload2<scalar_t, acc_t>(x + i + 2 * W, x2, x3);
    wide_add<acc_t>(a.a0, a.a1, (g0 + g1) + (g2 + g3));
    b.a0 += g0 * (x0 - m);
    b.a1 += g1 * (x1 - m);
    b.a2 += g2 * (x2 - m);
    b.a3 += g3 * (x3 - m);
  }
  if (i + 2 * W <= len) {
    vec g0, g1, x0, x1;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    wide_add<acc_t>(a.a2, a.a3, g0 + g1);
    b.a0 += g0 * (x0 - m);
    b.a1 += g1 * (x1 - m);
    i += 2 * W;
  }
  if (i + W <= len) {
    const vec g = vload<scalar_t, acc_t>(dy + i);
    wide_add<acc_t>(a.a2, a.a3, g);
    b.a2 += g * (vload<scalar_t, acc_t>(x + i) - m);
    i += W;
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      const vec g = vload_part<scalar_t, acc_t>(dy + i, len - i);  // zero past len
      wide_add<acc_t>(a.a2, a.a3, g);
      b.a3 += first_lanes<acc_t>(g * (vload_part<scalar_t, acc_t>(x + i, len - i) - m), len - i);
    }
  } else {
    for (; i < len; ++i) {
      const acc_t g = load<scalar_t, acc_t>(dy, i);
      a.tail += g;
      b.tail += g * (load<scalar_t, acc_t>(x, i) - mean);
    }
  }
  sum_a = a;
  sum_b = b;
}

// y = (x - pivot) * scale + shift (normalize() of math.h) over one segment of one channel.
// With NT, the values before y's first store-aligned address are stored one by one and the
// vectors are streamed.
template <typename scalar_t, typename acc_t, bool NT = false, bool Centered = true>
inline void seg_affine(const scalar_t* x, scalar_t* y, int64_t len, const NormalizeCoeffs<acc_t>& k) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec pv = vec{} + k.pivot, s = vec{} + k.scale, t = vec{} + k.shift;
  auto f = [&](vec a) { return vnormalize<Centered>(a, pv, s, t); };
  int64_t i = 0;
  for (const int64_t head = aligned_head<scalar_t, NT>(y, len); i < head; ++i) {
    store<scalar_t, acc_t>(y, i, normalize(load<scalar_t, acc_t>(x, i), k.pivot, k.scale, k.shift));
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    vec a, b;
    vload2<scalar_t, acc_t>(x + i, a, b);
    vstore2<scalar_t, acc_t, NT>(y + i, f(a), f(b));
  }
  for (; i + W <= len; i += W) {
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(y + i, f(vload<scalar_t, acc_t>(x + i)));
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      vstore_part<scalar_t, acc_t>(y + i, f(vload_part<scalar_t, acc_t>(x + i, len - i)), len - i);
    }
  } else {
    for (; i < len; ++i) {
      store<scalar_t, acc_t>(y, i, normalize(load<scalar_t, acc_t>(x, i), k.pivot, k.scale, k.shift));
    }
  }
}

// backward_elemt() of math.h over one segment of one channel.
template <typename scalar_t, typename acc_t, bool NT = false>
inline void seg_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, const BackwardCoeffs<acc_t>& k) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec m = vec{} + k.mean, mdy = vec{} + k.mean_dy, kv = vec{} + k.k, a = vec{} + k.a;
  auto f = [&](vec g, vec v) { return backward_elemt(g, v, m, mdy, kv, a); };
  auto one = [&](int64_t i) {
    store<scalar_t, acc_t>(
        dx, i, backward_elemt(load<scalar_t, acc_t>(dy, i), load<scalar_t, acc_t>(x, i), k.mean, k.mean_dy, k.k, k.a));
  };
  int64_t i = 0;
  for (const int64_t head = aligned_head<scalar_t, NT>(dx, len); i < head; ++i) {
    one(i);
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    vec g0, g1, x0, x1;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    vstore2<scalar_t, acc_t, NT>(dx + i, f(g0, x0), f(g1, x1));
  }
  for (; i + W <= len; i += W) {
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(
        dx + i, f(vload<scalar_t, acc_t>(dy + i), vload<scalar_t, acc_t>(x + i)));
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      const int64_t n = len - i;
      vstore_part<scalar_t, acc_t>(dx + i, f(vload_part<scalar_t, acc_t>(dy + i, n), vload_part<scalar_t, acc_t>(x + i, n)), n);
    }
  } else {
    for (; i < len; ++i) {
      one(i);
    }
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
