"""bnext.BatchRenorm1d/2d/3d: Batch Renormalization (Ioffe 2017, arXiv:1702.03275), for small or
non-i.i.d. batches, where batch statistics are noisy estimates of the population's.

In training, with batch statistics mu_B, sigma_B = sqrt(batch_var + eps) and running statistics
mu, sigma = sqrt(running_var + eps):

    y = weight * ((x - mu_B) / sigma_B * r + d) + bias
    r = clip(sigma_B / sigma, 1 / r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max)

r and d are constants for backward (the paper's stop_gradient). The output is then batch norm's
with the effective affine parameters weight * r and bias + weight * d, so the layer computes r and
d and hands those to bnext's batch norm: the paper's gradients come from batch norm's own backward
(its dx is the paper's with weight * r as the weight; d weight = dw * r + db * d = sum(dy * (xhat * r
+ d)), d bias = db), with its routing, kernels and running-statistic update (momentum blend,
unbiased batch variance, num_batches_tracked). Eval is batch norm's. With r_max = 1 and d_max = 0,
r = 1 and d = 0 exactly: batch norm itself.

The batch statistics are computed twice in training (once, detached, for r and d; once inside the
fused forward), an extra read of the input that buys the fused, closed-form backward. Before any
update (running_mean = 0, running_var = 1) r and d follow the same formula: the paper has no special
case; its schedule starts at r_max = 1, d_max = 0 and relaxes them while the running statistics
settle, which a training loop does by setting the attributes (examples/batch_renorm.py).

Departures, on purpose: the running variance is batch norm's (the paper's Algorithm 1 averages
sigma instead), so checkpoints stay batch norm's. r and d come from the running statistics before
the step updates them in place; the effective weight is a new tensor, so eager backward never sees
the update (compiled graphs: DESIGN.md's inductor trap, tests/test_small_batch.py compares compiled
gradients with eager ones). A forward recomputed by torch.utils.checkpoint reads the running
statistics after that update: where r or d is not clipped, its gradients are those of a forward one
momentum step apart (README, "Small and irregular batches").
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops.conventions import acc_dtype
from ._ops.handles import ops
from .functional import batch_norm_impl, saved_program
from .modules import PLAIN_LAYERS, BatchNorm1d, BatchNorm2d, BatchNorm3d


def _check_limit(owner: str, name: str, value, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not value >= low:  # NaN fails too
        bound = "r is clipped to [1/r_max, r_max]" if name == "r_max" else "d is clipped to [-d_max, d_max]"
        raise ValueError(f"{owner}: {name} must be >= {low} ({bound}), got {value}")
    return value


def renormalized_affine(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    limits: Tensor,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """(weight * r, bias + weight * d): the affine parameters that make batch norm batch renorm.

    mean and var (biased) are the batch statistics in the accumulation dtype; limits is [r_max,
    d_max]. r and d are computed from detached tensors: no gradient flows through them. The results
    have the weight's dtype (the running statistics' without a weight), so the parameters keep
    batch norm's one-dtype rule. TorchScript compiles it too (the layers' scripted forward).
    """
    acc = mean.dtype
    sigma = torch.sqrt(running_var.detach().reshape(-1).to(acc) + eps)
    r = (torch.sqrt(var.detach() + eps) / sigma).clamp(torch.reciprocal(limits[0]), limits[0])
    d = ((mean.detach() - running_mean.detach().reshape(-1).to(acc)) / sigma).clamp(-limits[1], limits[1])
    if weight is not None:
        w = weight.reshape(-1)
        dtype = w.dtype
        scale, shift = w.to(acc) * r, w.to(acc) * d
    else:
        dtype = running_mean.dtype
        scale, shift = r, d
    if bias is not None:
        shift = bias.reshape(-1).to(acc) + shift
    return scale.to(dtype), shift.to(dtype)


def _batch_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """Detached (mean, biased var) per channel in the accumulation dtype, for r and d. bnext's
    statistics op, or torch's ops in a saved program (which must not call bnext's)."""
    if saved_program():
        dims = [0] + list(range(2, input.dim()))
        var, mean = torch.var_mean(input.detach().to(acc_dtype(input.dtype)), dims, correction=0)
        return mean, var
    return ops().batch_norm_stats(input.detach())


class _BatchRenormMixin:
    """Batch renorm on top of bnext's batch norm layers: the constructor, r_max / d_max, and the
    training path (_batch_norm); everything else (checks, running-statistic bookkeeping, eval,
    state_dict) is the batch norm layer's."""

    # Properties TorchScript leaves alone (their setters check in Python).
    __jit_unused_properties__ = ["r_max", "d_max"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype)
        # [r_max, d_max] in a tensor, not a buffer: torch.compile reads a tensor's value at run time,
        # so a schedule changing them every step keeps one graph (a float attribute is a constant
        # of the graph: a change recompiles). A 0-d CPU value is usable with any device's tensors;
        # not a buffer, so state_dict stays batch norm's and .to()/.half() leave it alone.
        self._limits = torch.tensor([1.0, 0.0], dtype=torch.float64)
        self.r_max = r_max
        self.d_max = d_max

    @property
    def r_max(self) -> float:
        """r is clipped to [1 / r_max, r_max]; >= 1 (1: r = 1). May change between steps."""
        return self._r_max

    @r_max.setter
    def r_max(self, value: float) -> None:
        value = _check_limit(f"bnext.{type(self).__name__}", "r_max", value, 1.0)
        self.__dict__["_r_max"] = value
        with torch.no_grad():
            self._limits[0] = value

    @property
    def d_max(self) -> float:
        """d is clipped to [-d_max, d_max]; >= 0 (0: d = 0). May change between steps."""
        return self._d_max

    @d_max.setter
    def d_max(self, value: float) -> None:
        value = _check_limit(f"bnext.{type(self).__name__}", "d_max", value, 0.0)
        self.__dict__["_d_max"] = value
        with torch.no_grad():
            self._limits[1] = value

    def _batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
        if training:
            if not saved_program():
                # Checked first, so bad arguments raise batch norm's errors before any arithmetic
                # (a saved program holds torch's ops only: torch's op checks there).
                torch.ops.bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, True, eps)
            if running_mean is None or running_var is None:
                raise RuntimeError(
                    f"bnext.{type(self).__name__}: training needs running_mean and running_var (r and d are "
                    "computed from them), got None"
                )
            if input.numel() > 0:
                mean, var = _batch_stats(input)
                weight, bias = renormalized_affine(mean, var, running_mean, running_var, weight, bias, self._limits, eps)
        return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)

    def _torch_forward(self, input: Tensor) -> Tensor:
        # TorchScript compiles this instead of forward's bnext path (modules.py): the same rule in
        # torch's ops, so a scripted model runs where bnext is not installed.
        self._check_input_dim(input)
        running_mean, running_var = self.running_mean, self.running_var
        if not self.training or running_mean is None or running_var is None:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, False, 0.0, self.eps)
        factor = self._torch_count_batch()  # training, and batch renorm always tracks
        dims = [0] + list(range(2, input.dim()))
        stats_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        var, mean = torch.var_mean(input.detach().to(stats_dtype), dims, correction=0)
        weight, bias = renormalized_affine(mean, var, running_mean, running_var, self.weight, self.bias, self._limits, self.eps)
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, factor, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"


class BatchRenorm1d(_BatchRenormMixin, BatchNorm1d):
    """Batch renormalization (Ioffe 2017) of (N, C) or (N, C, L) input: bnext.BatchNorm1d's
    parameters, buffers and state_dict, momentum 0.01 by default, plus r_max (>= 1) and d_max (>= 0),
    float attributes a training loop may change every step (torch.compile keeps its graph)."""


class BatchRenorm2d(_BatchRenormMixin, BatchNorm2d):
    """Batch renormalization (Ioffe 2017) of (N, C, H, W) input. See BatchRenorm1d."""


class BatchRenorm3d(_BatchRenormMixin, BatchNorm3d):
    """Batch renormalization (Ioffe 2017) of (N, C, D, H, W) input. See BatchRenorm1d."""


PLAIN_LAYERS.update({BatchRenorm1d, BatchRenorm2d, BatchRenorm3d})
