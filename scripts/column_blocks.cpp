// Channels-last batch norm by column blocks: a standalone measurement behind docs/performance.md
// (#channels-last-column-blocks). A two-pass op over an R x C float32 channels-last tensor
// (per-channel sums, then y = x * s + 1) is run two ways:
//   rows    pass 1 over all rows, then pass 2 over all rows (bnext's memory-order passes; y
//           streamed);
//   blocks  per block of B channels (B / 16 cache lines of each row), pass 1 then pass 2 over that
//           block's column, so that pass 2 could read the column back from the cache.
// A 64 MiB buffer is read between the two so that neither starts with x in the cache.
//
//   g++ -O3 -mavx512f -fopenmp -o /tmp/column_blocks scripts/column_blocks.cpp
//   /tmp/column_blocks 12544 512 16 2      # R C B threads: (16, 512, 28, 28), 16-channel blocks
//
// (-mavx512f: the AVX-512 machines this was measured on.) Prints each of 7 repetitions.
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s R C B threads (C and B multiples of 16, B <= 128)\n", argv[0]);
    return 2;
  }
  const long R = std::atol(argv[1]), C = std::atol(argv[2]);
  const int B = std::atoi(argv[3]), nt = std::atoi(argv[4]);
  if (C % 16 != 0 || B % 16 != 0 || B > 128 || C % B != 0) {
    std::fprintf(stderr, "C and B must be multiples of 16, B <= 128 dividing C\n");
    return 2;
  }
  omp_set_num_threads(nt);
  float* x = static_cast<float*>(std::aligned_alloc(64, R * C * 4));
  float* y = static_cast<float*>(std::aligned_alloc(64, R * C * 4));
  const long big_n = 16L << 20;
  float* big = static_cast<float*>(std::aligned_alloc(64, big_n * 4));
  for (long i = 0; i < R * C; ++i) {
    x[i] = static_cast<float>(i % 7) * 0.1f;
    y[i] = 0.f;
  }
  std::memset(big, 1, big_n * 4);
  std::vector<float> s(C);
  auto flush = [&] {
    volatile float acc = 0;
    for (long i = 0; i < big_n; i += 16) {
      acc = acc + big[i];
    }
  };
  for (int rep = 0; rep < 7; ++rep) {
    flush();
    const double t0 = now();
    std::fill(s.begin(), s.end(), 0.f);
#pragma omp parallel
    {
      const int t = omp_get_thread_num();
      const long r0 = R * t / nt, r1 = R * (t + 1) / nt;
      std::vector<float> loc(C, 0.f);
      for (long r = r0; r < r1; ++r) {
        for (long c = 0; c < C; c += 16) {
          _mm512_storeu_ps(&loc[c], _mm512_add_ps(_mm512_loadu_ps(&loc[c]), _mm512_loadu_ps(x + r * C + c)));
        }
      }
#pragma omp critical
      for (long c = 0; c < C; ++c) {
        s[c] += loc[c];
      }
    }
#pragma omp parallel for schedule(static)
    for (long r = 0; r < R; ++r) {
      for (long c = 0; c < C; c += 16) {
        _mm512_stream_ps(y + r * C + c, _mm512_fmadd_ps(_mm512_loadu_ps(x + r * C + c), _mm512_loadu_ps(&s[c]), _mm512_set1_ps(1.f)));
      }
    }
    const double t1 = now();
    flush();
    const double t2 = now();
#pragma omp parallel for schedule(dynamic, 1)
    for (long c0 = 0; c0 < C; c0 += B) {
      __m512 acc[8];
      for (int k = 0; k < B / 16; ++k) {
        acc[k] = _mm512_setzero_ps();
      }
      for (long r = 0; r < R; ++r) {
        for (int k = 0; k < B / 16; ++k) {
          acc[k] = _mm512_add_ps(acc[k], _mm512_loadu_ps(x + r * C + c0 + 16 * k));
        }
      }
      for (long r = 0; r < R; ++r) {
        for (int k = 0; k < B / 16; ++k) {
          _mm512_storeu_ps(y + r * C + c0 + 16 * k, _mm512_fmadd_ps(_mm512_loadu_ps(x + r * C + c0 + 16 * k), acc[k], _mm512_set1_ps(1.f)));
        }
      }
    }
    const double t3 = now();
    std::printf("R=%ld C=%ld B=%d threads=%d  rows %.3f ms  blocks %.3f ms\n", R, C, B, nt, (t1 - t0) * 1e3, (t3 - t2) * 1e3);
  }
  std::free(x);
  std::free(y);
  std::free(big);
  return 0;
}
