// The one place where bnext's CUDA code meets a runtime: device guard, current stream, SM count,
// grid limits and the kernel launch. Compiled by nvcc it maps to c10::cuda and `<<<>>>`; compiled
// as host C++ with BNEXT_SIMT defined (csrc/simt) it maps to the SIMT emulator, so the kernels and
// every line of launch-configuration code run unchanged on the CPU.
//
// Only c10/cuda headers: this toolkit ships no cuBLAS/cuSPARSE headers, which ATen/cuda/CUDAContext.h
// pulls in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#ifdef BNEXT_SIMT
#include "../simt/simt.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <memory>
#include <mutex>
#endif

#define BNEXT_DEVICE __device__ __forceinline__

// Full unrolling of short fixed-trip loops (the elements of one 16-byte vector).
#ifdef BNEXT_SIMT
#define BNEXT_UNROLL _Pragma("GCC unroll 16")
#else
#define BNEXT_UNROLL _Pragma("unroll")
#endif

// Dynamic shared memory of a kernel as a T*. One byte array for every kernel: extern __shared__
// arrays of different types in different template instantiations would clash.
#ifdef BNEXT_SIMT
#define BNEXT_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::bnext::simt::dynamic_shared())
#else
#define BNEXT_DYNAMIC_SHARED(T, name)                                \
  extern __shared__ __align__(16) unsigned char bnext_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(bnext_dynamic_smem)
#endif

namespace bnext {
namespace cuda {

#ifdef BNEXT_SIMT
// The emulator lowers two limits so the paths they guard run on tiny tensors in every test run:
// channel loops beyond the grid limit (C > kMaxChannelBlocks) and 64-bit indexing.
constexpr int64_t kMaxChannelBlocks = 3;
constexpr int64_t kMax32BitIndex = 2048;
using Stream = simt::Stream;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline Stream current_stream() {
  return Stream{};
}
inline int multiprocessor_count() {
  return simt::kMultiprocessors;
}
#else
// gridDim.y and gridDim.z are limited to 65535; channel loops stride by the grid when C is larger.
constexpr int64_t kMaxChannelBlocks = 65535;
// Grid-stride loops step up to one grid past the end before they test the bound, so 32-bit
// indexing is used only while numel plus that overshoot stays far below INT32_MAX.
constexpr int64_t kMax32BitIndex = std::numeric_limits<int32_t>::max() / 2;
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}
inline int multiprocessor_count() {
  // Queried once per device: cudaDeviceGetAttribute is cheap but not free on every op call.
  static std::once_flag once;
  static std::unique_ptr<std::atomic<int>[]> counts;
  std::call_once(once, [] { counts.reset(new std::atomic<int>[c10::cuda::device_count()]()); });
  const int dev = c10::cuda::current_device();
  int n = counts[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    counts[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}
#endif

// A kernel and its source name; the emulator records the name of every launch (coverage test).
template <typename Kernel>
struct KernelRef {
  Kernel fn;
  const char* name;
};

// BNEXT_KERNEL(reduce_nchw_kernel, R, index_t): the instantiation and its name.
#define BNEXT_KERNEL(kernel, ...) \
  (::bnext::cuda::KernelRef<decltype(&kernel<__VA_ARGS__>)>{&kernel<__VA_ARGS__>, #kernel})

// Every bnext kernel launch goes through here; under nvcc every launch is checked.
template <typename... KArgs, typename... Args>
void launch(
    KernelRef<void (*)(KArgs...)> k,
    dim3 grid,
    dim3 block,
    size_t shared_bytes,
    Stream stream,
    Args... args) {
#ifdef BNEXT_SIMT
  simt::launch(k.name, k.fn, grid, block, shared_bytes, args...);
#else
  k.fn<<<grid, block, shared_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace cuda
}  // namespace bnext
