// The fused BN + activation (+ residual) kernels (part of batch_norm_kernel.h: see the map there):
//   act_affine    y = act((x - pivot) * scale + shift + r): the training forward's and eval's
//                 elementwise pass (one pass, z never stored, rounded once)
//   act_forward   channel_stats (the statistics of batch_norm_forward, bit for bit), then act_affine
//   act_backward  the sums of dz = dy * act'(z) and dz * (x - mean) (fixed blocks / chunks, fixed
//                 merge order), then dx = a * ((dz - mean_dz) - (x - mean) * k) and dr = dz in one
//                 pass; dz is recomputed in both passes, never stored (but as dr where a residual
//                 is given; channels-last float/double inputs with a residual beyond the cache
//                 store dr in the first pass and take dx from (dr, x), see act_backward_impl)
// The passes walk runs of one channel (NCHW planes), of an NCHW channel group in one sample, or
// channels-last super-rows (RowPlan), with the coefficients of a run as splats (SplatCoeffs) or
// per-lane arrays (LaneCoeffs), the same element functions either way (kernel/act_runs.h). Every
// value gets the same arithmetic whatever the thread count (runs are never split between tasks;
// a plane's last values go as a masked vector, as they do in a group's run by lanes): the
// results are deterministic per ISA.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/act_ops.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// ---------------------------------------------------------------------------------------------
// Forward: coefficients pivot, scale, shift (normalize() of math.h).

enum : int { kPivot = 0, kScale = 1, kShift = 2, kFwdCoeffs = 3 };

template <typename scalar_t, typename acc_t, Act A, bool Res, bool NT, typename Co>
__attribute__((always_inline)) inline void run_act_affine(
    const scalar_t* x, const scalar_t* r, scalar_t* y, int64_t len, const Co& co, acc_t p) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto f = [&](int64_t i, vec v, vec rv) {
    vec z = vnormalize<true>(v, co.at(kPivot, i), co.at(kScale, i), co.at(kShift, i));
    if constexpr (Res) {
      z = z + rv;
    }
    return vact_forward<A, acc_t>(z, p);
  };
  auto rvec = [&](int64_t i) { return Res ? vload<scalar_t, acc_t>(r + i) : vec{}; };
  run_map<acc_t, kMaskedRuns<scalar_t, acc_t, Co>, kMaskAll>(
      len,
      [&](int64_t i) {
        vec a, b;
        vload2<scalar_t, acc_t>(x + i, a, b);
        vstore2<scalar_t, acc_t, NT>(y + i, f(i, a, rvec(i)), f(i + W, b, rvec(i + W)));
      },
      [&](int64_t i) {
        vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(y + i, f(i, vload<scalar_t, acc_t>(x + i), rvec(i)));
      },
      [&](int64_t i) {
        acc_t z = normalize(load<scalar_t, acc_t>(x, i), co.one(kPivot, i), co.one(kScale, i), co.one(kShift, i));
        if constexpr (Res) {
          z = z + load<scalar_t, acc_t>(r, i);
        }
        store<scalar_t, acc_t>(y, i, act_forward(A, z, p));
      },
      [&](int64_t i, auto n) {  // (generic: instantiated only where run_map masks)
        // (Never streamed: a streamed NCHW pass has runs of whole lines, see stream_planes.)
        const vec rv = Res ? vload_part<scalar_t, acc_t>(r + i, n) : vec{};
        vstore_part<scalar_t, acc_t>(y + i, f(i, vload_part<scalar_t, acc_t>(x + i, n), rv), n);
      });
}

// act_affine of NCHW channels c0 .. c0 + G - 1 (k[g]: channel c0 + g's coefficients), by lanes
// where group_by_lanes says so, else plane by plane.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool NT>
inline void group_act_affine(
    const scalar_t* x, const scalar_t* r, scalar_t* y, const Layout& l, int64_t c0, int64_t G,
    const NormalizeCoeffs<acc_t>* k, acc_t p, GroupLaneCoeffs<acc_t, kFwdCoeffs>& lanes) {
  if (group_by_lanes<scalar_t, acc_t, NT>(l, G)) {
    const auto& co = lanes.spread(l.HxW, G, [&](int j, int64_t g) {
      return j == kPivot ? k[g].pivot : (j == kScale ? k[g].scale : k[g].shift);
    });
    group_samples(l, c0, [&](int64_t off) {
      run_act_affine<scalar_t, acc_t, A, Res, NT>(x + off, opt_at(r, off), y + off, G * l.HxW, co, p);
    });
    return;
  }
  group_planes(l, c0, G, [&](int64_t off, int64_t g) {
    run_act_affine<scalar_t, acc_t, A, Res, NT>(
        x + off, opt_at(r, off), y + off, l.HxW, SplatCoeffs<acc_t, kFwdCoeffs>(k[g]), p);
  });
}

template <typename scalar_t, typename acc_t, Act A, bool Res>
void act_affine_kernel(
    const scalar_t* x, const scalar_t* r, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift, acc_t p) {
  const acc_t* arrays[kFwdCoeffs] = {pivot, scale, shift};
  const int64_t passes = Res ? 3 : 2;
  if (l.channels_last) {
    const RowPlan plan(l, sizeof(scalar_t));
    const LaneBuffers<acc_t, kFwdCoeffs> co(arrays, l.C, plan.k);
    for_super_rows_all(plan, stream_rows<scalar_t, acc_t>(y, l, plan, passes), [&](auto nt, int64_t off, int64_t len) {
      run_act_affine<scalar_t, acc_t, A, Res, nt.value>(x + off, opt_at(r, off), y + off, len, co.lanes, p);
    });
    return;
  }
  if (const GroupPass gp = lanes_pass<scalar_t, acc_t>(y, l, passes); gp.G > 0) {
    using Lanes = GroupLaneCoeffs<acc_t, kFwdCoeffs>;
    for_channel_groups<Lanes>(l, gp, std::max<int64_t>(1, channel_grain(l) / gp.G), [&](auto nt, int64_t c0, int64_t G, Lanes& lanes) {
      NormalizeCoeffs<acc_t> k[kMaxGroup];
      for (int64_t g = 0; g < G; ++g) {
        k[g] = {pivot[c0 + g], scale[c0 + g], shift[c0 + g]};
      }
      group_act_affine<scalar_t, acc_t, A, Res, nt.value>(x, r, y, l, c0, G, k, p, lanes);
    });
    return;
  }
  for_planes(l, stream_planes(y, l, passes), [&](auto nt, int64_t off, int64_t len, int64_t c) {
    run_act_affine<scalar_t, acc_t, A, Res, nt.value>(
        x + off, opt_at(r, off), y + off, len, SplatCoeffs<acc_t, kFwdCoeffs>(arrays, c), p);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Per channel: mean, scale = weight * invstd, shift = bias, inv_scale = 1 / scale
// (0 where scale is 0: the memory-saving mode's channels the caller recomputes), and the
// coefficients of backward_elemt() of math.h (mean_dz, k, a).

enum : int { kMean = 0, kGScale = 1, kGShift = 2, kInvScale = 3, kMeanDz = 4, kK = 5, kA = 6, kGradCoeffs = 7 };

// dz and x - mean of one value (or vector): from the input s = x (z recomputed as the forward
// computes it, plus r), or from the output s = y (FromOut: z = act_inverse(y), x - mean =
// (z - bias - r) / scale).
template <Act A, bool Res, bool FromOut, typename acc_t>
inline void grad_terms_vec(
    typename Vec<acc_t>::type g, typename Vec<acc_t>::type s, typename Vec<acc_t>::type r, typename Vec<acc_t>::type m,
    typename Vec<acc_t>::type scale, typename Vec<acc_t>::type shift, typename Vec<acc_t>::type inv_scale, acc_t p,
    typename Vec<acc_t>::type& dz, typename Vec<acc_t>::type& xmu) {
  if constexpr (FromOut) {
    const typename Vec<acc_t>::type z = vact_inverse<A, acc_t>(s, p);
    xmu = Res ? ((z - shift) - r) * inv_scale : (z - shift) * inv_scale;
    dz = A == Act::kIdentity ? g : g * vact_derivative_from_output<A, acc_t>(s, p);
  } else {
    xmu = s - m;
    const typename Vec<acc_t>::type z = Res ? (xmu * scale + shift) + r : xmu * scale + shift;
    dz = A == Act::kIdentity ? g : g * vact_derivative<A, acc_t>(z, p);
  }
}

template <Act A, bool Res, bool FromOut, typename acc_t>
inline void grad_terms_one(
    acc_t g, acc_t s, acc_t r, acc_t m, acc_t scale, acc_t shift, acc_t inv_scale, acc_t p, acc_t& dz, acc_t& xmu) {
  if constexpr (FromOut) {
    const acc_t z = act_inverse(A, s, p);
    xmu = Res ? ((z - shift) - r) * inv_scale : (z - shift) * inv_scale;
    dz = A == Act::kIdentity ? g : g * act_derivative_from_output(A, s, p);
  } else {
    xmu = s - m;
    const acc_t z = Res ? normalize(s, m, scale, shift) + r : normalize(s, m, scale, shift);
    dz = A == Act::kIdentity ? g : g * act_derivative(A, z, p);
  }
}

// One run's loads and the terms of its vectors (v: f2/f1 of run_map get them through these).
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, typename Co>
struct GradRun {
  using vec = typename Vec<acc_t>::type;
  const scalar_t *dy, *s, *r;
  const Co& co;
  acc_t p;
  void vec_terms(int64_t i, vec& dz, vec& xmu) const {
    grad_terms_vec<A, Res, FromOut, acc_t>(
        vload<scalar_t, acc_t>(dy + i), vload<scalar_t, acc_t>(s + i), Res ? vload<scalar_t, acc_t>(r + i) : vec{},
        co.at(kMean, i), co.at(kGScale, i), co.at(kGShift, i), co.at(kInvScale, i), p, dz, xmu);
  }
  void one_terms(int64_t i, acc_t& dz, acc_t& xmu) const {
    grad_terms_one<A, Res, FromOut, acc_t>(
        load<scalar_t, acc_t>(dy, i), load<scalar_t, acc_t>(s, i), Res ? load<scalar_t, acc_t>(r, i) : acc_t(0),
        co.one(kMean, i), co.one(kGScale, i), co.one(kGShift, i), co.one(kInvScale, i), p, dz, xmu);
  }
  // The terms of the n < W values at i as one vector (run_map's masked tail): lanes past n load
  // as zero and their dz is zeroed, so they add nothing to the sums.
  void part_terms(int64_t i, int64_t n, vec& dz, vec& xmu) const {
    grad_terms_vec<A, Res, FromOut, acc_t>(
        vload_part<scalar_t, acc_t>(dy + i, n), vload_part<scalar_t, acc_t>(s + i, n),
        Res ? vload_part<scalar_t, acc_t>(r + i, n) : vec{}, co.at(kMean, i), co.at(kGScale, i), co.at(kGShift, i),
        co.at(kInvScale, i), p, dz, xmu);
    dz = first_lanes<acc_t>(dz, n);
  }
};

// A block's sums: dz in merge_t (wide_add, a pair's dz added in acc_t first: exact for a constant
// dz as in seg_reduce), dz * (x - mean) in acc_t.
template <typename acc_t>
struct GradAcc {
  using vec = typename Vec<acc_t>::type;
  WideVec lo = {}, hi = {};
  vec b0 = {}, b1 = {};
  merge_t ta = 0;
  acc_t tb = 0;
  merge_t dz() const {
    return hsum<merge_t>(lo + hi) + ta;
  }
  acc_t dz_xmu() const {
    return hsum<acc_t>(b0 + b1) + tb;
  }
};

// Where a reduction also stores dz (the channels-last residual path of act_backward_impl keeps it
// as grad_residual and reads it back for dx): nowhere (Store false), or at p, streamed where NT
// (a pair of vectors, or one vector that fills a line).
template <typename scalar_t, typename acc_t, bool Store, bool NT>
struct DzOut {
  using vec = typename Vec<acc_t>::type;
  scalar_t* p;
  DzOut at(int64_t o) const {
    return {Store ? p + o : nullptr};
  }
  void two(int64_t i, vec a, vec b) const {
    if constexpr (Store) {
      vstore2<scalar_t, acc_t, NT>(p + i, a, b);
    }
  }
  void one_vec(int64_t i, vec a) const {
    if constexpr (Store) {
      vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(p + i, a);
    }
  }
  void one(int64_t i, acc_t v) const {
    if constexpr (Store) {
      store<scalar_t, acc_t>(p, i, v);
    }
  }
};

template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, typename Co>
__attribute__((always_inline)) inline void run_act_reduce(
    const GradRun<scalar_t, acc_t, A, Res, FromOut, Co>& g, int64_t len, GradAcc<acc_t>& sums) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  GradAcc<acc_t> s = sums;  // a local copy (see seg_moments)
  run_map<acc_t, kMaskedRuns<scalar_t, acc_t, Co>>(
      len,
      [&](int64_t i) {
        vec d0, d1, m0, m1;
        g.vec_terms(i, d0, m0);
        g.vec_terms(i + W, d1, m1);
        wide_add<acc_t>(s.lo, s.hi, d0 + d1);
        s.b0 += d0 * m0;
        s.b1 += d1 * m1;
      },
      [&](int64_t i) {
        vec d, m;
        g.vec_terms(i, d, m);
        wide_add<acc_t>(s.lo, s.hi, d);
        s.b0 += d * m;
      },
      [&](int64_t i) {
        acc_t d, m;
        g.one_terms(i, d, m);
        s.ta += d;
        s.tb += d * m;
      },
      [&](int64_t i, auto n) {  // (generic: instantiated only where run_map masks)
        vec d, m;
        g.part_terms(i, n, d, m);
        wide_add<acc_t>(s.lo, s.hi, d);
        s.b0 += d * m;
      });
  sums = s;
}

// The same over channels-last rows, per lane: a (merge_t lanes, see wide_lane_add), b; dz also
// stored where `dz` says so.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, typename Co, typename Dz>
inline void run_act_reduce_lanes(
    const GradRun<scalar_t, acc_t, A, Res, FromOut, Co>& g, int64_t len, merge_t* a, acc_t* b, const Dz& dz) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto add = [&](int64_t i, vec d, vec m) {
    wide_lane_add<acc_t>(a + i, d);
    lane_add(b + i, d * m);
  };
  run_map<acc_t>(
      len,
      [&](int64_t i) {
        vec d0, m0, d1, m1;
        g.vec_terms(i, d0, m0);
        add(i, d0, m0);
        g.vec_terms(i + W, d1, m1);
        add(i + W, d1, m1);
        dz.two(i, d0, d1);
      },
      [&](int64_t i) {
        vec d, m;
        g.vec_terms(i, d, m);
        add(i, d, m);
        dz.one_vec(i, d);
      },
      [&](int64_t i) {
        acc_t d, m;
        g.one_terms(i, d, m);
        a[i] += d;
        b[i] += d * m;
        dz.one(i, d);
      });
}

// Inputs up to this size take act_rows_reduce four rows at a time (see there).
constexpr int64_t kActReduceBy4Bytes = int64_t(4) << 20;
// ... and so do inputs of any size whose super-rows' per-lane coefficient and sum arrays take more
// than this: half of a 32 KiB L1 data cache, the smallest of the x86 CPUs this runs on. A fixed
// size, not this CPU's L1, so which rows go by four (and the sums' bits) depends on the shape alone.
constexpr int64_t kActReduceBy4LaneBytes = int64_t(16) << 10;

// Whether act_reduce_sums walks four rows at a time: inputs of at most kActReduceBy4Bytes, and
// wide rows whose arrays (mean, scale, shift and, from the output, 1 / scale; the sums a and b)
// exceed kActReduceBy4LaneBytes. Row by row, the rows streaming through L1 evict those arrays and
// each row reloads all of them from L2; by four, once per four rows: the fused backward of
// (16, 2048, 7, 7) channels_last float32 took 0.74x the time (see
// docs/performance.md#fused-channels-last-sums).
template <typename acc_t, bool FromOut>
inline bool act_reduce_by4(const Layout& l, const RowPlan& plan, int64_t value_bytes) {
  const int64_t lane_bytes = (FromOut ? 4 : 3) * sizeof(acc_t) + sizeof(acc_t) + sizeof(merge_t);
  return l.rows() * l.C * value_bytes <= kActReduceBy4Bytes || plan.P * lane_bytes > kActReduceBy4LaneBytes;
}

// The sums of nrows channels-last (super-)rows of `width` lanes from s (their dy and r at the same
// offsets). With by4 (act_reduce_by4), four rows at a time: a vector of the
// lane sums (three vectors of a and b) is loaded and stored once per four rows, not once per row;
// those loads and stores, not the data, bounded the row-at-a-time loop on inputs that stay in
// cache. Larger inputs of narrower rows go a row at a time, three sequential streams (dy, s, r):
// walking four rows together was slower there, with or without rows_wide_by4's software prefetch (see
// docs/performance.md#fused-channels-last-sums). dz goes into a as two pair sums taken in acc_t,
// (d0 + d1) and (d2 + d3), each exact for a constant dy as in GradAcc, never a sum of three or four
// values in acc_t. Which rows go by four depends on the shape alone: the same bits for any thread
// count.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, typename Dz>
inline void act_rows_reduce(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, int64_t nrows, int64_t width, bool by4,
    const LaneCoeffs<acc_t, kGradCoeffs>& lanes, acc_t p, merge_t* a, acc_t* b, const Dz& dz) {
  using vec = typename Vec<acc_t>::type;
  const LaneCoeffs<acc_t, kGradCoeffs> co = lanes;  // by value into the lambdas (see rows_wide_by4)
  auto terms = [=](int64_t o, int64_t j, vec& d, vec& m) {
    grad_terms_vec<A, Res, FromOut, acc_t>(
        vload<scalar_t, acc_t>(dy + o + j), vload<scalar_t, acc_t>(s + o + j),
        Res ? vload<scalar_t, acc_t>(r + o + j) : vec{}, co.at(kMean, j), co.at(kGScale, j), co.at(kGShift, j),
        co.at(kInvScale, j), p, d, m);
  };
  auto one_terms = [=](int64_t o, int64_t j, acc_t& d, acc_t& m) {
    grad_terms_one<A, Res, FromOut, acc_t>(
        load<scalar_t, acc_t>(dy, o + j), load<scalar_t, acc_t>(s, o + j), Res ? load<scalar_t, acc_t>(r, o + j) : acc_t(0),
        co.one(kMean, j), co.one(kGScale, j), co.one(kGShift, j), co.one(kInvScale, j), p, d, m);
  };
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t row = 0;
  for (const int64_t rows4 = by4 ? nrows / 4 * 4 : 0; row < rows4; row += 4) {
    const int64_t o = row * width;
    int64_t j = 0;
    for (; j + W <= width; j += W) {
      vec d0, d1, d2, d3, m0, m1, m2, m3;
      terms(o, j, d0, m0);
      terms(o + width, j, d1, m1);
      terms(o + 2 * width, j, d2, m2);
      terms(o + 3 * width, j, d3, m3);
      WideVec lo, hi;
      wide_load<acc_t>(a + j, lo, hi);
      wide_add<acc_t>(lo, hi, d0 + d1);
      wide_add<acc_t>(lo, hi, d2 + d3);
      wide_store<acc_t>(a + j, lo, hi);
      lane_add(b + j, (d0 * m0 + d1 * m1) + (d2 * m2 + d3 * m3));
      dz.one_vec(o + j, d0);
      dz.one_vec(o + width + j, d1);
      dz.one_vec(o + 2 * width + j, d2);
      dz.one_vec(o + 3 * width + j, d3);
    }
    for (; j < width; ++j) {
      for (int64_t k = 0; k < 4; ++k) {
        acc_t d, m;
        one_terms(o + k * width, j, d, m);
        a[j] += d;
        b[j] += d * m;
        dz.one(o + k * width + j, d);
      }
    }
  }
  for (; row < nrows; ++row) {
    const int64_t o = row * width;
    run_act_reduce_lanes(
        GradRun<scalar_t, acc_t, A, Res, FromOut, LaneCoeffs<acc_t, kGradCoeffs>>{dy + o, s + o, opt_at(r, o), co, p},
        width, a, b, dz.at(o));
  }
}

// dx (and dr = dz) of one run.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, bool NT, typename Co>
__attribute__((always_inline)) inline void run_act_backward(
    const GradRun<scalar_t, acc_t, A, Res, FromOut, Co>& g, scalar_t* dx, scalar_t* dr, int64_t len) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const Co& co = g.co;
  auto elemt = [&](int64_t i, vec d, vec m) {
    return backward_elemt(d, m, vec{}, co.at(kMeanDz, i), co.at(kK, i), co.at(kA, i));
  };
  auto f = [&](int64_t i, vec& d) {
    vec m;
    g.vec_terms(i, d, m);
    return elemt(i, d, m);
  };
  run_map<acc_t, kMaskedRuns<scalar_t, acc_t, Co>, kMaskAll>(
      len,
      [&](int64_t i) {
        vec d0, d1;
        const vec v0 = f(i, d0), v1 = f(i + W, d1);
        vstore2<scalar_t, acc_t, NT>(dx + i, v0, v1);
        if constexpr (Res) {
          vstore2<scalar_t, acc_t, NT>(dr + i, d0, d1);
        }
      },
      [&](int64_t i) {
        vec d;
        vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(dx + i, f(i, d));
        if constexpr (Res) {
          vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(dr + i, d);
        }
      },
      [&](int64_t i) {
        acc_t d, m;
        g.one_terms(i, d, m);
        store<scalar_t, acc_t>(
            dx, i, backward_elemt(d, m, acc_t(0), co.one(kMeanDz, i), co.one(kK, i), co.one(kA, i)));
        if constexpr (Res) {
          store<scalar_t, acc_t>(dr, i, d);
        }
      },
      [&](int64_t i, auto n) {  // (generic: instantiated only where run_map masks)
        // (Never streamed: a streamed NCHW pass has runs of whole lines, see stream_planes.)
        vec d, m;
        g.part_terms(i, n, d, m);
        vstore_part<scalar_t, acc_t>(dx + i, elemt(i, d, m), n);
        if constexpr (Res) {
          vstore_part<scalar_t, acc_t>(dr + i, d, n);
        }
      });
}

// Whether the backward pass may stream by groups (fused_group_pass, lanes_pass) where they say so:
// dr (if any) must start where dx does in a line, and planes that do not start on lines stream
// only by lanes, which the backward takes only for planes shorter than kLanePlane (see
// group_by_lanes): streaming 14x14 planes by lanes measured slower than writing them plane by
// plane through the cache (see docs/performance.md#fused-short-planes-by-lanes).
template <typename scalar_t>
inline bool backward_streams(const Layout& l, const scalar_t* dr) {
  return (dr == nullptr || store_aligned(dr)) && (planes_on_lines<scalar_t>(l) || l.HxW < kLanePlane);
}

// dx (and dr) of NCHW channels c0 .. c0 + G - 1 (coefficients arrays[k][c], see kGradCoeffs), by
// lanes where group_by_lanes says so, else plane by plane.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, bool NT>
inline void group_act_backward(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, scalar_t* dx, scalar_t* dr, const Layout& l, int64_t c0,
    int64_t G, const acc_t* const* arrays, acc_t p, GroupLaneCoeffs<acc_t, kGradCoeffs>& lanes) {
  if (group_by_lanes<scalar_t, acc_t, NT, true>(l, G)) {
    // (The coefficients the terms do not read are spread all the same: a few stores per lane.)
    const auto& co = lanes.spread(l.HxW, G, [&](int k, int64_t g) { return arrays[k][c0 + g]; });
    using Run = GradRun<scalar_t, acc_t, A, Res, FromOut, LaneCoeffs<acc_t, kGradCoeffs>>;
    group_samples(l, c0, [&](int64_t off) {
      run_act_backward<scalar_t, acc_t, A, Res, FromOut, NT>(
          Run{dy + off, s + off, opt_at(r, off), co, p}, dx + off, opt_at(dr, off), G * l.HxW);
    });
    return;
  }
  using Run = GradRun<scalar_t, acc_t, A, Res, FromOut, SplatCoeffs<acc_t, kGradCoeffs>>;
  group_planes(l, c0, G, [&](int64_t off, int64_t g) {
    const SplatCoeffs<acc_t, kGradCoeffs> co(arrays, c0 + g);
    run_act_backward<scalar_t, acc_t, A, Res, FromOut, NT>(
        Run{dy + off, s + off, opt_at(r, off), co, p}, dx + off, opt_at(dr, off), l.HxW);
  });
}

// The sums of block j (BlockPlan) of NCHW channel c.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut>
inline GradSums act_block_sums(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, const Layout& l, const BlockPlan& plan, int64_t c,
    int64_t j, const SplatCoeffs<acc_t, kGradCoeffs>& co, acc_t p) {
  using Run = GradRun<scalar_t, acc_t, A, Res, FromOut, SplatCoeffs<acc_t, kGradCoeffs>>;
  int64_t n0, n1, h0, h1;
  plan.range(l, j, n0, n1, h0, h1);
  GradAcc<acc_t> acc;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t o = (n * l.C + c) * l.HxW + h0;
    run_act_reduce(Run{dy + o, s + o, opt_at(r, o), co, p}, h1 - h0, acc);
  }
  return {acc.dz(), static_cast<merge_t>(acc.dz_xmu())};
}

// act_block_sums of channels c0 .. c0 + G - 1 where lane_reductions applies (short planes that end
// in a partial vector: 7x7, 5x5), as lane_block_reduce does for batch norm: one accumulator per
// position of the group's span in a sample (its G * HxW adjacent values), the block's samples
// added into them in sample order (four at a time: dz as two pair sums, as act_rows_reduce), then
// each channel's HxW positions folded in a fixed order. A channel's terms are added in an order
// set by HxW alone, whatever G (which follows the thread count) is: the same bits for any G.
// Run by run, each 7x7 run cost three vectors, a scalar fourth and the run's setup, twice (the
// sums, then dx).
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut>
inline void lane_act_block_sums(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, const Layout& l, int64_t n0, int64_t n1, int64_t c0,
    int64_t G, const acc_t* const* arrays, acc_t p, GradSums* out) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const LaneSpan ls(l.HxW, G, W);
  alignas(64) acc_t mv[kLaneSpan], sv[kLaneSpan], tv[kLaneSpan], iv[kLaneSpan], b[kLaneSpan];
  alignas(64) merge_t a[kLaneSpan];
  ls.spread([&](int64_t g) { return arrays[kMean][c0 + g]; }, mv);
  ls.spread([&](int64_t g) { return arrays[kGScale][c0 + g]; }, sv);
  ls.spread([&](int64_t g) { return arrays[kGShift][c0 + g]; }, tv);
  ls.spread([&](int64_t g) { return arrays[kInvScale][c0 + g]; }, iv);
  ls.zero(a);
  ls.zero(b);
  // dz (zero past n) and x - mean of the n values at i of the span at offset o.
  auto terms = [&](int64_t o, int64_t i, int64_t n, vec& d, vec& m) {
    grad_terms_vec<A, Res, FromOut, acc_t>(
        span_load<scalar_t, acc_t>(dy + o + i, n), span_load<scalar_t, acc_t>(s + o + i, n),
        Res ? span_load<scalar_t, acc_t>(r + o + i, n) : vec{}, vload_acc(mv + i), vload_acc(sv + i),
        vload_acc(tv + i), vload_acc(iv + i), p, d, m);
    if (n < W) {
      d = first_lanes<acc_t>(d, n);
    }
  };
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    int64_t o[4];
    for (int k = 0; k < 4; ++k) {
      o[k] = ((n + k) * l.C + c0) * l.HxW;
    }
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t cnt) {
      vec d[4], m[4];
      for (int k = 0; k < 4; ++k) {
        terms(o[k], i, cnt, d[k], m[k]);
      }
      WideVec lo, hi;
      wide_load<acc_t>(a + i, lo, hi);
      wide_add<acc_t>(lo, hi, d[0] + d[1]);
      wide_add<acc_t>(lo, hi, d[2] + d[3]);
      wide_store<acc_t>(a + i, lo, hi);
      lane_add(b + i, (rounded(d[0] * m[0]) + rounded(d[1] * m[1])) + (rounded(d[2] * m[2]) + rounded(d[3] * m[3])));
    });
  }
  for (; n < n1; ++n) {
    const int64_t o = (n * l.C + c0) * l.HxW;
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t cnt) {
      vec d, m;
      terms(o, i, cnt, d, m);
      wide_lane_add<acc_t>(a + i, d);
      lane_add(b + i, rounded(d * m));
    });
  }
  for (int64_t g = 0; g < G; ++g) {
    out[g] = {lane_fold(a + g * l.HxW, l.HxW), static_cast<merge_t>(lane_fold(b + g * l.HxW, l.HxW))};
  }
}

// The sums of block j of NCHW channels c0 .. c0 + G - 1: by lanes where lane_reductions applies,
// else channel by channel (act_block_sums).
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut>
inline void act_group_block_sums(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, const Layout& l, const BlockPlan& plan, int64_t c0,
    int64_t G, int64_t j, const acc_t* const* arrays, acc_t p, GradSums* out) {
  if constexpr (kMaskedTails<scalar_t, acc_t>) {  // (lane_reductions needs them)
    if (lane_reductions<scalar_t, acc_t>(l)) {
      int64_t n0, n1, h0, h1;
      plan.range(l, j, n0, n1, h0, h1);
      lane_act_block_sums<scalar_t, acc_t, A, Res, FromOut>(dy, s, r, l, n0, n1, c0, G, arrays, p, out);
      return;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    out[g] = act_block_sums<scalar_t, acc_t, A, Res, FromOut>(
        dy, s, r, l, plan, c0 + g, j, SplatCoeffs<acc_t, kGradCoeffs>(arrays, c0 + g), p);
  }
}

// A channel's block sums added in block order.
inline GradSums merge_blocks(const GradSums* part, int64_t nblocks) {
  merge_t a = 0, b = 0;
  for (int64_t j = 0; j < nblocks; ++j) {
    a += part[j].dy;
    b += part[j].dy_xmu;
  }
  return {a, b};
}

// The sums of every channel: NCHW by (block, channel) tasks over BlockPlan's blocks, merged in
// block order; channels-last by RowPlan's chunks, merged in chunk order (as backward_reduce_sums).
// With StoreDz (channels-last only) dz is also stored to dzo (streamed in whole super-rows; the tail
// row stores normally): the same sums either way.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut, bool StoreDz = false>
void act_reduce_sums(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, const Layout& l, const acc_t* const* arrays, acc_t p,
    GradSums* sums, scalar_t* dzo = nullptr) {
  const int64_t C = l.C;
  if (l.channels_last) {
    const RowPlan plan(l, sizeof(scalar_t));
    const LaneBuffers<acc_t, kGradCoeffs> co(arrays, C, plan.k);
    const bool by4 = act_reduce_by4<acc_t, FromOut>(l, plan, sizeof(scalar_t));
    // Every chunk writes all of its C partials (fold).
    Buffer<merge_t> pa(plan.nchunks * C, Buffer<merge_t>::kUninit);
    Buffer<acc_t> pb(plan.nchunks * C, Buffer<acc_t>::kUninit);
    // dz streams where it and x, which the elementwise pass reads back, exceed the cache share.
    const bool stream = StoreDz && stream_rows<scalar_t, acc_t>(dzo, l, plan, 2);
    with_constant(stream, [&](auto nt) {
      at::parallel_for(0, plan.nchunks, plan.chunk_grain(), [&](int64_t begin, int64_t end) {
        Buffer<merge_t> a(plan.P);
        Buffer<acc_t> b(plan.P);
        for (int64_t q = begin; q < end; ++q) {
          const int64_t r0 = q * plan.rows_per_chunk, r1 = r0 + plan.chunk_rows(q);
          std::fill(a.p, a.p + plan.P, merge_t(0));
          std::fill(b.p, b.p + plan.P, acc_t(0));
          for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
            auto reduce = [&](const auto& dz) {
              act_rows_reduce<scalar_t, acc_t, A, Res, FromOut>(
                  dy + off, s + off, opt_at(r, off), nrows, width, by4, co.lanes, p, a.p, b.p, dz);
            };
            if (width == plan.P) {
              reduce(DzOut<scalar_t, acc_t, StoreDz, nt.value>{opt_at(dzo, off)});
            } else {
              reduce(DzOut<scalar_t, acc_t, StoreDz, false>{opt_at(dzo, off)});
            }
          });
          fold(a.p, C, plan.k, pa.p + q * C);
          fold(b.p, C, plan.k, pb.p + q * C);
        }
        end_streaming<nt.value>();
      });
    });
    merge_chunk_sums(pa.p, pb.p, plan.nchunks, C, sums);
    return;
  }
  const BlockPlan plan(l);
  const int64_t G = channel_group<scalar_t>(l), groups = (C + G - 1) / G;
  Buffer<GradSums> part(C * plan.nblocks);
  at::parallel_for(0, groups * plan.nblocks, std::max<int64_t>(1, plan.task_grain(l) / G), [&](int64_t begin, int64_t end) {
    GradSums out[kMaxGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / groups, c0 = (t % groups) * G, g_n = std::min(G, C - c0);
      act_group_block_sums<scalar_t, acc_t, A, Res, FromOut>(dy, s, r, l, plan, c0, g_n, j, arrays, p, out);
      for (int64_t g = 0; g < g_n; ++g) {
        part.p[(c0 + g) * plan.nblocks + j] = out[g];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    sums[c] = merge_blocks(part.p + c * plan.nblocks, plan.nblocks);
  }
}

// The elementwise pass: dx, and dr where a residual is given.
template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut>
void act_backward_elemt(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, scalar_t* dx, scalar_t* dr, const Layout& l,
    const acc_t* const* arrays, acc_t p) {
  const int64_t passes = 3 + (Res ? 2 : 0);
  const bool dr_aligned = !Res || store_aligned(dr);
  if (l.channels_last) {
    const RowPlan plan(l, sizeof(scalar_t));
    const LaneBuffers<acc_t, kGradCoeffs> co(arrays, l.C, plan.k);
    using Run = GradRun<scalar_t, acc_t, A, Res, FromOut, LaneCoeffs<acc_t, kGradCoeffs>>;
    const bool nt = dr_aligned && stream_rows<scalar_t, acc_t>(dx, l, plan, passes);
    for_super_rows_all(plan, nt, [&](auto nt_c, int64_t off, int64_t len) {
      run_act_backward<scalar_t, acc_t, A, Res, FromOut, nt_c.value>(
          Run{dy + off, s + off, opt_at(r, off), co.lanes, p}, dx + off, opt_at(dr, off), len);
    });
    return;
  }
  if (const GroupPass gp = lanes_pass<scalar_t, acc_t>(dx, l, passes); gp.G > 0 && (!gp.nt || backward_streams<scalar_t>(l, dr))) {
    using Lanes = GroupLaneCoeffs<acc_t, kGradCoeffs>;
    for_channel_groups<Lanes>(l, gp, std::max<int64_t>(1, channel_grain(l) / gp.G), [&](auto nt, int64_t c0, int64_t G, Lanes& lanes) {
      group_act_backward<scalar_t, acc_t, A, Res, FromOut, nt.value>(dy, s, r, dx, dr, l, c0, G, arrays, p, lanes);
    });
    return;
  }
  using Run = GradRun<scalar_t, acc_t, A, Res, FromOut, SplatCoeffs<acc_t, kGradCoeffs>>;
  for_planes(l, dr_aligned && stream_planes(dx, l, passes), [&](auto nt, int64_t off, int64_t len, int64_t c) {
    const SplatCoeffs<acc_t, kGradCoeffs> co(arrays, c);
    run_act_backward<scalar_t, acc_t, A, Res, FromOut, nt.value>(Run{dy + off, s + off, opt_at(r, off), co, p}, dx + off, opt_at(dr, off), len);
  });
}

// ---------------------------------------------------------------------------------------------
// The op kernels.

template <typename scalar_t, typename acc_t>
void act_affine_dispatch(
    const scalar_t* x, const scalar_t* r, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift, int64_t act, acc_t p) {
  with_act(act, [&](auto a) {
    with_constant(r != nullptr, [&](auto res) {
      act_affine_kernel<scalar_t, acc_t, decltype(a)::value, res.value>(x, r, y, l, pivot, scale, shift, p);
    });
  });
}

// Training forward: the statistics of forward_kernel (channel_stats, finished per channel by
// forward_channel_coeffs: the same mean, invstd and var bits), then one act_affine pass.
template <typename scalar_t, typename acc_t>
void act_forward_kernel(
    const scalar_t* x, const scalar_t* r, scalar_t* y, const Layout& l, const acc_t* weight, const acc_t* bias,
    double eps, acc_t* mean_out, acc_t* invstd_out, acc_t* var_out, int64_t act, acc_t p) {
  const int64_t C = l.C;
  auto finish = [&](int64_t c, acc_t pivot, merge_t mean, merge_t var_m) {
    return forward_channel_coeffs(c, pivot, mean, var_m, weight, bias, eps, mean_out, invstd_out, var_out);
  };
  if (fused_channel_forward<scalar_t>(l)) {
    // Per channel group: statistics, then the pass while the group is still in L2 (as forward_kernel).
    const BlockPlan plan(l);
    with_act(act, [&](auto a) {
      with_constant(r != nullptr, [&](auto res) {
        using Lanes = GroupLaneCoeffs<acc_t, kFwdCoeffs>;
        const GroupPass gp = fused_group_pass<scalar_t, acc_t>(y, l, res.value ? 3 : 2);
        for_channel_groups<Lanes>(l, gp, 1, [&](auto nt, int64_t c0, int64_t G, Lanes& lanes) {
          NormalizeCoeffs<acc_t> k[kMaxGroup];
          group_forward_coeffs<scalar_t, acc_t>(x, l, plan, c0, G, finish, k);
          group_act_affine<scalar_t, acc_t, decltype(a)::value, res.value, nt.value>(x, r, y, l, c0, G, k, p, lanes);
        });
      });
    });
    return;
  }
  ChannelStats<acc_t> st(C);
  channel_stats<scalar_t, acc_t>(x, l, st);
  Buffer<acc_t> pivot(C), scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto k = finish(c, st.pivot.p[c], st.mean.p[c], st.var.p[c]);
    pivot.p[c] = k.pivot;
    scale.p[c] = k.scale;
    shift.p[c] = k.shift;
  }
  act_affine_dispatch<scalar_t, acc_t>(x, r, y, l, pivot.p, scale.p, shift.p, act, p);
}

template <typename scalar_t, typename acc_t, Act A, bool Res, bool FromOut>
void act_backward_impl(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, scalar_t* dx, scalar_t* dr, const Layout& l,
    const acc_t* weight, const acc_t* bias, const acc_t* mean, const acc_t* invstd, acc_t* sum_dz, acc_t* sum_dz_xmu,
    acc_t p) {
  const int64_t C = l.C;
  Buffer<acc_t> scale(C), inv_scale(C), mean_dz(C), k(C), a(C);
  for (int64_t c = 0; c < C; ++c) {
    scale.p[c] = invstd[c] * weight[c];  // normalize_coeffs' scale
    inv_scale.p[c] = scale.p[c] != acc_t(0) ? acc_t(1) / scale.p[c] : acc_t(0);
  }
  const acc_t* arrays[kGradCoeffs] = {mean, scale.p, bias, inv_scale.p, mean_dz.p, k.p, a.p};
  auto coeffs = [&](int64_t c, const GradSums& sc) {
    const BackwardCoeffs<acc_t> bc = fused_backward_coeffs(l, c, weight, mean, invstd, sc, sum_dz, sum_dz_xmu);
    mean_dz.p[c] = bc.mean_dy;
    k.p[c] = bc.k;
    a.p[c] = bc.a;
  };
  if (!l.channels_last && fused_channel_backward<scalar_t>(l)) {
    // Per channel group: the sums (the blocks of act_reduce_sums, merged in the same order: the
    // same bits), then dx while the group's (dy, saved) are still in L2 (as backward_kernel).
    const BlockPlan plan(l);
    GroupPass gp = fused_group_pass<scalar_t, acc_t>(dx, l, Res ? 5 : 3);
    if (gp.nt && !backward_streams<scalar_t>(l, dr)) {
      gp = {channel_group<scalar_t>(l), false};
    }
    using Lanes = GroupLaneCoeffs<acc_t, kGradCoeffs>;
    const int64_t grain = std::max<int64_t>(1, channel_grain(l) / gp.G / 2);
    for_channel_groups<Lanes>(l, gp, grain, [&](auto nt, int64_t c0, int64_t G, Lanes& lanes) {
      merge_t sa[kMaxGroup] = {}, sb[kMaxGroup] = {};
      for (int64_t j = 0; j < plan.nblocks; ++j) {
        GradSums part[kMaxGroup];
        act_group_block_sums<scalar_t, acc_t, A, Res, FromOut>(dy, s, r, l, plan, c0, G, j, arrays, p, part);
        for (int64_t g = 0; g < G; ++g) {
          sa[g] += part[g].dy;
          sb[g] += part[g].dy_xmu;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        coeffs(c0 + g, GradSums{sa[g], sb[g]});
      }
      group_act_backward<scalar_t, acc_t, A, Res, FromOut, nt.value>(dy, s, r, dx, dr, l, c0, G, arrays, p, lanes);
    });
    return;
  }
  Buffer<GradSums> sums(C);
  if constexpr (Res && !FromOut && std::is_same_v<scalar_t, acc_t>) {
    if (l.channels_last && stream_rows<scalar_t, acc_t>(dr, l, RowPlan(l, sizeof(scalar_t)), 2)) {
      // Channels-last with a residual (float, double) where dz and x exceed the cache share: the
      // reduction streams dz out as grad_residual, and dx is batch norm's elementwise pass over
      // (dz, x): four tensor passes and three (dz, x -> dx) instead of three and five (dy, x, r ->
      // dx, dr), one pass fewer. Smaller inputs keep the five-pass route, whose inputs come from
      // the cache (measured faster there, see docs/performance.md#fused-residual-backward). Only
      // where scalar_t is acc_t: dz is stored exactly, so dx is the same formula on the same values
      // (the same bits on either route, tested through the streaming threshold); a 16-bit dz
      // would be rounded before dx.
      act_reduce_sums<scalar_t, acc_t, A, Res, FromOut, true>(dy, s, r, l, arrays, p, sums.p, dr);
      Buffer<BackwardCoeffs<acc_t>> bc(C);
      for (int64_t c = 0; c < C; ++c) {
        bc.p[c] = fused_backward_coeffs(l, c, weight, mean, invstd, sums.p[c], sum_dz, sum_dz_xmu);
      }
      backward_elemt_kernel<scalar_t, acc_t>(dr, s, dx, l, bc.p);
      return;
    }
  }
  act_reduce_sums<scalar_t, acc_t, A, Res, FromOut>(dy, s, r, l, arrays, p, sums.p);
  for (int64_t c = 0; c < C; ++c) {
    coeffs(c, sums.p[c]);
  }
  act_backward_elemt<scalar_t, acc_t, A, Res, FromOut>(dy, s, r, dx, dr, l, arrays, p);
}

template <typename scalar_t, typename acc_t>
void act_backward_kernel(
    const scalar_t* dy, const scalar_t* s, const scalar_t* r, scalar_t* dx, scalar_t* dr, const Layout& l,
    const acc_t* weight, const acc_t* bias, const acc_t* mean, const acc_t* invstd, acc_t* sum_dz, acc_t* sum_dz_xmu,
    int64_t act, acc_t p, bool from_output) {
  with_constant(r != nullptr, [&](auto res) {
    auto run = [&](auto a, auto from_out) {
      act_backward_impl<scalar_t, acc_t, decltype(a)::value, res.value, from_out.value>(
          dy, s, r, dx, dr, l, weight, bias, mean, invstd, sum_dz, sum_dz_xmu, p);
    };
    if (from_output) {
      with_invertible_act(act, [&](auto a) { run(a, std::true_type()); });
    } else {
      with_act(act, [&](auto a) { run(a, std::false_type()); });
    }
  });
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
