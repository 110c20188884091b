// Channels-last row walks (part of batch_norm_kernel.h: see the map there): the reductions and
// elementwise passes over rows of adjacent channel values, and the software prefetch they use.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/channels_last_rows.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// Rows of `width` adjacent values (channels-last), each lane j with its own accumulator or
// coefficient. The lane arrays stay in L1; vectorized across lanes.
// Column blocks of 4, then 1, vectors keep their accumulators in registers down the rows (four
// independent chains hide the FMA latency); leftover columns go one by one.

// f(column0, ncolumns_in_vectors) for 4-vector blocks, 1-vector blocks, then scalar columns.
template <typename acc_t, typename F4, typename F1, typename FS>
inline void for_column_blocks(int64_t width, const F4& f4, const F1& f1, const FS& fs) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t j = 0;
  for (; j + 4 * W <= width; j += 4 * W) {
    f4(j);
  }
  for (; j + W <= width; j += W) {
    f1(j);
  }
  for (; j < width; ++j) {
    fs(j);
  }
}

// Software prefetch distance of the row walks and per-channel tasks (see rows_wide_by4).
constexpr int64_t kPrefetchBytes = 8192;

// Prefetches the lines of [p, p + nbytes) into L2 (p as an integer: it may lie past the tensor,
// which a prefetch never faults on). An asm prefetch: GCC 12 -O3 dropped the __builtin_prefetch
// of this loop from every row walk that inlined it (no prefetch instruction left in rows_mean,
// rows_moments, rows_reduce), the same as masked.h's prefetch_run; tests/test_cpu_binary.py
// checks the built code. Into L2 (prefetcht1), not L1: the line is read kPrefetchBytes later, and
// the L1 prefetch measured slower for the wide backward passes (see
// docs/performance.md#prefetch-instructions).
inline void prefetch_lines(uintptr_t p, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; b += 64) {
    const char* line = reinterpret_cast<const char*>(p + static_cast<uintptr_t>(b));
#if defined(__x86_64__)
    asm volatile("prefetcht1 %0" : : "m"(*line));
#else
    __builtin_prefetch(line, 0, 2);
#endif
  }
}

// Bytes ahead that a walk over rows of row_bytes prefetches: whole groups of four rows, about
// kPrefetchBytes.
inline int64_t prefetch_ahead(int64_t row_bytes) {
  row_bytes = std::max<int64_t>(1, row_bytes);
  return std::max<int64_t>(4, (kPrefetchBytes / row_bytes + 3) / 4 * 4) * row_bytes;
}

// Wide rows (see RowPlan::wide) are walked in memory order, each lane's sum updated in place (the
// lane arrays stay in L1). A column block walking down the rows of a chunk instead strides a whole
// row per step, every row of a 4 KiB width mapping to the same L1 sets (see
// docs/performance.md#wide-rows). They go four at a time, for the reductions: four(x0, j) adds
// lanes [j, j + W) of the four rows from x0 into its lane sums, four_s(x0, j) lane j; one(x0, j)
// and one_s(x0, j) the same for the single rows left over. One row at a time, the sums' loads and
// stores (two per vector of x for each sum), not x, bounded these loops. The functors capture by
// value and are inlined: pointers held in a closure by reference were reloaded after every vector
// store (the stores may alias them).
// Each 4-row step also prefetches the rows about kPrefetchBytes on (of x, and of x2 where given:
// dy of the backward reduction): the hardware prefetchers did not keep four interleaved row
// streams ahead (see docs/performance.md#prefetch).
template <typename scalar_t, typename acc_t, typename Four, typename FourS, typename One, typename OneS>
__attribute__((always_inline)) inline void rows_wide_by4(
    const scalar_t* x, int64_t nrows, int64_t width, Four four, FourS four_s, One one, OneS one_s,
    const scalar_t* x2 = nullptr) {
  constexpr int64_t W = Vec<acc_t>::W;
  constexpr int64_t kStep = 4 * W * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const uintptr_t ahead = static_cast<uintptr_t>(prefetch_ahead(row_bytes));
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) {
    const scalar_t* x0 = x + r * width;
    // The four rows `ahead` bytes on, a step's share of them per step (addresses as integers:
    // they may lie past the tensor, which a prefetch never faults on).
    const uintptr_t p1 = reinterpret_cast<uintptr_t>(x0) + ahead;
    const uintptr_t p2 = x2 != nullptr ? reinterpret_cast<uintptr_t>(x2 + (x0 - x)) + ahead : 0;
    int64_t j = 0;
    for (; j + W <= width; j += W) {
      const uintptr_t o = static_cast<uintptr_t>(4 * j * static_cast<int64_t>(sizeof(scalar_t)));
      prefetch_lines(p1 + o, kStep);
      if (x2 != nullptr) {
        prefetch_lines(p2 + o, kStep);
      }
      four(x0, j);
    }
    for (; j < width; ++j) {
      four_s(x0, j);
    }
  }
  for (; r < nrows; ++r) {
    const scalar_t* x0 = x + r * width;
    int64_t j = 0;
    for (; j + W <= width; j += W) {
      one(x0, j);
    }
    for (; j < width; ++j) {
      one_s(x0, j);
    }
  }
}

template <typename scalar_t, typename acc_t>
inline void rows_mean(
    const scalar_t* x, int64_t nrows, int64_t width, bool wide, const acc_t* pivot, acc_t inv_count, acc_t* acc) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec iv = vec{} + inv_count;
  if (wide) {
    rows_wide_by4<scalar_t, acc_t>(
        x, nrows, width,
        [=](const scalar_t* x0, int64_t j) {
          const vec pv = vload_acc(pivot + j);
          const vec t0 = (vload<scalar_t, acc_t>(x0 + j) - pv) * iv, t1 = (vload<scalar_t, acc_t>(x0 + width + j) - pv) * iv;
          const vec t2 = (vload<scalar_t, acc_t>(x0 + 2 * width + j) - pv) * iv;
          const vec t3 = (vload<scalar_t, acc_t>(x0 + 3 * width + j) - pv) * iv;
          vstore_acc(acc + j, vload_acc(acc + j) + ((t0 + t1) + (t2 + t3)));
        },
        [=](const scalar_t* x0, int64_t j) {
          for (int64_t k = 0; k < 4; ++k) {
            acc[j] += (load<scalar_t, acc_t>(x0, k * width + j) - pivot[j]) * inv_count;
          }
        },
        [=](const scalar_t* x0, int64_t j) {
          vstore_acc(acc + j, vload_acc(acc + j) + (vload<scalar_t, acc_t>(x0 + j) - vload_acc(pivot + j)) * iv);
        },
        [=](const scalar_t* x0, int64_t j) { acc[j] += (load<scalar_t, acc_t>(x0, j) - pivot[j]) * inv_count; });
    return;
  }
  for_column_blocks<acc_t>(
      width,
      [&](int64_t j) {
        vec a0 = vload_acc(acc + j), a1 = vload_acc(acc + j + W), a2 = vload_acc(acc + j + 2 * W),
            a3 = vload_acc(acc + j + 3 * W);
        const vec p0 = vload_acc(pivot + j), p1 = vload_acc(pivot + j + W), p2 = vload_acc(pivot + j + 2 * W),
                  p3 = vload_acc(pivot + j + 3 * W);
        for (int64_t r = 0; r < nrows; ++r) {
          const scalar_t* row = x + r * width + j;
          a0 += (vload<scalar_t, acc_t>(row) - p0) * iv;
          a1 += (vload<scalar_t, acc_t>(row + W) - p1) * iv;
          a2 += (vload<scalar_t, acc_t>(row + 2 * W) - p2) * iv;
          a3 += (vload<scalar_t, acc_t>(row + 3 * W) - p3) * iv;
        }
        vstore_acc(acc + j, a0);
        vstore_acc(acc + j + W, a1);
        vstore_acc(acc + j + 2 * W, a2);
        vstore_acc(acc + j + 3 * W, a3);
      },
      [&](int64_t j) {
        vec a0 = vload_acc(acc + j);
        const vec p0 = vload_acc(pivot + j);
        for (int64_t r = 0; r < nrows; ++r) {
          a0 += (vload<scalar_t, acc_t>(x + r * width + j) - p0) * iv;
        }
        vstore_acc(acc + j, a0);
      },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          acc[j] += (load<scalar_t, acc_t>(x, r * width + j) - pivot[j]) * inv_count;
        }
      });
}

// Sums of d = x - center into s1 and of d * d into s2 over rows, per lane: the one pass of 16-bit
// statistics (center: the pivots, see kOnePassStats) and the second pass of two-pass statistics
// (center: the first pass's means, see two_pass_welford) (one center vector per column: with 16 AVX2 registers a
// 4-vector column block keeps its 8 sums and 4 centers in registers).
template <typename scalar_t, typename acc_t>
inline void rows_moments(
    const scalar_t* x, int64_t nrows, int64_t width, bool wide, const acc_t* center, acc_t* s1, acc_t* s2) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  if (wide) {
    rows_wide_by4<scalar_t, acc_t>(
        x, nrows, width,
        [=](const scalar_t* x0, int64_t j) {
          const vec cv = vload_acc(center + j);
          const vec d0 = vload<scalar_t, acc_t>(x0 + j) - cv, d1 = vload<scalar_t, acc_t>(x0 + width + j) - cv;
          const vec d2 = vload<scalar_t, acc_t>(x0 + 2 * width + j) - cv;
          const vec d3 = vload<scalar_t, acc_t>(x0 + 3 * width + j) - cv;
          vstore_acc(s1 + j, vload_acc(s1 + j) + ((d0 + d1) + (d2 + d3)));
          vstore_acc(s2 + j, vload_acc(s2 + j) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
        },
        [=](const scalar_t* x0, int64_t j) {
          for (int64_t k = 0; k < 4; ++k) {
            const acc_t d = load<scalar_t, acc_t>(x0, k * width + j) - center[j];
            s1[j] += d;
            s2[j] += d * d;
          }
        },
        [=](const scalar_t* x0, int64_t j) {
          const vec d = vload<scalar_t, acc_t>(x0 + j) - vload_acc(center + j);
          vstore_acc(s1 + j, vload_acc(s1 + j) + d);
          vstore_acc(s2 + j, vload_acc(s2 + j) + d * d);
        },
        [=](const scalar_t* x0, int64_t j) {
          const acc_t d = load<scalar_t, acc_t>(x0, j) - center[j];
          s1[j] += d;
          s2[j] += d * d;
        });
    return;
  }
  auto block = [&](int64_t j, auto nvec) {
    constexpr int NV = decltype(nvec)::value;
    vec a[NV], q[NV], cv[NV];
    for (int v = 0; v < NV; ++v) {
      a[v] = vload_acc(s1 + j + v * W);
      q[v] = vload_acc(s2 + j + v * W);
      cv[v] = vload_acc(center + j + v * W);
    }
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* row = x + r * width + j;
      for (int v = 0; v < NV; ++v) {
        const vec d = vload<scalar_t, acc_t>(row + v * W) - cv[v];
        a[v] += d;
        q[v] += d * d;
      }
    }
    for (int v = 0; v < NV; ++v) {
      vstore_acc(s1 + j + v * W, a[v]);
      vstore_acc(s2 + j + v * W, q[v]);
    }
  };
  for_column_blocks<acc_t>(
      width, [&](int64_t j) { block(j, std::integral_constant<int, 4>()); },
      [&](int64_t j) { block(j, std::integral_constant<int, 1>()); },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          const acc_t d = load<scalar_t, acc_t>(x, r * width + j) - center[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      });
}

// sum(dy) into a (merge_t lanes, see wide_add), sum(dy * (x - mean)) into b, per lane. Four rows'
// dy are added in acc_t first, ((g0 + g1) + (g2 + g3)), exact for a constant dy as every step
// doubles, so that a vector of merge_t lanes is updated once per four rows.
template <typename scalar_t, typename acc_t>
inline void rows_reduce(
    const scalar_t* dy, const scalar_t* x, int64_t nrows, int64_t width, bool wide, const acc_t* mean, merge_t* a,
    acc_t* b) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  if (wide) {
    rows_wide_by4<scalar_t, acc_t>(
        x, nrows, width,
        [=](const scalar_t* x0, int64_t j) {
          const scalar_t* g0 = dy + (x0 - x);
          const vec mv = vload_acc(mean + j);
          vec ga[4], xa[4];
          for (int k = 0; k < 4; ++k) {
            ga[k] = vload<scalar_t, acc_t>(g0 + k * width + j);
            xa[k] = vload<scalar_t, acc_t>(x0 + k * width + j) - mv;
          }
          wide_lane_add<acc_t>(a + j, (ga[0] + ga[1]) + (ga[2] + ga[3]));
          vstore_acc(b + j, vload_acc(b + j) + ((ga[0] * xa[0] + ga[1] * xa[1]) + (ga[2] * xa[2] + ga[3] * xa[3])));
        },
        [=](const scalar_t* x0, int64_t j) {
          const scalar_t* g0 = dy + (x0 - x);
          for (int64_t k = 0; k < 4; ++k) {
            const acc_t g = load<scalar_t, acc_t>(g0, k * width + j);
            a[j] += g;
            b[j] += g * (load<scalar_t, acc_t>(x0, k * width + j) - mean[j]);
          }
        },
        [=](const scalar_t* x0, int64_t j) {
          const vec g = vload<scalar_t, acc_t>(dy + (x0 - x) + j);
          wide_lane_add<acc_t>(a + j, g);
          vstore_acc(b + j, vload_acc(b + j) + g * (vload<scalar_t, acc_t>(x0 + j) - vload_acc(mean + j)));
        },
        [=](const scalar_t* x0, int64_t j) {
          const acc_t g = load<scalar_t, acc_t>(dy + (x0 - x), j);
          a[j] += g;
          b[j] += g * (load<scalar_t, acc_t>(x0, j) - mean[j]);
        },
        dy);
    return;
  }
  // Column blocks: the sums in registers down the rows, four rows' dy in a tree.
  auto block = [&](int64_t j, auto nvec) {
    constexpr int NV = decltype(nvec)::value;
    vec bv[NV], mv[NV];
    WideVec lo[NV], hi[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = vload_acc(b + j + v * W);
      mv[v] = vload_acc(mean + j + v * W);
      wide_load<acc_t>(a + j + v * W, lo[v], hi[v]);
    }
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) {
      for (int v = 0; v < NV; ++v) {
        vec g[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t o = (r + k) * width + j + v * W;
          g[k] = vload<scalar_t, acc_t>(dy + o);
          bv[v] += g[k] * (vload<scalar_t, acc_t>(x + o) - mv[v]);
        }
        wide_add<acc_t>(lo[v], hi[v], (g[0] + g[1]) + (g[2] + g[3]));
      }
    }
    for (; r < nrows; ++r) {
      for (int v = 0; v < NV; ++v) {
        const int64_t o = r * width + j + v * W;
        const vec g = vload<scalar_t, acc_t>(dy + o);
        bv[v] += g * (vload<scalar_t, acc_t>(x + o) - mv[v]);
        wide_add<acc_t>(lo[v], hi[v], g);
      }
    }
    for (int v = 0; v < NV; ++v) {
      vstore_acc(b + j + v * W, bv[v]);
      wide_store<acc_t>(a + j + v * W, lo[v], hi[v]);
    }
  };
  for_column_blocks<acc_t>(
      width, [&](int64_t j) { block(j, std::integral_constant<int, 4>()); },
      [&](int64_t j) { block(j, std::integral_constant<int, 1>()); },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          const acc_t g = load<scalar_t, acc_t>(dy, r * width + j);
          a[j] += g;
          b[j] += g * (load<scalar_t, acc_t>(x, r * width + j) - mean[j]);
        }
      });
}

// Elementwise passes over rows: coefficient vectors of a column block are loaded once per
// block and reused down the rows (the bfloat16 conversions then vectorize as in seg_affine).
// NT: every row's vectors are store-aligned (the caller checked y and the row width).
// !Centered: the pivot vectors are not loaded at all (two coefficient vectors per column instead
// of three: with 16 AVX2 registers a 4-vector block then keeps 8 of them in registers, not 12;
// see docs/performance.md#eval-passes).
template <typename scalar_t, typename acc_t, bool NT, bool Centered = true>
inline void rows_affine_group(
    const scalar_t* x, scalar_t* y, int64_t nrows, int64_t width, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto block = [&](int64_t j, auto nvec) {
    vec pv[nvec.value], s[nvec.value], t[nvec.value];
    for (int v = 0; v < nvec.value; ++v) {
      pv[v] = Centered ? vload_acc(pivot + j + v * W) : vec{};
      s[v] = vload_acc(scale + j + v * W);
      t[v] = vload_acc(shift + j + v * W);
    }
    for (int64_t r = 0; r < nrows; ++r) {
      const scalar_t* in = x + r * width + j;
      scalar_t* out = y + r * width + j;
      if constexpr (nvec.value % 2 == 0) {
        for (int v = 0; v < nvec.value; v += 2) {
          vec a, b;
          vload2<scalar_t, acc_t>(in + v * W, a, b);
          vstore2<scalar_t, acc_t, NT>(
              out + v * W, vnormalize<Centered>(a, pv[v], s[v], t[v]), vnormalize<Centered>(b, pv[v + 1], s[v + 1], t[v + 1]));
        }
      } else {
        for (int v = 0; v < nvec.value; ++v) {
          vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(
              out + v * W, vnormalize<Centered>(vload<scalar_t, acc_t>(in + v * W), pv[v], s[v], t[v]));
        }
      }
    }
  };
  for_column_blocks<acc_t>(
      width, [&](int64_t j) { block(j, std::integral_constant<int, 4>()); },
      [&](int64_t j) { block(j, std::integral_constant<int, 1>()); },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          store<scalar_t, acc_t>(y, r * width + j, normalize(load<scalar_t, acc_t>(x, r * width + j), pivot[j], scale[j], shift[j]));
        }
      });
}

// backward_elemt() of math.h over rows, per-lane coefficient arrays m, mdy, k, a (as rows_affine_group).
template <typename scalar_t, typename acc_t, bool NT>
inline void rows_backward_group(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t nrows, int64_t width, const acc_t* m,
    const acc_t* mdy, const acc_t* k, const acc_t* a) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  auto block = [&](int64_t j, auto nvec) {
    vec mv[nvec.value], dv[nvec.value], kv[nvec.value], av[nvec.value];
    for (int v = 0; v < nvec.value; ++v) {
      mv[v] = vload_acc(m + j + v * W);
      dv[v] = vload_acc(mdy + j + v * W);
      kv[v] = vload_acc(k + j + v * W);
      av[v] = vload_acc(a + j + v * W);
    }
    auto f = [&](int v, vec g, vec xv) { return backward_elemt(g, xv, mv[v], dv[v], kv[v], av[v]); };
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t off = r * width + j;
      if constexpr (nvec.value % 2 == 0) {
        for (int v = 0; v < nvec.value; v += 2) {
          const int64_t o = off + v * W;
          vec g0, g1, x0, x1;
          vload2<scalar_t, acc_t>(dy + o, g0, g1);
          vload2<scalar_t, acc_t>(x + o, x0, x1);
          vstore2<scalar_t, acc_t, NT>(dx + o, f(v, g0, x0), f(v + 1, g1, x1));
        }
      } else {
        for (int v = 0; v < nvec.value; ++v) {
          const int64_t o = off + v * W;
          vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(
              dx + o, f(v, vload<scalar_t, acc_t>(dy + o), vload<scalar_t, acc_t>(x + o)));
        }
      }
    }
  };
  for_column_blocks<acc_t>(
      width, [&](int64_t j) { block(j, std::integral_constant<int, 4>()); },
      [&](int64_t j) { block(j, std::integral_constant<int, 1>()); },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t o = r * width + j;
          store<scalar_t, acc_t>(
              dx, o, backward_elemt(load<scalar_t, acc_t>(dy, o), load<scalar_t, acc_t>(x, o), m[j], mdy[j], k[j], a[j]));
        }
      });
}

// The elementwise row passes walk a few rows at a time: a column block going down thousands of
// rows would stride through the whole tensor once per block (TLB and prefetcher misses).
// Rows of at least kWideRow values are walked one at a time, in memory order, instead: the
// backward's column blocks going down a group of 2 KiB rows were much slower than row by row (see
// docs/performance.md#wide-rows). Likely cause: the strided walk loads x[r + 1] 2 KiB after
// storing dx[r], which 4 KiB store-to-load alias checks can stall; not proven.
// Except where the pass's per-lane coefficient arrays (coeff_bytes in all) take more than half of
// the L1 data cache: row by row, the rows streaming through L1 evict them, and every row reloads
// all of them from L2; kWideRowGroup rows per column block load them once per group (see
// docs/performance.md#wide-coefficient-rows).
constexpr int64_t kRowGroupValues = 8192;
constexpr int64_t kWideRowGroup = 4;

inline int64_t row_group(int64_t width, bool wide, int64_t coeff_bytes) {
  if (wide) {
    return 2 * coeff_bytes > l1_data_cache_bytes() ? kWideRowGroup : 1;
  }
  return std::max<int64_t>(1, kRowGroupValues / std::max<int64_t>(1, width));
}

template <typename scalar_t, typename acc_t, bool NT = false, bool Centered = true>
inline void rows_affine(
    const scalar_t* x, scalar_t* y, int64_t nrows, int64_t width, bool wide, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift) {
  const int64_t group = row_group(width, wide, (Centered ? 3 : 2) * width * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_ahead(row_bytes);
  for (int64_t r = 0; r < nrows; r += group) {
    if (wide) {
      prefetch_lines(reinterpret_cast<uintptr_t>(x + r * width) + ahead, row_bytes * std::min(group, nrows - r));
    }
    rows_affine_group<scalar_t, acc_t, NT, Centered>(x + r * width, y + r * width, std::min(group, nrows - r), width, pivot, scale, shift);
  }
}

template <typename scalar_t, typename acc_t, bool NT = false>
inline void rows_backward(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t nrows, int64_t width, bool wide, const acc_t* m,
    const acc_t* mdy, const acc_t* k, const acc_t* a) {
  const int64_t group = row_group(width, wide, 4 * width * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_ahead(row_bytes);
  for (int64_t r = 0; r < nrows; r += group) {
    const int64_t off = r * width;
    if (wide) {
      const int64_t bytes = row_bytes * std::min(group, nrows - r);
      prefetch_lines(reinterpret_cast<uintptr_t>(dy + off) + ahead, bytes);
      prefetch_lines(reinterpret_cast<uintptr_t>(x + off) + ahead, bytes);
    }
    rows_backward_group<scalar_t, acc_t, NT>(dy + off, x + off, dx + off, std::min(group, nrows - r), width, m, mdy, k, a);
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
