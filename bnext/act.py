"""bnext.BatchNormAct1d/2d/3d: batch norm, residual add and activation in one layer.

    y = act(BatchNorm(x) + residual)        forward(input, residual=None)

Subclasses of bnext.BatchNorm1d/2d/3d with exactly nn.BatchNorm's parameters, buffers and
state_dict (a checkpoint of the unfused torch model loads unchanged); the activation is a
constructor argument, not state. bnext.fuse_model puts them into whole networks.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import batch_norm_act_impl, check_activation
from .modules import PLAIN_LAYERS, BatchNorm1d, BatchNorm2d, BatchNorm3d, _fx_leaf


class _BatchNormActMixin:
    """forward(input, residual=None) of the fused layers; everything else is the BN layer's."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        memory_saving: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        check_activation(activation, negative_slope, alpha, memory_saving)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.memory_saving = memory_saving

    def _activation_param(self) -> float:
        if self.activation == "leaky_relu":
            return self.negative_slope
        if self.activation == "elu":
            return self.alpha
        return 0.0

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            # torch's ops, as the BN layers script (bnext.BatchNorm2d): BN, add, activation.
            out = self._torch_forward(input)
            if residual is not None:
                out = out + residual
            return self._torch_activation(out)
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf(self, (input,) if residual is None else (input, residual))
        self._check_input_dim(input)
        return self._batch_norm_act(input, *self._layer_args(), residual)

    def _batch_norm_act(self, input, *args):
        # (args: _layer_args(), then the residual.) The one place SyncBatchNormAct changes.
        return batch_norm_act_impl(input, *args, self.activation, self._activation_param(), self.memory_saving)

    def _torch_activation(self, z: Tensor) -> Tensor:
        if self.activation == "relu":
            return F.relu(z)
        if self.activation == "leaky_relu":
            return F.leaky_relu(z, self.negative_slope)
        if self.activation == "elu":
            return F.elu(z, self.alpha)
        if self.activation == "silu":
            return F.silu(z)
        if self.activation == "hardswish":
            return F.hardswish(z)
        return z

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if self.activation == "elu":
            s += f", alpha={self.alpha}"
        if self.memory_saving:
            s += ", memory_saving=True"
        return s


class BatchNormAct1d(_BatchNormActMixin, BatchNorm1d):
    """act(BatchNorm1d(x) + residual) in fused kernels: (N, C) or (N, C, L) input.

    activation: "relu" (default), "leaky_relu" (negative_slope), "elu" (alpha), "silu",
    "hardswish" or "identity". memory_saving=True (identity, leaky_relu with negative_slope > 0,
    elu with alpha > 0) saves the output instead of the input for backward and recovers the input
    from it: one activation-sized tensor less per layer, since the next layer keeps the output."""


class BatchNormAct2d(_BatchNormActMixin, BatchNorm2d):
    """act(BatchNorm2d(x) + residual) in fused kernels: (N, C, H, W) input. See BatchNormAct1d."""


class BatchNormAct3d(_BatchNormActMixin, BatchNorm3d):
    """act(BatchNorm3d(x) + residual) in fused kernels: (N, C, D, H, W) input. See BatchNormAct1d."""


PLAIN_LAYERS.update({BatchNormAct1d, BatchNormAct2d, BatchNormAct3d})
