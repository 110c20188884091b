// Reading rows in part: a standalone measurement behind masked batch norm's notes in
// docs/performance.md (small and irregular batches). A 64x256x512 float32 tensor is read row by
// row, the first `len` values of each 512-value row, the way masked kernels and the compact
// route's gather read padded sequences; the sums are those of a masked statistics pass (d = x - p
// and d^2 in 8 double lanes). Then the gather of the first 240 values of every row into a
// (256, 64 * 240) tensor, in three loop orders.
//
//   g++ -O3 -mavx512f -mavx512dq -o /tmp/partial_rows scripts/partial_rows.cpp && /tmp/partial_rows
//
// (-mavx512*: the machine's ISA, as bnext's AVX-512 kernel variant; drop it elsewhere.) Times are the
// best of 15 runs, one thread.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

using clk = std::chrono::steady_clock;
constexpr long N = 64, C = 256, L = 512;
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));

float* x;
float* y;

// The masked statistics pass over the first len values of every row, each row's run prefetched
// `ahead` rows before it is read (0: no software prefetch).
double stats(long len, long ahead) {
  double total = 0;
  for (long r = 0; r < N * C; ++r) {
    if (ahead > 0 && r + ahead < N * C) {
      const char* q = reinterpret_cast<const char*>(x + (r + ahead) * L);
      for (long o = 0; o < len * 4; o += 64) {
        __builtin_prefetch(q + o);
      }
    }
    v8d s1 = {}, s2 = {};
    for (long i = 0; i + 8 <= len; i += 8) {
      v8f f;
      std::memcpy(&f, x + r * L + i, sizeof(f));
      const v8d d = __builtin_convertvector(f, v8d) - 0.5;
      s1 += d;
      s2 += d * d;
    }
    for (int j = 0; j < 8; ++j) {
      total += s1[j] + s2[j];
    }
  }
  return total;
}

// The first len values of row (n, c) to y[c, n * len ...]: channel by channel (B = C: all channels
// per row, in memory order of x; B < C: blocks of B channels).
void gather(long len, long B) {
  const long K = N * len;
  for (long c0 = 0; c0 < C; c0 += B) {
    for (long n = 0; n < N; ++n) {
      for (long c = c0; c < c0 + B; ++c) {
        std::memcpy(y + c * K + n * len, x + (n * C + c) * L, len * 4);
      }
    }
  }
}

void gather_by_channel(long len) {
  const long K = N * len;
  for (long c = 0; c < C; ++c) {
    for (long n = 0; n < N; ++n) {
      std::memcpy(y + c * K + n * len, x + (n * C + c) * L, len * 4);
    }
  }
}

template <class F>
double best_ms(F f) {
  double best = 1e9;
  for (int k = 0; k < 15; ++k) {
    const auto t0 = clk::now();
    f();
    best = std::min(best, std::chrono::duration<double>(clk::now() - t0).count());
  }
  return best * 1e3;
}

}  // namespace

int main() {
  x = static_cast<float*>(std::aligned_alloc(64, N * C * L * 4));
  y = static_cast<float*>(std::aligned_alloc(64, N * C * L * 4));
  for (long i = 0; i < N * C * L; ++i) {
    x[i] = static_cast<float>(i % 97) * 0.01f;
  }
  std::memset(y, 0, N * C * L * 4);
  volatile double sink = 0;
  std::printf("statistics pass, first len of 512 values per row, no software prefetch:\n");
  for (long len : {64L, 128L, 192L, 240L, 320L, 384L, 448L, 512L}) {
    std::printf("  len %3ld  %.3f ms\n", len, best_ms([&] { sink = sink + stats(len, 0); }));
  }
  std::printf("statistics pass, len 240 / 320 / 512, prefetching the run `ahead` rows before:\n");
  for (long ahead : {0L, 1L, 2L, 4L, 8L, 16L}) {
    std::printf("  ahead %2ld  %.3f / %.3f / %.3f ms\n", ahead, best_ms([&] { sink = sink + stats(240, ahead); }),
        best_ms([&] { sink = sink + stats(320, ahead); }), best_ms([&] { sink = sink + stats(512, ahead); }));
  }
  std::printf("gather of 240 of 512 values per row (memcpy of the same bytes: %.3f ms):\n",
      best_ms([&] { std::memcpy(y, x, N * C * 240 * 4); }));
  std::printf("  by channel %.3f ms, blocks of 16 channels %.3f ms, memory order %.3f ms\n",
      best_ms([&] { gather_by_channel(240); }), best_ms([&] { gather(240, 16); }), best_ms([&] { gather(240, C); }));
  return 0;
}
