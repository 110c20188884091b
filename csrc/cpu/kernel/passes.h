// Elementwise passes over the whole tensor (part of batch_norm_kernel.h: see the map there):
// normalize y = (x - pivot) * scale + shift and the backward's dx, NCHW and channels-last.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/passes.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// NCHW planes that do not start on a line (7x7, 14x14 float32; 14x14, 28x28 bfloat16), streamed:
// the planes [p0, p1) of a task are one contiguous range of values, written line by line with
// streaming stores; a vector that straddles two planes takes each lane's coefficients from its own
// plane (a lane select), so no line mixes streamed and ordinary stores. Only the partial lines at
// the ends of the range, which a neighbouring task may share, are stored one value at a time.
// Needs a line to be one or two vectors (kLineVecs) and planes of at least one line (a line then
// spans at most two planes). See docs/performance.md#line-groups.
template <typename scalar_t, typename acc_t>
constexpr int64_t kLineVecs = kStreamAlign / (Vec<acc_t>::W * static_cast<int64_t>(sizeof(scalar_t)));

template <typename scalar_t, typename acc_t, bool Centered = true>
inline void planes_affine_lines(
    const scalar_t* x, scalar_t* y, const Layout& l, int64_t p0, int64_t p1, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  constexpr int64_t kLine = W * kLineVecs<scalar_t, acc_t>;
  static_assert(kLineVecs<scalar_t, acc_t> == 1 || kLineVecs<scalar_t, acc_t> == 2);
  const int64_t HxW = l.HxW, C = l.C;
  const int64_t end = p1 * HxW;
  int64_t i = p0 * HxW;
  int64_t c = p0 % C, plane_end = i + HxW;
  auto next_plane = [&] {
    c = c + 1 == C ? 0 : c + 1;
    plane_end += HxW;
  };
  auto one = [&](int64_t j) {
    store<scalar_t, acc_t>(y, j, normalize(load<scalar_t, acc_t>(x, j), pivot[c], scale[c], shift[c]));
  };
  for (const int64_t head = i + aligned_head<scalar_t, true>(y + i, end - i); i < head; ++i) {
    if (i == plane_end) {
      next_plane();
    }
    one(i);
  }
  vec lane;
  for (int64_t j = 0; j < W; ++j) {
    lane[j] = static_cast<acc_t>(j);
  }
  // The vector at o (inside the line at i, which starts in plane c and may end in the next one):
  // lanes below plane_end - o belong to channel c, the others to the next.
  auto straddling = [&](int64_t o, vec v) {
    const int64_t c2 = c + 1 == C ? 0 : c + 1;
    const auto first = lane < static_cast<acc_t>(plane_end - o);
    const vec pv = first ? vec{} + pivot[c] : vec{} + pivot[c2];
    const vec sv = first ? vec{} + scale[c] : vec{} + scale[c2];
    const vec tv = first ? vec{} + shift[c] : vec{} + shift[c2];
    return vnormalize<Centered>(v, pv, sv, tv);
  };
  for (; i + kLine <= end; i += kLine) {
    if (i == plane_end) {
      next_plane();
    }
    const bool inside = i + kLine <= plane_end;
    if constexpr (kLineVecs<scalar_t, acc_t> == 1) {
      const vec v = vload<scalar_t, acc_t>(x + i);
      vstore<scalar_t, acc_t, true>(
          y + i, inside ? vnormalize<Centered>(v, vec{} + pivot[c], vec{} + scale[c], vec{} + shift[c]) : straddling(i, v));
    } else {
      vec a, b;
      vload2<scalar_t, acc_t>(x + i, a, b);
      if (inside) {
        const vec pv = vec{} + pivot[c], sv = vec{} + scale[c], tv = vec{} + shift[c];
        vstore2<scalar_t, acc_t, true>(y + i, vnormalize<Centered>(a, pv, sv, tv), vnormalize<Centered>(b, pv, sv, tv));
      } else {
        vstore2<scalar_t, acc_t, true>(y + i, straddling(i, a), straddling(i + W, b));
      }
    }
    if (!inside) {
      next_plane();
    }
  }
  for (; i < end; ++i) {
    if (i == plane_end) {
      next_plane();
    }
    one(i);
  }
}

// Channels-last rows that do not start on lines (C * sizeof(scalar_t) no multiple of 64, so no row
// can be streamed on its own; rows_affine_all keeps ordinary stores for them, which read every
// output line before writing it), streamed: the rows of a task are one contiguous range of values
// [i, end), written line by line with streaming stores. The coefficients of a vector come from
// per-channel arrays extended by one line past C (ext[j] = coefficient of channel j % C) at the
// channel of its first lane, so a vector that straddles two rows needs no select; every value gets
// the vector arithmetic of the row walks. Only the partial lines at the ends of the range, which a
// neighbouring task may share, are stored one value at a time. Needs C >= one line.
template <typename scalar_t, typename acc_t>
inline bool stream_row_lines(const scalar_t* out, const Layout& l, const RowPlan& plan, int64_t passes) {
  if constexpr (kLineVecs<scalar_t, acc_t> != 1 && kLineVecs<scalar_t, acc_t> != 2) {
    return false;
  } else {
    return plan.k == 1 && l.C >= kLineValues<scalar_t> &&
        (l.C * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign != 0 && stream_pass<scalar_t>(l, passes) &&
        store_aligned(out);
  }
}

// A per-channel value get(c) as an array extended by one line (see rows_affine_lines):
// buf.p[j] = get(j % C).
template <typename scalar_t, typename acc_t>
struct ExtendedLanes {
  template <typename Get>
  ExtendedLanes(int64_t C, const Get& get) : buf(C + kLineValues<scalar_t>, Buffer<acc_t>::kUninit) {
    for (int64_t j = 0; j < C + kLineValues<scalar_t>; ++j) {
      buf.p[j] = get(j % C);
    }
  }
  Buffer<acc_t> buf;
};

// f(i, c) for the values of [i, end) (channel c) one at a time until y + i is store-aligned,
// line(i, c) for each whole line, then f again for the rest: the walk of rows_affine_lines.
template <typename scalar_t, typename acc_t, typename One, typename Line>
inline void row_lines_walk(const scalar_t* y, int64_t C, int64_t i, int64_t end, const One& one, const Line& line) {
  constexpr int64_t kLine = kLineValues<scalar_t>;
  static_assert(kLine == Vec<acc_t>::W * kLineVecs<scalar_t, acc_t>, "row_lines_walk: a line is whole vectors");
  int64_t c = i % C;
  auto step = [&](int64_t n) {
    c += n;
    c = c >= C ? c - C : c;
  };
  for (const int64_t head = i + aligned_head<scalar_t, true>(y + i, end - i); i < head; ++i, step(1)) {
    one(i, c);
  }
  for (; i + kLine <= end; i += kLine, step(kLine)) {
    line(i, c);
  }
  for (; i < end; ++i, step(1)) {
    one(i, c);
  }
}

template <typename scalar_t, typename acc_t, bool Centered>
inline void rows_affine_lines(
    const scalar_t* x, scalar_t* y, int64_t C, int64_t i, int64_t end, const acc_t* pv, const acc_t* s, const acc_t* t) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto f = [&](int64_t c, vec v) {
    return vnormalize<Centered>(v, Centered ? vload_acc(pv + c) : vec{}, vload_acc(s + c), vload_acc(t + c));
  };
  row_lines_walk<scalar_t, acc_t>(
      y, C, i, end,
      [&](int64_t j, int64_t c) { store<scalar_t, acc_t>(y, j, normalize(load<scalar_t, acc_t>(x, j), pv[c], s[c], t[c])); },
      [&](int64_t j, int64_t c) {
        if constexpr (kLineVecs<scalar_t, acc_t> == 1) {
          vstore<scalar_t, acc_t, true>(y + j, f(c, vload<scalar_t, acc_t>(x + j)));
        } else {
          vec a, b;
          vload2<scalar_t, acc_t>(x + j, a, b);
          vstore2<scalar_t, acc_t, true>(y + j, f(c, a), f(c + W, b));
        }
      });
}

template <typename scalar_t, typename acc_t>
inline void rows_backward_lines(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C, int64_t i, int64_t end, const acc_t* m,
    const acc_t* mdy, const acc_t* k, const acc_t* a) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto f = [&](int64_t c, vec g, vec v) {
    return backward_elemt(g, v, vload_acc(m + c), vload_acc(mdy + c), vload_acc(k + c), vload_acc(a + c));
  };
  row_lines_walk<scalar_t, acc_t>(
      dx, C, i, end,
      [&](int64_t j, int64_t c) {
        store<scalar_t, acc_t>(
            dx, j, backward_elemt(load<scalar_t, acc_t>(dy, j), load<scalar_t, acc_t>(x, j), m[c], mdy[c], k[c], a[c]));
      },
      [&](int64_t j, int64_t c) {
        if constexpr (kLineVecs<scalar_t, acc_t> == 1) {
          vstore<scalar_t, acc_t, true>(dx + j, f(c, vload<scalar_t, acc_t>(dy + j), vload<scalar_t, acc_t>(x + j)));
        } else {
          vec g0, g1, x0, x1;
          vload2<scalar_t, acc_t>(dy + j, g0, g1);
          vload2<scalar_t, acc_t>(x + j, x0, x1);
          vstore2<scalar_t, acc_t, true>(dx + j, f(c, g0, x0), f(c + W, g1, x1));
        }
      });
}

// A channel group whose runs of one sample (G * HxW adjacent values) are whole float vectors:
// lane j of vector v belongs to channel (v * W + j) / HxW. Its coefficients are laid out per lane
// once, and each sample's G runs are then one run of vectors with no tails and no per-run setup
// (7x7 planes: 49 vectors for 16 channels instead of 4 vectors, one of them masked, per channel).
// Every value gets the arithmetic of seg_affine / seg_backward, so the bits are the same. Used by
// the fused per-group forward/backward and by unstreamed normalize/dx passes (see
// docs/performance.md#per-lane-groups).

template <typename scalar_t, typename acc_t, bool Centered = true, bool NT = false>
inline void lanes_affine(
    const scalar_t* x, scalar_t* y, int64_t nvec, const acc_t* pv, const acc_t* s, const acc_t* t) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto one = [&](int64_t i, vec a) {
    return vnormalize<Centered>(a, Centered ? vload_acc(pv + i) : vec{}, vload_acc(s + i), vload_acc(t + i));
  };
  int64_t v = 0;
  for (; v + 2 <= nvec; v += 2) {
    const int64_t i = v * W;
    vec a, b;
    vload2<scalar_t, acc_t>(x + i, a, b);
    vstore2<scalar_t, acc_t, NT>(y + i, one(i, a), one(i + W, b));
  }
  if (v < nvec) {
    const int64_t i = v * W;
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(y + i, one(i, vload<scalar_t, acc_t>(x + i)));
  }
}

template <typename scalar_t, typename acc_t, bool NT = false>
inline void lanes_backward(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t nvec, const acc_t* m, const acc_t* mdy, const acc_t* k,
    const acc_t* a) {
  constexpr int64_t W = Vec<acc_t>::W;
  auto one = [&](int64_t i, typename Vec<acc_t>::type g, typename Vec<acc_t>::type xv) {
    return backward_elemt(g, xv, vload_acc(m + i), vload_acc(mdy + i), vload_acc(k + i), vload_acc(a + i));
  };
  int64_t v = 0;
  for (; v + 2 <= nvec; v += 2) {
    const int64_t i = v * W;
    typename Vec<acc_t>::type g0, g1, x0, x1;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    vstore2<scalar_t, acc_t, NT>(dx + i, one(i, g0, x0), one(i + W, g1, x1));
  }
  if (v < nvec) {
    const int64_t i = v * W;
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(
        dx + i, one(i, vload<scalar_t, acc_t>(dy + i), vload<scalar_t, acc_t>(x + i)));
  }
}

// Normalizes channels c0 .. c0 + G - 1 of every sample, k[g] being channel c0 + g's coefficients:
// as one run of vectors per sample where GroupLanes applies, else run by run.
template <typename scalar_t, typename acc_t, bool NT, bool Centered = true>
inline void group_affine(
    const scalar_t* x, scalar_t* y, const Layout& l, int64_t c0, int64_t G, const NormalizeCoeffs<acc_t>* k) {
  // Streamed planes that do not start on a line: G is a line_group (the caller's choice).
  if (NT ? !planes_on_lines<scalar_t>(l) : group_lanes_fit<scalar_t, acc_t>(l, G)) {
    constexpr int64_t kLanes = kMaxLineLaneVecs * kLaneWidth;
    alignas(64) acc_t pv[kLanes], sv[kLanes], tv[kLanes];
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].pivot; }, pv);
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].scale; }, sv);
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].shift; }, tv);
    const int64_t nvec = G * l.HxW / Vec<acc_t>::W;
    for (int64_t n = 0; n < l.N; ++n) {
      const int64_t off = (n * l.C + c0) * l.HxW;
      lanes_affine<scalar_t, acc_t, Centered, NT>(x + off, y + off, nvec, pv, sv, tv);
    }
    return;
  }
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t off = (n * l.C + c0 + g) * l.HxW;
      seg_affine<scalar_t, acc_t, NT, Centered>(x + off, y + off, l.HxW, k[g]);
    }
  }
}

// The same for the backward's dx.
template <typename scalar_t, typename acc_t, bool NT>
inline void group_backward(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& l, int64_t c0, int64_t G,
    const BackwardCoeffs<acc_t>* k) {
  if (NT ? !planes_on_lines<scalar_t>(l) : group_lanes_fit<scalar_t, acc_t>(l, G)) {
    constexpr int64_t kLanes = kMaxLineLaneVecs * kLaneWidth;
    alignas(64) acc_t mv[kLanes], dv[kLanes], kv[kLanes], av[kLanes];
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].mean; }, mv);
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].mean_dy; }, dv);
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].k; }, kv);
    spread_lanes<acc_t>(l.HxW, G, [&](int64_t g) { return k[g].a; }, av);
    const int64_t nvec = G * l.HxW / Vec<acc_t>::W;
    for (int64_t n = 0; n < l.N; ++n) {
      const int64_t off = (n * l.C + c0) * l.HxW;
      lanes_backward<scalar_t, acc_t, NT>(dy + off, x + off, dx + off, nvec, mv, dv, kv, av);
    }
    return;
  }
  for (int64_t n = 0; n < l.N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t off = (n * l.C + c0 + g) * l.HxW;
      seg_backward<scalar_t, acc_t, NT>(dy + off, x + off, dx + off, l.HxW, k[g]);
    }
  }
}

// affine_kernel over an NCHW tensor; !Centered: every pivot is +0 (see vnormalize).
template <typename scalar_t, typename acc_t, bool Centered>
void affine_nchw(const scalar_t* x, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
  if (const auto [G, streamed] = lanes_pass<scalar_t, acc_t>(y, l, 2); G > 0) {
    const int64_t groups = (l.C + G - 1) / G;
    with_constant(streamed, [&](auto nt) {
      at::parallel_for(0, groups, std::max<int64_t>(1, channel_grain(l) / G), [&](int64_t begin, int64_t end) {
        NormalizeCoeffs<acc_t> k[kMaxGroup];
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c0 = q * G, g_n = std::min(G, l.C - c0);
          for (int64_t g = 0; g < g_n; ++g) {
            k[g] = {pivot[c0 + g], scale[c0 + g], shift[c0 + g]};
          }
          group_affine<scalar_t, acc_t, nt.value, Centered>(x, y, l, c0, g_n, k);
        }
        end_streaming<nt.value>();
      });
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.HxW));
  if constexpr (kLineVecs<scalar_t, acc_t> == 1 || kLineVecs<scalar_t, acc_t> == 2) {
    if (l.HxW >= Vec<acc_t>::W * kLineVecs<scalar_t, acc_t> && !stream_planes(y, l, 2) && stream_pass<scalar_t>(l, 2)) {
      at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
        planes_affine_lines<scalar_t, acc_t, Centered>(x, y, l, begin, end, pivot, scale, shift);
        stream_fence();
      });
      return;
    }
  }
  with_constant(stream_planes(y, l, 2), [&](auto nt) {
    at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
      // The channel advances with the plane (no division per plane: planes of 7x7 are a few
      // vectors long).
      for (int64_t p = begin, c = begin % l.C; p < end; ++p, c = c + 1 == l.C ? 0 : c + 1) {
        seg_affine<scalar_t, acc_t, nt.value, Centered>(
            x + p * l.HxW, y + p * l.HxW, l.HxW, NormalizeCoeffs<acc_t>{pivot[c], scale[c], shift[c]});
      }
      end_streaming<nt.value>();
    });
  });
}

// affine_kernel over channels_last rows; !Centered: every pivot is +0 (see vnormalize).
template <typename scalar_t, typename acc_t, bool Centered>
void rows_affine_all(const scalar_t* x, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
  const RowPlan plan(l, sizeof(scalar_t));
  if (stream_row_lines<scalar_t, acc_t>(y, l, plan, 2)) {
    const ExtendedLanes<scalar_t, acc_t> pv(l.C, [&](int64_t c) { return pivot[c]; }),
        s(l.C, [&](int64_t c) { return scale[c]; }), t(l.C, [&](int64_t c) { return shift[c]; });
    at::parallel_for(0, plan.R, std::max<int64_t>(1, kGrainElems / l.C), [&](int64_t begin, int64_t end) {
      rows_affine_lines<scalar_t, acc_t, Centered>(x, y, l.C, begin * l.C, end * l.C, pv.buf.p, s.buf.p, t.buf.p);
      stream_fence();
    });
    return;
  }
  Buffer<acc_t> pv(plan.P), s(plan.P), t(plan.P);
  replicate(pivot, l.C, plan.k, pv.p);
  replicate(scale, l.C, plan.k, s.p);
  replicate(shift, l.C, plan.k, t.p);
  const int64_t nsuper = plan.R / plan.k;
  with_constant(stream_rows<scalar_t, acc_t>(y, l, plan, 2), [&](auto nt) {
    at::parallel_for(0, nsuper, std::max<int64_t>(1, kGrainElems / plan.P), [&](int64_t begin, int64_t end) {
      rows_affine<scalar_t, acc_t, nt.value, Centered>(
          x + begin * plan.P, y + begin * plan.P, end - begin, plan.P, plan.wide, pv.p, s.p, t.p);
      end_streaming<nt.value>();
    });
  });
  const int64_t tail = (plan.R - nsuper * plan.k) * l.C;
  if (tail > 0) {
    rows_affine<scalar_t, acc_t, false, Centered>(x + nsuper * plan.P, y + nsuper * plan.P, 1, tail, plan.wide, pv.p, s.p, t.p);
  }
}

template <typename scalar_t, typename acc_t>
void rows_backward_all(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& l, const BackwardCoeffs<acc_t>* coeffs) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
  if (stream_row_lines<scalar_t, acc_t>(dx, l, plan, 3)) {
    const ExtendedLanes<scalar_t, acc_t> m(C, [&](int64_t c) { return coeffs[c].mean; }),
        mdy(C, [&](int64_t c) { return coeffs[c].mean_dy; }), k(C, [&](int64_t c) { return coeffs[c].k; }),
        a(C, [&](int64_t c) { return coeffs[c].a; });
    at::parallel_for(0, plan.R, std::max<int64_t>(1, kGrainElems / C), [&](int64_t begin, int64_t end) {
      rows_backward_lines<scalar_t, acc_t>(dy, x, dx, C, begin * C, end * C, m.buf.p, mdy.buf.p, k.buf.p, a.buf.p);
      stream_fence();
    });
    return;
  }
  Buffer<acc_t> m(plan.P), mdy(plan.P), k(plan.P), a(plan.P);
  for (int64_t i = 0; i < plan.k; ++i) {
    for (int64_t c = 0; c < C; ++c) {
      m.p[i * C + c] = coeffs[c].mean;
      mdy.p[i * C + c] = coeffs[c].mean_dy;
      k.p[i * C + c] = coeffs[c].k;
      a.p[i * C + c] = coeffs[c].a;
    }
  }
  const int64_t nsuper = plan.R / plan.k;
  with_constant(stream_rows<scalar_t, acc_t>(dx, l, plan, 3), [&](auto nt) {
    at::parallel_for(0, nsuper, std::max<int64_t>(1, kGrainElems / plan.P), [&](int64_t begin, int64_t end) {
      const int64_t off = begin * plan.P;
      rows_backward<scalar_t, acc_t, nt.value>(dy + off, x + off, dx + off, end - begin, plan.P, plan.wide, m.p, mdy.p, k.p, a.p);
      end_streaming<nt.value>();
    });
  });
  const int64_t tail = (plan.R - nsuper * plan.k) * C;
  if (tail > 0) {
    const int64_t off = nsuper * plan.P;
    rows_backward<scalar_t, acc_t>(dy + off, x + off, dx + off, 1, tail, plan.wide, m.p, mdy.p, k.p, a.p);
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
