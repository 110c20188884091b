// Streaming (non-temporal) stores and when an elementwise pass uses them (part of
// batch_norm_kernel.h: see the map there). vec.h builds its vector stores on put().

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/stream.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

// Streaming (non-temporal) stores: an output larger than the last-level cache is written
// without first reading its lines into the cache (a normal store reads each line it fills),
// which cuts the traffic of an elementwise pass from three tensor passes to two (see
// docs/performance.md#streaming-stores).
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

// The values of one such line (the unit of the line-by-line passes: masked_row_lines,
// rows_affine_lines).
template <typename scalar_t>
constexpr int64_t kLineValues = kStreamAlign / static_cast<int64_t>(sizeof(scalar_t));

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

// How many of the len values from y come before y's first store-aligned address (none without
// NT): a streamed pass stores them one by one, then streams whole vectors.
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

// Whether an elementwise pass streams its output (see stream_bytes): decided once per call from
// the bytes it moves, `passes` tensor passes (2: read x, write y; 3: read dy and x, write dx).
template <typename scalar_t>
inline bool stream_pass(const Layout& l, int64_t passes) {
  return stream_outputs(passes * l.traffic_numel() * static_cast<int64_t>(sizeof(scalar_t)));
}

// NCHW passes stream plane by plane only when every HxW plane starts on a line: planes that
// share lines would mix streamed and ordinary stores in those lines and store their heads one
// value at a time, which is slower than not streaming at all (see
// docs/performance.md#streaming-stores). Planes that share lines stream by channel groups
// (line_group) or line by line (planes_affine_lines).
template <typename scalar_t>
inline bool planes_on_lines(const Layout& l) {
  return (l.HxW * static_cast<int64_t>(sizeof(scalar_t))) % kStreamAlign == 0;
}

template <typename scalar_t>
inline bool stream_planes(const scalar_t* out, const Layout& l, int64_t passes) {
  return stream_pass<scalar_t>(l, passes) && store_aligned(out) && planes_on_lines<scalar_t>(l);
}

template <bool NT>
inline void end_streaming() {
  if constexpr (NT) {
    stream_fence();
  }
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
