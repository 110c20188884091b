// How an input is walked: every bnext kernel sees a tensor that is contiguous in its suggested
// memory format and views it as (N, C, HxW).
#pragma once

#include <ATen/core/Tensor.h>

namespace bnext {

struct Layout {
  int64_t N;
  int64_t C;
  int64_t HxW;
  // True when the C values of one (n, spatial) position are adjacent: channels_last(_3d), and any
  // input with HxW == 1 such as (N, C). Kernels then reduce over R = N * HxW rows of C values.
  bool channels_last;
  // Set where the CPU kernels walk a tensor in blocks of N samples, one call per block (ghost batch
  // norm's chunks, csrc/cpu/batch_norm_cpu.cpp): the samples of the whole tensor. The choices that
  // depend on whether the data comes from memory or stays in cache (streaming stores, wide rows)
  // are then the whole tensor's, as its blocks come from memory one after another. 0: N.
  int64_t whole_N = 0;
  int64_t rows() const {
    return N * HxW;
  }
  // Values of the tensor whose size decides those choices.
  int64_t traffic_numel() const {
    return (whole_N > 0 ? whole_N : N) * C * HxW;
  }
};

// The memory format bnext keeps, chosen as torch's own BN chooses it: contiguous inputs stay
// contiguous, inputs contiguous in channels_last(_3d) stay so (also when size-1 dimensions make
// suggest_memory_format() call them contiguous, e.g. (1, C, H, 1) with C-stride 1), any other
// strides go to the suggested format.
inline at::MemoryFormat layout_format(const at::Tensor& input) {
  if (input.is_contiguous()) {
    return at::MemoryFormat::Contiguous;
  }
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return input.suggest_memory_format();
}

// `x` must be contiguous in `fmt`.
inline Layout make_layout(const at::Tensor& x, at::MemoryFormat fmt) {
  Layout l;
  l.N = x.size(0);
  l.C = x.size(1);
  l.HxW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    l.HxW *= x.size(d);
  }
  l.channels_last =
      fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d || l.HxW == 1;
  return l;
}

}  // namespace bnext
