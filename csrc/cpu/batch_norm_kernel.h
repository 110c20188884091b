// CPU loops of every bnext op, templated on the input type. The entries in batch_norm_cpu.cpp
// check arguments, pick the memory format and allocate; everything here only reads and writes
// raw pointers of tensors that are contiguous in that format.
//
// This header is compiled once per instruction set (kernels_baseline.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp, kernels_avx512bf16.cpp). Each of those includes kernel_deps.h first, then
// switches the target ISA with `#pragma GCC target`, then includes this file inside the namespace
// BNEXT_CPU_ISA_NS. So every function defined here exists once per ISA under its own name, and
// shared inline/template code (ATen, c10, libstdc++) keeps the baseline ISA: the linker can never
// hand an AVX-512 copy of a shared inline function to a baseline caller.
//
// Determinism: every reduction is split into pieces whose boundaries depend only on the shape
// (fixed blocks of a channel in NCHW, fixed chunks of rows in channels-last), never on the thread
// count, and the pieces are merged in a fixed order. Results are therefore bitwise identical for
// any torch.set_num_threads value and from run to run (for a given ISA variant: vector width
// changes the summation order inside a block).
//
// Memory traffic (what makes batch norm fast): statistics are taken per block with two passes,
// the second one over data still in L1 (16-bit inputs: one pass); the NCHW training
// forward/backward finish a group of channels (one of long planes, up to 16 of short ones:
// statistics, then normalize) while it is still in L2; per-channel coefficients are computed once
// (normalize() and backward_elemt() of math.h); no full-size temporary is ever allocated.
#ifndef BNEXT_CPU_ISA_NS
#error "batch_norm_kernel.h is compiled through csrc/cpu/kernels_<isa>.cpp, which names BNEXT_CPU_ISA_NS"
#endif

#include "kernel_deps.h"

#ifndef BNEXT_CPU_BF16
#define BNEXT_CPU_BF16 0  // 1: the ISA has AVX512-BF16 (kernels_avx512bf16.cpp)
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
// fold and a merge of C partials: chunks of 16384 values (32 rows of C = 512) spent a tenth of
// the statistics' time there; measured with two threads, (32, 512, 14, 14) channels_last float32
// statistics 544 -> 356 us, bfloat16 359 -> 216 us (131072 values per chunk: the same).
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
// in memory order too. Measured with two threads on an AMD EPYC (Zen 3) VM, AVX2, channels_last,
// in one process: (32, 64, 56, 56) bfloat16 forward+backward 10.4 -> 6.4 ms, float32 14.2 ->
// 11.3 ms; (32, 128, 28, 28) float32 forward 2.43 -> 1.42 ms, bfloat16 eval 1.45 -> 0.79 ms;
// (2, 64, 16, 56, 56) bfloat16 forward 3.87 -> 2.33 ms. Inputs below 1 MiB were 5-25% slower
// that way ((16, 64, 16, 16), (8, 128, 14, 14), (4, 32, 8, 28, 28)): they keep column blocks.
constexpr int64_t kWideBytes = int64_t(2) << 20;
// Work per task below which at::parallel_for keeps a range on one thread.
constexpr int64_t kGrainElems = 32768;

template <typename acc_t>
using Welford = WelfordData<acc_t, int64_t>;
// Block and chunk partials are merged in double: with float merges every Chan step rounds the
// running mean, and a float32 running sum stops growing at 2**24 ones.
using merge_t = double;

// ---------------------------------------------------------------------------------------------
// Scalar loads and stores in the accumulation type. bfloat16 goes through its bits so that the
// loops vectorize (round to nearest even and quiet NaN on the way back, exactly as c10 does).
template <typename scalar_t, typename acc_t>
inline acc_t load(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    return __builtin_bit_cast(float, u);
  } else {
    return static_cast<acc_t>(p[i]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, int64_t i, acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    reinterpret_cast<uint16_t*>(p)[i] = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
  } else {
    p[i] = static_cast<scalar_t>(v);
  }
}

// Vectors of the ISA's native width (GCC/Clang vector extensions): one zmm under AVX-512, one ymm
// under AVX2, one xmm on the baseline (SSE2, NEON), so the same source serves every ISA. (Wider
// vectors than the ISA has are split by GCC, but it builds their splats lane by lane on the stack,
// copies them to memory through the stack and compares and shuffles them one lane at a time:
// with 64-byte vectors under AVX2 on an EPYC, float32 (32, 2048, 7, 7) eval took 1.9 ms and
// bfloat16 (32, 64, 56, 56) eval 8.5 ms, against torch's 0.4 and 0.5 ms.)
#if BNEXT_CPU_ISA_LEVEL >= 2
constexpr int64_t kNativeBytes = 64;
#elif BNEXT_CPU_ISA_LEVEL == 1
constexpr int64_t kNativeBytes = 32;
#else
constexpr int64_t kNativeBytes = 16;
#endif
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kNativeBytes)));
  static constexpr int64_t W = kNativeBytes / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kNativeBytes)));
  static constexpr int64_t W = kNativeBytes / 8;
};

template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type vload(const scalar_t* p) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    // Each value into the high half of a 32-bit lane.
#if BNEXT_CPU_ISA_LEVEL >= 2
    // One word shuffle against zero (GCC turns the equivalent zero-extend-and-shift into two
    // half-width extends and an insert).
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint16_t u16x32 __attribute__((vector_size(64)));
    u16x16 h;
    std::memcpy(&h, p, sizeof(h));
    const u16x16 z = {};
    const u16x32 w = __builtin_shufflevector(
        z, h, 0, 16, 0, 17, 0, 18, 0, 19, 0, 20, 0, 21, 0, 22, 0, 23, 0, 24, 0, 25, 0, 26, 0, 27, 0, 28, 0, 29, 0, 30,
        0, 31);
#elif BNEXT_CPU_ISA_LEVEL == 1
    // One vpmovzxwd from memory and one vpslld.
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    typedef uint16_t u16x4 __attribute__((vector_size(8)));
    typedef uint32_t u32x4 __attribute__((vector_size(16)));
    u16x4 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x4 w = __builtin_convertvector(h, u32x4) << 16;
#endif
    std::memcpy(&v, &w, sizeof(v));
  } else {
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
      v[j] = static_cast<acc_t>(p[j]);
    }
  }
  return v;
}

// Streaming (non-temporal) stores: an output larger than the last-level cache is written
// without first reading its lines into the cache (a normal store reads each line it fills),
// which cuts the traffic of an elementwise pass from three tensor passes to two. Measured with
// a 25 MiB float32 output on this kind of machine: 1.08 ms streamed against 1.75 ms stored.
// NB bytes from a register-sized value to p, which must be NB-byte aligned.
template <int NB>
inline void stream_bytes(void* p, const void* v) {
#if defined(__x86_64__)
#if BNEXT_CPU_ISA_LEVEL >= 2
  if constexpr (NB % 64 == 0) {
    for (int o = 0; o < NB; o += 64) {
      _mm512_stream_si512(
          reinterpret_cast<__m512i*>(static_cast<char*>(p) + o), _mm512_loadu_si512(static_cast<const char*>(v) + o));
    }
    return;
  }
#endif
#if BNEXT_CPU_ISA_LEVEL >= 1
  if constexpr (NB % 32 == 0) {
    for (int o = 0; o < NB; o += 32) {
      _mm256_stream_si256(
          reinterpret_cast<__m256i*>(static_cast<char*>(p) + o),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const char*>(v) + o)));
    }
    return;
  }
#endif
  static_assert(NB % 16 == 0, "stream_bytes: NB must be a multiple of 16");
  for (int o = 0; o < NB; o += 16) {
    _mm_stream_si128(
        reinterpret_cast<__m128i*>(static_cast<char*>(p) + o),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(v) + o)));
  }
#else
  std::memcpy(p, v, NB);
#endif
}

// Orders a task's streaming stores before whatever runs after it (the join of parallel_for).
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Streamed outputs start at a 64-byte boundary: one vector of float/double, a pair of vectors
// of a 16-bit type (vstore2), so every streamed vector or pair is aligned to its own size.
constexpr int64_t kStreamAlign = 64;

// Only whole 64-byte lines are ever streamed: a streaming store of part of a line (one 32-byte
// vector of a 16-bit type) next to ordinary stores into the rest of that line measured 8x slower
// than not streaming at all ((32, 1024, 14, 14) bfloat16). Single vectors of 16-bit types are
// therefore stored normally; their pairs (vstore2) stream.
template <typename scalar_t, typename acc_t>
constexpr bool kVecIsLine = Vec<acc_t>::W * sizeof(scalar_t) == kStreamAlign;

template <typename scalar_t>
inline bool store_aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % kStreamAlign == 0;
}

template <bool NT, int NB, typename T>
inline void put(void* p, const T& v) {
  static_assert(sizeof(T) == NB, "put: size mismatch");
  if constexpr (NT) {
    stream_bytes<NB>(p, &v);
  } else {
    std::memcpy(p, &v, NB);
  }
}

#if BNEXT_CPU_ISA_LEVEL >= 2
// bfloat16 of each float lane, in the lane's high 16 bits: round to nearest even exactly as c10
// does, NaN -> 0x7FC0 (the low 16 bits are garbage).
typedef uint16_t bnext_u16x16 __attribute__((vector_size(32)));
typedef uint16_t bnext_u16x32 __attribute__((vector_size(64)));
inline bnext_u16x32 bf16_in_high_halves(typename Vec<float>::type v) {
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  u32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  const i32x16 nan = v != v;
  const u32x16 r = nan ? u32x16{} + 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
  bnext_u16x32 h;
  std::memcpy(&h, &r, sizeof(h));
  return h;
}

// With AVX512-BF16 (the avx512bf16 variant) vcvtneps2bf16 rounds 16 floats in one instruction,
// to the same bits as c10 except in two kinds of lanes: NaN (c10: 0x7FC0; the instruction keeps
// the payload) and denormals (the instruction flushes them to zero). A vector with any such lane
// takes the exact shift-and-add rounding instead. Measured with two threads, bfloat16 NCHW,
// avx512 -> avx512bf16 in one process: (32, 512, 7, 7) normalize 98 -> 87 us, eval 93 -> 83 us;
// (32, 256, 14, 14) forward 241 -> 194 us; (32, 64, 56, 56) backward 1053 -> 982 us (passes that
// read and write main memory gain little).
#if BNEXT_CPU_BF16
inline bool bf16_exact_lanes(typename Vec<float>::type v, __mmask16 lanes = 0xFFFF) {
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  constexpr int kNaN = 0x01 | 0x80, kDenormal = 0x20;  // vfpclassps: QNaN, SNaN, denormal
  return (_mm512_fpclass_ps_mask(r, kNaN | kDenormal) & lanes) == 0;
}
#endif

// The 16 bfloat16 values of v (lanes >= n of v may be anything; n = 16 for a whole vector).
inline bnext_u16x16 bf16_round(typename Vec<float>::type v, [[maybe_unused]] int64_t n = 16) {
#if BNEXT_CPU_BF16
  if (__builtin_expect(bf16_exact_lanes(v, static_cast<__mmask16>((1u << n) - 1u)), 1)) {
    __m512 r;
    std::memcpy(&r, &v, sizeof(r));
    const __m256bh h = _mm512_cvtneps_pbh(r);
    bnext_u16x16 out;
    std::memcpy(&out, &h, sizeof(out));
    return out;
  }
#endif
  const bnext_u16x32 w = bf16_in_high_halves(v);
  return __builtin_shufflevector(w, w, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The 32 bfloat16 values of a, then b.
inline bnext_u16x32 bf16_round2(typename Vec<float>::type a, typename Vec<float>::type b) {
#if BNEXT_CPU_BF16
  if (__builtin_expect(bf16_exact_lanes(a) && bf16_exact_lanes(b), 1)) {
    __m512 ra, rb;
    std::memcpy(&ra, &a, sizeof(ra));
    std::memcpy(&rb, &b, sizeof(rb));
    const __m512bh h = _mm512_cvtne2ps_pbh(rb, ra);  // b's values in the high half
    bnext_u16x32 out;
    std::memcpy(&out, &h, sizeof(out));
    return out;
  }
#endif
  const bnext_u16x32 ha = bf16_in_high_halves(a), hb = bf16_in_high_halves(b);
  return __builtin_shufflevector(
      ha, hb, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53,
      55, 57, 59, 61, 63);
}

#else
// Below AVX-512 (W = 8 or 4 floats): the bfloat16 bits of each lane, rounded to nearest even
// exactly as c10 does, NaN -> 0x7FC0, narrowed by one conversion (vpackusdw under AVX2).
typedef uint16_t bnext_bf16xW __attribute__((vector_size(Vec<float>::W * 2)));
typedef uint32_t bnext_u32xW __attribute__((vector_size(kNativeBytes)));
// The bits in the low half of each 32-bit lane.
inline bnext_u32xW bf16_bits(typename Vec<float>::type v) {
  typedef int32_t i32xW __attribute__((vector_size(kNativeBytes)));
  bnext_u32xW u;
  std::memcpy(&u, &v, sizeof(u));
  const i32xW nan = v != v;
  return nan ? bnext_u32xW{} + 0x7FC0u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
inline bnext_bf16xW bf16_round(typename Vec<float>::type v) {
  return __builtin_convertvector(bf16_bits(v), bnext_bf16xW);
}
// The 2 W bfloat16 values of a, then b.
#if BNEXT_CPU_ISA_LEVEL == 1
// One pack (per 128-bit half) and one permute for both vectors.
inline __m256i bf16_round2(typename Vec<float>::type a, typename Vec<float>::type b) {
  const bnext_u32xW ra = bf16_bits(a), rb = bf16_bits(b);
  __m256i ia, ib;
  std::memcpy(&ia, &ra, sizeof(ia));
  std::memcpy(&ib, &rb, sizeof(ib));
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(ia, ib), 0xD8);
}
#else
// One 16-byte vector, as streaming stores need.
typedef uint16_t bnext_u16x8 __attribute__((vector_size(16)));
inline bnext_u16x8 bf16_round2(typename Vec<float>::type a, typename Vec<float>::type b) {
  return __builtin_shufflevector(bf16_round(a), bf16_round(b), 0, 1, 2, 3, 4, 5, 6, 7);
}
#endif
#endif

template <typename scalar_t, typename acc_t, bool NT = false>
inline void vstore(scalar_t* p, typename Vec<acc_t>::type v) {
  constexpr int NB = static_cast<int>(Vec<acc_t>::W * sizeof(scalar_t));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    put<NT, NB>(p, v);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    put<NT, NB>(p, bf16_round(v));
  } else if constexpr (NT) {
    struct alignas(16) Values {
      scalar_t v[Vec<acc_t>::W];
    } out;
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
      out.v[j] = static_cast<scalar_t>(v[j]);
    }
    put<NT, NB>(p, out);
  } else {
    for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
      p[j] = static_cast<scalar_t>(v[j]);
    }
  }
}

// Two adjacent vectors (2 W values). For bfloat16 the pair rounds back with one shuffle picking
// the high halves of both vectors (measured on (32, 64, 56, 56) bfloat16, one thread: the
// affine pass 0.94 ms singly, 0.72 ms in pairs; bitwise the same values).
template <typename scalar_t, typename acc_t>
inline void vload2(const scalar_t* p, typename Vec<acc_t>::type& a, typename Vec<acc_t>::type& b) {
  a = vload<scalar_t, acc_t>(p);
  b = vload<scalar_t, acc_t>(p + Vec<acc_t>::W);
}

template <typename scalar_t, typename acc_t, bool NT = false>
inline void vstore2(scalar_t* p, typename Vec<acc_t>::type a, typename Vec<acc_t>::type b) {
  constexpr int64_t W = Vec<acc_t>::W;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    put<NT, 4 * W>(p, bf16_round2(a, b));
  } else if constexpr (NT && !std::is_same_v<scalar_t, acc_t> && W * sizeof(scalar_t) < 16) {
    // (float16 on the baseline: the pair is the smallest streaming store, 16 bytes.)
    struct alignas(16) Values {
      scalar_t v[2 * W];
    } out;
    for (int64_t j = 0; j < W; ++j) {
      out.v[j] = static_cast<scalar_t>(a[j]);
      out.v[W + j] = static_cast<scalar_t>(b[j]);
    }
    put<NT, 2 * W * sizeof(scalar_t)>(p, out);
  } else {
    vstore<scalar_t, acc_t, NT>(p, a);
    vstore<scalar_t, acc_t, NT>(p + W, b);
  }
}

// The tail of a run (n < W values) as one masked vector load and store where the ISA has them
// (AVX-512; float and bfloat16 values in float vectors): a run of 7x7 or 14x14 values ends in 1
// or 4 of them, which one at a time (a bfloat16 store is a dozen scalar instructions) cost as
// much as the run's vectors. Masked-off lanes load as zero; the reductions zero their terms.
#if BNEXT_CPU_ISA_LEVEL >= 2
template <typename scalar_t, typename acc_t>
constexpr bool kMaskedTails =
    std::is_same_v<acc_t, float> && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>);

inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>((1u << n) - 1u);
}

template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type vload_part(const scalar_t* p, int64_t n) {
  static_assert(kMaskedTails<scalar_t, acc_t>);
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512 r = _mm512_maskz_loadu_ps(tail_mask(n), p);
    std::memcpy(&v, &r, sizeof(v));
  } else {
    // (Vector-extension widening: the _mm512 conversion intrinsics warn under GCC 12.)
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    const __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
    u16x16 hv;
    std::memcpy(&hv, &h, sizeof(hv));
    const u32x16 r = __builtin_convertvector(hv, u32x16) << 16;
    std::memcpy(&v, &r, sizeof(v));
  }
  return v;
}

template <typename scalar_t, typename acc_t>
inline void vstore_part(scalar_t* p, typename Vec<acc_t>::type v, int64_t n) {
  static_assert(kMaskedTails<scalar_t, acc_t>);
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m512 r;
    std::memcpy(&r, &v, sizeof(r));
    _mm512_mask_storeu_ps(p, tail_mask(n), r);
  } else {
    const bnext_u16x16 h = bf16_round(v, n);
    __m256i r;
    std::memcpy(&r, &h, sizeof(r));
    _mm256_mask_storeu_epi16(p, tail_mask(n), r);
  }
}

// Lanes [0, n) of v, zero elsewhere.
template <typename acc_t>
inline typename Vec<acc_t>::type first_lanes(typename Vec<acc_t>::type v, int64_t n) {
  using vec = typename Vec<acc_t>::type;
  vec lane;
  for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
    lane[j] = static_cast<acc_t>(j);
  }
  return lane < static_cast<acc_t>(n) ? v : vec{};
}
#else
template <typename scalar_t, typename acc_t>
constexpr bool kMaskedTails = false;
#endif

template <typename acc_t>
inline acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
    s += v[j];
  }
  return s;
}

// Statistics are taken of x - pivot, with a per-channel pivot taken from the data (the channel's
// first value): with a large offset and a small spread (mean 1e4, std 1e-2 in float32) means of
// raw values lose their low digits, shifted ones do not. Every term is scaled by 1/count before
// it is summed, so values near the float limit cannot overflow a block's mean.

// ---------------------------------------------------------------------------------------------
// Contiguous segments of one channel (NCHW). A block of a channel is several segments (runs); the
// vector accumulators carry over from one segment to the next and are reduced once per block, so
// short runs (7x7, 14x14) cost no horizontal sum each. Four accumulators hide add latency.
template <typename acc_t>
struct VecSum {
  using vec = typename Vec<acc_t>::type;
  vec a0 = {}, a1 = {}, a2 = {}, a3 = {};
  acc_t tail = 0;
  acc_t total() const {
    return hsum<acc_t>((a0 + a1) + (a2 + a3)) + tail;
  }
  // Accumulator K (0-3) of the four chains.
  template <int K>
  vec& at() {
    static_assert(K >= 0 && K < 4);
    if constexpr (K == 0) {
      return a0;
    } else if constexpr (K == 1) {
      return a1;
    } else if constexpr (K == 2) {
      return a2;
    } else {
      return a3;
    }
  }
};

template <int K>
using Slot = std::integral_constant<int, K>;

// Walks one segment of a run for the reductions: vadd(Slot<k>, v) for each whole vector v, k
// (0-3, one accumulator chain each) fixed by the vector's place in the run; vtail(v, n) for the
// last n < W values as one masked vector where the ISA has them (lanes >= n load as zero; vtail
// zeroes its terms there), else sadd(x) for each of them.
template <typename scalar_t, typename acc_t, typename VecAdd, typename TailAdd, typename ScalarAdd>
inline void seg_walk(const scalar_t* p, int64_t len, const VecAdd& vadd, const TailAdd& vtail, const ScalarAdd& sadd) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    typename Vec<acc_t>::type v0, v1, v2, v3;
    vload2<scalar_t, acc_t>(p + i, v0, v1);
    vload2<scalar_t, acc_t>(p + i + 2 * W, v2, v3);
    vadd(Slot<0>(), v0);
    vadd(Slot<1>(), v1);
    vadd(Slot<2>(), v2);
    vadd(Slot<3>(), v3);
  }
  // The last (up to three) vectors of a run into different accumulators: runs of 7x7 or 14x14
  // values end with two or three, and one accumulator made them a chain of dependent adds.
  if (i + 2 * W <= len) {
    vadd(Slot<0>(), vload<scalar_t, acc_t>(p + i));
    vadd(Slot<1>(), vload<scalar_t, acc_t>(p + i + W));
    i += 2 * W;
  }
  if (i + W <= len) {
    vadd(Slot<2>(), vload<scalar_t, acc_t>(p + i));
    i += W;
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      vtail(vload_part<scalar_t, acc_t>(p + i, len - i), len - i);
    }
  } else {
    for (; i < len; ++i) {
      sadd(load<scalar_t, acc_t>(p, i));
    }
  }
}

// Adds term(x) of every value of a segment into s.
template <typename scalar_t, typename acc_t, typename VecTerm, typename Term>
inline void seg_accumulate(const scalar_t* p, int64_t len, VecSum<acc_t>& s, const VecTerm& vterm, const Term& term) {
  using vec = typename Vec<acc_t>::type;
  seg_walk<scalar_t, acc_t>(
      p, len, [&](auto k, vec v) { s.template at<k.value>() += vterm(v); },
      [&](auto v, int64_t n) { s.a3 += first_lanes<acc_t>(vterm(v), n); }, [&](acc_t v) { s.tail += term(v); });
}

// Sum of (x - pivot) * inv_count.
template <typename scalar_t, typename acc_t>
inline void seg_mean(const scalar_t* p, int64_t len, acc_t pivot, acc_t inv_count, VecSum<acc_t>& s) {
  using vec = typename Vec<acc_t>::type;
  const vec pv = vec{} + pivot, iv = vec{} + inv_count;
  seg_accumulate<scalar_t, acc_t>(
      p, len, s, [&](vec v) { return (v - pv) * iv; }, [&](acc_t v) { return (v - pivot) * inv_count; });
}

// Sums of d = x - center into s1 and of d * d into s2 (the second pass of two-pass statistics,
// see two_pass_welford).
template <typename scalar_t, typename acc_t>
inline void seg_m2(const scalar_t* p, int64_t len, acc_t center, VecSum<acc_t>& sum1, VecSum<acc_t>& sum2) {
  using vec = typename Vec<acc_t>::type;
  const vec cv = vec{} + center;
  // Local copies: the caller's sums could alias p as far as the compiler knows (float vectors and
  // float values), which kept them in memory, stored and reloaded around every load of p.
  VecSum<acc_t> s1 = sum1, s2 = sum2;
  seg_walk<scalar_t, acc_t>(
      p, len,
      [&](auto k, vec v) {
        const vec d = v - cv;
        s1.template at<k.value>() += d;
        s2.template at<k.value>() += d * d;
      },
      [&](auto v, int64_t n) {  // generic: instantiated only where masked tails exist
        const vec d = first_lanes<acc_t>(v - cv, n);
        s1.a3 += d;
        s2.a3 += d * d;
      },
      [&](acc_t v) {
        const acc_t d = v - center;
        s1.tail += d;
        s2.tail += d * d;
      });
  sum1 = s1;
  sum2 = s2;
}

// Mean and M2 of `count` values of x - pivot from two passes: the first pass's mean, then sums of
// d = x - center and of d * d, center = pivot + mean rounded once (the second pass then costs what
// it cost without the sum of d: one subtraction a value, not two). The corrected two-pass
// algorithm (Chan, Golub and LeVeque, 1983): sum(d) is what the first pass's float accumulation
// left out of its mean (its terms carry the data's offset from the pivot, and the rounding of a
// chain of them grows with it) and what rounding the center lost, and it is small, so
// (center - pivot) + sum(d) / count is accurate to a rounding of the spread, not of the offset.
// NCHW float32 means came out several ulps off without it, where torch's (summed in double) are
// correctly rounded, and the backward carries the mean's error into dx (a constant dy gives
// dx = -a * (x - mean) * k, k proportional to the error). M2 = sum(d^2) - sum(d)^2 / count. Where
// the center or sum(d) is not finite (Inf or NaN in x, or a center rounded past the largest
// float) the first pass's mean is kept, so Inf and NaN come out as they came out of it.
template <typename acc_t>
inline Welford<merge_t> two_pass_welford(
    acc_t pivot, acc_t mean, acc_t center, acc_t sum_d, acc_t sum_d2, int64_t count) {
  const merge_t r = count > 0 ? static_cast<merge_t>(sum_d) / static_cast<merge_t>(count) : merge_t(0);
  if (!(center - center == acc_t(0) && r - r == merge_t(0))) {
    return {static_cast<merge_t>(mean), static_cast<merge_t>(sum_d2), count};
  }
  const merge_t m2 = static_cast<merge_t>(sum_d2) - static_cast<merge_t>(sum_d) * r;
  return {(static_cast<merge_t>(center) - static_cast<merge_t>(pivot)) + r, m2 < 0 ? merge_t(0) : m2, count};
}

// 16-bit inputs (bfloat16, float16) take their statistics in ONE pass of shifted sums,
// sum(x - pivot) and sum((x - pivot)^2), where wider types take two (mean, then squared
// deviations from L1). The second pass cost as much as the first: the conversion of every value
// to float made both compute-bound ((32, 256, 28, 28) bfloat16, two threads: statistics 570 us
// against 316 us for x.sum(); one pass: 411 us). It is accurate enough here: a 16-bit value has
// 8 or 11 significant bits, so x - pivot and its square lose at most the last bits of a float,
// and the main error is the float accumulation of the sums (a block, or a chunk's rows), which
// M2 = sum2 - sum1 * mean (taken in double) scales by sum2 / M2 = 1 + (mean - pivot)^2 / var,
// near 1 with the pivot used here (the mean of the channel's first values, see nchw_pivot). Checked
// by tests/test_cpu_kernels.py to 1e-4 of the variance with a first value 30 deviations out.
template <typename scalar_t>
constexpr bool kOnePassStats = sizeof(scalar_t) == 2;

// Sums of d = x - pivot into s1 and of d * d into s2, over one segment.
template <typename scalar_t, typename acc_t>
inline void seg_moments(const scalar_t* p, int64_t len, acc_t pivot, VecSum<acc_t>& s1, VecSum<acc_t>& s2) {
  using vec = typename Vec<acc_t>::type;
  const vec pv = vec{} + pivot;
  seg_walk<scalar_t, acc_t>(
      p, len,
      [&](auto k, vec v) {
        const vec d = v - pv;
        s1.template at<k.value>() += d;
        s2.template at<k.value>() += d * d;
      },
      [&](auto v, int64_t n) {  // generic: instantiated only where masked tails exist
        const vec d = first_lanes<acc_t>(v - pv, n);
        s1.a3 += d;
        s2.a3 += d * d;
      },
      [&](acc_t v) {
        const acc_t d = v - pivot;
        s1.tail += d;
        s2.tail += d * d;
      });
}

// Mean and M2 of `count` values of x - pivot from their sum and sum of squares.
template <typename acc_t>
inline Welford<merge_t> moments_to_welford(acc_t sum1, acc_t sum2, int64_t count) {
  if (count == 0) {
    return {0, 0, 0};
  }
  const merge_t mean = static_cast<merge_t>(sum1) / static_cast<merge_t>(count);
  const merge_t m2 = static_cast<merge_t>(sum2) - static_cast<merge_t>(sum1) * mean;
  return {mean, m2 < 0 ? merge_t(0) : m2, count};  // NaN stays NaN
}

// The pivot of channel c: its first value, or for one-pass statistics the mean of its first
// (up to) kPivotValues values, so that one value far out in the channel's tail cannot make
// sum2 / M2 large (a first value 30 deviations out cost bfloat16 statistics of 16384 rows per
// lane 0.4% of their variance; a mean of 32 values moves about 1/32 as far).
constexpr int64_t kPivotValues = 32;

template <typename scalar_t, typename acc_t>
inline acc_t nchw_pivot(const scalar_t* x, const Layout& l, int64_t c) {
  if (l.N == 0 || l.HxW == 0) {
    return acc_t(0);
  }
  if constexpr (!kOnePassStats<scalar_t>) {
    return load<scalar_t, acc_t>(x, c * l.HxW);
  } else {
    acc_t sum = 0;
    int64_t count = 0;
    for (int64_t n = 0; n < l.N && count < kPivotValues; ++n) {
      const scalar_t* run = x + (n * l.C + c) * l.HxW;
      for (int64_t i = 0; i < l.HxW && count < kPivotValues; ++i, ++count) {
        sum += load<scalar_t, acc_t>(run, i);
      }
    }
    return sum / static_cast<acc_t>(count);
  }
}

// The same for every channel of R rows of C values (channels-last): the first row, or the mean of
// the first (up to) kPivotValues rows.
template <typename scalar_t, typename acc_t>
inline void rows_pivots(const scalar_t* x, int64_t R, int64_t C, acc_t* pivot) {
  const int64_t rows = R == 0 ? 0 : (kOnePassStats<scalar_t> ? std::min(R, kPivotValues) : 1);
  for (int64_t c = 0; c < C; ++c) {
    pivot[c] = 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] += load<scalar_t, acc_t>(x, r * C + c);
    }
  }
  if (rows > 1) {
    for (int64_t c = 0; c < C; ++c) {
      pivot[c] /= static_cast<acc_t>(rows);
    }
  }
}

// The backward reductions sum dy in merge_t (dy * (x - mean) in acc_t, as the statistics): where
// dy is constant over a channel (a loss through global pooling) sum_dy is then exactly M * dy and
// mean_dy = sum_dy / M is dy itself, as backward_elemt() needs to cancel dy - mean_dy. Summed in
// float, M equal values come out rounded (the partial sums k * dy need more than 24 bits), and that
// rounding stayed in every dx. (Shifting dy by a pivot first, as the statistics shift x, also makes
// a constant dy exact, but terms with a common offset grow a float chain's rounding: with the
// mean of a channel's first 256 dy as pivot, sum_dy of zero-mean random dy, grad_bias, came out
// several times less accurate than unshifted.) A vector of float dy goes into two vectors of merge_t
// (wide_add; where acc_t is merge_t already, into the first), mostly as the sum of four vectors
// taken in acc_t as ((g0 + g1) + (g2 + g3)): a constant dy still sums exactly there (every step
// doubles), and the conversions are paid once per four vectors.
using WideVec = typename Vec<merge_t>::type;

// (The conversions are intrinsics: GCC 12 made __builtin_convertvector of a half vector into
// conversions of two or four values each, put together with shuffles or through the stack. The
// AVX-512 ones are the zero-masking forms: the plain ones warn under GCC 12, as in vload_part.)
template <typename acc_t>
inline void wide_add(WideVec& lo, WideVec& hi, typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<acc_t, merge_t>) {
    lo += v;
  } else {
    static_assert(std::is_same_v<acc_t, float>);
    WideVec l, h;
#if defined(__x86_64__) && BNEXT_CPU_ISA_LEVEL >= 2
    __m512 r;
    std::memcpy(&r, &v, sizeof(r));
    // (_mm512_castps512_ps256 is the plain extract in GCC 12: the masked extract of half 0.)
    const __m512d cl =
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(r), 0)));
    const __m512d ch =
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, _mm512_castps_pd(r), 1)));
#elif defined(__x86_64__) && BNEXT_CPU_ISA_LEVEL == 1
    __m256 r;
    std::memcpy(&r, &v, sizeof(r));
    const __m256d cl = _mm256_cvtps_pd(_mm256_castps256_ps128(r));
    const __m256d ch = _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1));
#elif defined(__x86_64__) && BNEXT_CPU_ISA_LEVEL == 0
    __m128 r;
    std::memcpy(&r, &v, sizeof(r));
    const __m128d cl = _mm_cvtps_pd(r);
    const __m128d ch = _mm_cvtps_pd(_mm_movehl_ps(r, r));
#else
    typedef acc_t half __attribute__((vector_size(kNativeBytes / 2)));
    half hl, hh;
    std::memcpy(&hl, &v, sizeof(hl));
    std::memcpy(&hh, reinterpret_cast<const char*>(&v) + sizeof(hl), sizeof(hh));
    const WideVec cl = __builtin_convertvector(hl, WideVec), ch = __builtin_convertvector(hh, WideVec);
#endif
    std::memcpy(&l, &cl, sizeof(l));
    std::memcpy(&h, &ch, sizeof(h));
    lo += l;
    hi += h;
  }
}

// sum(dy) into a, sum(dy * (x - mean)) into b, over one segment.
template <typename scalar_t, typename acc_t>
inline void seg_reduce(
    const scalar_t* dy, const scalar_t* x, int64_t len, acc_t mean, VecSum<merge_t>& sum_a, VecSum<acc_t>& sum_b) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec m = vec{} + mean;
  VecSum<merge_t> a = sum_a;  // local copies, as in seg_m2
  VecSum<acc_t> b = sum_b;
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    vec g0, g1, g2, g3, x0, x1, x2, x3;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(dy + i + 2 * W, g2, g3);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    vload2<scalar_t, acc_t>(x + i + 2 * W, x2, x3);
    wide_add<acc_t>(a.a0, a.a1, (g0 + g1) + (g2 + g3));
    b.a0 += g0 * (x0 - m);
    b.a1 += g1 * (x1 - m);
    b.a2 += g2 * (x2 - m);
    b.a3 += g3 * (x3 - m);
  }
  if (i + 2 * W <= len) {
    vec g0, g1, x0, x1;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    wide_add<acc_t>(a.a2, a.a3, g0 + g1);
    b.a0 += g0 * (x0 - m);
    b.a1 += g1 * (x1 - m);
    i += 2 * W;
  }
  if (i + W <= len) {
    const vec g = vload<scalar_t, acc_t>(dy + i);
    wide_add<acc_t>(a.a2, a.a3, g);
    b.a2 += g * (vload<scalar_t, acc_t>(x + i) - m);
    i += W;
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      const vec g = vload_part<scalar_t, acc_t>(dy + i, len - i);  // zero past len
      wide_add<acc_t>(a.a2, a.a3, g);
      b.a3 += first_lanes<acc_t>(g * (vload_part<scalar_t, acc_t>(x + i, len - i) - m), len - i);
    }
  } else {
    for (; i < len; ++i) {
      const acc_t g = load<scalar_t, acc_t>(dy, i);
      a.tail += g;
      b.tail += g * (load<scalar_t, acc_t>(x, i) - mean);
    }
  }
  sum_a = a;
  sum_b = b;
}

// y = (x - pivot) * scale + shift (normalize() of math.h) over one segment of one channel.
// With NT, the values before y's first store-aligned address are stored one by one and the
// vectors are streamed.
template <typename scalar_t, bool NT = false>
inline int64_t aligned_head(const scalar_t* y, int64_t len) {
  if constexpr (!NT) {
    return 0;
  } else {
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(y) % kStreamAlign);
    if (mis % static_cast<int64_t>(sizeof(scalar_t)) != 0) {
      return len;  // not even scalar-aligned: never the case for tensor data; store it all one by one
    }
    return std::min(len, mis == 0 ? int64_t(0) : (kStreamAlign - mis) / static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// normalize() on vectors. Centered = false: every pivot is +0 (folded coefficients, eval), so the
// subtraction is left out (and, where the pivots are vectors in memory, their loads): x - +0 is
// x, so the bits are the same.
template <bool Centered, typename vec>
inline vec vnormalize(vec x, vec pivot, vec scale, vec shift) {
  if constexpr (Centered) {
    return (x - pivot) * scale + shift;
  } else {
    return x * scale + shift;
  }
}

// True when every pivot is +0 (see vnormalize).
template <typename acc_t>
inline bool pivots_all_zero(const acc_t* pivot, int64_t n) {
  return std::all_of(pivot, pivot + n, [](acc_t v) { return v == acc_t(0) && !std::signbit(v); });
}

template <typename scalar_t, typename acc_t, bool NT = false, bool Centered = true>
inline void seg_affine(const scalar_t* x, scalar_t* y, int64_t len, const NormalizeCoeffs<acc_t>& k) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec pv = vec{} + k.pivot, s = vec{} + k.scale, t = vec{} + k.shift;
  auto f = [&](vec a) { return vnormalize<Centered>(a, pv, s, t); };
  int64_t i = 0;
  for (const int64_t head = aligned_head<scalar_t, NT>(y, len); i < head; ++i) {
    store<scalar_t, acc_t>(y, i, normalize(load<scalar_t, acc_t>(x, i), k.pivot, k.scale, k.shift));
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    vec a, b;
    vload2<scalar_t, acc_t>(x + i, a, b);
    vstore2<scalar_t, acc_t, NT>(y + i, f(a), f(b));
  }
  for (; i + W <= len; i += W) {
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(y + i, f(vload<scalar_t, acc_t>(x + i)));
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      vstore_part<scalar_t, acc_t>(y + i, f(vload_part<scalar_t, acc_t>(x + i, len - i)), len - i);
    }
  } else {
    for (; i < len; ++i) {
      store<scalar_t, acc_t>(y, i, normalize(load<scalar_t, acc_t>(x, i), k.pivot, k.scale, k.shift));
    }
  }
}

// backward_elemt() of math.h over one segment of one channel.
template <typename scalar_t, typename acc_t, bool NT = false>
inline void seg_backward(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t len, const BackwardCoeffs<acc_t>& k) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  const vec m = vec{} + k.mean, mdy = vec{} + k.mean_dy, kv = vec{} + k.k, a = vec{} + k.a;
  auto f = [&](vec g, vec v) { return backward_elemt(g, v, m, mdy, kv, a); };
  auto one = [&](int64_t i) {
    store<scalar_t, acc_t>(
        dx, i, backward_elemt(load<scalar_t, acc_t>(dy, i), load<scalar_t, acc_t>(x, i), k.mean, k.mean_dy, k.k, k.a));
  };
  int64_t i = 0;
  for (const int64_t head = aligned_head<scalar_t, NT>(dx, len); i < head; ++i) {
    one(i);
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    vec g0, g1, x0, x1;
    vload2<scalar_t, acc_t>(dy + i, g0, g1);
    vload2<scalar_t, acc_t>(x + i, x0, x1);
    vstore2<scalar_t, acc_t, NT>(dx + i, f(g0, x0), f(g1, x1));
  }
  for (; i + W <= len; i += W) {
    vstore<scalar_t, acc_t, NT && kVecIsLine<scalar_t, acc_t>>(
        dx + i, f(vload<scalar_t, acc_t>(dy + i), vload<scalar_t, acc_t>(x + i)));
  }
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    if (i < len) {
      const int64_t n = len - i;
      vstore_part<scalar_t, acc_t>(dx + i, f(vload_part<scalar_t, acc_t>(dy + i, n), vload_part<scalar_t, acc_t>(x + i, n)), n);
    }
  } else {
    for (; i < len; ++i) {
      one(i);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rows of `width` adjacent values (channels-last), each lane j with its own accumulator or
// coefficient. The lane arrays stay in L1; vectorized across lanes.
// Column blocks of 4, then 1, vectors keep their accumulators in registers down the rows (four
// independent chains hide the FMA latency); leftover columns go one by one.
template <typename acc_t>
inline typename Vec<acc_t>::type vload_acc(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void vstore_acc(acc_t* p, typename Vec<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename acc_t>
inline void lane_add(acc_t* s, typename Vec<acc_t>::type v) {
  vstore_acc(s, vload_acc(s) + v);
}

// Lanes [0, W) of a merge_t lane array as wide_add's (lo, hi), W = Vec<acc_t>::W, and back.
template <typename acc_t>
inline void wide_load(const merge_t* s, WideVec& lo, WideVec& hi) {
  lo = vload_acc(s);
  hi = std::is_same_v<acc_t, merge_t> ? WideVec{} : vload_acc(s + Vec<merge_t>::W);
}

template <typename acc_t>
inline void wide_store(merge_t* s, WideVec lo, WideVec hi) {
  vstore_acc(s, lo);
  if constexpr (!std::is_same_v<acc_t, merge_t>) {
    vstore_acc(s + Vec<merge_t>::W, hi);
  }
}

template <typename acc_t>
inline void wide_lane_add(merge_t* s, typename Vec<acc_t>::type v) {
  WideVec lo, hi;
  wide_load<acc_t>(s, lo, hi);
  wide_add<acc_t>(lo, hi, v);
  wide_store<acc_t>(s, lo, hi);
}

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

// Prefetches the lines of [p, p + nbytes) (p as an integer: it may lie past the tensor, which a
// prefetch never faults on).
inline void prefetch_lines(uintptr_t p, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; b += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(p + static_cast<uintptr_t>(b)));
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
// row per step, every row of a 4 KiB width mapping to the same L1 sets: measured on
// (32, 1024, 14, 14) channels_last float32, one thread, statistics 2.3 ms that way and 0.9 ms
// row by row. They go four at a time, for the reductions: four(x0, j) adds lanes
// [j, j + W) of the four rows from x0 into its lane sums, four_s(x0, j) lane j; one(x0, j) and
// one_s(x0, j) the same for the single rows left over. One row at a time, the sums' loads and
// stores (two per vector of x for each sum), not x, bounded these loops: (32, 512, 14, 14)
// channels_last, two threads, with the chunk size below: statistics float32 544 -> 379 us,
// bfloat16 (one pass) 482 -> 199 us. The functors capture by value and are inlined: pointers held
// in a closure by reference were reloaded after every vector store (the stores may alias them).
// Each 4-row step also prefetches the rows about kPrefetchBytes on (of x, and of x2 where given:
// dy of the backward reduction): the hardware prefetchers did not keep four interleaved row
// streams ahead. Measured with two threads on an AMD EPYC (Zen 3) VM, AVX2, channels_last, in
// one process, no prefetch -> 8 rows (8 KiB) ahead: (32, 256, 28, 28) float32 statistics 3.85 ->
// 1.50 ms, bfloat16 1.73 -> 0.57 ms, bfloat16 backward reduction 3.64 -> 1.00 ms;
// (32, 1024, 14, 14) bfloat16 backward reduction 2.80 -> 0.99 ms (x.sum(): 0.40 ms).
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

// One pass for 16-bit inputs (see kOnePassStats): sums of d = x - pivot into s1, of d * d into s2.
template <typename scalar_t, typename acc_t>
inline void rows_moments(
    const scalar_t* x, int64_t nrows, int64_t width, bool wide, const acc_t* pivot, acc_t* s1, acc_t* s2) {
  using vec = typename Vec<acc_t>::type;
  constexpr int64_t W = Vec<acc_t>::W;
  if (wide) {
    rows_wide_by4<scalar_t, acc_t>(
        x, nrows, width,
        [=](const scalar_t* x0, int64_t j) {
          const vec pv = vload_acc(pivot + j);
          const vec d0 = vload<scalar_t, acc_t>(x0 + j) - pv, d1 = vload<scalar_t, acc_t>(x0 + width + j) - pv;
          const vec d2 = vload<scalar_t, acc_t>(x0 + 2 * width + j) - pv, d3 = vload<scalar_t, acc_t>(x0 + 3 * width + j) - pv;
          vstore_acc(s1 + j, vload_acc(s1 + j) + ((d0 + d1) + (d2 + d3)));
          vstore_acc(s2 + j, vload_acc(s2 + j) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
        },
        [=](const scalar_t* x0, int64_t j) {
          for (int64_t k = 0; k < 4; ++k) {
            const acc_t d = load<scalar_t, acc_t>(x0, k * width + j) - pivot[j];
            s1[j] += d;
            s2[j] += d * d;
          }
        },
        [=](const scalar_t* x0, int64_t j) {
          const vec d = vload<scalar_t, acc_t>(x0 + j) - vload_acc(pivot + j);
          vstore_acc(s1 + j, vload_acc(s1 + j) + d);
          vstore_acc(s2 + j, vload_acc(s2 + j) + d * d);
        },
        [=](const scalar_t* x0, int64_t j) {
          const acc_t d = load<scalar_t, acc_t>(x0, j) - pivot[j];
          s1[j] += d;
          s2[j] += d * d;
        });
    return;
  }
  for_column_blocks<acc_t>(
      width,
      [&](int64_t j) {
        vec a[4], q[4], pv[4];
        for (int v = 0; v < 4; ++v) {
          a[v] = vload_acc(s1 + j + v * W);
          q[v] = vload_acc(s2 + j + v * W);
          pv[v] = vload_acc(pivot + j + v * W);
        }
        for (int64_t r = 0; r < nrows; ++r) {
          const scalar_t* row = x + r * width + j;
          for (int v = 0; v < 4; ++v) {
            const vec d = vload<scalar_t, acc_t>(row + v * W) - pv[v];
            a[v] += d;
            q[v] += d * d;
          }
        }
        for (int v = 0; v < 4; ++v) {
          vstore_acc(s1 + j + v * W, a[v]);
          vstore_acc(s2 + j + v * W, q[v]);
        }
      },
      [&](int64_t j) {
        vec a = vload_acc(s1 + j), q = vload_acc(s2 + j);
        const vec pv = vload_acc(pivot + j);
        for (int64_t r = 0; r < nrows; ++r) {
          const vec d = vload<scalar_t, acc_t>(x + r * width + j) - pv;
          a += d;
          q += d * d;
        }
        vstore_acc(s1 + j, a);
        vstore_acc(s2 + j, q);
      },
      [&](int64_t j) {
        for (int64_t r = 0; r < nrows; ++r) {
          const acc_t d = load<scalar_t, acc_t>(x, r * width + j) - pivot[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      });
}

// The second pass of two-pass statistics over rows (see two_pass_welford): sums of d = x - center
// into s1 and of d * d into s2, per lane (one center vector per column: with 16 AVX2 registers a
// 4-vector column block keeps its 8 sums and 4 centers in registers).
template <typename scalar_t, typename acc_t>
inline void rows_m2(
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
// of three: with 16 AVX2 registers a 4-vector block then keeps 8 of them in registers, not 12).
// In one process on an AVX2 EPYC (Zen 3), channels_last bfloat16 eval: (32, 512, 14, 14) 0.83 ->
// 0.59 ms, (32, 256, 14, 14) 0.34 -> 0.27 ms, (32, 128, 28, 28) 0.72 -> 0.63 ms; on an AVX-512
// Xeon 0-15% (bfloat16) and 0-7% (float32).
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
// Rows of at least kWideRow values are walked one at a time, in memory order, instead: measured
// on (32, 512, 14, 14) channels_last float32 (2 KiB rows), the fused backward took 5.25 ms with
// column blocks going down 16 rows and 3.07 ms row by row (the affine pass did not change). Likely
// cause: the strided walk loads x[r + 1] 2 KiB after storing dx[r], which 4 KiB store-to-load
// alias checks can stall; not proven.
constexpr int64_t kRowGroupValues = 8192;

inline int64_t row_group(int64_t width, bool wide) {
  return wide ? 1 : std::max<int64_t>(1, kRowGroupValues / std::max<int64_t>(1, width));
}

template <typename scalar_t, typename acc_t, bool NT = false, bool Centered = true>
inline void rows_affine(
    const scalar_t* x, scalar_t* y, int64_t nrows, int64_t width, bool wide, const acc_t* pivot, const acc_t* scale,
    const acc_t* shift) {
  const int64_t group = row_group(width, wide);
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_ahead(row_bytes);
  for (int64_t r = 0; r < nrows; r += group) {
    if (wide) {
      prefetch_lines(reinterpret_cast<uintptr_t>(x + r * width) + ahead, row_bytes);
    }
    rows_affine_group<scalar_t, acc_t, NT, Centered>(x + r * width, y + r * width, std::min(group, nrows - r), width, pivot, scale, shift);
  }
}

template <typename scalar_t, typename acc_t, bool NT = false>
inline void rows_backward(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t nrows, int64_t width, bool wide, const acc_t* m,
    const acc_t* mdy, const acc_t* k, const acc_t* a) {
  const int64_t group = row_group(width, wide);
  const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t ahead = prefetch_ahead(row_bytes);
  for (int64_t r = 0; r < nrows; r += group) {
    const int64_t off = r * width;
    if (wide) {
      prefetch_lines(reinterpret_cast<uintptr_t>(dy + off) + ahead, row_bytes);
      prefetch_lines(reinterpret_cast<uintptr_t>(x + off) + ahead, row_bytes);
    }
    rows_backward_group<scalar_t, acc_t, NT>(dy + off, x + off, dx + off, std::min(group, nrows - r), width, m, mdy, k, a);
  }
}

// Whether an elementwise pass streams its output (see stream_bytes): decided once per call from
// the bytes it moves, `passes` tensor passes (2: read x, write y; 3: read dy and x, write dx).
template <typename scalar_t>
inline bool stream_pass(const Layout& l, int64_t passes) {
  return stream_outputs(passes * l.N * l.C * l.HxW * static_cast<int64_t>(sizeof(scalar_t)));
}

// NCHW passes stream plane by plane only when every HxW plane starts on a line: planes that
// share lines would mix streamed and ordinary stores in those lines and store their heads one
// value at a time (measured slower than not streaming: (32, 1024, 14, 14) bfloat16, 1.85 ms
// against 0.99 ms). Planes that share lines stream by channel groups (line_group) or line by line
// (planes_affine_lines).
template <typename scalar_t>
inline bool planes_on_lines(const Layout& l) {
  return (l.HxW * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign == 0;
}

template <typename scalar_t>
inline bool stream_planes(const scalar_t* out, const Layout& l, int64_t passes) {
  return stream_pass<scalar_t>(l, passes) && store_aligned(out) && planes_on_lines<scalar_t>(l);
}

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

template <bool NT>
inline void end_streaming() {
  if constexpr (NT) {
    stream_fence();
  }
}

// A heap array that is not a shared template instantiation (see the header comment on ODR).
template <typename T>
struct Buffer {
  explicit Buffer(int64_t n) : p(new T[n > 0 ? n : 1]()) {}
  ~Buffer() {
    delete[] p;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* p;
};

// A channel's backward sums, merged: sum(dy) and sum(dy * (x - mean)).
struct GradSums {
  merge_t dy;
  merge_t dy_xmu;
};

// ---------------------------------------------------------------------------------------------
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

// The statistics of every channel as the kernels produce them: mean and biased variance of
// x - pivot (merged in double), and the pivot itself.
template <typename acc_t>
struct ChannelStats {
  explicit ChannelStats(int64_t C) : pivot(C), mean(C), var(C) {}
  Buffer<acc_t> pivot;
  Buffer<merge_t> mean;
  Buffer<merge_t> var;
};

// Statistics of block j of channels c0 .. c0 + G - 1 (a channel group, see channel_group), each
// channel's sums carried over its runs in run order. The runs are walked in memory order (run n
// of every channel of the group, then run n + 1): a channel's values are summed in the same order
// whatever G is, so G never changes a bit, but the reads are G runs long instead of one run a
// plane apart. Measured with two threads, NCHW training forward, G = 1 -> 8: (32, 2048, 7, 7)
// bfloat16 989 -> 621 us, float32 1160 -> 881 us; (32, 512, 7, 7) bfloat16 203 -> 154 us;
// (32, 512, 14, 14) bfloat16 505 -> 453 us.
constexpr int64_t kGroupTarget = 16;
// The most channels in a group: kGroupTarget, or twice that for a line group (see line_group).
constexpr int64_t kMaxGroup = 32;
// VecSums of channels 0 .. n - 1 of a group, zeroed: a whole array of kMaxGroup zeroes 8 KiB of
// float accumulators per array at every call. (8, 64, 8, 8) float32 statistics, one thread: memset
// took 7% of the op's time, the VecSum arrays of a group of 8 channels reading 16 KiB.
template <typename acc_t>
struct GroupSums {
  explicit GroupSums(int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      new (raw + i * sizeof(VecSum<acc_t>)) VecSum<acc_t>();
    }
  }
  VecSum<acc_t>& operator[](int64_t i) {
    return std::launder(reinterpret_cast<VecSum<acc_t>*>(raw))[i];
  }
  alignas(VecSum<acc_t>) unsigned char raw[kMaxGroup * sizeof(VecSum<acc_t>)];
};
// See GroupLanes: float lanes per vector on every ISA (Vec<float>::W), and the most vectors of
// one sample's runs of a channel group laid out per lane.
constexpr int64_t kLaneWidth = 16;
constexpr int64_t kMaxLaneVecs = 64;
// ... and of a line group's (see line_group).
constexpr int64_t kMaxLineLaneVecs = 128;

// The per-channel (fused) NCHW tasks walk a channel group's runs sample by sample, G * len
// adjacent values a plane of C channels apart; each sample prefetches the group's runs of the
// sample about kPrefetchBytes on (a whole number of samples, at least one) where the runs are
// whole planes of at most kBlock values, short enough for the hardware prefetchers to lose the
// stream at every jump; none past the last sample, which would land past the tensor's end and
// still take a fill buffer (half the prefetches of (8, 64, 8, 8), 4 samples on of 8). Measured
// with two threads, in one process, without -> with that limit: backward (32, 128, 28, 28) float32
// 3.90 -> 3.35 ms, (32, 2048, 7, 7) bfloat16 2.86 -> 2.66 ms; forward (32, 64, 56, 56) bfloat16
// 3.03 -> 2.75 ms, (32, 2048, 7, 7) float32 2.79 -> 2.64 ms. (The memory-order tasks read the next
// group's runs next to these and do not prefetch: measured no faster that way.)
struct GroupPrefetch {
  int64_t samples = 0;  // 0: none
  int64_t stride = 0;   // bytes from a sample's runs to the next sample's
  int64_t bytes = 0;    // of the group's runs in one sample
  // Before reading sample n of N, whose runs start at p.
  template <typename T>
  void operator()(const T* p, int64_t n, int64_t N) const {
    if (samples > 0 && n + samples < N) {
      prefetch_lines(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(samples * stride), bytes);
    }
  }
};

template <typename scalar_t>
inline GroupPrefetch group_prefetch(const Layout& l, int64_t G, int64_t len, bool on) {
  if (!on || len != l.HxW || l.HxW > kBlock) {
    return {};
  }
  const int64_t size = static_cast<int64_t>(sizeof(scalar_t));
  const int64_t bytes = std::max<int64_t>(1, G * len * size);
  return {std::max<int64_t>(1, (kPrefetchBytes + bytes - 1) / bytes), l.C * l.HxW * size, bytes};
}

// The per-lane copies of per-channel values: out[i] = value of channel i / HxW, i < G * HxW.
template <typename acc_t, typename Get>
inline void spread_lanes(int64_t HxW, int64_t G, const Get& get, acc_t* out) {
  for (int64_t g = 0; g < G; ++g) {
    std::fill_n(out + g * HxW, HxW, get(g));
  }
}

// Short NCHW planes whose runs end in a partial vector (HxW < kLanePlane, not a multiple of the
// vector width: 7x7, 5x5, ...) where the ISA has masked tails: the reductions of a channel group
// keep one accumulator per value position of the group's span in a sample (its G * HxW adjacent
// values), add the block's samples into them in sample order, whole vectors at a time (one masked
// vector at the span's end), then fold each channel's HxW positions in a fixed order. A channel's
// terms are added in an order set by HxW alone, whatever G (which follows the thread count) is:
// the same bits for any G. Walking run by run instead cost each 7x7 run three vectors, a masked
// fourth for one value and the run's setup. Measured with two threads, in one process, run by run
// -> per position: (32, 512, 7, 7) statistics float32 438 -> 392 us, bfloat16 328 -> 257 us;
// training forward bfloat16 553 -> 499 us, (32, 2048, 7, 7) 2.62 -> 2.43 ms; backward reduction
// bfloat16 430 -> 345 us. Planes of whole vectors (8x8, 16x16, 14x14's 12 of 12.25) were 5-15%
// slower this way: their run-by-run sums stay in registers, these go through L1.
constexpr int64_t kLanePlane = 64;
// Positions of one span at most: 8 KiB of float each.
constexpr int64_t kLaneSpan = 2048;
static_assert(kMaxGroup * (kLanePlane - 1) <= kLaneSpan);

template <typename scalar_t, typename acc_t>
inline bool lane_reductions(const Layout& l) {
  return kMaskedTails<scalar_t, acc_t> && l.HxW > 0 && l.HxW < kLanePlane && l.HxW % Vec<acc_t>::W != 0;
}

// f(i, n) for the vectors of a span: i the first position, n the values in it (W but at the end).
template <typename acc_t, typename F>
inline void span_vectors(int64_t span, const F& f) {
  constexpr int64_t W = Vec<acc_t>::W;
  int64_t i = 0;
  for (; i + W <= span; i += W) {
    f(i, W);
  }
  if (i < span) {
    f(i, span - i);
  }
}

// Values i .. i + n - 1 of a span (n <= W; lanes >= n zero).
template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type span_load(const scalar_t* p, int64_t n) {
  if constexpr (kMaskedTails<scalar_t, acc_t>) {
    return n == Vec<acc_t>::W ? vload<scalar_t, acc_t>(p) : vload_part<scalar_t, acc_t>(p, n);
  } else {
    return vload<scalar_t, acc_t>(p);  // (not used: lane_reductions needs masked tails)
  }
}

// The sum of len per-position accumulators in a fixed order.
template <typename acc_t>
inline acc_t lane_fold(const acc_t* s, int64_t len) {
  VecSum<acc_t> t;
  seg_accumulate<acc_t, acc_t>(s, len, t, [](auto v) { return v; }, [](acc_t v) { return v; });
  return t.total();
}

// Per-position arrays of a span: padded to whole vectors, the padding zero.
struct LaneSpan {
  int64_t HxW, G, span, padded;
  LaneSpan(int64_t HxW_, int64_t G_, int64_t W) : HxW(HxW_), G(G_), span(G_ * HxW_), padded((G_ * HxW_ + W - 1) / W * W) {}
  template <typename acc_t, typename Get>
  void spread(const Get& get, acc_t* out) const {
    spread_lanes<acc_t>(HxW, G, get, out);
    std::fill(out + span, out + padded, acc_t(0));
  }
  template <typename acc_t>
  void zero(acc_t* out) const {
    std::fill_n(out, padded, acc_t(0));
  }
};

// f(off, n) for the span of channels c0 .. c0 + G - 1 of samples n in [n0, n1) in order, off the
// index of its first value.
template <typename F>
inline void span_samples(const Layout& l, int64_t n0, int64_t n1, int64_t c0, const F& f) {
  for (int64_t n = n0; n < n1; ++n) {
    f((n * l.C + c0) * l.HxW, n);
  }
}

// group_block_stats for lane_reductions.
template <typename scalar_t, typename acc_t>
inline void lane_block_stats(
    const scalar_t* x, const Layout& l, int64_t n0, int64_t n1, int64_t c0, int64_t G, const acc_t* pivot,
    Welford<merge_t>* out, bool prefetch) {
  using vec = typename Vec<acc_t>::type;
  const LaneSpan ls(l.HxW, G, Vec<acc_t>::W);
  const int64_t count = (n1 - n0) * l.HxW;
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, l.HxW, prefetch);
  alignas(64) acc_t pv[kLaneSpan], s1[kLaneSpan], s2[kLaneSpan];
  ls.spread([&](int64_t g) { return pivot[g]; }, pv);
  ls.zero(s1);
  ls.zero(s2);
  if constexpr (kOnePassStats<scalar_t>) {
    span_samples(l, n0, n1, c0, [&](int64_t off, int64_t s) {
      const scalar_t* p = x + off;
      ahead(p, s, l.N);
      span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
        const vec d = span_load<scalar_t, acc_t>(p + i, n) - vload_acc(pv + i);
        lane_add(s1 + i, d);
        lane_add(s2 + i, d * d);
      });
    });
    for (int64_t g = 0; g < G; ++g) {
      out[g] = moments_to_welford<acc_t>(lane_fold(s1 + g * l.HxW, l.HxW), lane_fold(s2 + g * l.HxW, l.HxW), count);
    }
    return;
  }
  const vec iv = vec{} + acc_t(1) / static_cast<acc_t>(count);
  span_samples(l, n0, n1, c0, [&](int64_t off, int64_t s) {
    const scalar_t* p = x + off;
    ahead(p, s, l.N);
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      lane_add(s1 + i, (span_load<scalar_t, acc_t>(p + i, n) - vload_acc(pv + i)) * iv);
    });
  });
  acc_t mean[kMaxGroup], center[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    mean[g] = lane_fold(s1 + g * l.HxW, l.HxW);
    center[g] = pivot[g] + mean[g];
  }
  // (The padding's centers are zero, as are its loads: its d stays zero.)
  alignas(64) acc_t cv[kLaneSpan];
  ls.spread([&](int64_t g) { return center[g]; }, cv);
  ls.zero(s1);
  // Four samples at a time (as lane_block_reduce).
  int64_t s = n0;
  for (; s + 4 <= n1; s += 4) {
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec c = vload_acc(cv + i);
      vec d[4];
      for (int k = 0; k < 4; ++k) {
        d[k] = span_load<scalar_t, acc_t>(x + ((s + k) * l.C + c0) * l.HxW + i, n) - c;
      }
      lane_add(s1 + i, (d[0] + d[1]) + (d[2] + d[3]));
      lane_add(s2 + i, (d[0] * d[0] + d[1] * d[1]) + (d[2] * d[2] + d[3] * d[3]));
    });
  }
  span_samples(l, s, n1, c0, [&](int64_t off, int64_t) {
    const scalar_t* p = x + off;
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec d = span_load<scalar_t, acc_t>(p + i, n) - vload_acc(cv + i);
      lane_add(s1 + i, d);
      lane_add(s2 + i, d * d);
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    out[g] = two_pass_welford(
        pivot[g], mean[g], center[g], lane_fold(s1 + g * l.HxW, l.HxW), lane_fold(s2 + g * l.HxW, l.HxW), count);
  }
}

// group_block_reduce for lane_reductions.
template <typename scalar_t, typename acc_t>
inline void lane_block_reduce(
    const scalar_t* dy, const scalar_t* x, const Layout& l, int64_t n0, int64_t n1, int64_t c0, int64_t G,
    const acc_t* mean, merge_t* s_dy, acc_t* s_dyxmu, bool prefetch) {
  using vec = typename Vec<acc_t>::type;
  const LaneSpan ls(l.HxW, G, Vec<acc_t>::W);
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, l.HxW, prefetch);
  alignas(64) acc_t mv[kLaneSpan], b[kLaneSpan];
  alignas(64) merge_t a[kLaneSpan];
  ls.spread([&](int64_t g) { return mean[g]; }, mv);
  ls.zero(a);
  ls.zero(b);
  // Four samples at a time: their dy in a tree (see wide_add), their dy * (x - mean) likewise, so
  // that the lanes in L1 are updated once per four samples.
  int64_t s = n0;
  for (; s + 4 <= n1; s += 4) {
    const scalar_t *pd[4], *px[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t off = ((s + k) * l.C + c0) * l.HxW;
      pd[k] = dy + off;
      px[k] = x + off;
      ahead(pd[k], s + k, l.N);
      ahead(px[k], s + k, l.N);
    }
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec m = vload_acc(mv + i);
      vec g[4], t[4];
      for (int k = 0; k < 4; ++k) {
        g[k] = span_load<scalar_t, acc_t>(pd[k] + i, n);
        t[k] = g[k] * (span_load<scalar_t, acc_t>(px[k] + i, n) - m);
      }
      wide_lane_add<acc_t>(a + i, (g[0] + g[1]) + (g[2] + g[3]));
      lane_add(b + i, (t[0] + t[1]) + (t[2] + t[3]));
    });
  }
  span_samples(l, s, n1, c0, [&](int64_t off, int64_t n_) {
    const scalar_t *pd = dy + off, *px = x + off;
    ahead(pd, n_, l.N);
    ahead(px, n_, l.N);
    span_vectors<acc_t>(ls.span, [&](int64_t i, int64_t n) {
      const vec g = span_load<scalar_t, acc_t>(pd + i, n);
      wide_lane_add<acc_t>(a + i, g);
      lane_add(b + i, g * (span_load<scalar_t, acc_t>(px + i, n) - vload_acc(mv + i)));
    });
  });
  for (int64_t g = 0; g < G; ++g) {
    s_dy[g] = lane_fold(a + g * l.HxW, l.HxW);
    s_dyxmu[g] = lane_fold(b + g * l.HxW, l.HxW);
  }
}

template <typename scalar_t, typename acc_t>
inline void group_block_stats(
    const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G, int64_t j, const acc_t* pivot,
    Welford<merge_t>* out, bool prefetch) {
  int64_t n0, n1, h0, h1;
  plan.range(l, j, n0, n1, h0, h1);
  if (lane_reductions<scalar_t, acc_t>(l)) {
    lane_block_stats<scalar_t, acc_t>(x, l, n0, n1, c0, G, pivot, out, prefetch);
    return;
  }
  const int64_t len = h1 - h0;
  const int64_t count = (n1 - n0) * len;
  // f(g, run): the block's runs of the group in memory order (the first walk prefetching).
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, len, prefetch);
  auto each_run = [&](const auto& f, bool first) {
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* run = x + (n * l.C + c0) * l.HxW + h0;
      if (first) {
        ahead(run, n, l.N);
      }
      for (int64_t g = 0; g < G; ++g, run += l.HxW) {
        f(g, run);
      }
    }
  };
  if constexpr (kOnePassStats<scalar_t>) {
    GroupSums<acc_t> s1(G), s2(G);
    each_run([&](int64_t g, const scalar_t* run) { seg_moments<scalar_t, acc_t>(run, len, pivot[g], s1[g], s2[g]); }, true);
    for (int64_t g = 0; g < G; ++g) {
      out[g] = moments_to_welford<acc_t>(s1[g].total(), s2[g].total(), count);
    }
    return;
  }
  const acc_t inv_count = acc_t(1) / static_cast<acc_t>(count);
  GroupSums<acc_t> sum(G);
  each_run([&](int64_t g, const scalar_t* run) { seg_mean<scalar_t, acc_t>(run, len, pivot[g], inv_count, sum[g]); }, true);
  acc_t mean[kMaxGroup], center[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    mean[g] = sum[g].total();
    center[g] = pivot[g] + mean[g];
  }
  GroupSums<acc_t> dev(G), m2(G);
  each_run([&](int64_t g, const scalar_t* run) { seg_m2<scalar_t, acc_t>(run, len, center[g], dev[g], m2[g]); }, false);
  for (int64_t g = 0; g < G; ++g) {
    out[g] = two_pass_welford(pivot[g], mean[g], center[g], dev[g].total(), m2[g].total(), count);
  }
}

// Block sums of dy (in merge_t, see wide_add) and dy * (x - mean) (in acc_t) of a channel group
// (as group_block_stats); callers add the blocks in merge_t.
template <typename scalar_t, typename acc_t>
inline void group_block_reduce(
    const scalar_t* dy, const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G, int64_t j,
    const acc_t* mean, merge_t* s_dy, acc_t* s_dyxmu, bool prefetch) {
  int64_t n0, n1, h0, h1;
  plan.range(l, j, n0, n1, h0, h1);
  if (lane_reductions<scalar_t, acc_t>(l)) {
    lane_block_reduce<scalar_t, acc_t>(dy, x, l, n0, n1, c0, G, mean, s_dy, s_dyxmu, prefetch);
    return;
  }
  GroupSums<merge_t> a(G);
  GroupSums<acc_t> b(G);
  const GroupPrefetch ahead = group_prefetch<scalar_t>(l, G, h1 - h0, prefetch);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * l.C + c0) * l.HxW + h0;  // channel c0's run; channel c0 + g's is g planes on
    ahead(dy + off, n, l.N);
    ahead(x + off, n, l.N);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t run = off + g * l.HxW;
      seg_reduce<scalar_t, acc_t>(dy + run, x + run, h1 - h0, mean[g], a[g], b[g]);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    s_dy[g] = a[g].total();
    s_dyxmu[g] = b[g].total();
  }
}

// NCHW backward with enough channels and long runs, or runs of at least a cache line whose (dy, x)
// per channel fit in 1 MiB: one task per channel reduces the channel and writes its dx while
// (dy, x) of the channel are still in L2. Measured with two threads on this kind of machine, the
// second condition (added to HxW >= 1024): float32 backward (32, 512, 28, 28) 5.4 -> 3.6 ms,
// (32, 1024, 14, 14) 3.8 -> 2.1 ms, (32, 128, 28, 28) 1.26 -> 0.83 ms; bfloat16 5-13% less.
// Otherwise (and always for
// statistics and the forward, where streaming the tensor in memory order measured faster than
// per-channel strided reads: (32,64,56,56) float32, one thread, forward 3.6 ms against 4.2 ms),
// tasks are (block, channel) pairs in memory order and the elementwise pass is separate. The blocks
// and their merge order are the same either way, so this choice (which depends on the thread
// count) never changes a bit of the result.
template <typename scalar_t>
inline bool fused_channel_backward(const Layout& l) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_bytes = l.HxW * static_cast<int64_t>(sizeof(scalar_t));
  const bool fits = run_bytes >= 64 && 2 * l.N * run_bytes <= (int64_t(1) << 20);
  return (l.HxW >= 1024 || fits) && (l.C >= 4 * threads || l.C % threads == 0);
}

// NCHW training forward, one task per channel (statistics, then normalization from L2): where a
// channel (its runs of at least one cache line) fits in 512 KiB and there are channels enough to
// share. Measured with two threads on this kind of machine, float32 forward: (32, 64, 56, 56)
// 1.92 -> 1.52 ms, (32, 256, 28, 28) 1.88 -> 1.41 ms, (32, 1024, 14, 14) 1.97 -> 1.72 ms against
// the memory-order passes; 7x7 planes and channels above 512 KiB ((32, 64, 112, 112)) the same.
// (An earlier tuning that kept only runs of 64 KiB and more had been measured with kernels that,
// built without OpenMP, ran on one thread.)
// Below AVX-512 an input above 1 MiB that fits the cache share (see stream_outputs) takes the
// memory-order passes instead: their second read comes from the last-level cache, while the
// per-channel tasks read runs a plane apart. Measured with two threads on an AMD EPYC (Zen 3) VM,
// AVX2, in one process, fused -> passes: bfloat16 (32, 128, 28, 28) 1.26 -> 0.87 ms,
// (32, 1024, 14, 14) 5.4 -> 4.4 ms, (32, 2048, 7, 7) 2.7 -> 2.0 ms, (32, 64, 56, 56) 2.85 ->
// 2.32 ms; float32 (32, 256, 14, 14) 1.31 -> 0.96 ms, (32, 128, 28, 28) 1.77 -> 1.32 ms. Larger
// inputs ((32, 256, 56, 56) float32 12.9 -> 17.0 ms) and smaller ones ((16, 32, 16, 16) float32
// 93 -> 113 us) keep the fused tasks.
constexpr int64_t kFusedMinBytes = int64_t(1) << 20;
template <typename scalar_t>
inline bool fused_channel_forward(const Layout& l) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t run_bytes = l.HxW * static_cast<int64_t>(sizeof(scalar_t));
  if (kNativeBytes < 64) {
    const int64_t bytes = l.N * l.C * run_bytes;
    if (bytes > kFusedMinBytes && !stream_outputs(bytes)) {
      return false;
    }
  }
  return !l.channels_last && l.N > 0 && run_bytes >= 64 && l.N * run_bytes <= (int64_t(512) << 10) &&
      (l.C >= 4 * threads || l.C % threads == 0);
}

// Channels per task of the NCHW reductions (see group_block_stats): enough that a task reads
// runs of at least 2 KiB of each sample (7x7 runs are 98 or 196 bytes), at most kMaxGroup, and
// a multiple of the channels whose runs fill whole float vectors (16 for 7x7, 4 for 14x14; see
// GroupLanes); fewer where the group's (x, dy) would not stay in L2 for the fused passes' second
// read (float32 (32, 128, 28, 28) backward: 0.89 ms with one channel per task, 1.22 ms with 16),
// or where there would be fewer than four groups per thread.
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

template <typename scalar_t, typename acc_t>
void nchw_stats(const scalar_t* x, const Layout& l, ChannelStats<acc_t>& st) {
  const BlockPlan plan(l);
  for (int64_t c = 0; c < l.C; ++c) {
    st.pivot.p[c] = nchw_pivot<scalar_t, acc_t>(x, l, c);
  }
  Buffer<Welford<merge_t>> partials(l.C * plan.nblocks);
  const int64_t G = channel_group<scalar_t>(l), groups = (l.C + G - 1) / G;
  const int64_t tasks = groups * plan.nblocks;
  at::parallel_for(0, tasks, std::max<int64_t>(1, plan.task_grain(l) / G), [&](int64_t begin, int64_t end) {
    // Tasks in memory order (block-major), partials stored channel-major for the merge.
    Welford<merge_t> part[kMaxGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / groups, c0 = (t % groups) * G, g_n = std::min(G, l.C - c0);
      group_block_stats<scalar_t, acc_t>(x, l, plan, c0, g_n, j, st.pivot.p + c0, part, false);
      for (int64_t g = 0; g < g_n; ++g) {
        partials.p[(c0 + g) * plan.nblocks + j] = part[g];
      }
    }
  });
  for (int64_t c = 0; c < l.C; ++c) {
    Welford<merge_t> w{0, 0, 0};
    for (int64_t j = 0; j < plan.nblocks; ++j) {
      w = welford_combine(w, partials.p[c * plan.nblocks + j]);
    }
    st.mean.p[c] = w.mean;
    st.var.p[c] = welford_var(w);
  }
}

// ---------------------------------------------------------------------------------------------
// Channels-last: R rows of C values, cut into fixed chunks of whole super-rows.
struct RowPlan {
  int64_t C, R;
  int64_t k;       // rows per super-row
  int64_t P;       // lanes per super-row, k * C
  int64_t rows_per_chunk;
  int64_t nchunks;
  bool wide;  // the row passes walk super-rows one at a time, in memory order (see kWideRow)

  RowPlan(const Layout& l, int64_t value_bytes) : C(l.C), R(l.rows()) {
    // k * C a multiple of 16 lanes (whole vectors) where C is small, and at least kMinLanes.
    k = 1;
    if (C > 0 && C < kMinLanes) {
      const int64_t k0 = 16 / std::gcd<int64_t>(C, 16);
      k = k0 * ((kMinLanes + k0 * C - 1) / (k0 * C));
    }
    P = k * C;
    // At least kMinChunkRows super-rows: each chunk costs a few passes over its C partials.
    rows_per_chunk = k * std::max<int64_t>(kMinChunkRows, kChunkValues / P);
    nchunks = (R + rows_per_chunk - 1) / rows_per_chunk;
    wide = P >= kWideRow ||
        (kNativeBytes < 64 && P > 4 * Vec<float>::W && R * C * value_bytes >= kWideBytes);
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

// Lane array of k copies of a per-channel array.
template <typename acc_t>
inline void replicate(const acc_t* per_channel, int64_t C, int64_t k, acc_t* lanes) {
  for (int64_t i = 0; i < k; ++i) {
    std::memcpy(lanes + i * C, per_channel, C * sizeof(acc_t));
  }
}

// Per-channel total of a lane array, lanes summed in order.
template <typename acc_t>
inline void fold(const acc_t* lanes, int64_t C, int64_t k, acc_t* out) {
  std::memcpy(out, lanes, C * sizeof(acc_t));
  for (int64_t i = 1; i < k; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      out[c] += lanes[i * C + c];
    }
  }
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

template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* x, const Layout& l, ChannelStats<acc_t>& st) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
  rows_pivots<scalar_t, acc_t>(x, plan.R, C, st.pivot.p);
  Buffer<acc_t> lanes_pivot(plan.P);
  replicate(st.pivot.p, C, plan.k, lanes_pivot.p);
  Buffer<merge_t> pmean(plan.nchunks * C), pm2(plan.nchunks * C);
  at::parallel_for(0, plan.nchunks, plan.chunk_grain(), [&](int64_t begin, int64_t end) {
    Buffer<acc_t> s1(plan.P), s2(plan.P), lanes_center(plan.P), t1(C), t2(C), center(C);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r0 = q * plan.rows_per_chunk, rows = plan.chunk_rows(q), r1 = r0 + rows;
      std::fill(s1.p, s1.p + plan.P, acc_t(0));
      std::fill(s2.p, s2.p + plan.P, acc_t(0));
      if constexpr (kOnePassStats<scalar_t>) {
        for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
          rows_moments<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_pivot.p, s1.p, s2.p);
        });
        // The chunk's raw sums: the merge below turns them into its mean and M2.
        fold(s1.p, C, plan.k, t1.p);
        fold(s2.p, C, plan.k, t2.p);
        for (int64_t c = 0; c < C; ++c) {
          pmean.p[q * C + c] = t1.p[c];
          pm2.p[q * C + c] = t2.p[c];
        }
        continue;
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(rows);
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_mean<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_pivot.p, inv, s1.p);
      });
      fold(s1.p, C, plan.k, t1.p);
      for (int64_t c = 0; c < C; ++c) {
        center.p[c] = st.pivot.p[c] + t1.p[c];
      }
      replicate(center.p, C, plan.k, lanes_center.p);
      std::fill(s1.p, s1.p + plan.P, acc_t(0));
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_m2<scalar_t, acc_t>(x + off, nrows, width, plan.wide, lanes_center.p, s1.p, s2.p);
      });
      fold(s1.p, C, plan.k, t2.p);
      fold(s2.p, C, plan.k, s1.p);
      for (int64_t c = 0; c < C; ++c) {
        const auto w = two_pass_welford(st.pivot.p[c], t1.p[c], center.p[c], t2.p[c], s1.p[c], rows);
        pmean.p[q * C + c] = w.mean;
        pm2.p[q * C + c] = w.m2;
      }
    }
  });
  // Chan merge (welford_combine's arithmetic) of the chunks in chunk order, in merge_t; all
  // channels of a chunk share its count, so the merge vectorizes across channels.
  at::parallel_for(0, C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, plan.nchunks)), [&](int64_t c0, int64_t c1) {
    merge_t* mean = st.mean.p;
    merge_t* m2 = st.var.p;
    // Chunk q's mean and M2 in merge_t: as stored, or (one pass) from its sums of d and d * d,
    // M2 = sum2 - sum1 * mean (moments_to_welford; a chunk's M2 can come out a rounding below
    // zero, the total is clamped).
    auto chunk = [&](int64_t q, int64_t c, merge_t inv_rows, merge_t& qmean, merge_t& qm2) {
      const merge_t a = pmean.p[q * C + c], b = pm2.p[q * C + c];
      if constexpr (kOnePassStats<scalar_t>) {
        qmean = a * inv_rows;
        qm2 = b - a * qmean;
      } else {
        qmean = a;
        qm2 = b;
      }
    };
    const merge_t inv0 = merge_t(1) / static_cast<merge_t>(std::max<int64_t>(1, plan.chunk_rows(0)));
    for (int64_t c = c0; c < c1; ++c) {
      chunk(0, c, inv0, mean[c], m2[c]);
    }
    int64_t na = plan.chunk_rows(0);
    for (int64_t q = 1; q < plan.nchunks; ++q) {
      const int64_t nb = plan.chunk_rows(q);
      const merge_t f = static_cast<merge_t>(nb) / static_cast<merge_t>(na + nb);
      const merge_t g = static_cast<merge_t>(na) * f;
      const merge_t inv = merge_t(1) / static_cast<merge_t>(nb);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        merge_t qmean, qm2;
        chunk(q, c, inv, qmean, qm2);
        const merge_t delta = qmean - mean[c];
        mean[c] = mean[c] * (merge_t(1) - f) + qmean * f;
        m2[c] += qm2 + delta * delta * g;
      }
      na += nb;
    }
    for (int64_t c = c0; c < c1; ++c) {
      m2[c] = plan.R > 0 && !(m2[c] < 0) ? m2[c] / static_cast<merge_t>(plan.R) : merge_t(0);
    }
  });
}

// affine_kernel over channels_last rows; !Centered: every pivot is +0 (see vnormalize).
template <typename scalar_t, typename acc_t, bool Centered>
void rows_affine_all(const scalar_t* x, scalar_t* y, const Layout& l, const acc_t* pivot, const acc_t* scale, const acc_t* shift) {
  const RowPlan plan(l, sizeof(scalar_t));
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

// The backward sums of every channel (chunk partials merged in merge_t, in chunk order).
template <typename scalar_t, typename acc_t>
void rows_reduce_all(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, GradSums* sums) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
  Buffer<merge_t> pa(plan.nchunks * C);
  Buffer<acc_t> pb(plan.nchunks * C), lanes_mean(plan.P);
  replicate(mean, C, plan.k, lanes_mean.p);
  at::parallel_for(0, plan.nchunks, plan.chunk_grain(), [&](int64_t begin, int64_t end) {
    Buffer<merge_t> a(plan.P);
    Buffer<acc_t> b(plan.P);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r0 = q * plan.rows_per_chunk, r1 = r0 + plan.chunk_rows(q);
      std::fill(a.p, a.p + plan.P, merge_t(0));
      std::fill(b.p, b.p + plan.P, acc_t(0));
      for_super_rows(plan, r0, r1, [&](int64_t off, int64_t nrows, int64_t width) {
        rows_reduce<scalar_t, acc_t>(dy + off, x + off, nrows, width, plan.wide, lanes_mean.p, a.p, b.p);
      });
      fold(a.p, C, plan.k, pa.p + q * C);
      fold(b.p, C, plan.k, pb.p + q * C);
    }
  });
  Buffer<merge_t> sa(C), sb(C);
  for (int64_t q = 0; q < plan.nchunks; ++q) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      sa.p[c] += pa.p[q * C + c];
      sb.p[c] += pb.p[q * C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sums[c] = {sa.p[c], sb.p[c]};
  }
}

template <typename scalar_t, typename acc_t>
void rows_backward_all(
    const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& l, const BackwardCoeffs<acc_t>* coeffs) {
  const RowPlan plan(l, sizeof(scalar_t));
  const int64_t C = l.C;
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

// ---------------------------------------------------------------------------------------------
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

// NCHW planes that do not start on a line (7x7, 14x14 float32; 14x14, 28x28 bfloat16), streamed:
// the planes [p0, p1) of a task are one contiguous range of values, written line by line with
// streaming stores; a vector that straddles two planes takes each lane's coefficients from its own
// plane (a lane select), so no line mixes streamed and ordinary stores. Only the partial lines at
// the ends of the range, which a neighbouring task may share, are stored one value at a time.
// Needs a line to be one or two vectors (kLineVecs) and planes of at least one line (a line then
// spans at most two planes). Measured on an Intel Xeon VM, two threads, float32 normalize:
// (32, 512, 7, 7) 203 -> 120 us, (32, 256, 14, 14) 328 -> 293 us (torch's eval: 198 and 331 us);
// two-vector lines on the AVX-512 Intel Xeon VM of 2026-12-02, in one process, bfloat16 eval,
// plane by plane with ordinary stores -> lines streamed: (32, 1024, 14, 14) 2.12 -> 1.20 ms and
// 3.39 -> 2.46 ms (two runs), (32, 128, 28, 28) 1.35 -> 0.65 and 1.34 -> 0.84 ms,
// (32, 256, 28, 28) 2.54 -> 1.76 ms, (32, 256, 14, 14) 0.50 -> 0.35 ms (torch 0.65 ms).
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

// A channel group whose runs of one sample (G * HxW adjacent values) are whole float vectors:
// lane j of vector v belongs to channel (v * W + j) / HxW. Its coefficients are laid out per lane
// once, and each sample's G runs are then one run of vectors with no tails and no per-run setup
// (7x7 planes: 49 vectors for 16 channels instead of 4 vectors, one of them masked, per channel).
// Every value gets the arithmetic of seg_affine / seg_backward, so the bits are the same. Used by
// the fused per-group forward/backward and by unstreamed normalize/dx passes. Measured with two
// threads (A/B in one process), run by run -> per lane: (32, 512, 7, 7) bfloat16 forward 137 ->
// 115 us, backward 208 -> 180 us; (32, 2048, 7, 7) bfloat16 forward 616 -> 520 us, backward
// 852 -> 715 us; float32 5%; 14x14 planes (groups of 4) unchanged; bfloat16 (32, 512, 7, 7)
// eval about 85 -> 58 us (separate processes).

// Only where seg_affine / seg_backward compute every value of a run, its tail included, with the
// same vector arithmetic (masked tails; elsewhere the scalar tail code is compiled for the
// baseline ISA, without FMA, and would give other bits than a vector lane).
template <typename scalar_t, typename acc_t>
inline bool group_lanes_fit(const Layout& l, int64_t G) {
  constexpr int64_t W = Vec<acc_t>::W;
  return kMaskedTails<scalar_t, acc_t> && G > 1 && (G * l.HxW) % W == 0 && G * l.HxW / W <= kMaxLaneVecs;
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
    const acc_t var = static_cast<acc_t>(var_m);
    const acc_t invstd = invstd_from_var(var, eps);
    mean_out[c] = static_cast<acc_t>(pivot + mean);
    var_out[c] = var;
    invstd_out[c] = invstd;
    return normalize_coeffs_shifted(pivot, static_cast<acc_t>(mean), invstd, weight[c], bias[c]);
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
          acc_t pivot[kMaxGroup];
          Welford<merge_t> w[kMaxGroup], part[kMaxGroup];
          for (int64_t g = 0; g < g_n; ++g) {
            pivot[g] = nchw_pivot<scalar_t, acc_t>(x, l, c0 + g);
            w[g] = {0, 0, 0};
          }
          for (int64_t j = 0; j < plan.nblocks; ++j) {
            group_block_stats<scalar_t, acc_t>(x, l, plan, c0, g_n, j, pivot, part, true);
            for (int64_t g = 0; g < g_n; ++g) {
              w[g] = welford_combine(w[g], part[g]);
            }
          }
          NormalizeCoeffs<acc_t> k[kMaxGroup];
          for (int64_t g = 0; g < g_n; ++g) {
            k[g] = finish(c0 + g, pivot[g], w[g].mean, welford_var(w[g]));
          }
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

// The sums of a channel group, its blocks added in block order (as backward_reduce_sums adds them).
template <typename scalar_t, typename acc_t>
inline void group_reduce_nchw(
    const scalar_t* dy, const scalar_t* x, const Layout& l, const BlockPlan& plan, int64_t c0, int64_t G,
    const acc_t* mean, GradSums* sums) {
  merge_t s_dy[kMaxGroup] = {}, s_dyxmu[kMaxGroup] = {};
  for (int64_t j = 0; j < plan.nblocks; ++j) {
    merge_t a[kMaxGroup];
    acc_t b[kMaxGroup];
    group_block_reduce<scalar_t, acc_t>(dy, x, l, plan, c0, G, j, mean, a, b, true);
    for (int64_t g = 0; g < G; ++g) {
      s_dy[g] += a[g];
      s_dyxmu[g] += b[g];
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    sums[g] = {s_dy[g], s_dyxmu[g]};
  }
}

// The sums of every channel.
template <typename scalar_t, typename acc_t>
void backward_reduce_sums(const scalar_t* dy, const scalar_t* x, const Layout& l, const acc_t* mean, GradSums* sums) {
  if (l.channels_last) {
    rows_reduce_all<scalar_t, acc_t>(dy, x, l, mean, sums);
    return;
  }
  const BlockPlan plan(l);
  const int64_t G = channel_group<scalar_t>(l), groups = (l.C + G - 1) / G;
  const int64_t tasks = groups * plan.nblocks;
  Buffer<merge_t> pa(l.C * plan.nblocks);
  Buffer<acc_t> pb(l.C * plan.nblocks);
  at::parallel_for(0, tasks, std::max<int64_t>(1, plan.task_grain(l) / G), [&](int64_t begin, int64_t end) {
    merge_t a[kMaxGroup];
    acc_t b[kMaxGroup];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t / groups, c0 = (t % groups) * G, g_n = std::min(G, l.C - c0);
      group_block_reduce<scalar_t, acc_t>(dy, x, l, plan, c0, g_n, j, mean + c0, a, b, false);
      for (int64_t g = 0; g < g_n; ++g) {
        pa.p[(c0 + g) * plan.nblocks + j] = a[g];
        pb.p[(c0 + g) * plan.nblocks + j] = b[g];
      }
    }
  });
  for (int64_t c = 0; c < l.C; ++c) {
    merge_t a = 0, b = 0;
    for (int64_t j = 0; j < plan.nblocks; ++j) {
      a += pa.p[c * plan.nblocks + j];
      b += pb.p[c * plan.nblocks + j];
    }
    sums[c] = {a, b};
  }
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
    // Half the forward's grain: a value here costs two reads, a reduction and a write (two
    // threads, (8, 64, 8, 8): 16.8 -> 13.7 us, float32 and bfloat16; larger inputs the same).
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

// ---------------------------------------------------------------------------------------------
// Type-erased entries of this ISA variant (see kernels.h).

#define BNEXT_CPU_DISPATCH(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "bnext_cpu", [&] { \
    using acc_t = acc_type_t<scalar_t>;                                             \
    __VA_ARGS__;                                                                    \
  })

#define BNEXT_IN(p) static_cast<const scalar_t*>(p)
#define BNEXT_OUT(p) static_cast<scalar_t*>(p)
#define BNEXT_ACC_IN(p) static_cast<const acc_t*>(p)
#define BNEXT_ACC_OUT(p) static_cast<acc_t*>(p)

inline void stats_entry(at::ScalarType t, const void* x, const Layout& l, void* mean, void* var) {
  BNEXT_CPU_DISPATCH(t, stats_kernel<scalar_t, acc_t>(BNEXT_IN(x), l, BNEXT_ACC_OUT(mean), BNEXT_ACC_OUT(var)));
}

inline void affine_entry(
    at::ScalarType t, const void* x, void* y, const Layout& l, const void* pivot, const void* scale,
    const void* shift) {
  BNEXT_CPU_DISPATCH(
      t, affine_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), l, BNEXT_ACC_IN(pivot), BNEXT_ACC_IN(scale), BNEXT_ACC_IN(shift)));
}

inline void forward_entry(
    at::ScalarType t, const void* x, void* y, const Layout& l, const void* weight, const void* bias, double eps,
    void* mean, void* invstd, void* var) {
  BNEXT_CPU_DISPATCH(
      t, forward_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), l, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(bias), eps, BNEXT_ACC_OUT(mean),
             BNEXT_ACC_OUT(invstd), BNEXT_ACC_OUT(var)));
}

inline void backward_reduce_entry(
    at::ScalarType t, const void* dy, const void* x, const Layout& l, const void* mean, void* sum_dy,
    void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, backward_reduce_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), l, BNEXT_ACC_IN(mean), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline void backward_elemt_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const Layout& l, const void* coeffs) {
  BNEXT_CPU_DISPATCH(
      t, backward_elemt_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), l, static_cast<const BackwardCoeffs<acc_t>*>(coeffs)));
}

inline void backward_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const Layout& l, const void* weight,
    const void* mean, const void* invstd, void* sum_dy, void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, backward_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), l, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(mean),
             BNEXT_ACC_IN(invstd), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline int parallel_probe_entry(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << std::min(at::get_thread_num(), 63));
  });
  return __builtin_popcountll(seen.load());
}

#undef BNEXT_CPU_DISPATCH
#undef BNEXT_IN
#undef BNEXT_OUT
#undef BNEXT_ACC_IN
#undef BNEXT_ACC_OUT

const KernelTable& table() {
  static const KernelTable t{
      stats_entry, affine_entry, forward_entry, backward_reduce_entry, backward_elemt_entry, backward_entry,
      parallel_probe_entry};
  return t;
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
