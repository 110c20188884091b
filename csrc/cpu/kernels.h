// The CPU kernels behind the ops, as a table of type-erased entries, one table per ISA variant
// (baseline, AVX2, AVX-512), chosen once per call by kernels() (see isa.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../common/layout.h"

namespace bnext {
namespace cpu {

// The real positions of masked batch norm's (N, C, L) input (bnext/masked.py): R runs (row n,
// start, stop) of int64, rows in order and runs of a row in order, not empty, within [0, L)
// (checked by the ops); K values a channel in all.
struct MaskedRuns {
  int64_t N, C, L;
  const int64_t* runs;
  int64_t R, K;
};

// Pointers to per-channel values are of the accumulation type (float for half/bfloat16/float,
// double for double); tensor pointers are of the input type and contiguous in its layout.
struct KernelTable {
  void (*stats)(at::ScalarType, const void* x, const Layout&, void* mean, void* var);
  // y = (x - pivot[c]) * scale[c] + shift[c]
  void (*affine)(
      at::ScalarType, const void* x, void* y, const Layout&, const void* pivot, const void* scale,
      const void* shift);
  void (*forward)(
      at::ScalarType, const void* x, void* y, const Layout&, const void* weight, const void* bias, double eps,
      void* mean, void* invstd, void* var);
  void (*backward_reduce)(
      at::ScalarType, const void* dy, const void* x, const Layout&, const void* mean, void* sum_dy,
      void* sum_dy_xmu);
  // coeffs: C BackwardCoeffs<acc_t> (see backward_elemt() in common/math.h)
  void (*backward_elemt)(at::ScalarType, const void* dy, const void* x, void* dx, const Layout&, const void* coeffs);
  void (*backward)(
      at::ScalarType, const void* dy, const void* x, void* dx, const Layout&, const void* weight, const void* mean,
      const void* invstd, void* sum_dy, void* sum_dy_xmu);
  // How many distinct threads at::parallel_for ran `tasks` one-task pieces on, compiled exactly
  // as the kernels are: 1 on any thread count if this TU lost its OpenMP (see setup.py).
  int (*parallel_probe)(int64_t tasks);
  // The fused BN + activation (+ residual) ops (common/act.h; `act` an Act code, `param` its
  // parameter). r: the residual, same layout as x, or null. y = act((x - pivot[c]) * scale[c] +
  // shift[c] + r).
  void (*act_affine)(
      at::ScalarType, const void* x, const void* r, void* y, const Layout&, const void* pivot, const void* scale,
      const void* shift, int64_t act, double param);
  // Training forward: the statistics of `forward`, then one act_affine pass.
  void (*act_forward)(
      at::ScalarType, const void* x, const void* r, void* y, const Layout&, const void* weight, const void* bias,
      double eps, void* mean, void* invstd, void* var, int64_t act, double param);
  // saved: x, or y where from_output (invertible activations only). dr: dz where r is given, else
  // unused.
  void (*act_backward)(
      at::ScalarType, const void* dy, const void* saved, const void* r, void* dx, void* dr, const Layout&,
      const void* weight, const void* bias, const void* mean, const void* invstd, void* sum_dz, void* sum_dz_xmu,
      int64_t act, double param, bool from_output);
  // Masked batch norm on NCHW-contiguous (N, C, L) tensors, the real positions only: statistics
  // (mean, biased var), y = (x - pivot[c]) * scale[c] + shift[c] and dx (coeffs: C BackwardCoeffs)
  // with zeros at the padding, and the backward sums.
  void (*masked_stats)(at::ScalarType, const void* x, const MaskedRuns&, void* mean, void* var);
  void (*masked_affine)(
      at::ScalarType, const void* x, void* y, const MaskedRuns&, const void* pivot, const void* scale,
      const void* shift);
  void (*masked_backward_reduce)(
      at::ScalarType, const void* dy, const void* x, const MaskedRuns&, const void* mean, void* sum_dy,
      void* sum_dy_xmu);
  void (*masked_backward_elemt)(
      at::ScalarType, const void* dy, const void* x, void* dx, const MaskedRuns&, const void* coeffs);
  // The training forward (statistics, invstd_from_var, normalize_coeffs) and backward (sums,
  // backward_coeffs, dx) fused channel by channel: the same bits as the kernels above.
  void (*masked_forward)(
      at::ScalarType, const void* x, void* y, const MaskedRuns&, const void* weight, const void* bias, double eps,
      void* mean, void* var, void* invstd);
  void (*masked_backward)(
      at::ScalarType, const void* dy, const void* x, void* dx, const MaskedRuns&, const void* weight,
      const void* mean, const void* invstd, void* sum_dy, void* sum_dy_xmu);
  // Channels from which the ops take the fused masked kernels (kMaskedFusedChannels).
  int64_t masked_fused_channels;
};

// Each variant's table. Only call one whose ISA the CPU supports (kernels() checks).
namespace baseline {
const KernelTable& table();
}
#if defined(__x86_64__)
namespace avx2 {
const KernelTable& table();
}
namespace avx512 {
const KernelTable& table();
}
namespace avx512bf16 {
const KernelTable& table();
}
#endif

// Whether an elementwise pass moving `bytes` (reads + writes) writes its output with streaming
// (non-temporal) stores: when it moves more than 3/4 of this process's share of the last-level
// cache (at most 4 MiB per CPU, see isa.cpp), so its output would not stay cached anyway.
// BNEXT_CPU_STREAM_BYTES=<n> sets the threshold instead (0: always stream; read at every call,
// so tests can exercise both paths on small tensors).
bool stream_outputs(int64_t bytes);

// This CPU's level-1 data cache in bytes (sysfs, else sysconf, else 32 KiB), read once.
int64_t l1_data_cache_bytes();

// The table of the variant in use: BNEXT_CPU_ISA (baseline|avx2|avx512|avx512bf16) when set, else the best
// one this CPU supports. The variable is read at every call so tests can switch variants.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace bnext
