// How to finish a row whose length is not a multiple of the vector width under AVX2: masked
// loads/stores (vmaskmovps) against a scalar loop against a zero-padded buffer, on the affine pass
// y = x * a + b over rows of L floats (an NCHW plane of L = H * W values). The answer decides
// kMaskedTails in csrc/cpu/kernel/vec.h for the AVX2 variant (docs/performance.md, "Row tails").
//
//     g++ -O3 -mavx2 -mfma scripts/tails_avx2.cpp -o /tmp/tails && /tmp/tails
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

using Pass = void (*)(const float*, float*, long, int, float, float);

static __m256i first_lanes(int n) {
  alignas(32) static const int table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
}

// The full vectors of a row; returns where the tail starts.
static inline int body(const float* x, float* y, int len, __m256 a, __m256 b) {
  int i = 0;
  for (; i + 8 <= len; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), a, b));
  return i;
}

__attribute__((noinline)) void masked(const float* x, float* y, long rows, int len, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (long r = 0; r < rows; r++, x += len, y += len) {
    int i = body(x, y, len, va, vb);
    if (i < len) {
      __m256i m = first_lanes(len - i);
      _mm256_maskstore_ps(y + i, m, _mm256_fmadd_ps(_mm256_maskload_ps(x + i, m), va, vb));
    }
  }
}

__attribute__((noinline)) void masked_load(const float* x, float* y, long rows, int len, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (long r = 0; r < rows; r++, x += len, y += len) {
    int i = body(x, y, len, va, vb);
    if (i < len) {
      alignas(32) float buf[8];
      _mm256_store_ps(buf, _mm256_fmadd_ps(_mm256_maskload_ps(x + i, first_lanes(len - i)), va, vb));
      std::memcpy(y + i, buf, sizeof(float) * (len - i));
    }
  }
}

__attribute__((noinline)) void scalar(const float* x, float* y, long rows, int len, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (long r = 0; r < rows; r++, x += len, y += len) {
    for (int i = body(x, y, len, va, vb); i < len; i++) y[i] = x[i] * a + b;
  }
}

__attribute__((noinline)) void buffered(const float* x, float* y, long rows, int len, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (long r = 0; r < rows; r++, x += len, y += len) {
    int i = body(x, y, len, va, vb);
    if (i < len) {
      alignas(32) float buf[8] = {};
      std::memcpy(buf, x + i, sizeof(float) * (len - i));
      _mm256_store_ps(buf, _mm256_fmadd_ps(_mm256_load_ps(buf), va, vb));
      std::memcpy(y + i, buf, sizeof(float) * (len - i));
    }
  }
}

int main() {
  const struct { const char* name; Pass pass; } passes[] = {
      {"masked", masked}, {"masked load", masked_load}, {"scalar", scalar}, {"buffered", buffered}};
  std::printf("%4s %-12s %s\n", "L", "tail", "best of 20, ms (1.6M floats)");
  for (int len : {9, 25, 49, 196, 64}) {
    const long rows = 1600000 / len;
    std::vector<float> x(rows * len, 1.0f), y(rows * len);
    for (const auto& p : passes) {
      double best = 1e30;
      for (int k = 0; k < 20; k++) {
        auto t0 = std::chrono::steady_clock::now();
        p.pass(x.data(), y.data(), rows, len, 1.5f, 0.5f);
        best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::printf("%4d %-12s %.3f\n", len, p.name, best);
    }
  }
}
