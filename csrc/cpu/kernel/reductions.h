// Reductions (part of batch_norm_kernel.h: see the map there): per-channel statistics (NCHW blocks,
// channels-last chunks, merged in a fixed order) and the backward sums.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/reductions.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// Statistics are taken of x - pivot, with a per-channel pivot taken from the data (the channel's
// first value): with a large offset and a small spread (mean 1e4, std 1e-2 in float32) means of
// raw values lose their low digits, shifted ones do not. Every term is scaled by 1/count before
// it is summed, so values near the float limit cannot overflow a block's mean.

// Mean and M2 of `count` values of x - pivot from two passes: the first pass's mean, then sums of
// d = x - center and of d * d, center = pivot + mean rounded once (the second pass then costs what
// it cost without the sum of d: one subtraction a value, not two). The corrected two-pass
// algorithm (Chan, Golub and LeVeque, 1983): sum(d) is what the first pass's float accumulation
// left out of its mean (its terms carry the data's offset from the pivot, and the rounding of a
// chain of them grows with it) and what rounding the center lost, and it is small, so
// (center - pivot) + sum(d) / count is accurate to a rounding of the spread, not of the offset.
// NCHW float32 means came out several ulps off without it, where torch's (summed in double) are
// correctly rounded, and the backward carries the mean's error into dx (a constant dy gives
// dx = -a * (x - mean) * k, k proportional to the error). M2 = sum(d^2) - sum(d)^2 / count. Where
// the center or sum(d) is not finite (Inf or NaN in x, or a center rounded past the largest
// float) the first pass's mean is kept, so Inf and NaN come out as they came out of it.
template <typename acc_t>
inline Welford<merge_t> two_pass_welford(
    acc_t pivot, acc_t mean, acc_t center, acc_t sum_d, acc_t sum_d2, int64_t count) {
  const merge_t r = count > 0 ? static_cast<merge_t>(sum_d) / static_cast<merge_t>(count) : merge_t(0);
  if (!(center - center == acc_t(0) && r - r == merge_t(0))) {
    return {static_cast<merge_t>(mean), static_cast<merge_t>(sum_d2), count};
  }
  const merge_t m2 = static_cast<merge_t>(sum_d2) - static_cast<merge_t>(sum_d) * r;
  return {(static_cast<merge_t>(center) - static_cast<merge_t>(pivot)) + r, m2 < 0 ? merge_t(0) : m2, count};
}

// Whether v is Inf or NaN, from its exponent bits (a floating-point comparison in a loop kept GCC
// from vectorizing it: with trapping math it would not if-convert the comparison).
template <typename T>
inline uint32_t nonfinite_bits(T v) {
  if constexpr (sizeof(T) == 4) {
    return (std::bit_cast<uint32_t>(v) & 0x7f800000u) == 0x7f800000u;
  } else {
    return (std::bit_cast<uint64_t>(v) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
  }
}

// two_pass_welford of the C channels of one chunk of `count` rows, vectorized across channels:
// the same operations, so the same bits, where every center and sum_d / count is finite; false
// (out undefined) otherwise, for the caller's channel-by-channel two_pass_welford. A chunk of a
// wide channels-last input has few rows a channel (kMinChunkRows), and channel by channel this
// finishing took longer than the chunk's two passes over its rows (see
// docs/performance.md#chunk-finishing).
template <typename acc_t>
inline bool chunk_welford(
    const acc_t* pivot, const acc_t* center, const acc_t* sum_d, const acc_t* sum_d2, int64_t C, int64_t count,
    merge_t* mean, merge_t* m2) {
  const merge_t n = static_cast<merge_t>(count);
  uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t c = 0; c < C; ++c) {
    const merge_t d = static_cast<merge_t>(sum_d[c]);
    const merge_t r = d / n;
    bad |= nonfinite_bits(center[c]) | nonfinite_bits(r);
    mean[c] = (static_cast<merge_t>(center[c]) - static_cast<merge_t>(pivot[c])) + r;
    m2[c] = std::max(static_cast<merge_t>(sum_d2[c]) - d * r, merge_t(0));
  }
  return bad == 0 && count > 0;
}

// 16-bit inputs (bfloat16, float16) take their statistics in ONE pass of shifted sums,
// sum(x - pivot) and sum((x - pivot)^2), where wider types take two (mean, then squared
// deviations from L1). The second pass cost as much as the first: the conversion of every value
// to float made both compute-bound (see docs/performance.md#one-pass-statistics). It is accurate
// enough here: a 16-bit value has 8 or 11 significant bits, so x - pivot and its square lose at
// most the last bits of a float, and the main error is the float accumulation of the sums (a
// block, or a chunk's rows), which M2 = sum2 - sum1 * mean (taken in double) scales by
// sum2 / M2 = 1 + (mean - pivot)^2 / var, near 1 with the pivot used here (the mean of the
// channel's first values, see nchw_pivot). Checked by tests/test_cpu_kernels.py to 1e-4 of the
// variance with a first value 30 deviations out.
template <typename scalar_t>
constexpr bool kOnePassStats = sizeof(scalar_t) == 2;

// Mean and M2 of `count` values of x - pivot from their sum and sum of squares.
template <typename acc_t>
inline Welford<merge_t> moments_to_welford(acc_t sum1, acc_t sum2, int64_t count) {
  if (count == 0) {
    return {0, 0, 0};
  }
  const merge_t mean = static_cast<merge_t>(sum1) / static_cast<merge_t>(count);
  const merge_t m2 = static_cast<merge_t>(sum2) - static_cast<merge_t>(sum1) * mean;
  return {mean, m2 < 0 ? merge_t(0) : m2, count};  // NaN stays NaN
}

// The pivot of channel c: its first value, or for one-pass statistics the mean of its first
// (up to) kPivotValues values, so that one value far out in the channel's tail cannot make
// sum2 / M2 large (a first value 30 deviations out cost bfloat16 statistics of 16384 rows per
// lane 0.4% of their variance; a mean of 32 values moves about 1/32 as far).
constexpr int64_t kPivotValues = 32;

template <typename scalar_t, typename acc_t>
inline acc_t nchw_pivot(const scalar_t* x, const Layout& l, int64_t c) {
  if (l.N == 0 || l.HxW == 0) {
    return acc_t(0);
  }
  if constexpr (!kOnePassStats<scalar_t>) {
    return load<scalar_t, acc_t>(x, c * l.HxW);
  } else {
    acc_t sum = 0;
    int64_t count = 0;
    for (int64_t n = 0; n < l.N && count < kPivotValues; ++n) {
      const scalar_t* run = x + (n * l.C + c) * l.HxW;
      for (int64_t i = 0; i < l.HxW && count < kPivotValues; ++i, ++count) {
        sum += load<scalar_t, acc_t>(run, i);
      }
    }
    return sum / static_cast<acc_t>(count);
  }
}

// The same for every channel of R rows of C values (channels-last): the first row, or the mean of
// the first (up to) kPivotValues rows.
template <typename scalar_t, typename acc_t>
inline void rows_pivots(const scalar_t* x, int64_t R, int64_t C, acc_t* pivot) {
  const int64_t rows = R == 0 ? 0 : (kOnePassStats<scalar_t> ? std::min(R, kPivotValues) : 1);
  for (int64_t c = 0; c < C; ++c) {
    pivot[c] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] += load<scalar_t, acc_t>(x, r * C + c);
    }
  }
  if (rows > 1) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] /= static_cast<acc_t>(rows);
    }
  }
}

// The statistics of every channel as the kernels produce them: mean and biased variance of
// x - pivot (merged in double), and the pivot itself.
template <typename acc_t>
struct ChannelStats {
  explicit ChannelStats(int64_t C) : pivot(C), mean(C), var(C) {}
  Buffer<acc_t> pivot;
  Buffer<merge_t> mean;
  Buffer<merge_t> var;
};

// A channel's backward sums, merged: sum(dy) and sum(dy * (x - mean)).
struct GradSums {
  merge_t dy;
  merge_t dy_xmu;
};

// VecSums of channels 0 .. n - 1 of a group, zeroed: a whole array of kMaxGroup zeroes 8 KiB of
// float accumulators per array at every call, a visible part of a small input's statistics (see
// docs/performance.md#channel-groups).
template <typename acc_t>
struct GroupSums {
  explicit GroupSums(int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      new (raw + i * sizeof(VecSum<acc_t>)) VecSum<acc_t>();
    }
  }
  VecSum<acc_t>& operator[](int64_t i) {
    return std::launder(reinterpret_cast<VecSum<acc_t>*>(raw))[i];
  }
  alignas(VecSum<acc_t>) unsigned char raw[kMaxGroup * sizeof(VecSum<acc_t>)];
};

// The per-channel (fused) NCHW tasks walk a channel group's runs sample by sample, G * len
// adjacent values a plane of C channels apart; each sample prefetches the group's runs of the
// sample about kPrefetchBytes on (a whole number of samples, at least one) where the runs are
// whole planes of at most kBlock values, short enough for the hardware prefetchers to lose the
// stream at every jump; none past the last sample, which would land past the tensor's end and
// still take a fill buffer (half the prefetches of (8, 64, 8, 8), 4 samples on of 8). The
// memory-order tasks read the next group's runs next to these and do not prefetch: they were no
// faster that way (see docs/performance.md#prefetch).
struct GroupPrefetch {
  int64_t samples = 0;  // 0: none
  int64_t stride = 0;   // bytes from a sample's runs to the next sample's
  int64_t bytes = 0;    // of the group's runs in one sample
  // Before reading sample n of N, whose runs start at p.
  template <typename T>
  void operator()(const T* p, int64_t n, int64_t N) const {
    if (samples > 0 && n + samples < N) {
      prefetch_lines(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(samples * stride), bytes);
    }
  }
};

template <typename scalar_t>
inline GroupPrefetch group_prefetch(const Layout& l, int64_t G, int64_t len, bool on) {
  if (!on || len != l.HxW || l.HxW > kBlock) {
    return {};
  }
  const int64_t size = static_cast<int64_t>(sizeof(scalar_t));
  const int64_t bytes = std::max<int64_t>(1, G * len * size);
  return {std::max<int64_t>(1, (kPrefetchBytes + bytes - 1) / bytes), l.C * l.HxW * size, bytes};
}

// The per-lane copies of per-channel values: out[i] = value of channel i / HxW, i < G * HxW.
template <typename acc_t, typename Get>
inline void spread_lanes(int64_t HxW, int64_t G, const Get& get, acc_t* out) {
  for (int64_t g = 0; g < G; ++g) {
    std::fill_n(out + g * HxW, HxW, get(g));
  }
}

// Short NCHW planes whose runs end in a partial vector (HxW < kLanePlane, not a multiple of the
// vector width: 7x7, 5x5, ...) where the ISA has masked tails: the reductions of a channel group
// keep one accumulator per value position of the group's span in a sample (its G * HxW adjacent
// values), add the block's samples into them in sample order, whole vectors at a time (one masked
// vector at the span's end), then fold each channel's HxW positions in a fixed order. A channel's
// terms are added in an order set by HxW alone, whatever G (which follows the thread count) is:
// the same bits for any G, provided a product is rounded alike in a whole vector and in the masked
// one (rounded(): no FMA contraction in one copy of the loop body and not the other). Walking run
// by run instead cost each 7x7 run three vectors, a masked fourth for one value and the run's
// setup. Planes of whole vectors (8x8, 16x16, 14x14's 12 of 12.25) were slower this way: their
// run-by-run sums stay in registers, these go through L1 (see docs/performance.md#lane-reductions).
constexpr int64_t kLanePlane = 64;
// Positions of one span at most: 8 KiB of float each.
constexpr int64_t kLaneSpan = 2048;
static_assert(kMaxGroup * (kLanePlane - 1) <= kLaneSpan);

template <typename scalar_t, typename acc_t>
inline bool lane_reductions(const Layout& l) {
  return kMaskedTails<scalar_t, acc_t> && l.HxW > 0 && l.HxW < kLanePlane && l.HxW % Vec<acc_t>::W != 0;
}

// f(i, n) for the vectors of a span: i the first position, n the values in it (W but at the end).
template <typename acc_t, typename F>
inline void span_vectors(int64_t span, const F& f) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t i = 0;
  for (; i + W <= span; i += W) {
    f(i, W);
  }
  if (i < span) {
    f(i, span - i);
  }
}

// Values i .. i + n - 1 of a span (n <= W; lanes >= n zero).
template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type span_load(const scalar_t* p, int64_t n) {
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    return n == Vec<acc_t>::W ? vload<scalar_t, acc_t>(p) : vload_part<scalar_t, acc_t>(p, n);
  } else {
    return vload<scalar_t, acc_t>(p);  // (not used: lane_reductions needs masked tails)
  }
}

// The sum of len per-position accumulators in a fixed order.
template <typename acc_t>
inline acc_t lane_fold(const acc_t* s, int64_t len) {
  VecSum<acc_t> t;
  seg_accumulate<acc_t, acc_t>(s, len, t, [](auto v) { return v; }, [](acc_t v) { return v; });
  return t.total();
}

// Per-position arrays of a span: padded to whole vectors, the padding zero.
struct LaneSpan {
  int64_t HxW, G, span, padded;
  LaneSpan(int64_t HxW_, int64_t G_, int64_t W) : HxW(HxW_), G(G_), span(G_ * HxW_), padded((G_ * HxW_ + W - 1) / W * W) {}
  template <typename acc_t, typename Get>
  void spread(const Get& get, acc_t* out) const {
    spread_lanes<acc_t>(HxW, G, get, out);
    std::fill(out + span, out + padded, acc_t(0));
  }
  template <typename acc_t>
  void zero(acc_t* out) const {
    std::fill_n(out, padded, acc_t(0));
  }
};

// f(off, n) for the span of channels c0 .. c0 + G - 1 of samples n in [n0, n1) in order, off the
// index of its first value.
template <typename F>
inline void span_samples(const Layout& l, int64_t n0, int64_t n1, int64_t c0, const F& f) {
  for (int64_t n = n0; n < n1; ++n) {
    f((n * l.C + c0) * l.HxW, n);
  }
}

// group_block_stats for lane_reductions.
template <typename scalar_t, typename acc_t>
inline void lane_block_stats(
    const scalar_t* x, const Layout& l, int64_t n0, int64_t n1, int64_t c0, int64_t G, const acc_t* pivot,
    Welford<merge_t>* out, bool prefetch) {
  using vec = typename Vec<acc_t>::type;
  const LaneSpan ls(l.HxW, G, Vec<acc_t>::W);
  const int64_t count = (n1 - n0) * l.HxW;
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, l.HxW, prefetch);
  alignas(64) acc_t pv[kLaneSpan], s1[kLaneSpan], s2[kLaneSpan];
  ls.spread([&](int64_t g) { return pivot[g]; }, pv);
  ls.zero(s1);
  ls.zero(s2);
  if constexpr (kOnePassStats<scalar_t>) {
    span_samples(l, n0, n1, c0, [&](int64_t off, int64_t s) {
      const scalar_t* p = x + off;
      ahead(p, s, l.N);
      span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
        const vec d = span_load<scalar_t, acc_t>(p + i, n) - vload_acc(pv + i);
        lane_add(s1 + i, d);
        lane_add(s2 + i, rounded(d * d));
      });
    });
    for (int64_t g = 0; g < G; ++g) {
      out[g] = moments_to_welford<acc_t>(lane_fold(s1 + g * l.HxW, l.HxW), lane_fold(s2 + g * l.HxW, l.HxW), count);
    }
    return;
  }
  const vec iv = vec{} + acc_t(1) / static_cast<acc_t>(count);
  span_samples(l, n0, n1, c0, [&](int64_t off, int64_t s) {
    const scalar_t* p = x + off;
    ahead(p, s, l.N);
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      lane_add(s1 + i, rounded((span_load<scalar_t, acc_t>(p + i, n) - vload_acc(pv + i)) * iv));
    });
  });
  acc_t mean[kMaxGroup], center[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    mean[g] = lane_fold(s1 + g * l.HxW, l.HxW);
    center[g] = pivot[g] + mean[g];
  }
  // (The padding's centers are zero, as are its loads: its d stays zero.)
  alignas(64) acc_t cv[kLaneSpan];
  ls.spread([&](int64_t g) { return center[g]; }, cv);
  ls.zero(s1);
  // Four samples at a time (as lane_block_reduce).
  int64_t s = n0;
  for (; s + 4 <= n1; s += 4) {
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec c = vload_acc(cv + i);
      vec d[4];
      for (int k = 0; k < 4; ++k) {
        d[k] = span_load<scalar_t, acc_t>(x + ((s + k) * l.C + c0) * l.HxW + i, n) - c;
      }
      lane_add(s1 + i, (d[0] + d[1]) + (d[2] + d[3]));
      lane_add(s2 + i, (rounded(d[0] * d[0]) + rounded(d[1] * d[1])) + (rounded(d[2] * d[2]) + rounded(d[3] * d[3])));
    });
  }
  span_samples(l, s, n1, c0, [&](int64_t off, int64_t) {
    const scalar_t* p = x + off;
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec d = span_load<scalar_t, acc_t>(p + i, n) - vload_acc(cv + i);
      lane_add(s1 + i, d);
      lane_add(s2 + i, rounded(d * d));
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    out[g] = two_pass_welford(
        pivot[g], mean[g], center[g], lane_fold(s1 + g * l.HxW, l.HxW), lane_fold(s2 + g * l.HxW, l.HxW), count);
  }
}

// group_block_reduce for lane_reductions.
template <typename scalar_t, typename acc_t>
inline void lane_block_reduce(
    const scalar_t* dy, const scalar_t* x, const Layout& l, int64_t n0, int64_t n1, int64_t c0, int64_t G,
    const acc_t* mean, merge_t* s_dy, acc_t* s_dyxmu, bool prefetch) {
  using vec = typename Vec<acc_t>::type;
  const LaneSpan ls(l.HxW, G, Vec<acc_t>::W);
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, l.HxW, prefetch);
  alignas(64) acc_t mv[kLaneSpan], b[kLaneSpan];
  alignas(64) merge_t a[kLaneSpan];
  ls.spread([&](int64_t g) { return mean[g]; }, mv);
  ls.zero(a);
  ls.zero(b);
  // Four samples at a time: their dy in a tree (see wide_add), their dy * (x - mean) likewise, so
  // that the lanes in L1 are updated once per four samples.
  int64_t s = n0;
  for (; s + 4 <= n1; s += 4) {
    const scalar_t *pd[4], *px[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t off = ((s + k) * l.C + c0) * l.HxW;
      pd[k] = dy + off;
      px[k] = x + off;
      ahead(pd[k], s + k, l.N);
      ahead(px[k], s + k, l.N);
    }
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec m = vload_acc(mv + i);
      vec g[4], t[4];
      for (int k = 0; k < 4; ++k) {
        g[k] = span_load<scalar_t, acc_t>(pd[k] + i, n);
        t[k] = rounded(g[k] * (span_load<scalar_t, acc_t>(px[k] + i, n) - m));
      }
      wide_lane_add<acc_t>(a + i, (g[0] + g[1]) + (g[2] + g[3]));
      lane_add(b + i, (t[0] + t[1]) + (t[2] + t[3]));
    });
  }
  span_samples(l, s, n1, c0, [&](int64_t off, int64_t n_) {
    const scalar_t *pd = dy + off, *px = x + off;
    ahead(pd, n_, l.N);
    ahead(px, n_, l.N);
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec g = span_load<scalar_t, acc_t>(pd + i, n);
      wide_lane_add<acc_t>(a + i, g);
      lane_add(b + i, rounded(g * (span_load<scalar_t, acc_t>(px + i, n) - vload_acc(mv + i))));
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    s_dy[g] = lane_fold(a + g * l.HxW, l.HxW);
    s_dyxmu[g] = lane_fold(b + g * l.HxW, l.HxW);
  }
}

// Statistics of block j of channels c0 .. c0 + G - 1 (a channel group, see channel_group), each
// channel's sums carried over its runs in run order. The runs are walked in memory order (run n
// of every channel of the group, then run n + 1): a channel's values are summed in the same order
// whatever G is, so G never changes a bit, but the reads are G runs long instead of one run a
// plane apart (see docs/performance.md#channel-groups).
template <typename scalar_t, typename acc_t>
inline void group_block_stats(
    const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G, int64_t j, const acc_t* pivot,
    Welford<merge_t>* out, bool prefetch) {
  int64_t n0, n1, h0, h1;
  plan.range(l, j, n0, n1, h0, h1);
  if (lane_reductions<scalar_t, acc_t>(l)) {
    lane_block_stats<scalar_t, acc_t>(x, l, n0, n1, c0, G, pivot, out, prefetch);
    return;
  }
  const int64_t len = h1 - h0;
  const int64_t count = (n1 - n0) * len;
  // f(g, run): the block's runs of the group in memory order (the first walk prefetching).
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, len, prefetch);
  auto each_run = [&](const auto& f, bool first) {
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* run = x + (n * l.C + c0) * l.HxW + h0;
      if (first) {
        ahead(run, n, l.N);
      }
      for (int64_t g = 0; g < G; ++g, run += l.HxW) {
        f(g, run);
      }
    }
  };
  if constexpr (kOnePassStats<scalar_t>) {
    GroupSums<acc_t> s1(G), s2(G);
    each_run([&](int64_t g, const scalar_t* run) { seg_moments<scalar_t, acc_t>(run, len, pivot[g], s1[g], s2[g]); }, true);
    for (int64_t g = 0; g < G; ++g) {
      out[g] = moments_to_welford<acc_t>(s1[g].total(), s2[g].total(), count);
    }
    return;
  }
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  GroupSums<acc_t> sum(G);
  each_run([&](int64_t g, const scalar_t* run) { seg_mean<scalar_t, acc_t>(run, len, pivot[g], inv_count, sum[g]); }, true);
  acc_t mean[kMaxGroup], center[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    mean[g] = sum[g].total();
    center[g] = pivot[g] + mean[g];
  }
  GroupSums<acc_t> dev(G), m2(G);
  each_run([&](int64_t g, const scalar_t* run) { seg_moments<scalar_t, acc_t>(run, len, center[g], dev[g], m2[g]); }, false);
  for (int64_t g = 0; g < G; ++g) {
    out[g] = two_pass_welford(pivot[g], mean[g], center[g], dev[g].total(), m2[g].total(), count);
  }
}

// Block sums of dy (in merge_t, see wide_add) and dy * (x - mean) (in acc_t) of a channel group
// (as group_block_stats); callers add the blocks in merge_t.

template <typename scalar_t, typename acc_t>
inline void group_block_reduce(
    const scalar_t* dy, const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G, int64_t j,
    const acc_t* mean, merge_t* s_dy, acc_t* s_dyxmu, bool prefetch) {
  int64_t n0, n1, h0, h1;
  plan.range(l, j, n0, n1, h0, h1);
  if (lane_reductions<scalar_t, acc_t>(l)) {
    lane_block_reduce<scalar_t, acc_t>(dy, x, l, n0, n1, c0, G, mean, s_dy, s_dyxmu, prefetch);
    return;
  }
  GroupSums<merge_t> a(G);
  GroupSums<acc_t> b(G);
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, h1 - h0, prefetch);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * l.C + c0) * l.HxW + h0;  // channel c0's run; channel c0 + g's is g planes on
    ahead(dy + off, n, l.N);
    ahead(x + off, n, l.N);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t run = off + g * l.HxW;
      seg_reduce<scalar_t, acc_t>(dy + run, x + run, h1 - h0, mean[g], a[g], b[g]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    s_dy[g] = a[g].total();
    s_dyxmu[g] = b[g].total();
  }
}

template <typename scalar_t, typename acc_t>
void nchw_stats(const scalar_t* x, const Layout& l, ChannelStats<acc_t>& st) {
  const BlockPlan plan(l);
  for (int64_t c = 0; c < l.C; ++c) {
    st.pivot.p[c] = nchw_pivot<scalar_t, acc_t>(x, l, c);
  }
  Buffer<Welford<merge_t>> partials(l.C * plan.nblocks);
  const int64_t G = channel_group<scalar_t>(l), groups = (l.C + G - 1) / G;
  const int64_t tasks = groups * plan.nblocks;
  at::parallel_for(0, tasks, std::max<int64_t>(1, plan.task_grain(l) / G), [&](int64_t begin, int64_t end) {
    // Tasks in memory order (block-major), partials stored channel-major for the merge.
    Welford<merge_t> part[kMaxGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / groups, c0 = (t % groups) * G, g_n = std::min(G, l.C - c0);
      group_block_stats<scalar_t, acc_t>(x, l, plan, c0, g_n, j, st.pivot.p + c0, part, false);
      for (int64_t g = 0; g < g_n; ++g) {
        partials.p[(c0 + g) * plan.nblocks + j] = part[g];
      }
    }
  });
  for (int64_t c = 0; c < l.C; ++c) {
    Welford<merge_t> w{0, 0, 0};
    for (int64_t j = 0; j < plan.nblocks; ++j) {
      w = welford_combine(w, partials.p[c * plan.nblocks + j]);
    }
    st.mean.p[c] = w.mean;
    st.var.p[c] = welford_var(w);
  }
}

// Lane array of k copies of a per-channel array.
template <typename acc_t>
inline void replicate(const acc_t* per_channel, int64_t C, int64_t k, acc_t* lanes) {
  for (int64_t i = 0; i < k; ++i) {
    std::memcpy(lanes + i * C, per_channel, C * sizeof(acc_t));
  }
}

// Per-channel total of a lane array, lanes summed in order.
template <typename acc_t>
inline void fold(const acc_t* lanes, int64_t C, int64_t k, acc_t* out) {
  std::memcpy(out, lanes, C * sizeof(acc_t));
  for (int64_t i = 1; i < k; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      out[c] += lanes[i * C + c];
    }
  }
}

template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* x, const Layout& l, ChannelStats<acc_t>& st) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
  rows_pivots<scalar_t, acc_t>(x, plan.R, C, st.pivot.p);
  Buffer<acc_t> lanes_pivot(plan.P);
  replicate(st.pivot.p, C, plan.k, lanes_pivot.p);
  // Every chunk writes all of its C partials.
  Buffer<merge_t> pmean(plan.nchunks * C, Buffer<merge_t>::kUninit), pm2(plan.nchunks * C, Buffer<merge_t>::kUninit);
  at::parallel_for(0, plan.nchunks, plan.chunk_grain(), [&](int64_t begin, int64_t end) {
    Buffer<acc_t> s1(plan.P), s2(plan.P), lanes_center(plan.P), t1(C), t2(C), center(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r0 = q * plan.rows_per_chunk, rows = plan.chunk_rows(q), r1 = r0 + rows;
      std::fill(s1.p, s1.p + plan.P, acc_t(0));
      std::fill(s2.p, s2.p + plan.P, acc_t(0));
      if constexpr (kOnePassStats<scalar_t>) {
        for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
          rows_moments<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_pivot.p, s1.p, s2.p);
        });
        // The chunk's raw sums: the merge below turns them into its mean and M2.
        fold(s1.p, C, plan.k, t1.p);
        fold(s2.p, C, plan.k, t2.p);
        for (int64_t c = 0; c < C; ++c) {
          pmean.p[q * C + c] = t1.p[c];
          pm2.p[q * C + c] = t2.p[c];
        }
        continue;
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(rows);
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_mean<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_pivot.p, inv, s1.p);
      });
      fold(s1.p, C, plan.k, t1.p);
      for (int64_t c = 0; c < C; ++c) {
        center.p[c] = st.pivot.p[c] + t1.p[c];
      }
      replicate(center.p, C, plan.k, lanes_center.p);
      std::fill(s1.p, s1.p + plan.P, acc_t(0));
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_moments<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_center.p, s1.p, s2.p);
      });
      fold(s1.p, C, plan.k, t2.p);
      fold(s2.p, C, plan.k, s1.p);
      merge_t* qmean = pmean.p + q * C;
      merge_t* qm2 = pm2.p + q * C;
      if (!chunk_welford(st.pivot.p, center.p, t2.p, s1.p, C, rows, qmean, qm2)) {
        for (int64_t c = 0; c < C; ++c) {
          const auto w = two_pass_welford(st.pivot.p[c], t1.p[c], center.p[c], t2.p[c], s1.p[c], rows);
          qmean[c] = w.mean;
          qm2[c] = w.m2;
        }
      }
    }
  });
  // Chan merge (welford_combine's arithmetic) of the chunks in chunk order, in merge_t; all
  // channels of a chunk share its count, so the merge vectorizes across channels.
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, plan.nchunks)), [&](int64_t c0, int64_t c1) {
    merge_t* mean = st.mean.p;
    merge_t* m2 = st.var.p;
    // Chunk q's mean and M2 in merge_t: as stored, or (one pass) from its sums of d and d * d,
    // M2 = sum2 - sum1 * mean (moments_to_welford; a chunk's M2 can come out a rounding below
    // zero, the total is clamped).
    auto chunk = [&](int64_t q, int64_t c, merge_t inv_rows, merge_t& qmean, merge_t& qm2) {
      const merge_t a = pmean.p[q * C + c], b = pm2.p[q * C + c];
      if constexpr (kOnePassStats<scalar_t>) {
        qmean = a * inv_rows;
        qm2 = b - a * qmean;
      } else {
        qmean = a;
        qm2 = b;
      }
    };
    const merge_t inv0 = merge_t(1) / static_cast<merge_t>(std::max<int64_t>(1, plan.chunk_rows(0)));
    for (int64_t c = c0; c < c1; ++c) {
      chunk(0, c, inv0, mean[c], m2[c]);
    }
    int64_t na = plan.chunk_rows(0);
    for (int64_t q = 1; q < plan.nchunks; ++q) {
      const int64_t nb = plan.chunk_rows(q);
      const merge_t f = static_cast<merge_t>(nb) / static_cast<merge_t>(na + nb);
      const merge_t g = static_cast<merge_t>(na) * f;
      const merge_t inv = merge_t(1) / static_cast<merge_t>(nb);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        merge_t qmean, qm2;
        chunk(q, c, inv, qmean, qm2);
        const merge_t delta = qmean - mean[c];
        mean[c] = mean[c] * (merge_t(1) - f) + qmean * f;
        m2[c] += qm2 + delta * delta * g;
      }
      na += nb;
    }
    for (int64_t c = c0; c < c1; ++c) {
      m2[c] = plan.R > 0 && !(m2[c] < 0) ? m2[c] / static_cast<merge_t>(plan.R) : merge_t(0);
    }
  });
}

// The backward sums of every channel from the chunk partials pa[q * C + c], pb[q * C + c], added
// in merge_t in chunk order. Chunk by chunk across the channels, not channel by channel down the
// chunks: the latter strides C partials per load, a cache (and 4 KiB alias) miss per load for
// wide rows, which took about a tenth of the fused backward of (16, 2048, 7, 7) channels_last.
template <typename B>
inline void merge_chunk_sums(const merge_t* pa, const B* pb, int64_t nchunks, int64_t C, GradSums* sums) {
  Buffer<merge_t> sa(C), sb(C);
  for (int64_t q = 0; q < nchunks; ++q) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sa.p[c] += pa[q * C + c];
      sb.p[c] += pb[q * C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sums[c] = {sa.p[c], sb.p[c]};
  }
}

// The backward sums of every channel (chunk partials merged in merge_t, in chunk order).
template <typename scalar_t, typename acc_t>
void rows_reduce_all(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, GradSums* sums) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
  // Every chunk writes all of its C partials (fold).
  Buffer<merge_t> pa(plan.nchunks * C, Buffer<merge_t>::kUninit);
  Buffer<acc_t> pb(plan.nchunks * C, Buffer<acc_t>::kUninit), lanes_mean(plan.P);
  replicate(mean, C, plan.k, lanes_mean.p);
  at::parallel_for(0, plan.nchunks, plan.chunk_grain(), [&](int64_t begin, int64_t end) {
    Buffer<merge_t> a(plan.P);
    Buffer<acc_t> b(plan.P);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r0 = q * plan.rows_per_chunk, r1 = r0 + plan.chunk_rows(q);
      std::fill(a.p, a.p + plan.P, merge_t(0));
      std::fill(b.p, b.p + plan.P, acc_t(0));
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_reduce<scalar_t, acc_t>(dy + off, x + off, nrows, width, plan.wide, lanes_mean.p, a.p, b.p);
      });
      fold(a.p, C, plan.k, pa.p + q * C);
      fold(b.p, C, plan.k, pb.p + q * C);
    }
  });
  merge_chunk_sums(pa.p, pb.p, plan.nchunks, C, sums);
}

// The sums of a channel group, its blocks added in block order (as backward_reduce_sums adds them).
template <typename scalar_t, typename acc_t>
inline void group_reduce_nchw(
    const scalar_t* dy, const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G,
    const acc_t* mean, GradSums* sums) {
  merge_t s_dy[kMaxGroup] = {}, s_dyxmu[kMaxGroup] = {};
  for (int64_t j = 0; j < plan.nblocks; ++j) {
    merge_t a[kMaxGroup];
    acc_t b[kMaxGroup];
    group_block_reduce<scalar_t, acc_t>(dy, x, l, plan, c0, G, j, mean, a, b, true);
    for (int64_t g = 0; g < G; ++g) {
      s_dy[g] += a[g];
      s_dyxmu[g] += b[g];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    sums[g] = {s_dy[g], s_dyxmu[g]};
  }
}

// The sums of every channel.
template <typename scalar_t, typename acc_t>
void backward_reduce_sums(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, GradSums* sums) {
  if (l.channels_last) {
    rows_reduce_all<scalar_t, acc_t>(dy, x, l, mean, sums);
    return;
  }
  const BlockPlan plan(l);
  const int64_t G = channel_group<scalar_t>(l), groups = (l.C + G - 1) / G;
  const int64_t tasks = groups * plan.nblocks;
  Buffer<merge_t> pa(l.C * plan.nblocks);
  Buffer<acc_t> pb(l.C * plan.nblocks);
  at::parallel_for(0, tasks, std::max<int64_t>(1, plan.task_grain(l) / G), [&](int64_t begin, int64_t end) {
    merge_t a[kMaxGroup];
    acc_t b[kMaxGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / groups, c0 = (t % groups) * G, g_n = std::min(G, l.C - c0);
      group_block_reduce<scalar_t, acc_t>(dy, x, l, plan, c0, g_n, j, mean + c0, a, b, false);
      for (int64_t g = 0; g < g_n; ++g) {
        pa.p[(c0 + g) * plan.nblocks + j] = a[g];
        pb.p[(c0 + g) * plan.nblocks + j] = b[g];
      }
    }
  });
  for (int64_t c = 0; c < l.C; ++c) {
    merge_t a = 0, b = 0;
    for (int64_t j = 0; j < plan.nblocks; ++j) {
      a += pa.p[c * plan.nblocks + j];
      b += pb.p[c * plan.nblocks + j];
    }
    sums[c] = {a, b};
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
