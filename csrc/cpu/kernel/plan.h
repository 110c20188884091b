// How the kernels cut a tensor into work and which path an op takes (part of batch_norm_kernel.h:
// see the map there): NCHW blocks and channel groups, channels-last chunks and super-rows, the
// routing predicates of the fused per-channel-group tasks and of the per-lane passes.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/plan.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// NCHW: channel c holds N runs of HxW values; its statistics blocks are fixed by the shape alone.
struct BlockPlan {
  int64_t runs_per_block;  // HxW <= kBlock: whole runs per block
  int64_t pieces_per_run;  // HxW > kBlock: blocks per run
  int64_t nblocks;

  explicit BlockPlan(const Layout& l) {
    if (l.HxW <= kBlock) {
      runs_per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, l.HxW));
      pieces_per_run = 1;
      nblocks = (l.N + runs_per_block - 1) / runs_per_block;
    } else {
      runs_per_block = 1;
      pieces_per_run = (l.HxW + kBlock - 1) / kBlock;
      nblocks = l.N * pieces_per_run;
    }
  }
  // At::parallel_for grain in (block, channel) tasks: about kGrainElems values per task, so a
  // small input (blocks of a few hundred values) is not split into tasks whose fork and join cost
  // more than their work.
  int64_t task_grain(const Layout& l) const {
    const int64_t block_values = pieces_per_run == 1 ? std::min(l.N, runs_per_block) * l.HxW : kBlock;
    return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, block_values));
  }
  // Block j covers runs [n0, n1) and, within each, values [h0, h1).
  void range(const Layout& l, int64_t j, int64_t& n0, int64_t& n1, int64_t& h0, int64_t& h1) const {
    if (pieces_per_run == 1) {
      n0 = j * runs_per_block;
      n1 = std::min(l.N, n0 + runs_per_block);
      h0 = 0;
      h1 = l.HxW;
    } else {
      n0 = j / pieces_per_run;
      n1 = n0 + 1;
      h0 = (j % pieces_per_run) * kBlock;
      h1 = std::min(l.HxW, h0 + kBlock);
    }
  }
};

// Channels-last: R rows of C values, cut into fixed chunks of whole super-rows.
struct RowPlan {
  int64_t C, R;
  int64_t k;       // rows per super-row
  int64_t P;       // lanes per super-row, k * C
  int64_t rows_per_chunk;
  int64_t nchunks;
  bool wide;  // the row passes walk super-rows one at a time, in memory order (see kWideRow)

  RowPlan(const Layout& l, int64_t value_bytes) : C(l.C), R(l.rows()) {
    // k * C a multiple of 16 lanes (whole vectors) where C is small, and at least kMinLanes. Rows
    // narrower than kWideRow whose C is not a multiple of 16 pair up the same way: such rows are
    // walked as column blocks down the rows, and the columns left over from the whole vectors
    // would go down them one value at a time, each add waiting on the one before (see
    // docs/performance.md#odd-row-widths).
    k = 1;
    if (C > 0 && (C < kMinLanes || (C < kWideRow && C % 16 != 0))) {
      const int64_t k0 = 16 / std::gcd<int64_t>(C, 16);
      k = k0 * ((kMinLanes + k0 * C - 1) / (k0 * C));
    }
    P = k * C;
    // At least kMinChunkRows super-rows: each chunk costs a few passes over its C partials. The
    // rows are then spread evenly over that many chunks: with 100 rows of 2048 lanes, chunks of 32
    // rows were 32, 32, 32 and 4, and two threads took 64 and 36 of them; chunks of 25 split 50 / 50.
    // The chunks follow from the shape alone (the same sums for any thread count).
    const int64_t supers = (R + k - 1) / k;
    const int64_t most = std::max<int64_t>(kMinChunkRows, kChunkValues / P);
    const int64_t even = (supers + most - 1) / most;
    rows_per_chunk = k * std::max<int64_t>(1, (supers + even - 1) / std::max<int64_t>(1, even));
    nchunks = (R + rows_per_chunk - 1) / rows_per_chunk;
    wide = P >= kWideRow ||
        (kNativeBytes < 64 && P > 4 * Vec<float>::W && l.traffic_numel() * value_bytes >= kWideBytes);
  }
  // Chunks per task: about kGrainElems values (see BlockPlan::task_grain).
  int64_t chunk_grain() const {
    return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, rows_per_chunk * C));
  }
  int64_t chunk_rows(int64_t q) const {
    return std::min(R, (q + 1) * rows_per_chunk) - q * rows_per_chunk;
  }
};

// Channels-last passes stream only when every super-row's vectors are store-aligned.
template <typename scalar_t, typename acc_t>
inline bool stream_rows(const scalar_t* out, const Layout& l, const RowPlan& plan, int64_t passes) {
  return stream_pass<scalar_t>(l, passes) && store_aligned(out) &&
      (plan.P * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign == 0;
}

// Applies a row function to rows [r0, r1) as whole super-rows plus a tail of < k rows (the tail
// is one "row" of its (r1 - r0) % k * C adjacent values, whose lanes are the first ones).
template <typename F>
inline void for_super_rows(const RowPlan& plan, int64_t r0, int64_t r1, const F& f) {
  const int64_t nsuper = (r1 - r0) / plan.k;
  if (nsuper > 0) {
    f(r0 * plan.C, nsuper, plan.P);
  }
  const int64_t tail = (r1 - r0) - nsuper * plan.k;
  if (tail > 0) {
    f((r0 + nsuper * plan.k) * plan.C, int64_t(1), tail * plan.C);
  }
}

// Channels per group the NCHW reductions aim for (see channel_group and group_block_stats).
constexpr int64_t kGroupTarget = 16;
// The most channels in a group: kGroupTarget, or twice that for a line group (see line_group).
constexpr int64_t kMaxGroup = 32;

// See GroupLanes: float lanes per vector on every ISA (Vec<float>::W), and the most vectors of
// one sample's runs of a channel group laid out per lane.
constexpr int64_t kLaneWidth = 16;
constexpr int64_t kMaxLaneVecs = 64;
// ... and of a line group's (see line_group).
constexpr int64_t kMaxLineLaneVecs = 128;

// Channels per task of the NCHW reductions (see group_block_stats): enough that a task reads
// runs of at least 2 KiB of each sample (7x7 runs are 98 or 196 bytes), at most kMaxGroup, and
// a multiple of the channels whose runs fill whole float vectors (16 for 7x7, 4 for 14x14; see
// GroupLanes); fewer where the group's (x, dy) would not stay in L2 for the fused passes' second
// read, or where there would be fewer than four groups per thread (see
// docs/performance.md#channel-groups).
template <typename scalar_t>
inline int64_t channel_group(const Layout& l) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_bytes = std::max<int64_t>(1, l.HxW * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t unit = kLaneWidth / std::gcd<int64_t>(std::max<int64_t>(1, l.HxW), kLaneWidth);
  int64_t G = std::min<int64_t>(kGroupTarget, (2048 + run_bytes - 1) / run_bytes);
  if (unit > 1 && G > 1) {
    G = std::max(unit, G / unit * unit);
  }
  while (G > 1 && (2 * G * l.N * run_bytes > (int64_t(512) << 10) || (l.C + G - 1) / G < 4 * threads)) {
    G = G > unit && G % unit == 0 && unit > 1 ? G - unit : G / 2;
  }
  return G;
}

inline int64_t channel_grain(const Layout& l) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.N * l.HxW));
}

// Only where seg_affine / seg_backward compute every value of a run, its tail included, with the
// same vector arithmetic (masked tails; elsewhere the scalar tail code is compiled for the
// baseline ISA, without FMA, and would give other bits than a vector lane). And only with several
// samples: laying out the coefficients per lane writes three or four arrays of a sample's G runs,
// which one sample does not pay back (see docs/performance.md#per-lane-groups).
template <typename scalar_t, typename acc_t>
inline bool group_lanes_fit(const Layout& l, int64_t G) {
  constexpr int64_t W = Vec<acc_t>::W;
  return kMaskedTails<scalar_t, acc_t> && G > 1 && l.N >= 2 && (G * l.HxW) % W == 0 &&
      G * l.HxW / W <= kMaxLaneVecs;
}

// NCHW planes that do not start on a cache line (7x7, 14x14; 28x28 of a 16-bit type) share
// lines with their neighbours, so no single plane can be streamed; but the G * HxW values of a
// group of G channels in one sample are whole lines where G * HxW * sizeof(scalar_t) is a
// multiple of 64 and so is C * HxW * sizeof(scalar_t) (every sample starts on a line). Returns
// the smallest multiple of G (a channel_group) that makes such a line group, whose lanes fit and
// that divides C; 0 where there is none. Its runs are then streamed whole lines at a time with
// the per-lane coefficients of GroupLanes (the same arithmetic: the same bits).
template <typename scalar_t, typename acc_t>
inline int64_t line_group(const Layout& l, int64_t G) {
  constexpr int64_t W = Vec<acc_t>::W;
  const int64_t run_bytes = l.HxW * static_cast<int64_t>(sizeof(scalar_t));
  if (!kMaskedTails<scalar_t, acc_t> || G < 1 || l.HxW < 1 || (l.C * run_bytes) % kStreamAlign != 0) {
    return 0;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t g = G; g <= kMaxGroup && l.C / g >= 4 * threads; g += G) {
    if ((g * run_bytes) % kStreamAlign == 0 && (g * l.HxW) % W == 0 && g * l.HxW / W <= kMaxLineLaneVecs &&
        l.C % g == 0) {
      return g;
    }
  }
  return 0;
}

// The line group (a multiple of the channel group G) with which an NCHW pass of `passes` passes
// over the tensor streams `out` where its planes do not start on a line, or 0: not streamed that
// way.
template <typename scalar_t, typename acc_t>
inline int64_t stream_line_group(const scalar_t* out, const Layout& l, int64_t passes, int64_t G) {
  if (l.channels_last || planes_on_lines<scalar_t>(l) || !stream_pass<scalar_t>(l, passes) || !store_aligned(out)) {
    return 0;
  }
  return line_group<scalar_t, acc_t>(l, G);
}

// How an NCHW pass works group by group: G channels at a time (0: not by groups), its output
// streamed (nt) or not.
struct GroupPass {
  int64_t G;
  bool nt;
};

// The fused per-group NCHW tasks (training forward, backward): a line group, streamed, where the
// planes share lines and the pass streams; else the channel group, streamed where the planes
// start on lines.
template <typename scalar_t, typename acc_t>
inline GroupPass fused_group_pass(const scalar_t* out, const Layout& l, int64_t passes) {
  const int64_t G = channel_group<scalar_t>(l);
  if (const int64_t LG = stream_line_group<scalar_t, acc_t>(out, l, passes, G); LG > 0) {
    return {LG, true};
  }
  return {G, stream_planes(out, l, passes)};
}

// How the elementwise NCHW passes (normalize, backward dx) work group by group with per-lane
// coefficients: short planes in cache, not streamed (GroupLanes), or streamed line groups; G = 0:
// plane by plane in memory order.
template <typename scalar_t, typename acc_t>
inline GroupPass lanes_pass(const scalar_t* out, const Layout& l, int64_t passes) {
  if (l.channels_last) {
    return {0, false};
  }
  const int64_t G = channel_group<scalar_t>(l);
  if (stream_pass<scalar_t>(l, passes)) {
    const int64_t LG = stream_line_group<scalar_t, acc_t>(out, l, passes, G);
    return {LG, LG > 0};
  }
  return {group_lanes_fit<scalar_t, acc_t>(l, G) ? G : 0, false};
}

// NCHW backward with enough channels and long runs, or runs of at least a cache line whose (dy, x)
// per channel fit in 1 MiB: one task per channel reduces the channel and writes its dx while
// (dy, x) of the channel are still in L2. Otherwise (and always for the statistics, where
// streaming the tensor in memory order is faster than per-channel strided reads), tasks are
// (block, channel) pairs in memory order and the elementwise pass is separate (see
// docs/performance.md#fused-channel-tasks). The blocks and their merge order are the same either
// way, so this choice (which depends on the thread count) never changes a bit of the result.
template <typename scalar_t>
inline bool fused_channel_backward(const Layout& l) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_bytes = l.HxW * static_cast<int64_t>(sizeof(scalar_t));
  const bool fits = run_bytes >= 64 && 2 * l.N * run_bytes <= (int64_t(1) << 20);
  return (l.HxW >= 1024 || fits) && (l.C >= 4 * threads || l.C % threads == 0);
}

// NCHW training forward, one task per channel (statistics, then normalization from L2): where a
// channel (its runs of at least one cache line) fits in 512 KiB and there are channels enough to
// share.
// Below AVX-512 an input above 1 MiB that fits the cache share (see stream_outputs) takes the
// memory-order passes instead: their second read comes from the last-level cache, while the
// per-channel tasks read runs a plane apart. Larger and smaller inputs keep the fused tasks (see
// docs/performance.md#fused-channel-tasks).
constexpr int64_t kFusedMinBytes = int64_t(1) << 20;
template <typename scalar_t>
inline bool fused_channel_forward(const Layout& l) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_bytes = l.HxW * static_cast<int64_t>(sizeof(scalar_t));
  if (kNativeBytes < 64) {
    const int64_t bytes = l.traffic_numel() * static_cast<int64_t>(sizeof(scalar_t));
    if (bytes > kFusedMinBytes && !stream_outputs(bytes)) {
      return false;
    }
  }
  return !l.channels_last && l.N > 0 && run_bytes >= 64 && l.N * run_bytes <= (int64_t(512) << 10) &&
      (l.C >= 4 * threads || l.C % threads == 0);
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
