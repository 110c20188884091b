// CPU loops of every bnext op, templated on the input type. The entries in batch_norm_cpu.cpp
// check arguments, pick the memory format and allocate; everything here only reads and writes
// raw pointers of tensors that are contiguous in that format.
//
// Map: op (KernelTable entry) -> kernel (kernel/ops.h) -> NCHW path | channels-last path. The
// file of each function is named in brackets, all under csrc/cpu/kernel/.
//
//   stats            stats_kernel -> channel_stats
//     NCHW           nchw_stats [reductions]: (block, channel group) tasks in memory order,
//                    group_block_stats [reductions] -> seg_mean + seg_moments, or seg_moments for 16-bit
//                    types [nchw_segments]; lane_block_stats [reductions] for short planes that
//                    end in a partial vector (7x7)
//     channels-last  rows_stats [reductions]: chunks of super-rows -> rows_mean + rows_moments, or
//                    rows_moments alone [channels_last_rows]
//   affine           affine_kernel (normalize and eval; eval's folded pivots are +0: !Centered)
//     NCHW           affine_nchw [passes]: lanes_pass [plan] picks group_affine -> lanes_affine
//                    (per-lane coefficients) [passes], planes_affine_lines (streamed lines)
//                    [passes], or seg_affine plane by plane [nchw_segments]
//     channels-last  rows_affine_all [passes] -> rows_affine -> rows_affine_group [channels_last_rows]
//   forward          forward_kernel
//     NCHW           where fused_channel_forward [plan]: per channel group, group_block_stats
//                    [reductions] then group_affine [passes] while the group is in L2;
//                    elsewhere channel_stats + affine_kernel
//     channels-last  channel_stats + affine_kernel
//   backward_reduce  backward_reduce_kernel -> backward_reduce_sums [reductions]
//     NCHW           group_block_reduce [reductions] -> seg_reduce [nchw_segments], or
//                    lane_block_reduce [reductions] (7x7)
//     channels-last  rows_reduce_all [reductions] -> rows_reduce [channels_last_rows]
//   backward_elemt   backward_elemt_kernel
//     NCHW           lanes_pass [plan] picks group_backward -> lanes_backward [passes], or
//                    seg_backward plane by plane [nchw_segments]
//     channels-last  rows_backward_all [passes] -> rows_backward -> rows_backward_group
//                    [channels_last_rows]
//   backward         backward_kernel
//     NCHW           where fused_channel_backward [plan]: per channel group, group_reduce_nchw
//                    [reductions] then group_backward [passes] while the group is in L2;
//                    elsewhere backward_reduce_sums + backward_elemt_kernel
//     channels-last  backward_reduce_sums + backward_elemt_kernel
//   act_affine       act_affine_dispatch [act_ops]: y = act((x - pivot) * scale + shift + r), the
//                    activation (act.h: vector exp/expm1 and the activations of common/act.h) and the
//                    residual compile-time constants
//     NCHW           act_affine_kernel [act_ops] -> group_act_affine: channel groups whose runs of a
//                    sample fill whole vectors (or stream as lines) as one run with per-lane
//                    coefficients (GroupLaneCoeffs [act_runs]), others plane by plane (SplatCoeffs)
//     channels-last  act_affine_kernel -> run_act_affine per super-row (LaneCoeffs)
//   act_forward      act_forward_kernel [act_ops]
//     NCHW           where fused_channel_forward [plan]: per channel group, group_forward_coeffs
//                    [ops] then group_act_affine while the group is in L2; elsewhere channel_stats +
//                    act_affine
//     channels-last  channel_stats + act_affine
//   act_backward     act_backward_kernel -> act_backward_impl [act_ops]: dz and x - mean per value
//                    from (dy, x, r) or (dy, y, r) (GradRun)
//     NCHW           where fused_channel_backward [plan]: per channel group, act_group_block_sums
//                    (short planes: lane_act_block_sums, per-position sums; else act_block_sums per
//                    channel) then group_act_backward while the group is in L2; elsewhere
//                    act_reduce_sums ((block, channel group) tasks) + act_backward_elemt
//     channels-last  act_reduce_sums (chunks, run_act_reduce_lanes) + act_backward_elemt
//   masked_*         masked batch norm of (N, C, L) over runs of real positions [masked]: the
//                    statistics and backward sums per channel over MaskedBlocks (seg_mean +
//                    seg_moments, seg_reduce), the passes row by row (seg_affine, seg_backward,
//                    zeros at the padding)
//
// Beneath them: common.h (tuning constants, merge_t, Buffer, with_constant), stream.h (streaming
// stores and when a pass streams), vec.h (Vec, vload/vstore, bfloat16 rounding, masked tails,
// wide_add), plan.h (BlockPlan, RowPlan, channel_group, line_group, the routing predicates);
// above them, entries.h: the type-erased entries and this variant's KernelTable.
//
// These headers are compiled once per instruction set (kernels_baseline.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp, kernels_avx512bf16.cpp). Each of those includes kernel_deps.h first, then
// switches the target ISA with `#pragma GCC target`, then includes this file, whose parts define
// everything inside the namespace BNEXT_CPU_ISA_NS. So every function defined here exists once per
// ISA under its own name, and shared inline/template code (ATen, c10, libstdc++) keeps the
// baseline ISA: the linker can never hand an AVX-512 copy of a shared inline function to a
// baseline caller. The parts include nothing themselves and come in dependency order below.
//
// Determinism: every reduction is split into pieces whose boundaries depend only on the shape
// (fixed blocks of a channel in NCHW, fixed chunks of rows in channels-last), never on the thread
// count, and the pieces are merged in a fixed order. Results are therefore bitwise identical for
// any torch.set_num_threads value and from run to run (for a given ISA variant: vector width
// changes the summation order inside a block).
//
// Memory traffic (what makes batch norm fast): statistics are taken per block with two passes,
// the second one over data still in L1 (16-bit inputs: one pass); the NCHW training
// forward/backward finish a group of channels (one of long planes, up to 16 of short ones:
// statistics, then normalize) while it is still in L2; per-channel coefficients are computed once
// (normalize() and backward_elemt() of math.h); no full-size temporary is ever allocated.
#ifndef BNEXT_CPU_ISA_NS
#error "batch_norm_kernel.h is compiled through csrc/cpu/kernels_<isa>.cpp, which names BNEXT_CPU_ISA_NS"
#endif

#include "kernel_deps.h"

#ifndef BNEXT_CPU_BF16
#define BNEXT_CPU_BF16 0  // 1: the ISA has AVX512-BF16 (kernels_avx512bf16.cpp)
#endif

#include "kernel/common.h"
#include "kernel/stream.h"
#include "kernel/vec.h"
#include "kernel/nchw_segments.h"
#include "kernel/channels_last_rows.h"
#include "kernel/plan.h"
#include "kernel/reductions.h"
#include "kernel/passes.h"
#include "kernel/ops.h"
#include "kernel/act.h"
#include "kernel/act_runs.h"
#include "kernel/act_ops.h"
#include "kernel/masked.h"
#include "kernel/entries.h"
