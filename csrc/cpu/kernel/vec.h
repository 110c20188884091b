// Vector primitives of the CPU kernels (part of batch_norm_kernel.h: see the map there): scalar and
// vector loads and stores in the accumulation type, bfloat16 rounding, masked tails (AVX-512), lane
// arrays, float-to-double widening sums.

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/vec.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

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
// copies them to memory through the stack and compares and shuffles them one lane at a time,
// several times slower than torch: see docs/performance.md#isa-variants.)
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

// Only whole 64-byte lines are ever streamed: a streaming store of part of a line (one 32-byte
// vector of a 16-bit type) next to ordinary stores into the rest of that line was several times
// slower than not streaming at all (see docs/performance.md#streaming-stores). Single vectors of
// 16-bit types are therefore stored normally; their pairs (vstore2) stream.
template <typename scalar_t, typename acc_t>
constexpr bool kVecIsLine = Vec<acc_t>::W * sizeof(scalar_t) == kStreamAlign;

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
// takes the exact shift-and-add rounding instead. Passes over data in cache gain most, passes
// that read and write main memory little (see docs/performance.md#bfloat16-rounding).
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
// the high halves of both vectors: the same bits as two single vectors, in fewer instructions
// (see docs/performance.md#bfloat16-rounding).
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

// Lanes of a vector as bits, lane j as bit j (the masked loads and stores below).
using LaneMask = uint32_t;

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

// The lanes of k loaded from p (the others neither read nor faulted on: zero).
template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type vload_lanes(const scalar_t* p, LaneMask k) {
  static_assert(kMaskedTails<scalar_t, acc_t>);
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const __m512 r = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k), p);
    std::memcpy(&v, &r, sizeof(v));
  } else {
    // (Vector-extension widening: the _mm512 conversion intrinsics warn under GCC 12.)
    typedef uint16_t u16x16 __attribute__((vector_size(32)));
    typedef uint32_t u32x16 __attribute__((vector_size(64)));
    const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(k), p);
    u16x16 hv;
    std::memcpy(&hv, &h, sizeof(hv));
    const u32x16 r = __builtin_convertvector(hv, u32x16) << 16;
    std::memcpy(&v, &r, sizeof(v));
  }
  return v;
}

template <typename scalar_t, typename acc_t>
inline typename Vec<acc_t>::type vload_part(const scalar_t* p, int64_t n) {
  return vload_lanes<scalar_t, acc_t>(p, tail_mask(n));
}

// The lanes of k of v, zero elsewhere.
template <typename acc_t>
inline typename Vec<acc_t>::type keep_lanes(typename Vec<acc_t>::type v, LaneMask k) {
  static_assert(std::is_same_v<acc_t, float>);
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  r = _mm512_maskz_mov_ps(static_cast<__mmask16>(k), r);
  std::memcpy(&v, &r, sizeof(v));
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
// (Declared for the discarded branches of `if constexpr (kMaskedTails<...>)`; never defined.)
template <typename scalar_t, typename acc_t>
typename Vec<acc_t>::type vload_lanes(const scalar_t* p, LaneMask k);
template <typename acc_t>
typename Vec<acc_t>::type keep_lanes(typename Vec<acc_t>::type v, LaneMask k);
#endif

template <typename acc_t>
inline acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t j = 0; j < Vec<acc_t>::W; ++j) {
    s += v[j];
  }
  return s;
}

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

// v as computed, rounded to its type: the compiler cannot see through the empty asm, so it never
// fuses the multiply that produced v into the add that consumes it (an FMA). Where one value may
// be computed by different inlined copies of a loop body (a whole vector or a masked tail, see
// lane_block_reduce), GCC's contraction (-ffp-contract=fast, its default) fused in some copies and
// not in others: the bits of a value then depended on which copy computed it. A vector wider than
// the ISA's registers (never run through these paths: they need masked tails) goes through memory.
template <typename V>
__attribute__((always_inline)) inline V rounded(V v) {
  if constexpr (sizeof(V) <= kNativeBytes) {
    asm("" : "+v"(v));
  } else {
    asm("" : "+m"(v));
  }
  return v;
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

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
