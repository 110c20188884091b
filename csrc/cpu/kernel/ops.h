// The op kernels and this ISA variant's type-erased entries (part of batch_norm_kernel.h: see the
// map there).

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/ops.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// The kernels behind the ops.

template <typename scalar_t, typename acc_t>
void channel_stats(const scalar_t* x, const Layout& l, ChannelStats<acc_t>& st) {
  if (l.channels_last) {
    rows_stats<scalar_t, acc_t>(x, l, st);
  } else {
    nchw_stats<scalar_t, acc_t>(x, l, st);
  }
}

template <typename scalar_t, typename acc_t>
void stats_kernel(const scalar_t* x, const Layout& l, acc_t* mean_out, acc_t* var_out) {
  ChannelStats<acc_t> st(l.C);
  channel_stats<scalar_t, acc_t>(x, l, st);
  for (int64_t c = 0; c < l.C; ++c) {
    mean_out[c] = static_cast<acc_t>(st.pivot.p[c] + st.mean.p[c]);
    var_out[c] = static_cast<acc_t>(st.var.p[c]);
  }
}

// True when every pivot is +0 (see vnormalize).
template <typename acc_t>
inline bool pivots_all_zero(const acc_t* pivot, int64_t n) {
  return std::all_of(pivot, pivot + n, [](acc_t v) { return v == acc_t(0) && !std::signbit(v); });
}

// y = (x - pivot[c]) * scale[c] + shift[c] over the whole tensor (x * scale[c] + shift[c] where
// every pivot is +0: eval's folded coefficients).
template <typename scalar_t, typename acc_t>
void affine_kernel(const scalar_t* x, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
  with_constant(!pivots_all_zero(pivot, l.C), [&](auto centered) {
    constexpr bool kCentered = decltype(centered)::value;
    if (l.channels_last) {
      rows_affine_all<scalar_t, acc_t, kCentered>(x, y, l, pivot, scale, shift);
    } else {
      affine_nchw<scalar_t, acc_t, kCentered>(x, y, l, pivot, scale, shift);
    }
  });
}

// The training forward's per-channel results of channel c's merged statistics (statistics of
// x - pivot): mean, invstd and var stored as acc_t, and the normalization coefficients.
template <typename acc_t>
inline NormalizeCoeffs<acc_t> forward_channel_coeffs(
    int64_t c, acc_t pivot, merge_t mean, merge_t var_m, const acc_t* weight, const acc_t* bias, double eps,
    acc_t* mean_out, acc_t* invstd_out, acc_t* var_out) {
  const acc_t var = static_cast<acc_t>(var_m);
  const acc_t invstd = invstd_from_var(var, eps);
  mean_out[c] = static_cast<acc_t>(pivot + mean);
  var_out[c] = var;
  invstd_out[c] = invstd;
  return normalize_coeffs_shifted(pivot, static_cast<acc_t>(mean), invstd, weight[c], bias[c]);
}

// The statistics of channels c0 .. c0 + G - 1 of an NCHW tensor (their blocks merged in block
// order, exactly as nchw_stats merges them: the same bits for any G), each finished by
// finish(c, pivot, mean, var) into k[g] (the fused per-group forward tasks).
template <typename scalar_t, typename acc_t, typename Finish>
inline void group_forward_coeffs(
    const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G, const Finish& finish,
    NormalizeCoeffs<acc_t>* k) {
  acc_t pivot[kMaxGroup];
  Welford<merge_t> w[kMaxGroup], part[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    pivot[g] = nchw_pivot<scalar_t, acc_t>(x, l, c0 + g);
    w[g] = {0, 0, 0};
  }
  for (int64_t j = 0; j < plan.nblocks; ++j) {
    group_block_stats<scalar_t, acc_t>(x, l, plan, c0, G, j, pivot, part, true);
    for (int64_t g = 0; g < G; ++g) {
      w[g] = welford_combine(w[g], part[g]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    k[g] = finish(c0 + g, pivot[g], w[g].mean, welford_var(w[g]));
  }
}

// Training forward in one call: statistics (one pass over memory, second pass of each block
// from L1), per-channel coefficients once, then one elementwise pass.
template <typename scalar_t, typename acc_t>
void forward_kernel(
    const scalar_t* x,
    scalar_t* y,
    const Layout& l,
    const acc_t* weight,
    const acc_t* bias,
    double eps,
    acc_t* mean_out,
    acc_t* invstd_out,
    acc_t* var_out) {
  const int64_t C = l.C;
  // The per-channel results of one channel's merged statistics (shared by both paths below).
  auto finish = [&](int64_t c, acc_t pivot, merge_t mean, merge_t var_m) {
    return forward_channel_coeffs(c, pivot, mean, var_m, weight, bias, eps, mean_out, invstd_out, var_out);
  };
  if (fused_channel_forward<scalar_t>(l)) {
    // One task per channel: its blocks' statistics (merged in block order, exactly as
    // nchw_stats merges them), then its normalization while the channel is still in L2.
    const BlockPlan plan(l);
    const auto [G, streamed] = fused_group_pass<scalar_t, acc_t>(y, l, 2);
    const int64_t groups = (C + G - 1) / G;
    with_constant(streamed, [&](auto nt) {
      at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c0 = q * G, g_n = std::min(G, C - c0);
          NormalizeCoeffs<acc_t> k[kMaxGroup];
          group_forward_coeffs<scalar_t, acc_t>(x, l, plan, c0, g_n, finish, k);
          group_affine<scalar_t, acc_t, nt.value>(x, y, l, c0, g_n, k);
        }
        end_streaming<nt.value>();
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
  affine_kernel<scalar_t, acc_t>(x, y, l, pivot.p, scale.p, shift.p);
}

template <typename scalar_t, typename acc_t>
void backward_reduce_kernel(
    const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  Buffer<GradSums> sums(l.C);
  backward_reduce_sums<scalar_t, acc_t>(dy, x, l, mean, sums.p);
  for (int64_t c = 0; c < l.C; ++c) {
    sum_dy[c] = static_cast<acc_t>(sums.p[c].dy);
    sum_dy_xmu[c] = static_cast<acc_t>(sums.p[c].dy_xmu);
  }
}

// The training backward's coefficients of channel c (and its sums, stored as acc_t). The means are
// divided in merge_t and rounded once: M * dy / M is dy (sum_dy rounded to acc_t first is not
// M * dy where M is no power of two).
template <typename acc_t>
inline BackwardCoeffs<acc_t> fused_backward_coeffs(
    const Layout& l, int64_t c, const acc_t* weight, const acc_t* mean, const acc_t* invstd, const GradSums& s,
    acc_t* sum_dy, acc_t* sum_dy_xmu) {
  sum_dy[c] = static_cast<acc_t>(s.dy);
  sum_dy_xmu[c] = static_cast<acc_t>(s.dy_xmu);
  const merge_t count = static_cast<merge_t>(std::max<int64_t>(1, l.rows()));  // no rows: the sums are 0
  return backward_coeffs(
      mean[c], invstd[c], weight[c], static_cast<acc_t>(s.dy / count), static_cast<acc_t>(s.dy_xmu / count));
}

template <typename scalar_t, typename acc_t>
void backward_elemt_kernel(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& l, const BackwardCoeffs<acc_t>* coeffs) {
  if (l.channels_last) {
    rows_backward_all<scalar_t, acc_t>(dy, x, dx, l, coeffs);
    return;
  }
  if (const auto [G, streamed] = lanes_pass<scalar_t, acc_t>(dx, l, 3); G > 0) {
    const int64_t groups = (l.C + G - 1) / G;
    with_constant(streamed, [&](auto nt) {
      at::parallel_for(0, groups, std::max<int64_t>(1, channel_grain(l) / G), [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c0 = q * G;
          group_backward<scalar_t, acc_t, nt.value>(dy, x, dx, l, c0, std::min(G, l.C - c0), coeffs + c0);
        }
        end_streaming<nt.value>();
      });
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, l.HxW));
  with_constant(stream_planes(dx, l, 3), [&](auto nt) {
    at::parallel_for(0, l.N * l.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin, c = begin % l.C; p < end; ++p, c = c + 1 == l.C ? 0 : c + 1) {
        const int64_t off = p * l.HxW;
        seg_backward<scalar_t, acc_t, nt.value>(dy + off, x + off, dx + off, l.HxW, coeffs[c]);
      }
      end_streaming<nt.value>();
    });
  });
}

// Training backward in one call: at most two passes over (dy, x). NCHW with per-channel tasks
// reduces a channel and writes its dx while the channel is still in L2.
template <typename scalar_t, typename acc_t>
void backward_kernel(
    const scalar_t* dy,
    const scalar_t* x,
    scalar_t* dx,
    const Layout& l,
    const acc_t* weight,
    const acc_t* mean,
    const acc_t* invstd,
    acc_t* sum_dy,
    acc_t* sum_dy_xmu) {
  if (!l.channels_last && fused_channel_backward<scalar_t>(l)) {
    const BlockPlan plan(l);
    const auto [G, streamed] = fused_group_pass<scalar_t, acc_t>(dx, l, 3);
    const int64_t groups = (l.C + G - 1) / G;
    // Half the forward's grain: a value here costs two reads, a reduction and a write (see
    // docs/performance.md#fused-channel-tasks).
    const int64_t grain = std::max<int64_t>(1, channel_grain(l) / G / 2);
    with_constant(streamed, [&](auto nt) {
      at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t c0 = q * G, g_n = std::min(G, l.C - c0);
          GradSums sums[kMaxGroup];
          group_reduce_nchw<scalar_t, acc_t>(dy, x, l, plan, c0, g_n, mean + c0, sums);
          BackwardCoeffs<acc_t> k[kMaxGroup];
          for (int64_t g = 0; g < g_n; ++g) {
            k[g] = fused_backward_coeffs(l, c0 + g, weight, mean, invstd, sums[g], sum_dy, sum_dy_xmu);
          }
          group_backward<scalar_t, acc_t, nt.value>(dy, x, dx, l, c0, g_n, k);
        }
        end_streaming<nt.value>();
      });
    });
    return;
  }
  Buffer<GradSums> sums(l.C);
  backward_reduce_sums<scalar_t, acc_t>(dy, x, l, mean, sums.p);
  Buffer<BackwardCoeffs<acc_t>> coeffs(l.C);
  for (int64_t c = 0; c < l.C; ++c) {
    coeffs.p[c] = fused_backward_coeffs(l, c, weight, mean, invstd, sums.p[c], sum_dy, sum_dy_xmu);
  }
  backward_elemt_kernel<scalar_t, acc_t>(dy, x, dx, l, coeffs.p);
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
