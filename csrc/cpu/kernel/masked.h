// Masked batch norm (bnext/masked.py) on (N, C, L) NCHW-contiguous input whose real positions are
// runs (row n, start, stop) (part of batch_norm_kernel.h: see the map there). A run of one channel
// is one contiguous segment, so the NCHW segment walks (nchw_segments.h) serve as they are: the
// statistics and backward sums read the real positions only, and the elementwise passes write
// every position once (the runs through seg_affine / seg_backward, zeros between them). Before,
// the real positions were copied into a (1, C, K) tensor, normalized there and copied back: three
// more passes over them and a full-size temporary (see docs/performance.md, small and irregular
// batches).

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/masked.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// The real positions of every channel cut into the statistics blocks of NCHW: consecutive
// pieces of runs of at most kBlock values together (a run longer than kBlock cut into pieces),
// so that a block's second pass reads L1 and a block's float sums stay short; fixed by the runs
// alone, so the results do not depend on the thread count. A piece of channel c starts at
// x + base + c * L.
struct MaskedBlocks {
  // Each run gives a piece per block it touches: at most R + K / kBlock + 1 pieces, K / kBlock + 1
  // blocks.
  explicit MaskedBlocks(const MaskedRuns& m)
      : base(m.R + m.K / kBlock + 1, Buffer<int64_t>::kUninit),
        len(m.R + m.K / kBlock + 1, Buffer<int64_t>::kUninit),
        first(m.K / kBlock + 2, Buffer<int64_t>::kUninit),
        count(m.K / kBlock + 1, Buffer<int64_t>::kUninit) {
    first.p[0] = 0;
    int64_t in_block = 0;
    for (int64_t r = 0; r < m.R; ++r) {
      const int64_t n = m.runs[3 * r], a = m.runs[3 * r + 1], b = m.runs[3 * r + 2];
      for (int64_t s = a; s < b;) {
        const int64_t l = std::min(b - s, kBlock - in_block);
        base.p[npieces] = n * m.C * m.L + s;
        len.p[npieces++] = l;
        in_block += l;
        s += l;
        if (in_block == kBlock) {
          close(in_block);
        }
      }
    }
    if (in_block > 0) {
      close(in_block);
    }
  }
  Buffer<int64_t> base, len;  // the pieces
  Buffer<int64_t> first;      // block j: pieces first[j] .. first[j + 1] - 1
  Buffer<int64_t> count;      // block j's values
  int64_t npieces = 0, nblocks = 0;

 private:
  void close(int64_t& in_block) {
    count.p[nblocks++] = in_block;
    first.p[nblocks] = npieces;
    in_block = 0;
  }
};

// Runs that cover part of their rows (padded sequences with about half their positions real) read
// at a fraction of a clone's rate without help: the hardware prefetchers miss the start of every
// next run. Every pass prefetches the run kMaskedAhead runs ahead in its own order (up to its first
// kPrefetchRunBytes), with an asm prefetch: GCC 12 -O3 dropped the __builtin_prefetch of a loop
// over a run's lines altogether (docs/performance.md, small and irregular batches).
constexpr int64_t kMaskedAhead = 4;
constexpr int64_t kPrefetchRunBytes = 2048;

template <typename scalar_t>
inline void prefetch_run(const scalar_t* p, int64_t len) {
#if defined(__x86_64__)
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = std::min<int64_t>(len * static_cast<int64_t>(sizeof(scalar_t)), kPrefetchRunBytes);
  for (int64_t o = 0; o < bytes; o += kStreamAlign) {
    asm volatile("prefetcht0 %0" : : "m"(*(b + o)));
  }
#else
  (void)p;
  (void)len;
#endif
}

// The reductions run as (channel, block) tasks, channel-major, each walking its block's pieces of
// its channel and prefetching the piece kMaskedAhead on in the channel (the next block's too).
// A block is at most kBlock values, in L1 for its second pass. Measured against tasks of 16
// channels walked in memory order (a plane apart, the second pass from L2): those were slower
// (docs/performance.md, small and irregular batches).
template <typename F>
inline void masked_block_tasks(const MaskedRuns& m, const MaskedBlocks& blocks, const F& f) {
  const int64_t per_task = std::max<int64_t>(1, std::min(m.K, kBlock));
  at::parallel_for(0, m.C * blocks.nblocks, std::max<int64_t>(1, kGrainElems / per_task), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      f(t / blocks.nblocks, t % blocks.nblocks);
    }
  });
}

// f(offset, len) for block j's pieces of channel c, each prefetching (pf(offset, len)) the piece
// kMaskedAhead on where `prefetch`.
template <typename F, typename Prefetch>
inline void masked_block_walk(
    const MaskedBlocks& blocks, int64_t L, int64_t c, int64_t j, bool prefetch, const Prefetch& pf, const F& f) {
  for (int64_t p = blocks.first.p[j]; p < blocks.first.p[j + 1]; ++p) {
    if (prefetch && p + kMaskedAhead < blocks.npieces) {
      pf(blocks.base.p[p + kMaskedAhead] + c * L, blocks.len.p[p + kMaskedAhead]);
    }
    f(blocks.base.p[p] + c * L, blocks.len.p[p]);
  }
}

// The pivot of channel c (see nchw_pivot): its first real value, or for one-pass statistics the
// mean of its first (up to) kPivotValues real values.
template <typename scalar_t, typename acc_t>
inline acc_t masked_pivot(const scalar_t* x, const MaskedBlocks& b, int64_t L, int64_t c) {
  if (b.npieces == 0) {
    return acc_t(0);
  }
  if constexpr (!kOnePassStats<scalar_t>) {
    return load<scalar_t, acc_t>(x, b.base.p[0] + c * L);
  } else {
    acc_t sum = 0;
    int64_t count = 0;
    for (int64_t p = 0; p < b.npieces && count < kPivotValues; ++p) {
      for (int64_t i = 0; i < b.len.p[p] && count < kPivotValues; ++i, ++count) {
        sum += load<scalar_t, acc_t>(x, b.base.p[p] + c * L + i);
      }
    }
    return sum / static_cast<acc_t>(count);
  }
}

// Mean and M2 of block j of channel c (statistics of x - pivot): two passes, the second from L1,
// or one for 16-bit types, as nchw_stats takes a block.
template <typename scalar_t, typename acc_t>
inline Welford<merge_t> masked_block_stats(
    const scalar_t* x, const MaskedRuns& m, const MaskedBlocks& blocks, int64_t c, int64_t j, acc_t pivot) {
  const int64_t count = blocks.count.p[j];
  // f(piece, len) for the block's pieces; the first pass prefetches.
  auto each = [&](bool first_pass, const auto& f) {
    masked_block_walk(
        blocks, m.L, c, j, first_pass, [&](int64_t off, int64_t len) { prefetch_run(x + off, len); },
        [&](int64_t off, int64_t len) { f(x + off, len); });
  };
  if constexpr (kOnePassStats<scalar_t>) {
    VecSum<acc_t> s1, s2;
    each(true, [&](const scalar_t* p, int64_t len) { seg_moments<scalar_t, acc_t>(p, len, pivot, s1, s2); });
    return moments_to_welford<acc_t>(s1.total(), s2.total(), count);
  } else {
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
    VecSum<acc_t> sum;
    each(true, [&](const scalar_t* p, int64_t len) { seg_mean<scalar_t, acc_t>(p, len, pivot, inv_count, sum); });
    const acc_t mean = sum.total(), center = pivot + mean;
    VecSum<acc_t> dev, m2;
    each(false, [&](const scalar_t* p, int64_t len) { seg_moments<scalar_t, acc_t>(p, len, center, dev, m2); });
    return two_pass_welford(pivot, mean, center, dev.total(), m2.total(), count);
  }
}

// sum(dy) and sum(dy * (x - mean)) of block j of channel c, in merge_t.
template <typename scalar_t, typename acc_t>
inline void masked_block_reduce(
    const scalar_t* dy, const scalar_t* x, const MaskedRuns& m, const MaskedBlocks& blocks, int64_t c, int64_t j,
    acc_t mean, merge_t& s_dy, merge_t& s_dyxmu) {
  VecSum<merge_t> a;
  VecSum<acc_t> b;
  masked_block_walk(
      blocks, m.L, c, j, true,
      [&](int64_t off, int64_t len) {
        prefetch_run(dy + off, len);
        prefetch_run(x + off, len);
      },
      [&](int64_t off, int64_t len) { seg_reduce<scalar_t, acc_t>(dy + off, x + off, len, mean, a, b); });
  s_dy = a.total();
  s_dyxmu = static_cast<merge_t>(b.total());
}

// A channel's statistics from its blocks' partials, merged in block order.
template <typename acc_t>
inline void masked_finish_stats(const Welford<merge_t>* parts, int64_t nblocks, acc_t pivot, acc_t& mean, acc_t& var) {
  Welford<merge_t> w{0, 0, 0};
  for (int64_t j = 0; j < nblocks; ++j) {
    w = welford_combine(w, parts[j]);
  }
  mean = static_cast<acc_t>(pivot + w.mean);
  var = static_cast<acc_t>(welford_var(w));
}

// Mean and biased variance of every channel's real positions, (channel, block) tasks.
template <typename scalar_t, typename acc_t>
void masked_stats_kernel(const scalar_t* x, const MaskedRuns& m, acc_t* mean_out, acc_t* var_out) {
  const MaskedBlocks blocks(m);
  Buffer<acc_t> pivot(m.C, Buffer<acc_t>::kUninit);
  for (int64_t c = 0; c < m.C; ++c) {
    pivot.p[c] = masked_pivot<scalar_t, acc_t>(x, blocks, m.L, c);
  }
  Buffer<Welford<merge_t>> partials(m.C * blocks.nblocks, Buffer<Welford<merge_t>>::kUninit);
  masked_block_tasks(m, blocks, [&](int64_t c, int64_t j) {
    partials.p[c * blocks.nblocks + j] = masked_block_stats<scalar_t, acc_t>(x, m, blocks, c, j, pivot.p[c]);
  });
  for (int64_t c = 0; c < m.C; ++c) {
    masked_finish_stats(partials.p + c * blocks.nblocks, blocks.nblocks, pivot.p[c], mean_out[c], var_out[c]);
  }
}

// sum(dy) and sum(dy * (x - mean)) of every channel's real positions, (channel, block) tasks,
// blocks added in order.
template <typename scalar_t, typename acc_t>
void masked_backward_reduce_kernel(
    const scalar_t* dy, const scalar_t* x, const MaskedRuns& m, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const MaskedBlocks blocks(m);
  Buffer<merge_t> p_dy(m.C * blocks.nblocks, Buffer<merge_t>::kUninit);
  Buffer<merge_t> p_dyxmu(m.C * blocks.nblocks, Buffer<merge_t>::kUninit);
  masked_block_tasks(m, blocks, [&](int64_t c, int64_t j) {
    const int64_t q = c * blocks.nblocks + j;
    masked_block_reduce<scalar_t, acc_t>(dy, x, m, blocks, c, j, mean[c], p_dy.p[q], p_dyxmu.p[q]);
  });
  for (int64_t c = 0; c < m.C; ++c) {
    merge_t s_dy = 0, s_dyxmu = 0;
    for (int64_t j = 0; j < blocks.nblocks; ++j) {
      s_dy += p_dy.p[c * blocks.nblocks + j];
      s_dyxmu += p_dyxmu.p[c * blocks.nblocks + j];
    }
    sum_dy[c] = static_cast<acc_t>(s_dy);
    sum_dy_xmu[c] = static_cast<acc_t>(s_dyxmu);
  }
}

// len zeros from p (all-zero bytes: +0.0 in every float type); with NT, whole lines streamed.
template <typename scalar_t, bool NT>
inline void zero_values(scalar_t* p, int64_t len) {
  int64_t i = 0;
  if constexpr (NT) {
    constexpr int64_t kLine = kStreamAlign / static_cast<int64_t>(sizeof(scalar_t));
    alignas(kStreamAlign) static const char zeros[kStreamAlign] = {};
    i = aligned_head<scalar_t, true>(p, len);
    std::memset(p, 0, i * sizeof(scalar_t));
    for (; i + kLine <= len; i += kLine) {
      stream_bytes<kStreamAlign>(p + i, zeros);
    }
  }
  std::memset(p + i, 0, (len - i) * sizeof(scalar_t));
}

// The runs of each row: first[n] .. first[n + 1] - 1 are row n's.
struct MaskedRowRuns {
  explicit MaskedRowRuns(const MaskedRuns& m) : first(m.N + 1, Buffer<int64_t>::kUninit) {
    for (int64_t n = 0; n <= m.N; ++n) {
      first.p[n] = m.R;
    }
    for (int64_t r = m.R - 1; r >= 0; --r) {
      first.p[m.runs[3 * r]] = r;
    }
    for (int64_t n = m.N - 1; n >= 0; --n) {
      first.p[n] = std::min(first.p[n], first.p[n + 1]);
    }
  }
  Buffer<int64_t> first;
};

// Whether the elementwise passes stream their output (stream_outputs of `passes` tensor passes):
// where every row starts on a line, as NCHW planes must (stream_planes).
template <typename scalar_t>
inline bool masked_stream(const scalar_t* out, const MaskedRuns& m, int64_t passes) {
  return stream_outputs(passes * m.N * m.C * m.L * static_cast<int64_t>(sizeof(scalar_t))) && store_aligned(out) &&
      (m.L * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign == 0;
}

// Row (n, c) of L values of out: f(offset, len) for each run (offset: its first value), zeros
// between and after the runs.
template <typename scalar_t, bool NT, typename F>
inline void masked_row(scalar_t* out, const MaskedRuns& m, const MaskedRowRuns& rr, int64_t n, int64_t c, const F& f) {
  const int64_t row = (n * m.C + c) * m.L;
  int64_t pos = 0;
  for (int64_t r = rr.first.p[n]; r < rr.first.p[n + 1]; ++r) {
    const int64_t a = m.runs[3 * r + 1], b = m.runs[3 * r + 2];
    zero_values<scalar_t, NT>(out + row + pos, a - pos);
    f(row + a, b - a);
    pos = b;
  }
  zero_values<scalar_t, NT>(out + row + pos, m.L - pos);
}

// Row (n, c) written line by line from the row's start where the ISA has masked loads
// (kMaskedTails): whole lines inside a run from op.full(i) (the vector of values i .. i + W - 1,
// offsets into the tensor), whole lines of padding as zeros, and a line that a run starts or
// ends in as one masked computation, op.lanes(i, k) on the real lanes k only, its other lanes
// zero. Every line is then one whole store, streamed where NT: masked_row ends a run in a line
// of ordinary stores (its tail, then the zeros' head), and an ordinary store that misses holds
// the streamed stores queued behind it; runs ending mid-line (padded sequences) cost that about
// once a row (see docs/performance.md, small and irregular batches). Runs are read at their
// real lanes only, so a run at the end of the tensor is never read past. Every real value is
// computed by the same vector expression as in the segment walks.
template <typename scalar_t, typename acc_t, bool NT, typename Op>
inline void masked_row_lines(const MaskedRuns& m, int64_t r, int64_t r1, int64_t row, const Op& op) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W, U = kLineValues<scalar_t>, V = U / W;
  static_assert(V == 1 || V == 2, "masked_row_lines: a line is one or two vectors");
  const int64_t* runs = m.runs;
  const int64_t L = m.L;
  scalar_t* out = op.out + row;
  // The unit of values p .. p + n - 1 (n <= U: a short last unit where L is no multiple of U,
  // never with NT, which takes rows of whole lines only).
  auto put = [&](int64_t p, const vec* v, int64_t n) {
    if (n == U) {
      if constexpr (V == 2) {
        vstore2<scalar_t, acc_t, NT>(out + p, v[0], v[1]);
      } else {
        vstore<scalar_t, acc_t, NT>(out + p, v[0]);
      }
      return;
    }
    for (int64_t j = 0; j < V && j * W < n; ++j) {
      vstore_part<scalar_t, acc_t>(out + p + j * W, v[j], std::min(W, n - j * W));
    }
  };
  int64_t p = 0;
  while (p < L) {
    while (r < r1 && runs[3 * r + 2] <= p) {
      ++r;
    }
    const int64_t a = r < r1 ? runs[3 * r + 1] : L, b = r < r1 ? runs[3 * r + 2] : L;
    if (r == r1 || a >= p + U) {  // padding up to the line that the next run starts in
      const int64_t stop = r == r1 ? L : a / U * U;
      if constexpr (NT) {
        const vec z[V] = {};
        for (; p + U <= stop; p += U) {
          put(p, z, U);
        }
      }
      std::memset(out + p, 0, (stop - p) * sizeof(scalar_t));
      p = stop;
      continue;
    }
    if (a <= p && b >= p + U) {  // whole lines of one run
      for (const int64_t stop = b / U * U; p < stop; p += U) {
        vec v[V];
        for (int64_t j = 0; j < V; ++j) {
          v[j] = op.full(row + p + j * W);
        }
        put(p, v, U);
      }
      continue;
    }
    // A line with padding and real values: the lanes of every run in it.
    LaneMask k = 0;
    for (int64_t q = r; q < r1 && runs[3 * q + 1] < p + U; ++q) {
      const int64_t lo = std::max(runs[3 * q + 1], p) - p, hi = std::min(runs[3 * q + 2], p + U) - p;
      k |= (hi - lo >= 32 ? ~LaneMask(0) : (LaneMask(1) << (hi - lo)) - 1) << lo;
    }
    vec v[V];
    for (int64_t j = 0; j < V; ++j) {
      const LaneMask kj = (k >> (j * W)) & ((LaneMask(1) << W) - 1);
      v[j] = kj == 0 ? vec{} : keep_lanes<acc_t>(op.lanes(row + p + j * W, kj), kj);
    }
    put(p, v, std::min(U, L - p));
    p += U;
  }
}

// Row (n, c) of op.out: the real values through op, zeros at the padding (masked_row_lines where
// the ISA has masked loads, else masked_row with op.seg).
template <typename scalar_t, typename acc_t, bool NT, typename Op>
inline void masked_write_row(const MaskedRuns& m, const MaskedRowRuns& rr, int64_t n, int64_t c, const Op& op) {
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    masked_row_lines<scalar_t, acc_t, NT>(m, rr.first.p[n], rr.first.p[n + 1], (n * m.C + c) * m.L, op);
  } else {
    masked_row<scalar_t, NT>(op.out, m, rr, n, c, [&](int64_t off, int64_t len) { op.template seg<NT>(off, len); });
  }
}

// The ops of the elementwise passes for masked_write_row: y = (x - pivot) * scale + shift (seg_affine)
// and backward_elemt() (seg_backward) of one channel.
template <typename scalar_t, typename acc_t>
struct MaskedAffineOp {
  using vec = typename Vec<acc_t>::type;
  MaskedAffineOp(const scalar_t* x, scalar_t* out, const NormalizeCoeffs<acc_t>& k)
      : x(x), out(out), k(k), pv(vec{} + k.pivot), s(vec{} + k.scale), t(vec{} + k.shift) {}
  vec full(int64_t i) const {
    return vnormalize<true>(vload<scalar_t, acc_t>(x + i), pv, s, t);
  }
  vec lanes(int64_t i, LaneMask m) const {
    return vnormalize<true>(vload_lanes<scalar_t, acc_t>(x + i, m), pv, s, t);
  }
  template <bool NT>
  void seg(int64_t i, int64_t len) const {
    seg_affine<scalar_t, acc_t, NT>(x + i, out + i, len, k);
  }
  const scalar_t* x;
  scalar_t* out;
  NormalizeCoeffs<acc_t> k;
  vec pv, s, t;
};

template <typename scalar_t, typename acc_t>
struct MaskedBackwardOp {
  using vec = typename Vec<acc_t>::type;
  MaskedBackwardOp(const scalar_t* dy, const scalar_t* x, scalar_t* out, const BackwardCoeffs<acc_t>& k)
      : dy(dy), x(x), out(out), k(k), m(vec{} + k.mean), mdy(vec{} + k.mean_dy), kv(vec{} + k.k), a(vec{} + k.a) {}
  vec full(int64_t i) const {
    return backward_elemt(vload<scalar_t, acc_t>(dy + i), vload<scalar_t, acc_t>(x + i), m, mdy, kv, a);
  }
  vec lanes(int64_t i, LaneMask l) const {
    return backward_elemt(vload_lanes<scalar_t, acc_t>(dy + i, l), vload_lanes<scalar_t, acc_t>(x + i, l), m, mdy, kv, a);
  }
  template <bool NT>
  void seg(int64_t i, int64_t len) const {
    seg_backward<scalar_t, acc_t, NT>(dy + i, x + i, out + i, len, k);
  }
  const scalar_t *dy, *x;
  scalar_t* out;
  BackwardCoeffs<acc_t> k;
  vec m, mdy, kv, a;
};

// Every (n, c) row in memory order (masked_write_row with op(c) of channel c), prefetching
// (pf(offset, len)) the runs of the row kMaskedAhead on: every output value written once.
template <typename scalar_t, typename acc_t, typename Prefetch, typename MakeOp>
inline void masked_rows(scalar_t* out, const MaskedRuns& m, int64_t passes, const Prefetch& pf, const MakeOp& op) {
  const MaskedRowRuns rr(m);
  with_constant(masked_stream(out, m, passes), [&](auto nt) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, m.L));
    at::parallel_for(0, m.N * m.C, grain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        if (const int64_t ahead = q + kMaskedAhead, na = ahead / m.C; ahead < q1) {
          for (int64_t r = rr.first.p[na]; r < rr.first.p[na + 1]; ++r) {
            pf(ahead * m.L + m.runs[3 * r + 1], m.runs[3 * r + 2] - m.runs[3 * r + 1]);
          }
        }
        const int64_t c = q % m.C;
        masked_write_row<scalar_t, acc_t, nt.value>(m, rr, q / m.C, c, op(c));
      }
      end_streaming<nt.value>();
    });
  });
}

// y = (x - pivot[c]) * scale[c] + shift[c] at the real positions, 0 at the padding.
template <typename scalar_t, typename acc_t>
void masked_affine_kernel(
    const scalar_t* x, scalar_t* y, const MaskedRuns& m, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
  masked_rows<scalar_t, acc_t>(
      y, m, 2, [&](int64_t off, int64_t len) { prefetch_run(x + off, len); },
      [&](int64_t c) {
        return MaskedAffineOp<scalar_t, acc_t>(x, y, NormalizeCoeffs<acc_t>{pivot[c], scale[c], shift[c]});
      });
}

// backward_elemt() of math.h at the real positions, 0 at the padding.
template <typename scalar_t, typename acc_t>
void masked_backward_elemt_kernel(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const MaskedRuns& m, const BackwardCoeffs<acc_t>* coeffs) {
  masked_rows<scalar_t, acc_t>(
      dx, m, 3,
      [&](int64_t off, int64_t len) {
        prefetch_run(dy + off, len);
        prefetch_run(x + off, len);
      },
      [&](int64_t c) { return MaskedBackwardOp<scalar_t, acc_t>(dy, x, dx, coeffs[c]); });
}

// The fused training forward and backward, channel by channel: a channel's reduction (its blocks in
// order, the same partials and merges as the kernels above, so the same statistics and sums),
// then its rows written while its real positions (K values) are still in L2, instead of read
// from memory a second time. Parallel over channels only, so bnext._masked_forward and
// _masked_backward take them for inputs of at least kMaskedFusedChannels channels and the kernels
// above for fewer; both give the same bits (the same coefficients, from the same sums).
constexpr int64_t kMaskedFusedChannels = 16;

template <typename scalar_t, typename acc_t>
void masked_forward_kernel(
    const scalar_t* x, scalar_t* y, const MaskedRuns& m, const acc_t* weight, const acc_t* bias, double eps,
    acc_t* mean_out, acc_t* var_out, acc_t* invstd_out) {
  const MaskedBlocks blocks(m);
  const MaskedRowRuns rr(m);
  with_constant(masked_stream(y, m, 2), [&](auto nt) {
    at::parallel_for(0, m.C, 1, [&](int64_t c0, int64_t c1) {
      Buffer<Welford<merge_t>> parts(blocks.nblocks, Buffer<Welford<merge_t>>::kUninit);
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t pivot = masked_pivot<scalar_t, acc_t>(x, blocks, m.L, c);
        for (int64_t j = 0; j < blocks.nblocks; ++j) {
          parts.p[j] = masked_block_stats<scalar_t, acc_t>(x, m, blocks, c, j, pivot);
        }
        masked_finish_stats(parts.p, blocks.nblocks, pivot, mean_out[c], var_out[c]);
        invstd_out[c] = invstd_from_var(var_out[c], eps);
        const NormalizeCoeffs<acc_t> k = normalize_coeffs(mean_out[c], invstd_out[c], weight[c], bias[c]);
        const MaskedAffineOp<scalar_t, acc_t> op(x, y, k);
        for (int64_t n = 0; n < m.N; ++n) {
          masked_write_row<scalar_t, acc_t, nt.value>(m, rr, n, c, op);
        }
      }
      end_streaming<nt.value>();
    });
  });
}

template <typename scalar_t, typename acc_t>
void masked_backward_kernel(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const MaskedRuns& m, const acc_t* weight, const acc_t* mean,
    const acc_t* invstd, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const MaskedBlocks blocks(m);
  const MaskedRowRuns rr(m);
  const acc_t K = static_cast<acc_t>(m.K);
  with_constant(masked_stream(dx, m, 3), [&](auto nt) {
    at::parallel_for(0, m.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        merge_t s_dy = 0, s_dyxmu = 0;
        for (int64_t j = 0; j < blocks.nblocks; ++j) {
          merge_t a, b;
          masked_block_reduce<scalar_t, acc_t>(dy, x, m, blocks, c, j, mean[c], a, b);
          s_dy += a;
          s_dyxmu += b;
        }
        sum_dy[c] = static_cast<acc_t>(s_dy);
        sum_dy_xmu[c] = static_cast<acc_t>(s_dyxmu);
        const BackwardCoeffs<acc_t> k =
            backward_coeffs(mean[c], invstd[c], weight[c], sum_dy[c] / K, sum_dy_xmu[c] / K);
        const MaskedBackwardOp<scalar_t, acc_t> op(dy, x, dx, k);
        for (int64_t n = 0; n < m.N; ++n) {
          masked_write_row<scalar_t, acc_t, nt.value>(m, rr, n, c, op);
        }
      }
      end_streaming<nt.value>();
    });
  });
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
