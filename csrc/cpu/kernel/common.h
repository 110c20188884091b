// Tuning constants, accumulation types and small helpers that every part of the CPU kernels uses
// (part of batch_norm_kernel.h: see the map there).

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/common.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// NCHW statistics are taken over fixed blocks of this many values of one channel (whole runs
// grouped when HxW is small, a run cut into pieces when it is large): 16 KiB of float32, so the
// second pass of the block (squared deviations) reads L1.
constexpr int64_t kBlock = 4096;
// Channels-last reductions give each chunk of about this many values its own per-channel
// partials (second pass from L2: 256 KiB of float32), merged in chunk order. Every chunk costs a
// fold and a merge of C partials, so chunks are large enough for that to stay a small part of the
// statistics' time (a quarter of this size was measurably slower, twice it no faster: see
// docs/performance.md#chunk-size).
constexpr int64_t kChunkValues = 65536;
// ... but a chunk has at least this many super-rows, so that the per-chunk work on C partials
// (fold, merge) stays small next to the chunk's rows when C is large (2048: 32 rows, 256 KiB).
constexpr int64_t kMinChunkRows = 32;
// Channels-last rows are processed as "super-rows" of k whole rows, k * C >= kMinLanes, so that a
// small C (3, 17, ...) still fills vector registers.
constexpr int64_t kMinLanes = 64;
// Channels-last rows (super-rows) of at least this many values are walked one row at a time, in
// memory order, by every row pass (see row_group and rows_wide_by4).
constexpr int64_t kWideRow = 256;
// Below AVX-512 a 4-vector column block is narrower than 64 values, so rows of 64 or 128 values
// (C = 64 or 128, or super-rows of smaller C) take two or more column blocks, each striding
// down the chunk's rows: where the tensor comes from memory (at least kWideBytes) those rows go
// in memory order too. Inputs that stay in cache were slower that way and keep column blocks
// (see docs/performance.md#wide-rows).
constexpr int64_t kWideBytes = int64_t(2) << 20;
// Work per task below which at::parallel_for keeps a range on one thread.
constexpr int64_t kGrainElems = 32768;

template <typename acc_t>
using Welford = WelfordData<acc_t, int64_t>;
// Block and chunk partials are merged in double: with float merges every Chan step rounds the
// running mean, and a float32 running sum stops growing at 2**24 ones.
using merge_t = double;

// f(std::true_type) or f(std::false_type): a choice (streaming, centering) as a compile-time
// constant.
template <typename F>
inline void with_constant(bool flag, const F& f) {
  if (flag) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

// A heap array that is not a shared template instantiation (see the header comment on ODR).
template <typename T>
struct Buffer {
  // Zeroed, or left uninitialized with kUninit (for arrays every element of which is written
  // before it is read: zeroing the per-chunk partials of a wide channels-last input cost a few
  // percent of its statistics, see docs/performance.md#chunk-finishing).
  struct Uninit {};
  static constexpr Uninit kUninit{};
  explicit Buffer(int64_t n) : p(new T[n > 0 ? n : 1]()) {}
  Buffer(int64_t n, Uninit) : p(new T[n > 0 ? n : 1]) {}
  ~Buffer() {
    delete[] p;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* p;
};

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
