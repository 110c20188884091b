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
  int64_t rows() const {
    return N * HxW;
  }
};

// The memory format bnext keeps: the input's suggested one (the one torch's own BN keeps).
inline at::MemoryFormat layout_format(const at::Tensor& input) {
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
