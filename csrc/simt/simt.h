// SIMT emulation: the CUDA execution model as host C++, so bnext's CUDA kernels (csrc/cuda) compile
// with g++ and run on CPU tensors in every test run.
//
// Model (see simt.cpp):
//  * a launch runs its blocks one after another (in a selectable order); a block runs one fiber
//    (ucontext, own stack) per CUDA thread, scheduled cooperatively on the calling OS thread;
//  * __syncthreads() is a real barrier over the block's live threads; exited threads count as
//    arrived, as on Volta and later;
//  * warp shuffles and __syncwarp are barriers over the lanes of their mask with lock-step exchange
//    semantics: every lane of the mask deposits its value, then every lane reads its source, then
//    the warp waits again before any slot may be overwritten. A mask that names an exited or
//    missing lane, a caller outside its own mask, or a source lane outside the mask is an error
//    (undefined behaviour on a GPU), as is any deadlock;
//  * __shared__ variables are function-local statics (one copy per kernel instantiation, shared by
//    the block that runs); dynamic shared memory is a per-block buffer filled with 0xFF bytes
//    before each block, so reads of unwritten shared memory give NaNs rather than stale values;
//  * atomics are plain read-modify-writes: fibers switch only inside barriers, so nothing can
//    interleave with them. __threadfence is a sequentially consistent fence;
//  * launch limits are checked as the driver checks them (block and grid dimensions, 48 KiB of
//    dynamic shared memory), and every launch is recorded (kernel name, signature, grid, block).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint3 {
  unsigned x, y, z;
};

namespace bnext {
namespace simt {

// SM count the launch heuristics see: small, so multi-block reductions happen on tiny tensors.
constexpr int kMultiprocessors = 2;

struct Stream {};

// Coordinates of the running emulated thread.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();

void syncthreads();
void syncwarp(unsigned mask);
// Lock-step exchange within the warp: deposits `value`, returns the value deposited by `src_lane`.
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane);
void* dynamic_shared();

// Runs `body` as every thread of every block of the grid.
void run(
    const char* name,
    const std::string& signature,
    dim3 grid,
    dim3 block,
    size_t shared_bytes,
    const std::function<void()>& body);

std::string demangle(const char* mangled);

struct LaunchRecord {
  std::string name;
  std::string signature;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};
std::vector<LaunchRecord> launches();
void reset_launches();
// "forward" (blockIdx.x fastest, as GPUs tend to start them) or "reverse".
void set_block_order(bool reverse);

template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  // Arguments are converted to the kernel's parameter types once, as a launch copies them into
  // the kernel's parameter space; every thread then receives its own copy.
  const std::tuple<std::decay_t<KArgs>...> params(args...);
  run(name, demangle(typeid(kernel).name()), grid, block, shared_bytes, [&] { std::apply(kernel, params); });
}

template <typename T>
T shuffle(unsigned mask, T v, int src_lane) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "CUDA shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, src_lane);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace simt
}  // namespace bnext

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

#define threadIdx (::bnext::simt::thread_idx())
#define blockIdx (::bnext::simt::block_idx())
#define blockDim (::bnext::simt::block_dim())
#define gridDim (::bnext::simt::grid_dim())
#define warpSize 32

inline void __syncthreads() {
  ::bnext::simt::syncthreads();
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::bnext::simt::syncwarp(mask);
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// Source lanes follow the CUDA definitions: within segments of `width` lanes, and a source
// outside the segment returns the caller's own value.
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::bnext::simt::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return ::bnext::simt::shuffle(mask, v, src);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::bnext::simt::lane_id();
  const int in_segment = lane & (width - 1);
  const int src = in_segment + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::bnext::simt::shuffle(mask, v, src);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::bnext::simt::lane_id();
  const int in_segment = lane & (width - 1);
  const int src = in_segment >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return ::bnext::simt::shuffle(mask, v, src);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::bnext::simt::lane_id();
  const int target = lane ^ lane_mask;
  const int src = (target & ~(width - 1)) == (lane & ~(width - 1)) ? target : lane;
  return ::bnext::simt::shuffle(mask, v, src);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}

// Fibers switch only inside barriers, so a plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}

template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) {
    *address = value;
  }
  return old;
}

inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}

inline double rsqrt(double x) {
  return 1.0 / std::sqrt(x);
}
