"""bnext.BatchNorm1d/2d/3d: drop-in subclasses of torch.nn.BatchNorm1d/2d/3d."""
import torch
from torch import Tensor, nn

from .functional import batch_norm_impl


class _BatchNormMixin:
    """forward() of torch's _BatchNorm on bnext's kernels.

    Differences from torch, all on purpose:
    * num_batches_tracked is incremented only after the batch was normalized, so a call that
      raises leaves every buffer unchanged;
    * momentum=None computes its factor 1 / num_batches_tracked with tensor ops, so
      torch.compile(fullgraph=True) keeps one graph.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Buffers and parameters read from their dicts once (nn.Module.__getattr__ costs about
        # half a microsecond per read, a visible part of a small layer's call).
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        num_batches_tracked = buffers.get("num_batches_tracked")
        training = self.training
        track = training and self.track_running_stats and num_batches_tracked is not None
        momentum = self.momentum
        if momentum is None:
            if track:
                # Cumulative moving average over the batches seen, this one included.
                factor = 1.0 / (num_batches_tracked + 1).to(torch.float64)
            else:
                factor = 0.0
        else:
            factor = momentum
        use_batch_stats = training or (running_mean is None and running_var is None)
        pass_buffers = not training or self.track_running_stats
        out = self._batch_norm(
            input,
            running_mean if pass_buffers else None,
            running_var if pass_buffers else None,
            params.get("weight"),
            params.get("bias"),
            use_batch_stats,
            factor,
            self.eps,
            num_batches_tracked if track else None,
        )
        return out

    def _batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
        # The one place subclasses change: SyncBatchNorm routes the batch-statistics path through
        # its collectives; everything around it (checks, momentum) is shared. num_batches_tracked
        # (None: not counted) is incremented once the batch was normalized.
        return batch_norm_impl(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d on bnext's kernels: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d on bnext's kernels: (N, C, H, W) input."""


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d on bnext's kernels: (N, C, D, H, W) input."""


# torch class -> bnext class, exact types only (subclasses may change behaviour we cannot see).
BNEXT_TWIN = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert_model(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d inside `module` by its bnext twin, in place.

    The modules themselves are kept (their class is switched), so parameters, buffers, hooks,
    the training flag, device, dtype, requires_grad and any optimizer holding the parameters stay
    as they were. Returns `module`.

    sync=True: instead replace every nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and bnext.BatchNorm*
    (exact types) by a bnext.SyncBatchNorm over `process_group` (None: the whole world), as
    bnext.SyncBatchNorm.convert_sync_batchnorm does: new layers sharing the parameters and
    buffers, so use the returned module (a layer passed as `module` is returned converted). Call
    it before wrapping the model in DistributedDataParallel.
    """
    if sync:
        from .sync import convert_to_sync  # sync imports this module

        return convert_to_sync(module, process_group)
    if process_group is not None:
        raise ValueError("bnext.convert_model: process_group is used only with sync=True, got sync=False")
    for m in module.modules():
        twin = BNEXT_TWIN.get(type(m))
        if twin is not None:
            m.__class__ = twin
    return module
