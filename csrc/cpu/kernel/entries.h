// This ISA variant's type-erased entries and its KernelTable (part of batch_norm_kernel.h: see the
// map there).

#ifndef BNEXT_CPU_ISA_NS
#error "kernel/entries.h is a part of csrc/cpu/batch_norm_kernel.h, compiled per ISA by kernels_<isa>.cpp"
#endif

namespace bnext {
namespace cpu {
namespace BNEXT_CPU_ISA_NS {

#define BNEXT_CPU_DISPATCH(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "bnext_cpu", [&] { \
    using acc_t = acc_type_t<scalar_t>;                                             \
    __VA_ARGS__;                                                                    \
  })

#define BNEXT_IN(p) static_cast<const scalar_t*>(p)
#define BNEXT_OUT(p) static_cast<scalar_t*>(p)
#define BNEXT_ACC_IN(p) static_cast<const acc_t*>(p)
#define BNEXT_ACC_OUT(p) static_cast<acc_t*>(p)

inline void stats_entry(at::ScalarType t, const void* x, const Layout& l, void* mean, void* var) {
  BNEXT_CPU_DISPATCH(t, stats_kernel<scalar_t, acc_t>(BNEXT_IN(x), l, BNEXT_ACC_OUT(mean), BNEXT_ACC_OUT(var)));
}

inline void affine_entry(
    at::ScalarType t, const void* x, void* y, const Layout& l, const void* pivot, const void* scale,
    const void* shift) {
  BNEXT_CPU_DISPATCH(
      t, affine_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), l, BNEXT_ACC_IN(pivot), BNEXT_ACC_IN(scale), BNEXT_ACC_IN(shift)));
}

inline void forward_entry(
    at::ScalarType t, const void* x, void* y, const Layout& l, const void* weight, const void* bias, double eps,
    void* mean, void* invstd, void* var) {
  BNEXT_CPU_DISPATCH(
      t, forward_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), l, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(bias), eps, BNEXT_ACC_OUT(mean),
             BNEXT_ACC_OUT(invstd), BNEXT_ACC_OUT(var)));
}

inline void backward_reduce_entry(
    at::ScalarType t, const void* dy, const void* x, const Layout& l, const void* mean, void* sum_dy,
    void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, backward_reduce_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), l, BNEXT_ACC_IN(mean), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline void backward_elemt_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const Layout& l, const void* coeffs) {
  BNEXT_CPU_DISPATCH(
      t, backward_elemt_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), l, static_cast<const BackwardCoeffs<acc_t>*>(coeffs)));
}

inline void backward_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const Layout& l, const void* weight,
    const void* mean, const void* invstd, void* sum_dy, void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, backward_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), l, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(mean),
             BNEXT_ACC_IN(invstd), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline void act_affine_entry(
    at::ScalarType t, const void* x, const void* r, void* y, const Layout& l, const void* pivot, const void* scale,
    const void* shift, int64_t act, double param) {
  BNEXT_CPU_DISPATCH(
      t, act_affine_dispatch<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_IN(r), BNEXT_OUT(y), l, BNEXT_ACC_IN(pivot), BNEXT_ACC_IN(scale), BNEXT_ACC_IN(shift),
             act, static_cast<acc_t>(param)));
}

inline void act_forward_entry(
    at::ScalarType t, const void* x, const void* r, void* y, const Layout& l, const void* weight, const void* bias,
    double eps, void* mean, void* invstd, void* var, int64_t act, double param) {
  BNEXT_CPU_DISPATCH(
      t, act_forward_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_IN(r), BNEXT_OUT(y), l, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(bias), eps,
             BNEXT_ACC_OUT(mean), BNEXT_ACC_OUT(invstd), BNEXT_ACC_OUT(var), act, static_cast<acc_t>(param)));
}

inline void act_backward_entry(
    at::ScalarType t, const void* dy, const void* saved, const void* r, void* dx, void* dr, const Layout& l,
    const void* weight, const void* bias, const void* mean, const void* invstd, void* sum_dz, void* sum_dz_xmu,
    int64_t act, double param, bool from_output) {
  BNEXT_CPU_DISPATCH(
      t, act_backward_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(saved), BNEXT_IN(r), BNEXT_OUT(dx), BNEXT_OUT(dr), l, BNEXT_ACC_IN(weight),
             BNEXT_ACC_IN(bias), BNEXT_ACC_IN(mean), BNEXT_ACC_IN(invstd), BNEXT_ACC_OUT(sum_dz),
             BNEXT_ACC_OUT(sum_dz_xmu), act, static_cast<acc_t>(param), from_output));
}

inline void masked_stats_entry(at::ScalarType t, const void* x, const MaskedRuns& m, void* mean, void* var) {
  BNEXT_CPU_DISPATCH(t, masked_stats_kernel<scalar_t, acc_t>(BNEXT_IN(x), m, BNEXT_ACC_OUT(mean), BNEXT_ACC_OUT(var)));
}

inline void masked_affine_entry(
    at::ScalarType t, const void* x, void* y, const MaskedRuns& m, const void* pivot, const void* scale,
    const void* shift) {
  BNEXT_CPU_DISPATCH(
      t, masked_affine_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), m, BNEXT_ACC_IN(pivot), BNEXT_ACC_IN(scale), BNEXT_ACC_IN(shift)));
}

inline void masked_backward_reduce_entry(
    at::ScalarType t, const void* dy, const void* x, const MaskedRuns& m, const void* mean, void* sum_dy,
    void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, masked_backward_reduce_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), m, BNEXT_ACC_IN(mean), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline void masked_backward_elemt_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const MaskedRuns& m, const void* coeffs) {
  BNEXT_CPU_DISPATCH(
      t, masked_backward_elemt_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), m, static_cast<const BackwardCoeffs<acc_t>*>(coeffs)));
}

inline void masked_forward_entry(
    at::ScalarType t, const void* x, void* y, const MaskedRuns& m, const void* weight, const void* bias, double eps,
    void* mean, void* var, void* invstd) {
  BNEXT_CPU_DISPATCH(
      t, masked_forward_kernel<scalar_t, acc_t>(
             BNEXT_IN(x), BNEXT_OUT(y), m, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(bias), eps, BNEXT_ACC_OUT(mean),
             BNEXT_ACC_OUT(var), BNEXT_ACC_OUT(invstd)));
}

inline void masked_backward_entry(
    at::ScalarType t, const void* dy, const void* x, void* dx, const MaskedRuns& m, const void* weight,
    const void* mean, const void* invstd, void* sum_dy, void* sum_dy_xmu) {
  BNEXT_CPU_DISPATCH(
      t, masked_backward_kernel<scalar_t, acc_t>(
             BNEXT_IN(dy), BNEXT_IN(x), BNEXT_OUT(dx), m, BNEXT_ACC_IN(weight), BNEXT_ACC_IN(mean),
             BNEXT_ACC_IN(invstd), BNEXT_ACC_OUT(sum_dy), BNEXT_ACC_OUT(sum_dy_xmu)));
}

inline int parallel_probe_entry(int64_t tasks) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << std::min(at::get_thread_num(), 63));
  });
  return __builtin_popcountll(seen.load());
}

#undef BNEXT_CPU_DISPATCH
#undef BNEXT_IN
#undef BNEXT_OUT
#undef BNEXT_ACC_IN
#undef BNEXT_ACC_OUT

const KernelTable& table() {
  static const KernelTable t{
      stats_entry,    affine_entry,         forward_entry,    backward_reduce_entry, backward_elemt_entry,
      backward_entry, parallel_probe_entry, act_affine_entry, act_forward_entry,     act_backward_entry,
      masked_stats_entry, masked_affine_entry, masked_backward_reduce_entry, masked_backward_elemt_entry,
      masked_forward_entry, masked_backward_entry, kMaskedFusedChannels};
  return t;
}

}  // namespace BNEXT_CPU_ISA_NS
}  // namespace cpu
}  // namespace bnext
