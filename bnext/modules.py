"""bnext.BatchNorm1d/2d/3d: drop-in subclasses of torch.nn.BatchNorm1d/2d/3d."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._quantization import warn_if_quantization_tracer
from .functional import batch_norm_impl


_MISSING = object()


def _fx_leaf(module, args):
    """torch.fx: a leaf call_module, as torch's own batch norm layers are, whatever the tracer (FX
    passes, torchvision's feature extraction and quantization see the layer). (Out of forward, which
    TorchScript parses in full: forward keeps to what TorchScript accepts.)"""
    tracer = args[0].tracer
    warn_if_quantization_tracer(module, tracer)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _BatchNormMixin:
    """forward() of torch's _BatchNorm on bnext's kernels.

    Differences from torch, all on purpose (README, "Deliberate differences"):
    * a call that raises leaves every buffer unchanged (torch increments num_batches_tracked first);
    * momentum=None (the cumulative average) keeps one graph under torch.compile(fullgraph=True);
    * a forward recomputed by torch.utils.checkpoint does not update the running statistics again.
    """

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles this branch only: torch's own _BatchNorm.forward, so a scripted
            # model records torch's batch_norm op and runs where bnext is not installed.
            return self._torch_forward(input)
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, (input,))
        self._check_input_dim(input)
        return self._batch_norm(input, *self._layer_args())

    def _torch_count_batch(self) -> float:
        """torch's _BatchNorm.forward bookkeeping, for the TorchScript paths (_torch_forward of this
        layer and its subclasses): counts the batch in num_batches_tracked when training with
        running statistics, and returns the momentum factor of torch's batch_norm op (momentum
        None: the cumulative average, 1 / num_batches_tracked)."""
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def _torch_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self._torch_count_batch()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )

    @torch.jit.unused
    def _layer_args(self):
        """The arguments of _batch_norm after the input, torch's _BatchNorm.forward rules: (running_mean,
        running_var, weight, bias, use batch statistics, momentum, eps, num_batches_tracked to count
        the batch in)."""
        if type(self) in PLAIN_LAYERS:
            # The dictionaries nn.Module.__getattr__ would read (half a microsecond per attribute,
            # a visible part of a small layer's call); anything else (a plain tensor set in place of
            # a parameter) is read as an attribute.
            params, buffers = self._parameters, self._buffers
            weight, bias = params.get("weight", _MISSING), params.get("bias", _MISSING)
            running_mean, running_var = buffers.get("running_mean", _MISSING), buffers.get("running_var", _MISSING)
            num_batches_tracked = buffers.get("num_batches_tracked", _MISSING)
            if weight is _MISSING:
                weight = self.weight
            if bias is _MISSING:
                bias = self.bias
            if running_mean is _MISSING:
                running_mean = self.running_mean
            if running_var is _MISSING:
                running_var = self.running_var
            if num_batches_tracked is _MISSING:
                num_batches_tracked = self.num_batches_tracked
        else:
            # Subclasses (parametrizations, __getattr__ overrides, properties): attribute access.
            weight, bias = self.weight, self.bias
            running_mean, running_var = self.running_mean, self.running_var
            num_batches_tracked = self.num_batches_tracked
        training = self.training
        track = training and self.track_running_stats
        use_batch_stats = training or (running_mean is None and running_var is None)
        pass_buffers = not training or self.track_running_stats
        return (
            running_mean if pass_buffers else None,
            running_var if pass_buffers else None,
            weight,
            bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked if track else None,
        )

    def _batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
        # The one place subclasses change: SyncBatchNorm routes the batch-statistics path through
        # its collectives; everything around it is shared. momentum None: the cumulative average
        # over num_batches_tracked (None: not counted), which counts the batch once it was
        # normalized.
        return batch_norm_impl(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d on bnext's kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d on bnext's kernels: (N, C, H, W) input."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d on bnext's kernels: (N, C, D, H, W) input."""


# The exact classes whose parameters and buffers forward() reads from nn.Module's dictionaries:
# bnext's own layer classes, which define no attribute hooks (sync.py adds SyncBatchNorm).
PLAIN_LAYERS = {BatchNorm1d, BatchNorm2d, BatchNorm3d}


class LazyBatchNorm1d(_BatchNormMixin, nn.LazyBatchNorm1d):
    """Drop-in for torch.nn.LazyBatchNorm1d: becomes a bnext.BatchNorm1d at its first forward."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNormMixin, nn.LazyBatchNorm2d):
    """Drop-in for torch.nn.LazyBatchNorm2d: becomes a bnext.BatchNorm2d at its first forward."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNormMixin, nn.LazyBatchNorm3d):
    """Drop-in for torch.nn.LazyBatchNorm3d: becomes a bnext.BatchNorm3d at its first forward."""

    cls_to_become = BatchNorm3d
