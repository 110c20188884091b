// The runs of the fused BN + activation kernels (part of batch_norm_kernel.h: see the map there):
// the coefficients of a run as splats (SplatCoeffs, NCHW planes) or per-lane arrays (LaneCoeffs:
// channels-last super-rows, LaneBuffers; NCHW channel groups, GroupLaneCoeffs), run_map (a run's
// vector pairs, vector and tail), and the parallel walks over planes, super-rows and channel
// groups. kernel/act_ops.h builds the passes on them.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/act_runs.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// K per-channel coefficients of one NCHW run: the same in every lane.
template <typename acc_t, int K>
struct SplatCoeffs {
  using vec = typename Vec<acc_t>::type;
  static constexpr bool kSplat = true;  // at(k, j) for any j: runs may end in a masked vector
  vec v[K];
  acc_t s[K];
  // Channel c of K per-channel arrays.
  SplatCoeffs(const acc_t* const* arrays, int64_t c) {
    for (int k = 0; k < K; ++k) {
      s[k] = arrays[k][c];
      v[k] = vec{} + s[k];
    }
  }
  explicit SplatCoeffs(const NormalizeCoeffs<acc_t>& nc) : SplatCoeffs(std::array<acc_t, 3>{nc.pivot, nc.scale, nc.shift}) {}
  explicit SplatCoeffs(const std::array<acc_t, K>& values) {
    for (int k = 0; k < K; ++k) {
      s[k] = values[k];
      v[k] = vec{} + s[k];
    }
  }
  vec at(int k, int64_t) const {
    return v[k];
  }
  acc_t one(int k, int64_t) const {
    return s[k];
  }
};

// K per-lane coefficient arrays of channels-last super-rows (each per-channel array replicated
// RowPlan::k times).
template <typename acc_t, int K>
struct LaneCoeffs {
  using vec = typename Vec<acc_t>::type;
  static constexpr bool kSplat = false;  // at(k, j) reads lanes [j, j + W): only whole vectors
  const acc_t* p[K];
  vec at(int k, int64_t j) const {
    return vload_acc(p[k] + j);
  }
  acc_t one(int k, int64_t j) const {
    return p[k][j];
  }
};

// The lane arrays of LaneCoeffs from K per-channel arrays.
template <typename acc_t, int K>
struct LaneBuffers {
  LaneBuffers(const acc_t* const* per_channel, int64_t C, int64_t k) : buf(K * k * C) {
    for (int i = 0; i < K; ++i) {
      replicate(per_channel[i], C, k, buf.p + i * k * C);
      lanes.p[i] = buf.p + i * k * C;
    }
  }
  Buffer<acc_t> buf;
  LaneCoeffs<acc_t, K> lanes;
};

// The lane arrays of K coefficients of an NCHW channel group c0 .. c0 + G - 1 whose runs of one
// sample (G * HxW adjacent values) are whole float vectors: lane i holds channel c0 + i / HxW's
// value (spread_lanes), so that each sample's G runs are one run of whole vectors with
// LaneCoeffs, without per-run setup or tails (a 7x7 run is three vectors and one value), as the
// plain kernels' group_affine / group_backward do. Where that applies: group_by_lanes.
template <typename acc_t, int K>
struct GroupLaneCoeffs {
  static constexpr int64_t kLanes = kMaxLineLaneVecs * kLaneWidth;
  GroupLaneCoeffs() : buf(K * kLanes, Buffer<acc_t>::kUninit) {
    for (int k = 0; k < K; ++k) {
      lanes.p[k] = buf.p + k * kLanes;
    }
  }
  // Coefficient k of channel c0 + g is get(k, g).
  template <typename Get>
  const LaneCoeffs<acc_t, K>& spread(int64_t HxW, int64_t G, const Get& get) {
    for (int k = 0; k < K; ++k) {
      spread_lanes<acc_t>(HxW, G, [&](int64_t g) { return get(k, g); }, buf.p + k * kLanes);
    }
    return lanes;
  }
  Buffer<acc_t> buf;
  LaneCoeffs<acc_t, K> lanes;
};

// Whether a pass over an NCHW channel group of G channels goes by lanes (GroupLaneCoeffs): where
// it is streamed and its planes do not start on lines (G is then a line group, see
// fused_group_pass and lanes_pass), or where its runs in a sample fill whole vectors
// (group_lanes_fit), the rule of the plain kernels' group_affine.
// The backward pass (seven coefficients a lane, six of them read per vector) goes by lanes in
// cache only for planes shorter than kLanePlane: a 14x14 run's setup costs less than its twelve
// vectors' coefficient loads.
template <typename scalar_t, typename acc_t, bool NT, bool Backward = false>
inline bool group_by_lanes(const Layout& l, int64_t G) {
  if constexpr (NT) {
    return !planes_on_lines<scalar_t>(l);
  }
  return (!Backward || l.HxW < kLanePlane) && group_lanes_fit<scalar_t, acc_t>(l, G);
}

// p + o, or null for an absent tensor (the residual and its gradient; no offset of a null pointer).
template <typename T>
inline T* opt_at(T* p, int64_t o) {
  return p != nullptr ? p + o : nullptr;
}

// The fewest values left at the end of a run that the backward sums take as one masked vector
// (run_map): 14x14 runs end in 4 values, which measured faster masked; 7x7 runs end in 1, which
// measured slower masked than alone (see docs/performance.md#fused-masked-tails). The elementwise
// passes mask every tail (kMaskAll): a run's values must get the arithmetic of a whole vector, as
// they do where a channel group's runs go by lanes (GroupLaneCoeffs), since whether they do
// depends on the thread count (channel_group) and the scalar code differs in its last bits (silu's
// and elu's exp is std::exp there).
constexpr int64_t kMinMaskedTail = 4;
constexpr int64_t kMaskAll = 1;

// f2(i) for the pairs of vectors of a run of len values, f1(i) for a last single vector, then the
// values left: with Masked and at least MinTail of them, fm(i, n) as one masked vector of n < W
// values (see kMaskedTails), else fs(i) one by one.
template <typename acc_t, bool Masked = false, int64_t MinTail = kMinMaskedTail, typename F2, typename F1, typename FS,
          typename FM = std::nullptr_t>
inline void run_map(int64_t len, const F2& f2, const F1& f1, const FS& fs, const FM& fm = nullptr) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    f2(i);
  }
  for (; i + W <= len; i += W) {
    f1(i);
  }
  if constexpr (Masked) {
    if (i + MinTail <= len) {
      fm(i, len - i);
      return;
    }
  }
  for (; i < len; ++i) {
    fs(i);
  }
}

// Whether the runs of a pass with coefficients Co end in one masked vector (run_map's Masked).
// The run functions with such tails (run_act_affine, run_act_reduce, run_act_backward) are always
// inlined: they run once per NCHW plane, and with the masked tail GCC stopped inlining
// run_act_backward, a call per 7x7 plane that made the bfloat16 backward about 20% slower.
template <typename scalar_t, typename acc_t, typename Co>
constexpr bool kMaskedRuns = kMaskedTails<scalar_t, acc_t> && Co::kSplat;

// f(nt, offset, len, c) for every NCHW plane (c: its channel), in parallel, the output streamed
// (nt) where `stream` says so.
template <typename F>
inline void for_planes(const Layout& l, bool stream, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.HxW));
  with_constant(stream, [&](auto nt) {
    at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin, c = begin % l.C; q < end; ++q, c = c + 1 == l.C ? 0 : c + 1) {
        f(nt, q * l.HxW, l.HxW, c);
      }
      end_streaming<nt.value>();
    });
  });
}

// f(nt, offset, width) for every channels-last super-row of the plan, in parallel (streamed where
// `stream` says so), then for the tail rows as one row (not streamed).
template <typename F>
inline void for_super_rows_all(const RowPlan& plan, bool stream, const F& f) {
  const int64_t nsuper = plan.R / plan.k;
  with_constant(stream, [&](auto nt) {
    at::parallel_for(0, nsuper, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, plan.P)), [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        f(nt, s * plan.P, plan.P);
      }
      end_streaming<nt.value>();
    });
  });
  const int64_t tail = (plan.R - nsuper * plan.k) * plan.C;
  if (tail > 0) {
    f(std::false_type(), nsuper * plan.P, tail);
  }
}

// f(nt, c0, G, scratch) for the NCHW channel groups of gp (GroupPass: G channels a group, the
// output streamed where gp.nt), in parallel; scratch is a Scratch of the calling task.
template <typename Scratch, typename F>
inline void for_channel_groups(const Layout& l, GroupPass gp, int64_t grain, const F& f) {
  const int64_t G = gp.G, groups = (l.C + G - 1) / G;
  with_constant(gp.nt, [&](auto nt) {
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      Scratch scratch;
      for (int64_t q = begin; q < end; ++q) {
        f(nt, q * G, std::min(G, l.C - q * G), scratch);
      }
      end_streaming<nt.value>();
    });
  });
}

// The planes of channels c0 .. c0 + G - 1, sample by sample: f(offset, g).
template <typename F>
inline void group_planes(const Layout& l, int64_t c0, int64_t G, const F& f) {
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      f((n * l.C + c0 + g) * l.HxW, g);
    }
  }
}

// f(offset) for the runs of channels c0 .. c0 + G - 1 in each sample (G * HxW adjacent values).
template <typename F>
inline void group_samples(const Layout& l, int64_t c0, const F& f) {
  for (int64_t n = 0; n < l.N; ++n) {
    f((n * l.C + c0) * l.HxW);
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
