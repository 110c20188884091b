// AccChannels: per-channel vectors (weight, bias, statistics) as acc_t pointers for the CPU entries
// (batch_norm_cpu.cpp, masked_runs.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <vector>

namespace bnext {

// The C values of a per-channel vector in the accumulation type acc_t, as a pointer: the tensor's
// own memory where it already is that (contiguous acc_t), else converted here on the host, as
// .to(acc_t) rounds; `fill` for an absent one. (A .to() is an ATen call for each bfloat16
// parameter of every op call, a visible part of a small layer's time: see
// docs/performance.md#per-call-cost.)
template <typename acc_t>
class AccChannels {
 public:
  AccChannels(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
    if (t.has_value() && t->defined()) {
      init(*t, C);
    } else {
      buf_.assign(C, fill);
      p_ = buf_.data();
    }
  }
  AccChannels(const at::Tensor& t, int64_t C) {
    init(t, C);
  }
  const acc_t* get() const {
    return p_;
  }

 private:
  void init(const at::Tensor& t, int64_t C) {
    if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && t.is_contiguous()) {
      p_ = t.const_data_ptr<acc_t>();
      return;
    }
    buf_.resize(C);
    const int64_t stride = C > 1 ? t.stride(0) : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bnext_channels", [&] {
      const scalar_t* src = t.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        buf_[c] = static_cast<acc_t>(src[c * stride]);
      }
    });
    p_ = buf_.data();
  }
  std::vector<acc_t> buf_;
  const acc_t* p_ = nullptr;
};

}  // namespace bnext
