// Host-side preparation shared by the op entries: the input contiguous in its suggested memory
// format with its (N, C, HxW) view, and per-channel vectors in the accumulation type.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "layout.h"

namespace bnext {

// A tensor contiguous in the input's suggested memory format, plus its (N, C, HxW) view.
// Inputs that are already contiguous in that format are used as they are (no copy).
struct Prepared {
  at::Tensor x;
  at::MemoryFormat fmt;
  Layout layout;
};

inline Prepared prepare(const at::Tensor& input) {
  Prepared p;
  p.fmt = layout_format(input);
  p.x = input.contiguous(p.fmt);
  p.layout = make_layout(p.x, p.fmt);
  return p;
}

// A per-channel vector as a contiguous tensor of the accumulation type; `fill` when absent.
inline at::Tensor channel_vector(const c10::optional<at::Tensor>& t, const at::Tensor& input, double fill) {
  const auto acc = acc_dtype(input.scalar_type());
  if (t.has_value() && t->defined()) {
    return t->to(acc).contiguous();
  }
  return at::full({input.size(1)}, fill, input.options().dtype(acc));
}

// A per-channel tensor of C elements as a 1-D tensor (torch accepts any shape with C elements for
// weight, bias and the running statistics; the kernels read C consecutive strided values).
inline c10::optional<at::Tensor> flat_channels(const c10::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined() && t->dim() != 1) {
    return t->reshape({-1});
  }
  return t;
}

inline at::Tensor acc_vector(const at::Tensor& t, const at::Tensor& input) {
  return t.to(acc_dtype(input.scalar_type())).contiguous();
}

}  // namespace bnext
