"""bnext.MaskedBatchNorm1d and bnext.batch_norm(..., mask=...): batch norm of padded sequences, with
statistics over the real positions only.

Input (N, C, L) and a boolean mask (N, L), True at the real positions. With m the mask as 0/1 and
K = sum(m) the number of real positions (the same for every channel):

    mean = sum(m * x) / K,   var = sum(m * (x - mean)^2) / K   (two passes, never E[x^2] - E[x]^2)
    xhat = (x - mean) * invstd,   invstd = 1 / sqrt(var + eps),   y = m * (xhat * weight + bias)

so a batch is normalized as batch norm normalizes its real positions gathered into (K, C), and the
padding is zero in the output. The backward is batch norm's closed form restricted to the real
positions:

    d bias = sum(m * dy),   d weight = sum(m * dy * xhat),
    dx = m * weight * invstd * (dy - d bias / K - xhat * d weight / K)

(dy at padded positions never counts: a loss over the whole padded output gives the real positions'
gradients). The running statistics are batch norm's (bnext::update_running_stats: momentum blend,
momentum=None cumulative average, num_batches_tracked) of the real positions' mean and unbiased
variance, var * K / (K - 1). Eval normalizes with the running statistics (bnext's eval kernel) and
zeroes the padding. mask=None is bnext.BatchNorm1d / bnext.batch_norm, the same call.

Two ways to compute it (masked_batch_norm_impl routes by plain predicates):

* the kernels route (eager calls): on CUDA, any mask, the mask-taking kernels
  (bnext::_batch_norm_masked_forward / _backward: bnext's CUDA reduction and elementwise kernels
  with a reducer and op that skip the padding, csrc/cuda/batch_norm_kernels.cuh). On CPU, for masks
  made of few runs of real positions (padded sequences), kernels of its own
  (bnext::_masked_forward, _masked_backward; csrc/cpu/kernel/masked.h) read the real positions in
  place, run by run, with bnext's statistics (blocks, pivots, merges in double) and elementwise
  passes. Both write zeros at the padding: the memory passes of one unmasked batch norm call over
  the real positions only. On other devices the real positions are copied run by run into one
  (1, C, K) tensor, bnext's fused batch norm runs on that (its kernels, checks, and
  running-statistic update with count K), and the result is copied back around zeros; _Compact and
  _Expand are each other's adjoint, so double backward works through them.
  benchmarks/bench_small_batch.py --layers masked compares a step with unmasked batch norm of the
  whole padded batch.
* the torch-op route (torch.compile, where inductor fuses it; eager masks with many holes):
  MaskedBatchNormFunction, the formulas above in torch ops, backward in closed form written in
  differentiable torch ops (double backward recomputes the statistics from the input so that they
  are differentiated too). torch.func transforms and forward-mode AD run the same forward as a
  plain composite that autograd differentiates.

K comes from the mask, data the shapes do not tell: the "more than 1 value per channel" rule is a
host read in eager mode (ValueError, as batch norm's) and an in-graph assertion under torch.compile
and the torch.func transforms (RuntimeError with the same words: a graph cannot raise a ValueError
on a value it computes). There the unbiased correction is computed with tensor ops for the same
reason (the count handed to the update is then 1: no second correction).
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import functional
from ._ops.conventions import acc_dtype
from ._ops.handles import namespace, ops
from ._shared import flat
from .functional import batch_norm_impl, check_device, recomputing, transformed
from .modules import PLAIN_LAYERS, BatchNorm1d, _fx_leaf
from .sync import SyncBatchNorm, check_backend, sync_batch_norm, sync_world_size

_NAME = "bnext.MaskedBatchNorm1d"
_SYNC_NAME = "bnext.SyncMaskedBatchNorm"


def _stats(x: Tensor, m: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) per channel over the real positions, two passes. x (N, C, L) in the
    accumulation dtype, m (N, 1, L) bool, count the real positions (0-d, accumulation dtype).
    torch.where, not a product with the mask: padding holding inf or NaN stays out."""
    mean = torch.where(m, x, 0).sum((0, 2)) / count
    centered = torch.where(m, x - mean[:, None], 0)
    var = (centered * centered).sum((0, 2)) / count
    return mean, var


def _forward(input: Tensor, m: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], count: Tensor, eps: float):
    """(output in input's dtype, mean, biased var): the training forward in torch ops."""
    x = input.to(acc_dtype(input.dtype))
    mean, var = _stats(x, m, count)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(x.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(x.dtype)
    # x * scale + shift: one elementwise op with per-channel factors, then the padding zeroed.
    out = torch.where(m, torch.addcmul(shift[:, None], x, scale[:, None]), 0)
    return out.to(input.dtype), mean, var


def _backward(g, input, m, weight, mean, invstd, count, need_input, need_weight, need_bias):
    """(grad_input, grad_weight, grad_bias) of the closed form, in differentiable torch ops."""
    acc = mean.dtype
    g = torch.where(m, g.to(acc), 0)
    xhat = torch.where(m, (input.to(acc) - mean[:, None]) * invstd[:, None], 0)
    sum_dy = g.sum((0, 2))
    sum_dy_xhat = (g * xhat).sum((0, 2))
    grad_input = grad_weight = grad_bias = None
    if need_input:
        scale = invstd if weight is None else weight.to(acc) * invstd
        # dy - mean(dy) first, so that a constant dy cancels exactly (as in torch's backward).
        centered = g - (sum_dy / count)[:, None]
        grad_input = torch.where(m, (centered - xhat * (sum_dy_xhat / count)[:, None]) * scale[:, None], 0)
        grad_input = grad_input.to(input.dtype)
    if need_weight:
        grad_weight = sum_dy_xhat.to(weight.dtype)
    if need_bias:
        grad_bias = sum_dy
    return grad_input, grad_weight, grad_bias


class MaskedBatchNormFunction(torch.autograd.Function):
    """forward(input, m, weight, bias, count, eps) -> (output, mean, var): the training forward
    (see the module's notes), mean and biased var non-differentiable (for the running statistics).
    m is the mask as (N, 1, L) bool, count its number of True (0-d, accumulation dtype)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, m, weight, bias, count, eps):
        return _forward(input, m, weight, bias, count, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, m, weight, bias, count, eps = inputs
        _out, mean, var = output
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, m, weight, count, mean, torch.rsqrt(var + eps))
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, m, weight, count, mean, invstd = ctx.saved_tensors
        need_input, _, need_weight, need_bias = ctx.needs_input_grad[:4]
        grad_input, grad_weight, grad_bias = _formula_backward(
            ctx, grad_out, input, m, weight, count, mean, invstd, need_input, need_weight, need_bias
        )
        return grad_input, None, grad_weight, grad_bias, None, None


def _formula_backward(ctx, grad_out, input, m, weight, count, mean, invstd, need_input, need_weight, need_bias):
    """(grad_input, grad_weight, grad_bias) of the torch-op formulas (_backward), grad_bias in the
    bias's dtype. Under double backward (grad mode on) the statistics are recomputed from the input:
    the saved ones are constants of the graph, and autograd must differentiate them too."""
    if torch.is_grad_enabled():
        mean, var = _stats(input.to(mean.dtype), m, count)
        invstd = torch.rsqrt(var + ctx.eps)
    grad_input, grad_weight, grad_bias = _backward(
        grad_out, input, m, weight, mean, invstd, count, need_input, need_weight, need_bias
    )
    if grad_bias is not None:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias


class _MaskedKernels(torch.autograd.Function):
    """MaskedBatchNormFunction on bnext's masked kernels: forward(input, weight, bias, eps, runs,
    mask, count) -> (output, mean, var, invstd), the last three non-differentiable. With `runs` (a
    _Runs: CPU tensors) the CPU kernels read the real positions in place run by run
    (bnext::_masked_forward / _masked_backward, csrc/cpu/kernel/masked.h); with runs None the
    mask-taking kernels of the CUDA route (bnext::_batch_norm_masked_forward / _backward, on the
    emulated CUDA kernels under bnext.testing.emulate_cuda) read the mask per position. Either way
    they write zeros at the padding: the memory passes of one unmasked batch norm call, no copy.
    Double backward (create_graph) differentiates the torch-op formulas of MaskedBatchNormFunction
    (count: K as a 0-d tensor)."""

    @staticmethod
    def forward(input, weight, bias, eps, runs, mask, count):
        if runs is not None:
            return torch.ops.bnext._masked_forward(input, runs.table, weight, bias, eps)
        out, mean, invstd, var = ops()._batch_norm_masked_forward(input, mask, weight, bias, eps)
        return out, mean, var, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, eps, runs, mask, count = inputs
        _out, mean, var, invstd = output
        ctx.eps, ctx.runs = eps, runs
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, mask, weight, count, mean, invstd)
        ctx.mark_non_differentiable(mean, var, invstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_invstd):
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        input, mask, weight, count, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: the differentiable formulas
            grad_input, grad_weight, grad_bias = _formula_backward(
                ctx, grad_out, input, mask.unsqueeze(1), weight, count, mean, invstd, need_input, need_weight, need_bias
            )
            return grad_input, grad_weight, grad_bias, None, None, None, None
        if ctx.runs is not None:
            grad_input, sum_dy, sum_dy_xmu = torch.ops.bnext._masked_backward(
                grad_out, input, ctx.runs.table, mean, invstd, weight, need_input
            )
        else:
            grad_input, sum_dy, sum_dy_xmu = ops()._batch_norm_masked_backward(
                grad_out, input, mask, weight, mean, invstd
            )
        grad_input = grad_input if need_input else None
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _mask_kernels(input: Tensor) -> bool:
    """The mask-taking kernels (the CUDA route): CUDA tensors, and CPU tensors while bnext runs on the
    emulated CUDA kernels (bnext.testing.emulate_cuda)."""
    return type(input) is Tensor and (input.is_cuda or (input.device.type == "cpu" and namespace() != "bnext"))


class _Runs:
    """The mask's real positions as runs (row n, start, stop) on the host, in (n, l) order: where
    they are few, the real positions are copied into one (1, C, K) tensor with a slice per run."""

    def __init__(self, mask: Tensor) -> None:
        self._mask = mask
        # (R, 3) int64 (row, start, stop): the runs as the CPU ops take them.
        self.table = torch.ops.bnext._masked_runs(mask.detach().cpu())
        self.count = int((self.table[:, 2] - self.table[:, 1]).sum())

    # The runs as host lists, for the slice copies of other devices (the CPU ops take the table).
    @functools.cached_property
    def rows(self) -> list:
        return self.table[:, 0].tolist()

    @functools.cached_property
    def starts(self) -> list:
        return self.table[:, 1].tolist()

    @functools.cached_property
    def stops(self) -> list:
        return self.table[:, 2].tolist()

    @functools.cached_property
    def lengths(self) -> list:
        return (self.table[:, 2] - self.table[:, 1]).tolist()

    @functools.cached_property
    def gaps(self) -> "_Runs":
        """The padding's runs, which _Expand's slice copies zero (each output element is written
        once); taken only where those copies run (the CPU copy op zeroes the gaps itself)."""
        return _Runs(~self._mask.detach().cpu())

    def __len__(self) -> int:
        return self.table.shape[0]

    def slices(self, t: Tensor):
        return [t[n, :, a:b] for n, a, b in zip(self.rows, self.starts, self.stops)]


def _copy_ops(t: Tensor) -> bool:
    """The CPU copy ops of csrc/cpu/masked_runs.cpp (one memcpy per run and channel, in C++) for
    plain CPU tensors outside torch.compile; torch's slice copies elsewhere."""
    return not torch.compiler.is_compiling() and t.device.type == "cpu" and type(t) is Tensor


class _Compact(torch.autograd.Function):
    """(N, C, L) -> (1, C, K): the real positions, run after run (its adjoint is _Expand)."""

    @staticmethod
    def forward(ctx, input, runs):
        ctx.runs, ctx.shape = runs, input.shape
        if _copy_ops(input):
            return torch.ops.bnext._masked_compact(input, runs.table)
        if not len(runs):  # a rank without real positions (SyncMaskedBatchNorm)
            return input.new_zeros((1, input.shape[1], 0))
        return torch.cat(runs.slices(input), dim=1).unsqueeze(0)

    @staticmethod
    def backward(ctx, grad):
        return _Expand.apply(grad, ctx.runs, ctx.shape), None


class _Expand(torch.autograd.Function):
    """(1, C, K) -> (N, C, L): the values back at the real positions, zeros at the padding."""

    @staticmethod
    def forward(ctx, compact, runs, shape):
        ctx.runs = runs
        if _copy_ops(compact):
            return torch.ops.bnext._masked_expand(compact, runs.table, shape[0], shape[2])
        out = compact.new_empty(shape)
        for dst, src in zip(runs.slices(out), compact[0].split(runs.lengths, dim=1)):
            dst.copy_(src)
        for gap in runs.gaps.slices(out):
            gap.zero_()
        return out

    @staticmethod
    def backward(ctx, grad):
        return _Compact.apply(grad, ctx.runs), None, None


def check_mask(input: Tensor, mask, op: str = "bnext.batch_norm") -> None:
    """The mask's rules: a bool tensor of shape (N, L) on the input's device, for (N, C, L) input."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: mask must be a Tensor or None, got {type(mask).__name__}")
    if input.dim() != 3:
        raise ValueError(f"{op}: a mask needs (N, C, L) input, got {input.dim()}D input of shape {list(input.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a torch.bool tensor (True at the real positions), got {mask.dtype}")
    expected = [input.shape[0], input.shape[2]]
    if list(mask.shape) != expected:
        raise RuntimeError(
            f"{op}: mask must have shape (N, L) = {expected} for input of shape {list(input.shape)}, "
            f"got {list(mask.shape)}"
        )
    if mask.device != input.device:
        raise RuntimeError(f"{op}: mask must be on the input's device ({input.device}), got {mask.device}")


_WORDS = "Expected more than 1 value per channel when training, got input size"

# The runs route makes a few small calls per run of real positions and training step; the
# torch-op route makes several more passes over the input. Per run, the calls cost about what those
# passes cost over a thousand input elements (measured with masks of 64 to 3,500 runs on 64x256x512
# float32, one thread, the timing of benchmarks/bench_small_batch.py --layers masked, with the
# compact copies; the CPU kernels also walk each run of each channel on its own): the runs route
# while there are at least this many input elements per run, or at most one run per row (padded
# sequences) whatever the size.
_ELEMENTS_PER_RUN = 1024


def _compact_route(runs: "_Runs", input: Tensor) -> bool:
    return len(runs) <= input.shape[0] or len(runs) * _ELEMENTS_PER_RUN <= input.numel()


def _update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum) -> None:
    """Batch norm's update (bnext::update_running_stats) with the unbiased variance of the real
    positions: `count` a host int (eager CPU kernels) goes to the update, which corrects the
    variance; a tensor count (K is not a host value in a graph) is corrected with tensor ops, and
    count 1 then tells the update there is nothing left to correct."""
    if not torch.compiler.is_compiling() and recomputing():
        return  # checkpoint recomputation: the batch was counted when the forward first ran
    if running_mean is not None or running_var is not None or num_batches_tracked is not None:
        if isinstance(count, int):  # a host count (eager): the update corrects the variance itself
            unbiased = var.detach()
        else:
            unbiased, count = var.detach() * (count / (count - 1)), 1
        torch.ops.bnext.update_running_stats(
            flat(running_mean), flat(running_var), num_batches_tracked, mean.detach(), unbiased, count, momentum
        )


def _vmapped() -> bool:
    """Inside torch.func.vmap (at any level of the transform stack)."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def masked_batch_norm_impl(
    input: Tensor,
    mask: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
    op: str = "bnext.batch_norm",
) -> Tensor:
    """batch_norm_impl's arguments (training: use the batch statistics) with a mask (N, L) for
    (N, C, L) input. Every check runs before anything is written: a call that raises leaves the
    running statistics and num_batches_tracked unchanged.

    Training takes one of three routes, by plain predicates:
    * torch.compile, torch.func, forward AD: the torch-op forward (MaskedBatchNormFunction, or the
      bare composite under a transform), K computed in the graph and asserted there;
    * eager on CUDA (and on the emulated CUDA kernels): the mask-taking kernels (_MaskedKernels);
    * eager, few runs of real positions (padded sequences: one run per row): on CPU the masked
      kernels in place (_MaskedKernels); on other devices the real positions copied into
      (1, C, K), bnext's fused batch norm on that (its kernels, checks and running-statistic update
      with count K), the result copied back around zeros;
    * eager, many runs (masks with holes), CPU and other devices: MaskedBatchNormFunction.
    """
    if input.is_cuda:
        check_device(input)
    check_mask(input, mask, op)
    torch.ops.bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, training, eps, False)
    m = mask.unsqueeze(1)
    if not training:
        out = batch_norm_impl(input, running_mean, running_var, weight, bias, False, momentum, eps)
        return torch.where(m, out, 0)
    acc = acc_dtype(input.dtype)
    weight, bias = flat(weight), flat(bias)
    if torch.compiler.is_compiling() or transformed():
        count = mask.sum().to(acc)
        # No host read inside a graph or a transform: an assertion the graph runs (RuntimeError).
        # Under vmap the count may differ per member and an assertion has no batching rule: a member
        # with fewer than 2 real positions gets what the formulas give instead (its one position
        # normalized to 0; an infinite unbiased variance), as no vmapped op can raise per member.
        if torch.compiler.is_compiling() or not _vmapped():
            torch._assert_async(count > 1, f"{_WORDS} {list(input.shape)} with at most 1 real position in mask")
        if transformed():
            # torch.func and forward AD: the same formulas as a composite autograd differentiates.
            out, mean, var = _forward(input, m, weight, bias, count, eps)
        else:
            out, mean, var = MaskedBatchNormFunction.apply(input, m, weight, bias, count, eps)
        _update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
        return out
    if _mask_kernels(input):
        real = int(mask.sum())  # the host read of the count (one synchronization on CUDA)
        if real <= 1:
            raise ValueError(f"{_WORDS} torch.Size({list(input.shape)}) with {real} real position(s) in mask")
        count = torch.tensor(real, dtype=acc, device=input.device)
        out, mean, var, _invstd = _MaskedKernels.apply(input, weight, bias, eps, None, mask, count)
        _update(running_mean, running_var, num_batches_tracked, mean, var, real, momentum)
        return out
    runs = _Runs(mask)
    if runs.count <= 1:
        raise ValueError(f"{_WORDS} torch.Size({list(input.shape)}) with {runs.count} real position(s) in mask")
    if _compact_route(runs, input) and _copy_ops(input):
        count = torch.tensor(runs.count, dtype=acc, device=input.device)
        out, mean, var, _invstd = _MaskedKernels.apply(input, weight, bias, eps, runs, mask, count)
        _update(running_mean, running_var, num_batches_tracked, mean, var, runs.count, momentum)
        return out
    if _compact_route(runs, input):
        compact = _Compact.apply(input, runs)
        out = batch_norm_impl(
            compact, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked
        )
        return _Expand.apply(out, runs, input.shape)
    count = torch.tensor(runs.count, dtype=acc, device=input.device)
    out, mean, var = MaskedBatchNormFunction.apply(input, m, weight, bias, count, eps)
    _update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
    return out


def _masked_forward(layer, name: str, input, mask, synced):
    """forward(input, mask) of the masked layers, mask given: `synced` says whether the batch
    statistics come from sync_masked_batch_norm."""
    if isinstance(input, torch.fx.Proxy):
        return _fx_leaf(layer, (input, mask))
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
    layer._check_input_dim(input)
    (running_mean, running_var, weight, bias, use_batch_stats, momentum, eps, num_batches_tracked) = layer._layer_args()
    if use_batch_stats and synced:
        return sync_masked_batch_norm(
            input, mask, running_mean, running_var, weight, bias, momentum, eps, layer.process_group,
            num_batches_tracked,
        )
    return masked_batch_norm_impl(
        input, mask, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps, num_batches_tracked, name
    )


class MaskedBatchNorm1d(BatchNorm1d):
    """Batch norm of padded sequences: (N, C, L) input and a bool mask (N, L), True at the real
    positions. bnext.BatchNorm1d's constructor, parameters, buffers and state_dict.

    forward(input, mask=None): with a mask, the statistics (batch and running: the unbiased variance
    with the real count) and the weight and bias gradients come from the real positions only, and
    the output and grad_input are zero at the padding; eval normalizes with the running statistics
    and zeroes the padding. mask=None is bnext.BatchNorm1d exactly.
    """

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles this branch only: unmasked calls are torch's batch norm.
            if mask is not None:
                raise RuntimeError("bnext.MaskedBatchNorm1d: TorchScript supports mask=None only")
            return self._torch_forward(input)
        if mask is None:
            return super().forward(input)
        return _masked_forward(self, _NAME, input, mask, False)


@torch.compiler.disable
def sync_masked_batch_norm(
    input: Tensor,
    mask: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum,
    eps: float,
    process_group=None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Training-mode masked batch norm with statistics over the real positions of every rank of
    `process_group` (default: WORLD); every rank of the group must call it. Each rank copies its
    real positions into (1, C, K_rank) and hands them to bnext's sync_batch_norm, which merges
    unequal counts (0 included), applies batch norm's rules to the global count, updates the
    running statistics with it and all-reduces the backward's sums; the result is copied back
    around zeros. A bad mask on one rank raises on every rank (one small all-gather first)."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    check_backend(group, input.device)
    local_error = None
    try:
        check_mask(input, mask, _SYNC_NAME)
    except (TypeError, ValueError, RuntimeError) as e:
        local_error = e
    flags = torch.zeros(world_size, dtype=torch.int64, device=input.device)
    dist.all_gather_single(
        flags, torch.tensor([local_error is None], dtype=torch.int64, device=input.device), group=group
    )
    if local_error is not None:
        raise local_error
    failed = [r for r, ok in enumerate(flags.tolist()) if not ok]
    if failed:
        raise RuntimeError(
            f"{_SYNC_NAME}: rank(s) {failed} of the process group rejected their mask (their error says why); "
            "this rank stops too instead of waiting for them"
        )
    runs = _Runs(mask)
    compact = _Compact.apply(input, runs)
    out = sync_batch_norm(
        compact, running_mean, running_var, weight, bias, momentum, eps, process_group, num_batches_tracked
    )
    return _Expand.apply(out, runs, input.shape)


class SyncMaskedBatchNorm(SyncBatchNorm):
    """MaskedBatchNorm1d with the statistics of every rank's real positions: bnext.SyncBatchNorm's
    constructor (process_group), buffers and state_dict, forward(input, mask=None).

    In training with an initialized process group of more than one rank, the batch statistics are
    those of the real positions of every rank of `process_group` (the counts may differ per rank, a
    rank may have none); otherwise it is MaskedBatchNorm1d. mask=None is bnext.SyncBatchNorm.
    """

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            if mask is not None:
                raise RuntimeError("bnext.SyncMaskedBatchNorm: TorchScript supports mask=None only")
            return self._torch_forward(input)
        if mask is None:
            return super().forward(input)
        synced = self.training and sync_world_size(self.process_group) > 1
        return _masked_forward(self, _SYNC_NAME, input, mask, synced)


PLAIN_LAYERS.update({MaskedBatchNorm1d, SyncMaskedBatchNorm})
# bnext.batch_norm(..., mask=...) routes here (functional.py cannot import this module).
functional.masked_batch_norm_impl = masked_batch_norm_impl
