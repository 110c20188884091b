// Small device helpers used by the kernels: thin wrappers around intrinsics (so the SIMT emulator
// only has to provide the intrinsics themselves), the vector type of 16-byte accesses, and warp
// and block reductions of any reduction state.
#pragma once

#include "runtime.h"

namespace bnext {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// At most 1024 threads per block, so at most 32 warps.
constexpr int kMaxWarps = 32;
// 16 bytes is the widest global access (LDG.E.128 / STG.E.128).
constexpr int kVectorBytes = 16;

template <typename T>
BNEXT_DEVICE T shfl_down(T v, unsigned delta) {
  return __shfl_down_sync(kFullMask, v, delta);
}

// Read-only path for per-channel coefficients: many threads read the same few values.
template <typename T>
BNEXT_DEVICE T ldg(const T* p) {
  return __ldg(p);
}

// Partials written by other blocks are read past L1 (which is not coherent across SMs).
template <typename T>
BNEXT_DEVICE T ldcg(const T* p) {
  return __ldcg(p);
}

// V elements in one aligned access; with V * sizeof(scalar_t) == 16 that is one 128-bit access.
template <typename scalar_t, int V>
struct alignas(V * sizeof(scalar_t)) Vec {
  scalar_t val[V];
};

BNEXT_DEVICE int linear_thread() {
  return threadIdx.y * blockDim.x + threadIdx.x;
}

// Warp tree reduction; lane 0 holds the warp's result. The order of combination depends only on
// lane numbers, so results are bitwise reproducible. R provides combine() and shfl_down().
template <class R, class State>
BNEXT_DEVICE State warp_reduce(State s) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    s = R::combine(s, R::shfl_down(s, offset));
  }
  return s;
}

// Block reduction over all threads of a block whose size is a multiple of 32; the result is
// valid in thread 0. Ends with a barrier so `warp_states` may be reused right away.
template <class R, class State>
BNEXT_DEVICE State block_reduce(State s, State* warp_states) {
  const int tid = linear_thread();
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int nwarps = (blockDim.x * blockDim.y) / kWarpSize;
  s = warp_reduce<R>(s);
  if (lane == 0) {
    warp_states[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < nwarps ? warp_states[lane] : R::identity();
    s = warp_reduce<R>(s);
  }
  __syncthreads();
  return s;
}

}  // namespace cuda
}  // namespace bnext
