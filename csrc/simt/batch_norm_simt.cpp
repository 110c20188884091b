// The CUDA kernels and entries of csrc/cuda, compiled as host C++ over the SIMT emulator: the ops
// of namespace bnext_simt, for CPU tensors, with the same schemas as bnext.
#define BNEXT_SIMT 1

#include <torch/library.h>

#include "../common/eval.h"
#include "../common/schemas.h"
#include "../cuda/batch_norm_cuda.cu"

TORCH_LIBRARY(bnext_simt, m) {
  bnext::define_schemas(m);
}

// Inference on the emulated kernels: the device-generic fold, then bnext_simt::batch_norm_elemt.
TORCH_LIBRARY_IMPL(bnext_simt, CPU, m) {
  m.impl(
      "batch_norm_eval",
      [](const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
         const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps) {
        static const auto elemt = bnext::find_elemt_op("bnext_simt");
        return bnext::batch_norm_eval_generic(elemt, input, weight, bias, running_mean, running_var, eps);
      });
}
