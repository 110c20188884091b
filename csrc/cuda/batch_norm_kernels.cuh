// CUDA kernels of every bnext op and their templated launchers. Three layers (as in
// mapillary/inplace_abn): `__global__ *_kernel`, a launcher templated on the reduction or
// elementwise op and the index type, and the entries in batch_norm_cuda.cu that check arguments,
// dispatch the dtype and pick 32/64-bit indexing.
//
// Two kernel families cover every op:
//  * per-channel reductions (statistics, backward reduce), one NCHW and one channels-last kernel,
//    parametrized by a Reducer (per-element step, merge, per-channel epilogue);
//  * elementwise kernels (normalize, backward elementwise), parametrized by an op that reads
//    per-channel coefficients computed once per channel (by the reduction's epilogue in the fused
//    ops, by a small coefficient kernel in the split ops).
// The fused BN + activation (+ residual) ops (common/act.h) are the same kernels with other
// parameters: the backward reduction sums dz = dy * act'(z) in place of dy (GradReducer with
// ActGrad terms), the elementwise ops apply the activation, read the residual and write dz.
//
// Determinism: every reduction is a fixed tree. A thread's values are visited in a fixed order,
// warps and blocks merge by lane and warp number, and multi-block reductions write per-block
// partials that the last block to finish merges in block order; no floating-point atomics. The
// only atomic is an integer ticket that elects the merging block, and which block merges does not
// change the merge order, so results are bitwise identical from run to run.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/act.h"
#include "../common/layout.h"
#include "../common/math.h"
#include "device.cuh"

namespace bnext {
namespace cuda {

// Threads per block of the reductions: 8 warps per block, enough loads in flight per SM with a
// few blocks resident, and a block merge of only 8 warp partials.
constexpr int kReduceThreads = 256;
// Threads per block of the elementwise kernels.
constexpr int kElementwiseThreads = 256;
// Blocks per SM the launchers aim for: enough to hide memory latency without making the
// multi-block merge of the reductions long.
constexpr int kBlocksPerSM = 4;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Smallest power of two >= n (n >= 1), at most `cap`.
inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) {
    p <<= 1;
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Reducers: what a per-channel reduction accumulates and what it writes at the end.

template <typename acc_t>
using Welford = WelfordData<acc_t, int64_t>;

// Statistics: Welford per thread, Chan merges above. The epilogue writes mean and biased var and,
// in the fused forward, invstd and the normalize coefficients (pivot, scale, shift) of the channel.
template <typename scalar_t, typename acc_t_>
struct StatsReducer {
  using acc_t = acc_t_;
  using State = Welford<acc_t>;
  struct Channel {};

  const scalar_t* x;
  acc_t* mean;
  acc_t* var;
  // Fused forward only (nullptr otherwise).
  acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;
  acc_t* pivot;
  acc_t* scale;
  acc_t* shift;
  double eps;

  BNEXT_DEVICE static State identity() {
    return State{acc_t(0), acc_t(0), 0};
  }
  template <typename index_t>
  BNEXT_DEVICE Channel channel(index_t) const {
    return Channel{};
  }
  template <typename index_t>
  BNEXT_DEVICE void push(State& s, const Channel&, index_t i) const {
    welford_push(s, static_cast<acc_t>(x[i]));
  }
  BNEXT_DEVICE static State combine(const State& a, const State& b) {
    return welford_combine(a, b);
  }
  BNEXT_DEVICE static State shfl_down(const State& s, int delta) {
    return State{cuda::shfl_down(s.mean, delta), cuda::shfl_down(s.m2, delta), cuda::shfl_down(s.n, delta)};
  }
  BNEXT_DEVICE static State load_partial(const State* p) {
    return State{ldcg(&p->mean), ldcg(&p->m2), ldcg(&p->n)};
  }
  template <typename index_t>
  BNEXT_DEVICE void finalize(index_t c, const State& s) const {
    const acc_t v = welford_var(s);
    mean[c] = s.mean;
    var[c] = v;
    if (invstd != nullptr) {
      const acc_t is = invstd_from_var(v, eps);
      invstd[c] = is;
      const auto k = normalize_coeffs(s.mean, is, weight[c], bias[c]);
      pivot[c] = k.pivot;
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
  }
};

// dy enters as a running mean (mean_push, mean_combine), not a sum: where dy is constant over the
// channel (a loss through global pooling) mean_dy is then that constant exactly, as
// backward_elemt() needs to cancel dy - mean_dy. A float sum of M equal values comes out rounded,
// and that rounding stayed in every dx.
template <typename acc_t>
struct GradState {
  acc_t mean_dy;
  acc_t sum_dy_xmu;
  int64_t n;
};

// What the backward reduction takes of one element: g (dy; dz = dy * act'(z) in the fused
// activation backward) and x - mean.
template <typename acc_t>
struct GradTerms {
  acc_t g;
  acc_t xmu;
};

// Batch norm's own terms: dy, and x - mean from the input.
template <typename scalar_t, typename acc_t>
struct InputGrad {
  struct Channel {
    acc_t mean;
  };
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;

  template <typename index_t>
  BNEXT_DEVICE Channel channel(index_t c) const {
    return Channel{ldg(mean + c)};
  }
  template <typename index_t>
  BNEXT_DEVICE GradTerms<acc_t> operator()(const Channel& ch, index_t i) const {
    return GradTerms<acc_t>{static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]) - ch.mean};
  }
  template <typename index_t>
  BNEXT_DEVICE void finalize(index_t) const {}
};

// Per channel of the fused activation backward: the forward's normalize coefficients (z is
// recomputed from the input with the forward's arithmetic, so it has the forward's bits), the
// mean, and for the memory-saving mode the bias and rcp = 1 / (weight * invstd), computed once per
// channel. rcp is 0 where weight * invstd is 0: x - mean cannot be recovered from the output of
// such a channel (its output does not depend on x); its values are finite don't-cares that the
// caller replaces (schemas.h).
template <typename acc_t>
struct ActChannel {
  NormalizeCoeffs<acc_t> z;
  acc_t mean;
  acc_t bias;
  acc_t rcp;
};

template <typename acc_t>
BNEXT_DEVICE ActChannel<acc_t> act_channel(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  ActChannel<acc_t> ch;
  ch.z = normalize_coeffs(mean, invstd, weight, bias);
  ch.mean = mean;
  ch.bias = bias;
  ch.rcp = ch.z.scale != acc_t(0) ? acc_t(1) / ch.z.scale : acc_t(0);
  return ch;
}

// The activation of a fused backward and where z comes from (see act_grad_terms).
template <typename acc_t>
struct ActParams {
  Act act;
  acc_t param;
  bool from_output;
};

// dz and x - mean of one element, from dy, the saved tensor (x, or y when from_output) and the
// residual (0 when there is none). One function for the reduction and the elementwise pass, so
// both see the same dz.
template <typename acc_t>
BNEXT_DEVICE GradTerms<acc_t> act_grad_terms(
    const ActParams<acc_t>& a,
    const ActChannel<acc_t>& ch,
    acc_t dy,
    acc_t saved,
    acc_t r) {
  if (a.from_output) {
    // y = act(z), z = (x - mean) * w * invstd + b + r.
    const acc_t z = act_inverse(a.act, saved, a.param);
    return GradTerms<acc_t>{dy * act_derivative_from_output(a.act, saved, a.param), (z - ch.bias - r) * ch.rcp};
  }
  const acc_t z = normalize(saved, ch.z.pivot, ch.z.scale, ch.z.shift) + r;
  return GradTerms<acc_t>{dy * act_derivative(a.act, z, a.param), saved - ch.mean};
}

// The fused activation backward's terms. The epilogue stores each channel's ActChannel for the
// elementwise pass (the values channel() computed, bit for bit).
template <typename scalar_t, typename acc_t>
struct ActGrad {
  using Channel = ActChannel<acc_t>;
  const scalar_t* dy;
  const scalar_t* saved;
  const scalar_t* residual;  // nullptr: no residual
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  const acc_t* bias;
  ActParams<acc_t> a;
  ActChannel<acc_t>* channels;

  template <typename index_t>
  BNEXT_DEVICE Channel channel(index_t c) const {
    return act_channel(ldg(mean + c), ldg(invstd + c), ldg(weight + c), ldg(bias + c));
  }
  template <typename index_t>
  BNEXT_DEVICE GradTerms<acc_t> operator()(const Channel& ch, index_t i) const {
    const acc_t r = residual != nullptr ? static_cast<acc_t>(residual[i]) : acc_t(0);
    return act_grad_terms(a, ch, static_cast<acc_t>(dy[i]), static_cast<acc_t>(saved[i]), r);
  }
  template <typename index_t>
  BNEXT_DEVICE void finalize(index_t c) const {
    channels[c] = channel(c);
  }
};

// Backward reduce: sum_dy = mean_dy * M, sum_dy_xmu = sum(g * (x - mean)) over the Terms of every
// element (g = dy, or dz in the fused activation backward). In the fused backward the epilogue also
// computes the channel's backward coefficients (see backward_coeffs()).
template <typename scalar_t, typename acc_t_, class Terms = InputGrad<scalar_t, acc_t_>>
struct GradReducer {
  using acc_t = acc_t_;
  using State = GradState<acc_t>;
  using Channel = typename Terms::Channel;

  Terms terms;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  // Fused backward only (nullptr otherwise).
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;
  BackwardCoeffs<acc_t>* coeffs;

  BNEXT_DEVICE static State identity() {
    return State{acc_t(0), acc_t(0), 0};
  }
  template <typename index_t>
  BNEXT_DEVICE Channel channel(index_t c) const {
    return terms.channel(c);
  }
  template <typename index_t>
  BNEXT_DEVICE void push(State& s, const Channel& ch, index_t i) const {
    const GradTerms<acc_t> t = terms(ch, i);
    s.n += 1;
    s.mean_dy = mean_push(s.mean_dy, t.g, s.n);
    s.sum_dy_xmu += t.g * t.xmu;
  }
  // Empty sides are exact no-ops (as in welford_combine).
  BNEXT_DEVICE static State combine(const State& a, const State& b) {
    if (b.n == 0) {
      return a;
    }
    if (a.n == 0) {
      return b;
    }
    const int64_t n = a.n + b.n;
    const acc_t f = static_cast<acc_t>(b.n) / static_cast<acc_t>(n);
    return State{mean_combine(a.mean_dy, b.mean_dy, f), a.sum_dy_xmu + b.sum_dy_xmu, n};
  }
  BNEXT_DEVICE static State shfl_down(const State& s, int delta) {
    return State{cuda::shfl_down(s.mean_dy, delta), cuda::shfl_down(s.sum_dy_xmu, delta), cuda::shfl_down(s.n, delta)};
  }
  BNEXT_DEVICE static State load_partial(const State* p) {
    return State{ldcg(&p->mean_dy), ldcg(&p->sum_dy_xmu), ldcg(&p->n)};
  }
  template <typename index_t>
  BNEXT_DEVICE void finalize(index_t c, const State& s) const {
    const acc_t count = static_cast<acc_t>(s.n);
    sum_dy[c] = s.mean_dy * count;
    sum_dy_xmu[c] = s.sum_dy_xmu;
    if (coeffs != nullptr) {
      const acc_t mean_dy_xmu = s.n > 0 ? s.sum_dy_xmu / count : acc_t(0);
      coeffs[c] = backward_coeffs(mean[c], invstd[c], weight[c], s.mean_dy, mean_dy_xmu);
      terms.finalize(c);
    }
  }
};

// Reducers and elementwise ops that also take each element's position in the (N, spatial) plane
// (pos = n * HxW + hw for NCHW, the row for channels-last): the masked batch norm ops, whose mask
// has one value per position. The kernels compute pos only for these (if constexpr).
template <class T, class = void>
struct takes_position : std::false_type {};
template <class T>
struct takes_position<T, std::void_t<decltype(T::kTakesPosition)>> : std::true_type {};

// Masked batch norm (bnext/masked.py): reducer R over the real positions only, mask (N, spatial)
// nonzero there. Skipped elements are never pushed, so the states count the real positions, and
// everything else (merges, epilogue) is R's.
template <class R>
struct MaskedReducer {
  using acc_t = typename R::acc_t;
  using State = typename R::State;
  using Channel = typename R::Channel;
  static constexpr bool kTakesPosition = true;

  R r;
  const uint8_t* mask;

  BNEXT_DEVICE static State identity() {
    return R::identity();
  }
  template <typename index_t>
  BNEXT_DEVICE Channel channel(index_t c) const {
    return r.channel(c);
  }
  template <typename index_t>
  BNEXT_DEVICE void push(State& s, const Channel& ch, index_t i, index_t pos) const {
    if (ldg(mask + pos)) {
      r.push(s, ch, i);
    }
  }
  BNEXT_DEVICE static State combine(const State& a, const State& b) {
    return R::combine(a, b);
  }
  BNEXT_DEVICE static State shfl_down(const State& s, int delta) {
    return R::shfl_down(s, delta);
  }
  BNEXT_DEVICE static State load_partial(const State* p) {
    return R::load_partial(p);
  }
  template <typename index_t>
  BNEXT_DEVICE void finalize(index_t c, const State& s) const {
    r.finalize(c, s);
  }
};

template <class R, typename index_t>
BNEXT_DEVICE void reduce_push(
    const R& r, typename R::State& s, const typename R::Channel& ch, index_t i, index_t pos) {
  if constexpr (takes_position<R>::value) {
    r.push(s, ch, i, pos);
  } else {
    (void)pos;
    r.push(s, ch, i);
  }
}

// ---------------------------------------------------------------------------------------------
// Reduction kernels.

// NCHW: channel c is N runs of HxW values. threadIdx.x walks a run, threadIdx.y walks n. A
// channel is split over gridDim.x blocks: hw_splits tiles of a run times gridDim.x / hw_splits
// groups of n. Channels loop with stride gridDim.y (any C under the grid limit).
template <class R, typename index_t>
__global__ void reduce_nchw_kernel(
    R r,
    index_t N,
    index_t C,
    index_t HxW,
    int hw_splits,
    typename R::State* partials,
    int* tickets) {
  using State = typename R::State;
  __shared__ State warp_states[kMaxWarps];
  __shared__ bool is_last;
  const int tid = linear_thread();
  const int nthreads = blockDim.x * blockDim.y;
  const int n_splits = gridDim.x / hw_splits;
  const index_t hw0 = static_cast<index_t>(blockIdx.x % hw_splits) * blockDim.x + threadIdx.x;
  const index_t hw_step = static_cast<index_t>(hw_splits) * blockDim.x;
  const index_t n0 = static_cast<index_t>(blockIdx.x / hw_splits) * blockDim.y + threadIdx.y;
  const index_t n_step = static_cast<index_t>(n_splits) * blockDim.y;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    const auto ch = r.channel(c);
    State s = R::identity();
    for (index_t n = n0; n < N; n += n_step) {
      const index_t base = (n * C + c) * HxW;
      for (index_t hw = hw0; hw < HxW; hw += hw_step) {
        reduce_push(r, s, ch, base + hw, n * HxW + hw);
      }
    }
    s = block_reduce<R>(s, warp_states);
    if (gridDim.x == 1) {
      if (tid == 0) {
        r.finalize(c, s);
      }
      continue;
    }
    if (tid == 0) {
      partials[static_cast<int64_t>(c) * gridDim.x + blockIdx.x] = s;
      __threadfence();
      is_last = atomicAdd(&tickets[c], 1) == static_cast<int>(gridDim.x) - 1;
    }
    __syncthreads();
    if (is_last) {
      __threadfence();
      State t = R::identity();
      for (int b = tid; b < static_cast<int>(gridDim.x); b += nthreads) {
        t = R::combine(t, R::load_partial(&partials[static_cast<int64_t>(c) * gridDim.x + b]));
      }
      t = block_reduce<R>(t, warp_states);
      if (tid == 0) {
        r.finalize(c, t);
      }
    }
  }
}

// Column tree over threadIdx.y of a (blockDim.y x blockDim.x) tile of states in shared memory;
// blockDim.y is a power of two. Row 0 holds the result. Ends with a barrier.
template <class R, class State>
BNEXT_DEVICE void column_reduce(State* tile) {
  for (int off = blockDim.y / 2; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.y) < off) {
      State& mine = tile[threadIdx.y * blockDim.x + threadIdx.x];
      mine = R::combine(mine, tile[(threadIdx.y + off) * blockDim.x + threadIdx.x]);
    }
    __syncthreads();
  }
}

// Channels-last: R rows of C adjacent channels. threadIdx.x walks channels (coalesced across a
// warp), threadIdx.y walks rows; gridDim.y splits the rows, channel tiles of blockDim.x loop with
// stride gridDim.x.
template <class R, typename index_t>
__global__ void reduce_channels_last_kernel(
    R r,
    index_t rows,
    index_t C,
    typename R::State* partials,
    int* tickets) {
  using State = typename R::State;
  BNEXT_DYNAMIC_SHARED(State, tile);
  __shared__ bool is_last;
  const int tid = linear_thread();
  for (index_t c0 = static_cast<index_t>(blockIdx.x) * blockDim.x; c0 < C;
       c0 += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t c = c0 + threadIdx.x;
    State s = R::identity();
    if (c < C) {
      const auto ch = r.channel(c);
      for (index_t row = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows;
           row += static_cast<index_t>(gridDim.y) * blockDim.y) {
        reduce_push(r, s, ch, row * C + c, row);
      }
    }
    tile[tid] = s;
    __syncthreads();
    column_reduce<R>(tile);
    if (gridDim.y == 1) {
      if (threadIdx.y == 0 && c < C) {
        r.finalize(c, tile[threadIdx.x]);
      }
      __syncthreads();
      continue;
    }
    if (threadIdx.y == 0 && c < C) {
      partials[static_cast<int64_t>(blockIdx.y) * C + c] = tile[threadIdx.x];
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      is_last = atomicAdd(&tickets[c0 / blockDim.x], 1) == static_cast<int>(gridDim.y) - 1;
    }
    __syncthreads();
    if (is_last) {
      __threadfence();
      State t = R::identity();
      if (c < C) {
        for (int b = threadIdx.y; b < static_cast<int>(gridDim.y); b += blockDim.y) {
          t = R::combine(t, R::load_partial(&partials[static_cast<int64_t>(b) * C + c]));
        }
      }
      tile[tid] = t;
      __syncthreads();
      column_reduce<R>(tile);
      if (threadIdx.y == 0 && c < C) {
        r.finalize(c, tile[threadIdx.x]);
      }
    }
    __syncthreads();
  }
}

// Launches the reduction of `layout` with reducer `r`. Partials and tickets come from `alloc`,
// called only for multi-block reductions: alloc(bytes, zeroed) returns device memory, zero-filled
// when `zeroed` (the tickets; every partial is written before it is read).
template <class R, typename index_t, class Alloc>
void launch_reduce(const R& r, const Layout& l, Stream stream, Alloc&& alloc) {
  using State = typename R::State;
  const int64_t target_blocks = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSM;
  if (!l.channels_last) {
    const int bx = pow2_at_least(l.HxW, kReduceThreads);
    const int by = kReduceThreads / bx;
    const int64_t channel_blocks = std::min(l.C, kMaxChannelBlocks);
    const int64_t splits = std::max<int64_t>(1, target_blocks / channel_blocks);
    const int64_t hw_splits = std::min(ceil_div(l.HxW, bx), splits);
    const int64_t n_splits = std::min(ceil_div(l.N, by), std::max<int64_t>(1, splits / hw_splits));
    const dim3 grid(static_cast<unsigned>(hw_splits * n_splits), static_cast<unsigned>(channel_blocks));
    State* partials = nullptr;
    int* tickets = nullptr;
    if (grid.x > 1) {
      partials = static_cast<State*>(alloc(sizeof(State) * l.C * grid.x, false));
      tickets = static_cast<int*>(alloc(sizeof(int) * l.C, true));
    }
    launch(
        BNEXT_KERNEL(reduce_nchw_kernel, R, index_t), grid, dim3(bx, by), 0, stream, r,
        static_cast<index_t>(l.N), static_cast<index_t>(l.C), static_cast<index_t>(l.HxW),
        static_cast<int>(hw_splits), partials, tickets);
    return;
  }
  const int64_t rows = l.rows();
  const int bx = std::min(pow2_at_least(l.C, kWarpSize), kWarpSize);
  const int by = kReduceThreads / bx;
  const int64_t tiles = ceil_div(l.C, bx);
  const int64_t tile_blocks = std::min(tiles, kMaxChannelBlocks);
  const int64_t row_splits =
      std::min({ceil_div(rows, by), std::max<int64_t>(1, target_blocks / tile_blocks), kMaxChannelBlocks});
  const dim3 grid(static_cast<unsigned>(tile_blocks), static_cast<unsigned>(row_splits));
  State* partials = nullptr;
  int* tickets = nullptr;
  if (grid.y > 1) {
    partials = static_cast<State*>(alloc(sizeof(State) * l.C * grid.y, false));
    tickets = static_cast<int*>(alloc(sizeof(int) * tiles, true));
  }
  launch(
      BNEXT_KERNEL(reduce_channels_last_kernel, R, index_t), grid, dim3(bx, by), sizeof(State) * bx * by,
      stream, r, static_cast<index_t>(rows), static_cast<index_t>(l.C), partials, tickets);
}

// ---------------------------------------------------------------------------------------------
// Per-channel coefficients of the split ops.

template <typename acc_t>
__global__ void normalize_coeffs_kernel(
    const acc_t* mean,
    const acc_t* invstd,
    const acc_t* weight,
    const acc_t* bias,
    acc_t* pivot,
    acc_t* scale,
    acc_t* shift,
    int64_t C) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto k = normalize_coeffs(mean[c], invstd[c], weight[c], bias[c]);
    pivot[c] = k.pivot;
    scale[c] = k.scale;
    shift[c] = k.shift;
  }
}

template <typename acc_t>
__global__ void backward_coeffs_kernel(
    const acc_t* mean,
    const acc_t* invstd,
    const acc_t* weight,
    const acc_t* mean_dy,
    const acc_t* mean_dy_xmu,
    BackwardCoeffs<acc_t>* coeffs,
    int64_t C) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    coeffs[c] = backward_coeffs(mean[c], invstd[c], weight[c], mean_dy[c], mean_dy_xmu[c]);
  }
}

inline dim3 channel_grid(int64_t C) {
  return dim3(static_cast<unsigned>(std::min(ceil_div(C, kElementwiseThreads), kMaxChannelBlocks)));
}

// ---------------------------------------------------------------------------------------------
// Elementwise kernels over the whole tensor, flat. Element i belongs to channel (i / S) % C with
// S = HxW for NCHW and S = 1 for channels-last, so one kernel serves both layouts and any shape.
//
// An op takes Op::kInputs values and gives Op::kOutputs values per element, all in the
// accumulation type: op(in, out, c).

constexpr int kMaxElementwiseInputs = 3;
constexpr int kMaxElementwiseOutputs = 2;

// The tensors of one elementwise pass, all of the input's shape and layout. Inputs beyond
// Op::kInputs and outputs beyond Op::kOutputs are unused. An optional input (the residual) may be
// nullptr and reads as 0; an optional output (grad_residual) may be nullptr and is not written.
template <typename scalar_t>
struct ElementwiseTensors {
  const scalar_t* in[kMaxElementwiseInputs];
  scalar_t* out[kMaxElementwiseOutputs];
};

// y = (x - pivot[c]) * scale[c] + shift[c] (see normalize() in common/math.h)
template <typename acc_t>
struct NormalizeOp {
  static constexpr int kInputs = 1;
  static constexpr int kOutputs = 1;
  const acc_t* pivot;
  const acc_t* scale;
  const acc_t* shift;
  template <typename index_t>
  BNEXT_DEVICE void operator()(const acc_t* in, acc_t* out, index_t c) const {
    out[0] = normalize(in[0], ldg(pivot + c), ldg(scale + c), ldg(shift + c));
  }
};

// y = act((x - pivot[c]) * scale[c] + shift[c] + r) in the accumulation type, rounded once (BN's
// output is never stored). Inputs: x, residual (nullptr when there is none).
template <typename acc_t>
struct ActNormalizeOp {
  static constexpr int kInputs = 2;
  static constexpr int kOutputs = 1;
  NormalizeOp<acc_t> norm;
  Act act;
  acc_t param;
  // z + 0 would turn a -0 into +0: without a residual, z is BN's output bit for bit.
  bool residual;
  template <typename index_t>
  BNEXT_DEVICE void operator()(const acc_t* in, acc_t* out, index_t c) const {
    acc_t z;
    norm(in, &z, c);
    if (residual) {
      z += in[1];
    }
    out[0] = act_forward(act, z, param);
  }
};

// dx = a[c] * ((dy - mean_dy[c]) - (x - mean[c]) * k[c]) (see backward_elemt() in common/math.h)
template <typename acc_t>
struct BackwardElemtOp {
  static constexpr int kInputs = 2;
  static constexpr int kOutputs = 1;
  const BackwardCoeffs<acc_t>* coeffs;
  template <typename index_t>
  BNEXT_DEVICE void operator()(const acc_t* in, acc_t* out, index_t c) const {
    const BackwardCoeffs<acc_t>* k = coeffs + c;
    out[0] = backward_elemt(in[0], in[1], ldg(&k->mean), ldg(&k->mean_dy), ldg(&k->k), ldg(&k->a));
  }
};

// The fused activation backward: dx = a[c] * ((dz - mean_dz[c]) - (x - mean) * k[c]) and
// grad_residual = dz, dz and x - mean from act_grad_terms() as the reduction computed them.
// Inputs: dy, saved (x or y), residual (nullptr when none); outputs: dx, dz (nullptr when no
// residual).
template <typename acc_t>
struct ActBackwardElemtOp {
  static constexpr int kInputs = 3;
  static constexpr int kOutputs = 2;
  const ActChannel<acc_t>* channels;
  const BackwardCoeffs<acc_t>* coeffs;
  ActParams<acc_t> a;
  template <typename index_t>
  BNEXT_DEVICE void operator()(const acc_t* in, acc_t* out, index_t c) const {
    const ActChannel<acc_t>* p = channels + c;
    ActChannel<acc_t> ch{};
    if (a.from_output) {
      ch.bias = ldg(&p->bias);
      ch.rcp = ldg(&p->rcp);
    } else {
      ch.z = NormalizeCoeffs<acc_t>{ldg(&p->z.pivot), ldg(&p->z.scale), ldg(&p->z.shift)};
      ch.mean = ldg(&p->mean);
    }
    const GradTerms<acc_t> t = act_grad_terms(a, ch, in[0], in[1], in[2]);
    const BackwardCoeffs<acc_t>* k = coeffs + c;
    // x - mean is already formed: mean 0 leaves it exact.
    out[0] = backward_elemt(t.g, t.xmu, acc_t(0), ldg(&k->mean_dy), ldg(&k->k), ldg(&k->a));
    out[1] = t.g;
  }
};

// Masked batch norm's elementwise passes: Op at the real positions (mask nonzero), zero outputs
// at the padding (whatever the inputs hold there).
template <class Op>
struct MaskedOp {
  static constexpr int kInputs = Op::kInputs;
  static constexpr int kOutputs = Op::kOutputs;
  static constexpr bool kTakesPosition = true;
  Op op;
  const uint8_t* mask;
  template <typename acc_t, typename index_t>
  BNEXT_DEVICE void operator()(const acc_t* in, acc_t* out, index_t c, index_t pos) const {
    if (ldg(mask + pos)) {
      op(in, out, c);
    } else {
      BNEXT_UNROLL
      for (int j = 0; j < kOutputs; ++j) {
        out[j] = acc_t(0);
      }
    }
  }
};

// op(in, out, c), with the element's position where the op takes it (see takes_position).
template <class Op, typename acc_t, typename index_t>
BNEXT_DEVICE void apply_op(const Op& op, const acc_t* in, acc_t* out, index_t c, index_t pos) {
  if constexpr (takes_position<Op>::value) {
    op(in, out, c, pos);
  } else {
    (void)pos;
    op(in, out, c);
  }
}

template <class Op, typename scalar_t, typename index_t>
BNEXT_DEVICE void elementwise_one(
    const Op& op,
    const ElementwiseTensors<scalar_t>& t,
    index_t i,
    index_t S,
    index_t C) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t in[Op::kInputs];
  acc_t out[Op::kOutputs];
  BNEXT_UNROLL
  for (int j = 0; j < Op::kInputs; ++j) {
    in[j] = t.in[j] != nullptr ? static_cast<acc_t>(t.in[j][i]) : acc_t(0);
  }
  // Element i = (q * C + c) * S + s: channel c, position q * S + s (q: the sample, or for
  // channels-last, S = 1, the row).
  index_t pos = 0;
  if constexpr (takes_position<Op>::value) {
    pos = i / (S * C) * S + i % S;
  }
  apply_op(op, in, out, (i / S) % C, pos);
  BNEXT_UNROLL
  for (int j = 0; j < Op::kOutputs; ++j) {
    if (t.out[j] != nullptr) {
      t.out[j][i] = static_cast<scalar_t>(out[j]);
    }
  }
}

// Vectorized: 16-byte vectors (every input and output), then a scalar tail of fewer than V
// elements. The launcher picks this kernel only when every pointer is 16-byte aligned; outputs
// are fresh allocations, so an input that is not aligned could not share a vector boundary with
// them and takes the scalar kernel. A vector may straddle channels; the channel is tracked per
// element.
template <class Op, typename scalar_t, typename index_t>
__global__ void elementwise_vec_kernel(
    Op op,
    ElementwiseTensors<scalar_t> t,
    index_t numel,
    index_t S,
    index_t C) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int V = kVectorBytes / sizeof(scalar_t);
  using VecT = Vec<scalar_t, V>;
  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t nvec = numel / V;
  for (index_t v = tid; v < nvec; v += stride) {
    const index_t i = v * V;
    VecT a[Op::kInputs];
    BNEXT_UNROLL
    for (int j = 0; j < Op::kInputs; ++j) {
      a[j] = t.in[j] != nullptr ? *reinterpret_cast<const VecT*>(t.in[j] + i) : VecT{};
    }
    VecT y[Op::kOutputs];
    index_t c = (i / S) % C;
    index_t s = i % S;
    // The position's sample (see elementwise_one), tracked only for the ops that take it.
    index_t q = takes_position<Op>::value ? i / (S * C) : 0;
    BNEXT_UNROLL
    for (int k = 0; k < V; ++k) {
      acc_t in[Op::kInputs];
      acc_t out[Op::kOutputs];
      BNEXT_UNROLL
      for (int j = 0; j < Op::kInputs; ++j) {
        in[j] = static_cast<acc_t>(a[j].val[k]);
      }
      apply_op(op, in, out, c, q * S + s);
      BNEXT_UNROLL
      for (int j = 0; j < Op::kOutputs; ++j) {
        y[j].val[k] = static_cast<scalar_t>(out[j]);
      }
      if (++s == S) {
        s = 0;
        if (++c == C) {
          c = 0;
          ++q;
        }
      }
    }
    BNEXT_UNROLL
    for (int j = 0; j < Op::kOutputs; ++j) {
      if (t.out[j] != nullptr) {
        *reinterpret_cast<VecT*>(t.out[j] + i) = y[j];
      }
    }
  }
  for (index_t i = nvec * V + tid; i < numel; i += stride) {
    elementwise_one(op, t, i, S, C);
  }
}

// Any alignment: one element per step.
template <class Op, typename scalar_t, typename index_t>
__global__ void elementwise_scalar_kernel(
    Op op,
    ElementwiseTensors<scalar_t> t,
    index_t numel,
    index_t S,
    index_t C) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    elementwise_one(op, t, i, S, C);
  }
}

// Runs `op` over the tensors `t` of the layout `l`.
template <class Op, typename scalar_t, typename index_t>
void launch_elementwise(const Op& op, const ElementwiseTensors<scalar_t>& t, const Layout& l, Stream stream) {
  static_assert(Op::kInputs <= kMaxElementwiseInputs && Op::kOutputs <= kMaxElementwiseOutputs, "op arity");
  constexpr int V = kVectorBytes / sizeof(scalar_t);
  const int64_t numel = l.N * l.C * l.HxW;
  const int64_t S = l.channels_last ? 1 : l.HxW;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * kBlocksPerSM * 2;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; };
  bool vec = numel >= V;
  for (int j = 0; j < Op::kInputs; ++j) {
    vec = vec && aligned(t.in[j]);
  }
  for (int j = 0; j < Op::kOutputs; ++j) {
    vec = vec && aligned(t.out[j]);
  }
  if (vec) {
    const int64_t blocks = std::min(ceil_div(ceil_div(numel, V), kElementwiseThreads), max_blocks);
    launch(
        BNEXT_KERNEL(elementwise_vec_kernel, Op, scalar_t, index_t), dim3(static_cast<unsigned>(blocks)),
        dim3(kElementwiseThreads), 0, stream, op, t, static_cast<index_t>(numel), static_cast<index_t>(S),
        static_cast<index_t>(l.C));
    return;
  }
  const int64_t blocks = std::min(ceil_div(numel, kElementwiseThreads), max_blocks);
  launch(
      BNEXT_KERNEL(elementwise_scalar_kernel, Op, scalar_t, index_t), dim3(static_cast<unsigned>(blocks)),
      dim3(kElementwiseThreads), 0, stream, op, t, static_cast<index_t>(numel), static_cast<index_t>(S),
      static_cast<index_t>(l.C));
}

}  // namespace cuda
}  // namespace bnext
