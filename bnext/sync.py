"""bnext.SyncBatchNorm: batch statistics synchronized over a torch.distributed process group.

Forward, per call (every rank of the group must make it, in the same order):
  1. all-gather of a small int64 header [C, count, stats dtype, ok] per rank: every rank learns
     every count and checks that the ranks agree, so a set-up error raises on every rank instead
     of leaving the others blocked in the next collective;
  2. local batch_norm_stats (mean, biased var), all-gather of [mean, var] per rank;
  3. k-way Chan merge of the gathered statistics in rank order, with tensor ops: every rank runs
     the same computation on the same gathered data, so every rank gets bitwise-identical stats;
  4. batch_norm_elemt.
Backward: batch_norm_backward_reduce -> all-reduce of [sum_dy, sum_dy_xmu] -> backward_elemt with
mean_dy = sum_dy / M, M the global count. grad_weight/grad_bias are the local sums; DDP sums them.
Ranks with an empty batch take part in every collective with count 0.

Collectives are torch.distributed's own (gloo for CPU tensors, NCCL for CUDA tensors).
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._ops.conventions import acc_dtype, layout_format
from ._ops.handles import ops
from ._shared import empty_batch, flat, replace_layers
from .act import _BatchNormActMixin
from .functional import batch_norm_impl
from .modules import PLAIN_LAYERS, _BatchNormMixin

_NAME = "bnext.SyncBatchNorm"
_STATS_DTYPES = (torch.float32, torch.float64)  # header code -> dtype of the gathered statistics
_HEADER = 4  # C, count, stats dtype code, ok


def check_backend(group, device: torch.device) -> None:
    """Raise if `group` has no backend for `device` (e.g. an NCCL group and CPU tensors)."""
    check_backend_config(dist.get_backend_config(group), device)


def check_backend_config(config: str, device: torch.device) -> None:
    """`config` as dist.get_backend_config gives it: "cuda:nccl", "cpu:gloo,cuda:gloo", ..."""
    entries = [entry.split(":", 1) for entry in config.split(",")]
    if any(len(e) != 2 for e in entries):
        return  # a backend registered for every device type: nothing to check
    if device.type not in {e[0].strip() for e in entries}:
        raise RuntimeError(
            f"{_NAME}: the process group's backend ({config}) cannot communicate {device.type} tensors, "
            f"and the input is on {device}. Use a group with a backend for {device.type} (gloo for CPU "
            "tensors, nccl for CUDA tensors; init_process_group(backend='cpu:gloo,cuda:nccl') covers both), "
            "or move the model and input to a device the group serves."
        )


def _all_gather(tensor: Tensor, group, world_size: int) -> Tensor:
    out = tensor.new_empty((world_size * tensor.numel(),))
    dist.all_gather_single(out, tensor.contiguous(), group=group)
    return out.view(world_size, tensor.numel())


def _exchange_header(input: Tensor, local_error: Optional[Exception], group, world_size: int):
    """All-gather [C, count, stats dtype, ok]; raise on every rank when the ranks disagree.

    Returns the per-rank counts (int64 tensor on the input's device) and the global count.
    """
    C = input.shape[1] if input.dim() >= 2 else 0
    count = input.numel() // C if C > 0 else 0
    code = _STATS_DTYPES.index(acc_dtype(input.dtype)) if input.is_floating_point() else -1
    header = torch.tensor([C, count, code, local_error is None], dtype=torch.int64, device=input.device)
    gathered = _all_gather(header, group, world_size)
    # One host sync: the checks and the global count (a Python int for the running-var correction).
    rows = gathered.tolist()
    if local_error is not None:
        raise local_error
    failed = [r for r, row in enumerate(rows) if not row[3]]
    if failed:
        raise RuntimeError(
            f"{_NAME}: rank(s) {failed} of the process group rejected their arguments (their error says why); "
            "this rank stops too instead of waiting for them"
        )
    channels = [row[0] for row in rows]
    if len(set(channels)) != 1:
        raise RuntimeError(
            f"{_NAME}: every rank must pass the same number of channels (input.size(1)), got {channels} "
            "(rank order of the process group)"
        )
    codes = [row[2] for row in rows]
    if len(set(codes)) != 1:
        names = [str(_STATS_DTYPES[c]) for c in codes]
        raise RuntimeError(
            f"{_NAME}: every rank must accumulate statistics in the same dtype (float32 for float16/bfloat16/"
            f"float32 input, float64 for float64 input), got [{', '.join(names)}] (rank order of the process group)"
        )
    total = sum(row[1] for row in rows)
    if total == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got 1 value per channel over the "
            f"{world_size} ranks (local input size {list(input.shape)})"
        )
    return gathered[:, 1], total


def _merge_stats(gathered: Tensor, counts: Tensor, total: int, dtype):
    """k-way Chan merge: mean = sum n_i m_i / M, var = sum n_i (v_i + (m_i - mean)^2) / M.

    Rows of ranks with count 0 are zeros and weigh nothing. float64 for the merge (a (W, C) tensor,
    free next to the data); the result is cast back to the statistics dtype.
    """
    C = gathered.shape[1] // 2
    stats = gathered.to(torch.float64)
    mean_all, var_all = stats[:, :C], stats[:, C:]
    n = counts.to(torch.float64).unsqueeze(1)
    mean = (n * mean_all).sum(0) / total
    var = (n * (var_all + (mean_all - mean) ** 2)).sum(0) / total
    return mean.to(dtype), var.to(dtype)


class SyncBatchNormFunction(torch.autograd.Function):
    """forward(input, weight, bias, counts, total, eps, group, world_size) -> (output, mean, var).

    mean and var (biased) are the global batch statistics, non-differentiable, for the running
    statistics. First-order only: the backward's collective cannot be differentiated again.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, counts, total, eps, group, world_size):
        stats_dtype = acc_dtype(input.dtype)
        C = input.shape[1]
        empty = input.numel() == 0
        if empty:
            local = torch.zeros(2 * C, dtype=stats_dtype, device=input.device)
        else:
            local_mean, local_var = ops().batch_norm_stats(input)
            local = torch.cat([local_mean, local_var])
        gathered = _all_gather(local, group, world_size)
        mean, var = _merge_stats(gathered, counts, total, stats_dtype)
        invstd = torch.rsqrt(var + eps)
        if empty:
            output = torch.empty_like(input, memory_format=layout_format(input))
        else:
            output = ops().batch_norm_elemt(input, weight, bias, mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total = total
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        C = input.shape[1]
        empty = input.numel() == 0
        grad_out = grad_out.to(input.dtype)
        if empty:
            sum_dy = sum_dy_xmu = torch.zeros(C, dtype=mean.dtype, device=input.device)
        else:
            sum_dy, sum_dy_xmu = ops().batch_norm_backward_reduce(grad_out, input, mean, invstd)
        grad_input = grad_weight = grad_bias = None
        if need_w:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_b:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        if need_x:
            # needs_input_grad[0] is the same on every rank (same model), so either all ranks
            # take part in this all-reduce or none does.
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=ctx.group)
            if empty:
                grad_input = torch.empty_like(input, memory_format=layout_format(input))
            else:
                mean_dy, mean_dy_xmu = (combined / ctx.total).split(C)
                grad_input = ops().batch_norm_backward_elemt(
                    grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu
                )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _resolve_group(process_group):
    return process_group if process_group is not None else dist.group.WORLD


def sync_world_size(process_group) -> int:
    """World size to synchronize over; 1 when there is nothing to synchronize with."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_resolve_group(process_group))


@torch.compiler.disable
def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum,
    eps: float,
    process_group=None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Training-mode batch norm with statistics over every rank of `process_group` (default: WORLD).

    Every rank of the group must call it (same order of calls); a rank may pass an empty batch.
    Running statistics are updated with the global statistics (unbiased with the global count)
    only after every collective succeeded. Runs outside torch.compile graphs (collectives and one
    host sync): under torch.compile the graph breaks before and resumes after this call.
    """
    group = _resolve_group(process_group)
    world_size = dist.get_world_size(group)
    if world_size < 1:
        raise RuntimeError(f"{_NAME}: this process (global rank {dist.get_rank()}) is not a member of process_group")
    if isinstance(input, Tensor):
        check_backend(group, input.device)
    local_error = None
    try:
        # This rank's share of the batch: the values-per-channel rule applies to the global count
        # (_exchange_header).
        torch.ops.bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, True, eps, False)
    except (NotImplementedError, TypeError, ValueError, RuntimeError) as e:
        if not isinstance(input, Tensor):
            raise
        local_error = e
    counts, total = _exchange_header(input, local_error, group, world_size)
    weight, bias = flat(weight), flat(bias)
    if total == 0:
        out = empty_batch(input, weight, bias)
        mean = var = input.new_empty(0)
    else:
        out, mean, var = SyncBatchNormFunction.apply(input, weight, bias, counts, total, eps, group, world_size)
    torch.ops.bnext.update_running_stats(
        flat(running_mean) if total else None,
        flat(running_var) if total else None,
        num_batches_tracked,
        mean.detach(),
        var.detach(),
        total,
        momentum,
    )
    return out


class SyncBatchNorm(_BatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm on bnext's kernels, for CPU (gloo) and CUDA (NCCL) tensors.

    Same constructor, input checks and state_dict as torch.nn.SyncBatchNorm. In training with an
    initialized process group of more than one rank, statistics are computed over the batches of
    every rank of `process_group` (default: the whole world); otherwise (eval, no process group,
    world size 1) it is exactly bnext.BatchNorm*: no collective is made.

    It derives from torch's _BatchNorm, not from torch.nn.SyncBatchNorm, on purpose:
    DistributedDataParallel refuses every isinstance(m, nn.SyncBatchNorm) layer in a CPU model
    ("SyncBatchNorm layers only work with GPU modules"), which would rule out CPU training, the
    point of this class. isinstance(m, torch.nn.modules.batchnorm._BatchNorm) holds.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        # torch.nn.SyncBatchNorm's checks, with its messages and ValueError, written out here: this
        # class must not reach them through torch.nn.SyncBatchNorm, which users set to
        # bnext.SyncBatchNorm to swap implementations (the call would then recurse forever).
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
        if training and self.training and sync_world_size(self.process_group) > 1:
            return sync_batch_norm(
                input, running_mean, running_var, weight, bias, momentum, eps, self.process_group, num_batches_tracked
            )
        return batch_norm_impl(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """torch.nn.SyncBatchNorm.convert_sync_batchnorm, producing bnext.SyncBatchNorm layers.

        Every batch norm layer (any torch.nn.modules.batchnorm._BatchNorm, as torch converts) is
        replaced by a new bnext.SyncBatchNorm sharing its parameters and buffers (the same tensors:
        requires_grad, device and dtype kept) and its training flag. If `module` itself is such a
        layer, the new layer is returned. process_group: the group to synchronize over (None: the
        whole world).
        """
        return replace_layers(
            cls, module, process_group, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm)
        )


class SyncBatchNormAct(_BatchNormActMixin, SyncBatchNorm):
    """act(SyncBatchNorm(x) + residual): bnext.BatchNormAct2d's layer (activation, negative_slope,
    alpha, memory_saving; forward(input, residual=None)) with SyncBatchNorm's statistics.

    Where SyncBatchNorm synchronizes (training, a process group of more than one rank), the
    synchronized batch norm runs first and the add and activation after it, as torch ops; otherwise
    it is bnext.BatchNormAct*d, fused. Same state_dict as torch.nn.SyncBatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        memory_saving: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, activation=activation,
            negative_slope=negative_slope, alpha=alpha, memory_saving=memory_saving,
        )
        self.process_group = process_group

    def _batch_norm_act(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, residual):
        if training and self.training and sync_world_size(self.process_group) > 1:
            out = sync_batch_norm(
                input, running_mean, running_var, weight, bias, momentum, eps, self.process_group, num_batches_tracked
            )
            return self._torch_activation(out if residual is None else out + residual)
        return super()._batch_norm_act(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, residual
        )


PLAIN_LAYERS.add(SyncBatchNorm)
PLAIN_LAYERS.add(SyncBatchNormAct)
