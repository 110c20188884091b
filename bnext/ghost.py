"""bnext.GhostBatchNorm1d/2d: Ghost Batch Normalization (Hoffer et al. 2017, arXiv:1705.08741), batch
norm over virtual batches, for large-batch training (where BN over the whole batch regularizes less
and generalizes worse) and for tabular models (TabNet).

In training, the batch (N, C, *) is split along N into consecutive chunks of virtual_batch_size rows
(the last one smaller when N is not a multiple), and each chunk is normalized with its own
statistics. The result, gradients and running statistics are those of the chunks going through
nn.BatchNorm one after another: one momentum blend per chunk, in order, each with that chunk's
unbiased variance (its own count), num_batches_tracked advancing by the number of chunks (and
momentum=None the cumulative average over them). Eval is batch norm's, with the running statistics
(without running statistics, eval normalizes with batch statistics as batch norm does: per virtual
batch, as the chunks through nn.BatchNorm would).

How, with no Python loop over the G chunks, two routes:

* eager calls on CPU tensors (the chunk route): one call of bnext::_batch_norm_forward_chunks, and
  of bnext::_batch_norm_backward_chunks in backward, which run batch norm's kernels on each chunk in
  place (N is the outermost dimension of both memory formats, so a chunk is one contiguous block of
  every tensor): no copy, the memory traffic of one batch norm call. _GhostChunks is their autograd
  Function; its double backward differentiates the fold route below at the saved input.
* everything else (CUDA, the emulated kernels, torch.compile, torch.func, forward AD, saved
  programs: the fold route): the G full chunks of v rows, (G * v, C, *S), are one batch norm of
  (v, G * C, *S), the chunk index folded into the channels (a copy in the input's memory format, as
  bnext's vmap rules fold a vmapped dimension), with the affine parameters repeated G times
  (autograd sums their gradients over the chunks). That batch norm (bnext's routing) gets temporary
  running statistics of G * C elements, updated with momentum 1, which thus receive each chunk's
  mean and unbiased variance; a smaller last chunk is a second call.

The chunk route takes the chunks' statistics into the layer's running statistics with batch norm's
update once per chunk, in order (bnext::_update_running_stats_chunks, one call). The fold route
takes its G (+ 1) chunk statistics in closed form, with tensor ops (no host read, one graph under
torch.compile):

    momentum m:       running <- (1 - m)^G * running + sum_k m (1 - m)^(G - 1 - k) * stat_k
    momentum None:    running <- (n * running + sum_k stat_k) / (n + G),  n = num_batches_tracked

the G sequential updates of batch norm's rule, composed. The running statistics change only after
every chunk was normalized, so a call that raises leaves them as they were, and a forward that
torch.utils.checkpoint recomputes does not count its chunks again (batch_norm_impl's rule).

The fold costs two copies of the input's size in forward (in, and the output back) and two in
backward (grad_output in, grad_input back) beyond batch norm's own passes; the chunk route none:
benchmarks/bench_small_batch.py measures the layer against one batch norm call on the same input.
"""
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._shared import flat
from .functional import batch_norm_impl, eager_route, recomputing, saved_program
from .modules import PLAIN_LAYERS, BatchNorm1d, BatchNorm2d

_forward_chunks = torch.ops.bnext._batch_norm_forward_chunks.default
_backward_chunks = torch.ops.bnext._batch_norm_backward_chunks.default
_update_chunks = torch.ops.bnext._update_running_stats_chunks.default


def _check_virtual_batch_size(owner: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{owner}: virtual_batch_size must be an int, got bool")
    try:
        value = operator.index(value)  # int, numpy integers
    except TypeError:
        raise TypeError(f"{owner}: virtual_batch_size must be an int, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{owner}: virtual_batch_size must be >= 1 (rows per virtual batch), got {value}")
    return value


def _channels_last(input: Tensor) -> bool:
    return input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()


# The fold and its inverse, and the blend: plain torch ops, compiled by TorchScript too (the layers'
# scripted forward). Rows of chunk g are g * v .. g * v + v - 1.


def fold_chunks(input: Tensor, chunks: int, channels_last: bool) -> Tensor:
    """(G * v, C, *S) -> (v, G * C, *S): element [g * v + i, c, s] to [i, g * C + c, s], a copy,
    channels_last (4-D) or contiguous."""
    shape = input.shape
    v = shape[0] // chunks
    if channels_last:
        # In memory order (N, H, W, C): (G, v, H, W, C) -> (v, H, W, G, C).
        x = input.permute(0, 2, 3, 1).reshape([chunks, v, shape[2], shape[3], shape[1]]).permute(1, 2, 3, 0, 4)
        return x.contiguous().view([v, shape[2], shape[3], chunks * shape[1]]).permute(0, 3, 1, 2)
    x = input.reshape([chunks, v] + list(shape[1:])).transpose(0, 1)
    return x.contiguous().view([v, chunks * shape[1]] + list(shape[2:]))


def unfold_chunks(out: Tensor, chunks: int, channels_last: bool) -> Tensor:
    """The inverse of fold_chunks: (v, G * C, *S) -> (G * v, C, *S), a copy, channels_last (4-D) or
    contiguous."""
    shape = out.shape
    v, C = shape[0], shape[1] // chunks
    if channels_last:
        y = out.permute(0, 2, 3, 1).reshape([v, shape[2], shape[3], chunks, C]).permute(3, 0, 1, 2, 4)
        return y.contiguous().view([chunks * v, shape[2], shape[3], C]).permute(0, 3, 1, 2)
    y = out.reshape([v, chunks, C] + list(shape[2:])).transpose(0, 1)
    return y.contiguous().view([chunks * v, C] + list(shape[2:]))


def chunk_stats_buffer(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], chunks: int, channels: int
) -> Optional[Tensor]:
    """Zeros (2, chunks * channels) in the running statistics' dtype, for the chunks' means (row 0)
    and unbiased variances (row 1), chunk after chunk: batch norm with momentum 1 overwrites its
    running statistics with the batch's, exactly ((1 - 1) * 0 + 1 * stat). None without running
    statistics."""
    like = running_mean if running_mean is not None else running_var
    if like is None:
        return None
    return torch.zeros([2, chunks * channels], dtype=like.dtype, device=like.device)


def _rows(stats: Optional[Tensor], row: int, given: Optional[Tensor], start: int, end: int) -> Optional[Tensor]:
    """Elements start..end-1 of a statistics row (a view): batch norm's temporary running statistic."""
    if stats is None or given is None:
        return None
    return stats[row, start:end]


def _add_into(running: Optional[Tensor], combined: Tensor, keep: float) -> None:
    if running is not None:
        flat = running.view(-1)
        torch.add(combined, flat, alpha=keep, out=flat)


def _addcmul_into(running: Optional[Tensor], combined: Tensor, keep: Tensor) -> None:
    if running is not None:
        flat = running.view(-1)
        torch.addcmul(combined, flat, keep, out=flat)


def take_chunk_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    stats: Optional[Tensor],
    momentum: Optional[float],
    chunks: int,
) -> None:
    """The running statistics and count after `chunks` virtual batches went through batch norm one
    after another; stats (2, chunks * C): their means and unbiased variances, in order. Batch norm's
    rule for G chunks at once, with tensor ops (no host read):

        momentum m:     running <- (1 - m)^G * running + sum_k m (1 - m)^(G - 1 - k) * stat_k
        momentum None:  running <- (n * running + sum_k stat_k) / (n + G),  n = num_batches_tracked

    (momentum None without a count: torch's factor 0, the statistics stay), then n += G.

    The buffers are written with out= ops, not in-place methods: torch.func's grad and jvp refuse an
    in-place method on a tensor captured from outside the transformed function (the module's buffers),
    not an out= write; bnext's batch norm updates captured buffers there too."""
    if stats is not None and (running_mean is not None or running_var is not None):
        acc = torch.float64 if stats.dtype == torch.float64 else torch.float32
        G = chunks
        values = stats.to(acc).view(2, G, -1)
        if momentum is not None:
            m = float(momentum)
            # Chunk k's weight m (1 - m)^(G - 1 - k): the later the chunk, the less it is decayed.
            decay = torch.arange(G - 1, -1, -1, dtype=acc, device=values.device)
            combined = torch.matmul(torch.pow(1.0 - m, decay) * m, values)  # (2, C)
            keep = (1.0 - m) ** G
            _add_into(running_mean, combined[0], keep)
            _add_into(running_var, combined[1], keep)
        elif num_batches_tracked is not None:
            n = num_batches_tracked.to(acc)
            combined = values.sum(1) / (n + G)
            kept = n / (n + G)
            _addcmul_into(running_mean, combined[0], kept)
            _addcmul_into(running_var, combined[1], kept)
    if num_batches_tracked is not None:
        torch.add(num_batches_tracked, chunks, out=num_batches_tracked)


def _repeat(param: Optional[Tensor], chunks: int) -> Optional[Tensor]:
    # Autograd sums the repeated parameter's gradient over the chunks.
    if param is None:
        return None
    return (param if param.dim() == 1 else param.reshape(-1)).expand(chunks, -1).reshape(-1)


def _fold_route(input: Tensor, weight, bias, eps: float, v: int, stats: Optional[Tensor], running_mean, running_var):
    """The training output of the fold route (module docstring); the chunks' means and unbiased
    variances go into `stats` (chunk_stats_buffer) where it is given."""
    G, rest = divmod(input.shape[0], v)
    C = input.shape[1]
    cl = _channels_last(input)
    out = batch_norm_impl(
        fold_chunks(input[: G * v] if rest else input, G, cl),
        _rows(stats, 0, running_mean, 0, G * C),
        _rows(stats, 1, running_var, 0, G * C),
        _repeat(weight, G),
        _repeat(bias, G),
        True,
        1.0,
        eps,
        None,
    )
    out = unfold_chunks(out, G, cl)
    if rest:
        last_mean = _rows(stats, 0, running_mean, G * C, (G + 1) * C)
        last_var = _rows(stats, 1, running_var, G * C, (G + 1) * C)
        last = batch_norm_impl(input[G * v :], last_mean, last_var, weight, bias, True, 1.0, eps, None)
        out = torch.cat([out, last])
    return out


def _chunk_route(input: Tensor) -> bool:
    """The chunk route's kernels: eager calls (outside torch.compile, functional.eager_route) on
    plain CPU tensors."""
    return not torch.compiler.is_compiling() and input.device.type == "cpu" and eager_route() and type(input) is Tensor


class _GhostChunks(torch.autograd.Function):
    """The chunk route: output, per-chunk means and biased variances (G, C) of input's chunks of v
    rows; weight and bias (C,) or None."""

    @staticmethod
    def forward(ctx, input, weight, bias, eps, v):
        out, mean, invstd, var = _forward_chunks(input, weight, bias, eps, v)
        ctx.eps, ctx.v = eps, v
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # Double backward (create_graph=True): the input and weight gradients as differentiable
            # functions of input, weight and grad_out, from the fold route's ops at the saved input
            # (the bias only shifts the output, so it is left out there: its gradient is grad_out
            # summed over every dimension but the channels).
            d_b = grad_out.sum([d for d in range(grad_out.dim()) if d != 1]) if need_b else None
            wrt = [t for t, need in ((input, need_x), (weight, need_w)) if need]
            grads = iter(())
            if wrt:
                out = _fold_route(input, weight, None, ctx.eps, ctx.v, None, None, None)
                grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
            d_x = next(grads) if need_x else None
            d_w = next(grads) if need_w else None
            return d_x, d_w, None if d_b is None else d_b.to(ctx.bias_dtype), None, None
        grad_out = grad_out if grad_out.dtype == input.dtype else grad_out.to(input.dtype)
        dx, sum_dy, sum_dy_xmu = _backward_chunks(grad_out, input, weight, mean, invstd, ctx.v)
        # Each chunk's parameter gradients, summed over the chunks (batch norm's per chunk).
        d_w = (sum_dy_xmu * invstd).sum(0).to(weight.dtype) if need_w else None
        d_b = sum_dy.sum(0).to(ctx.bias_dtype) if need_b else None
        return dx if need_x else None, d_w, d_b, None, None


class _GhostBatchNormMixin:
    """Ghost batch norm on top of bnext's batch norm layers: the constructor, virtual_batch_size and
    the batch-statistics path (_batch_norm); everything else (checks, eval, state_dict) is the batch
    norm layer's."""

    # TorchScript reads _virtual_batch_size; the property's setter checks in Python.
    __jit_unused_properties__ = ["virtual_batch_size"]

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.virtual_batch_size = virtual_batch_size

    @property
    def virtual_batch_size(self) -> int:
        """Rows per virtual batch (>= 1); the last virtual batch of a call holds the rest. May change
        between steps (under torch.compile a new value is a new graph, as a new shape is)."""
        return self._virtual_batch_size

    @virtual_batch_size.setter
    def virtual_batch_size(self, value: int) -> None:
        self.__dict__["_virtual_batch_size"] = _check_virtual_batch_size(f"bnext.{type(self).__name__}", value)

    def _batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
        v = self._virtual_batch_size
        N = input.shape[0]
        if not training or N <= v:
            # Running statistics (eval), or one virtual batch: batch norm itself.
            return batch_norm_impl(
                input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
            )
        G, rest = N // v, N % v
        if not saved_program():
            # Batch norm's errors for the smallest virtual batch (one value per channel: ValueError),
            # named with its own shape, before any arithmetic. (A saved program holds torch's ops:
            # torch's op checks there.)
            smallest = input[G * v :] if rest else input[:v]
            torch.ops.bnext._check_batch_norm_args(smallest, weight, bias, running_mean, running_var, True, eps)
        if not torch.compiler.is_compiling() and recomputing():
            # torch.utils.checkpoint recomputing the forward: the chunks were counted when it first ran
            # (batch_norm_impl's rule, which the temporary statistics would not see).
            running_mean = running_var = num_batches_tracked = None
        chunks = G + 1 if rest else G
        if _chunk_route(input):
            out, mean, var = _GhostChunks.apply(input, flat(weight), flat(bias), eps, v)
            # Batch norm's update once per chunk, in order (bits of the loop over chunks).
            per_row = input.numel() // (N * input.shape[1])
            _update_chunks(
                running_mean, running_var, num_batches_tracked, mean, var, v * per_row, (N - (chunks - 1) * v) * per_row,
                momentum,
            )
            return out
        stats = chunk_stats_buffer(running_mean, running_var, chunks, input.shape[1])
        out = _fold_route(input, weight, bias, eps, v, stats, running_mean, running_var)
        with torch.no_grad():
            take_chunk_stats(running_mean, running_var, num_batches_tracked, stats, momentum, chunks)
        return out

    def _torch_forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles this instead of forward's bnext path (modules.py): the same rules with
        # torch's batch norm op, so a scripted model runs where bnext is not installed.
        self._check_input_dim(input)
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        v = self._virtual_batch_size
        N = input.shape[0]
        track = self.training and self.track_running_stats
        if self.training and not self.track_running_stats:
            running_mean = None
            running_var = None
        num_batches_tracked = self.num_batches_tracked if track else None
        if not use_batch_stats or N <= v:
            # Batch norm (torch's _BatchNorm.forward).
            factor = self._torch_count_batch()
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
            )
        G = N // v
        rest = N % v
        C = input.shape[1]
        chunks = G + 1 if rest > 0 else G
        stats = chunk_stats_buffer(running_mean, running_var, chunks, C)
        cl = _channels_last(input)
        out = F.batch_norm(
            fold_chunks(input[: G * v], G, cl),
            _rows(stats, 0, running_mean, 0, G * C),
            _rows(stats, 1, running_var, 0, G * C),
            _repeat(self.weight, G),
            _repeat(self.bias, G),
            True,
            1.0,
            self.eps,
        )
        out = unfold_chunks(out, G, cl)
        if rest > 0:
            last_mean = _rows(stats, 0, running_mean, G * C, chunks * C)
            last_var = _rows(stats, 1, running_var, G * C, chunks * C)
            last = F.batch_norm(input[G * v :], last_mean, last_var, self.weight, self.bias, True, 1.0, self.eps)
            out = torch.cat([out, last])
        with torch.no_grad():
            take_chunk_stats(running_mean, running_var, num_batches_tracked, stats, self.momentum, chunks)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNormMixin, BatchNorm1d):
    """Ghost batch norm (Hoffer et al. 2017) of (N, C) or (N, C, L) input: in training, each run of
    virtual_batch_size consecutive rows (the last run holds the rest) is normalized with its own
    statistics, and the running statistics take them one after another as nn.BatchNorm1d would;
    eval is batch norm's. bnext.BatchNorm1d's parameters, buffers and state_dict."""


class GhostBatchNorm2d(_GhostBatchNormMixin, BatchNorm2d):
    """Ghost batch norm (Hoffer et al. 2017) of (N, C, H, W) input. See GhostBatchNorm1d."""


PLAIN_LAYERS.update({GhostBatchNorm1d, GhostBatchNorm2d})
