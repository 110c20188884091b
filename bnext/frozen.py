"""bnext.FrozenBatchNorm2d and bnext.freeze_batchnorm: batch norm with fixed statistics and affine
parameters, for fine-tuning with batches too small to estimate statistics (detection, segmentation).

    y = x * scale + shift,   scale = weight * rsqrt(running_var + eps),   shift = bias - running_mean * scale

The layer of torchvision.ops.misc.FrozenBatchNorm2d (and detectron2's): the same four buffers
(weight, bias, running_mean, running_var; no parameters, no num_batches_tracked), the same formula
and state_dict, so checkpoints load both ways, and an nn.BatchNorm2d checkpoint loads too (its
num_batches_tracked is dropped, as torchvision drops it). On bnext's kernels:

* forward is bnext's eval op (torch.ops.bnext.batch_norm_eval): one pass writing the output and
  nothing else (torchvision's x * scale + shift writes an input-sized temporary before it);
* backward keeps nothing but the layer's own weight and running_var buffers (no new tensor; the
  scale is computed again): grad_input = grad_output * scale is all there is to compute, since the
  buffers are constants (the eval op's own autograd formula keeps the input, for a weight gradient
  this layer never needs; torchvision's keeps a per-channel scale it allocated);
* the output has the input's dtype, as nn.BatchNorm2d's (float32 buffers under a float16 input
  give a float16 output; torchvision's promotes it to float32).

A buffer a user set to require grad (as a parameter would) gets its gradient through the eval
op's formula instead; running statistics are constants, as in nn.BatchNorm2d.
"""
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from ._ops.conventions import acc_dtype
from ._ops.handles import ops
from .functional import batch_norm_impl, transformed
from .ghost import GhostBatchNorm2d
from .modules import BatchNorm2d
from .renorm import BatchRenorm2d
from .sync import SyncBatchNorm

_NAME = "bnext.FrozenBatchNorm2d"


def _scale(weight: Optional[Tensor], running_var: Tensor, eps: float, dtype) -> Tensor:
    """weight * rsqrt(running_var + eps) in the accumulation dtype of an input of `dtype`: the fold
    of csrc/common/eval.h (eval_scale_shift), the same operations in the same order."""
    invstd = torch.rsqrt(running_var.detach().reshape(-1).to(acc_dtype(dtype)) + eps)
    return invstd if weight is None else invstd * weight.detach().reshape(-1).to(acc_dtype(dtype))


class _FrozenBatchNormFunction(torch.autograd.Function):
    """batch_norm_eval(input, weight, bias, running_mean, running_var, eps) differentiated with
    respect to the input only, in eager autograd (the caller routes everything else to the op's own
    formulas): the output is input * scale + shift with constant per-channel scale and shift, so
    backward scales grad_output by `scale`. It keeps the weight and running_var buffers themselves
    (nothing new: the layer holds them anyway) and computes the scale again in backward, where
    torchvision's layer keeps a scale tensor it allocated; autograd's version check makes a buffer
    changed in place between forward and backward an error rather than a silently different scale.

    Under torch.compile the op's formula is traced instead and the partitioner keeps what that
    backward reads (weight and running_var, per-channel); torch.func transforms and forward-mode AD
    use the op's vmap and jvp formulas."""

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, eps):
        return ops().batch_norm_eval(input, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _bias, _running_mean, running_var, eps = inputs
        ctx.dtype, ctx.eps = input.dtype, eps
        ctx.save_for_backward(weight, running_var)

    @staticmethod
    def backward(ctx, grad_output):
        weight, running_var = ctx.saved_tensors
        scale = _scale(weight, running_var, ctx.eps, ctx.dtype)
        g = grad_output if grad_output.dtype == ctx.dtype else grad_output.to(ctx.dtype)
        # grad_output * scale in one pass, computed in the accumulation dtype (bnext's elementwise
        # op with mean 0 and invstd = scale), differentiable for double backward.
        grad_input = ops().batch_norm_elemt(g, None, None, torch.zeros_like(scale), scale)
        return grad_input, None, None, None, None, None


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters: torchvision.ops.misc.FrozenBatchNorm2d
    on bnext's kernels (same constructor, buffers, state_dict and results).

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, in training and eval alike;
    weight, bias, running_mean and running_var are buffers (nothing to train, nothing updated).
    Input (N, C, H, W) in any memory format (the output keeps it), float16, bfloat16, float32 or
    float64. bnext.freeze_batchnorm(model) puts it in place of a model's BatchNorm2d layers.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # torchvision's rule: a BatchNorm2d checkpoint loads, its batch counter has no use here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"{_NAME}: expected 4D input (N, C, H, W) (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            # TorchScript compiles this branch only: torch's eval op, so a scripted model runs where
            # bnext is not installed.
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if isinstance(input, torch.fx.Proxy):
            # torch.fx: a leaf, as bnext's other layers are (modules.py's _fx_leaf, without its
            # quantization notice: torch.ao has no frozen batch norm to match either).
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})
        if not isinstance(input, Tensor):
            raise TypeError(f"{_NAME}: input must be a Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        weight, bias, running_mean, running_var = self.weight, self.bias, self.running_mean, self.running_var
        if (
            torch.is_grad_enabled()
            and input.requires_grad
            and not (weight is not None and weight.requires_grad)
            and not (bias is not None and bias.requires_grad)
            and input.numel() > 0
            and not torch.compiler.is_compiling()
            and not transformed()
            and torch._C._get_tracing_state() is None
        ):
            torch.ops.bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, False, self.eps)
            return _FrozenBatchNormFunction.apply(input, weight, bias, running_mean, running_var, self.eps)
        # Nothing to differentiate (one C++ call in eager mode), buffers that require grad, empty
        # batches, torch.compile, torch.func, forward AD and saved programs: bnext's eval routing.
        return batch_norm_impl(input, running_mean, running_var, weight, bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


# The classes freeze_batchnorm replaces, exact types: each computes plain batch norm with its
# running statistics in eval. Subclasses may do more (timm's BatchNormAct2d applies an activation,
# bnext's BatchNormAct2d too), so freezing them would silently drop it.
FREEZABLE = (
    nn.BatchNorm2d,
    nn.modules.batchnorm.SyncBatchNorm,  # torch's class, whatever torch.nn.SyncBatchNorm points to
    BatchNorm2d,
    SyncBatchNorm,
    BatchRenorm2d,  # batch renorm is batch norm in eval
    GhostBatchNorm2d,  # so is ghost batch norm
)


def _freezable(m: nn.Module) -> bool:
    return type(m) in FREEZABLE and m.running_mean is not None and m.running_var is not None


def _frozen(bn: nn.Module) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d computing what `bn` computes in eval: copies of its affine parameters
    (ones and zeros where it has none) and running statistics, its eps and training flag."""
    running_mean, running_var = bn.running_mean.detach(), bn.running_var.detach()
    frozen = FrozenBatchNorm2d(bn.num_features, bn.eps, device=running_mean.device, dtype=running_mean.dtype)
    frozen.running_mean = running_mean.clone()
    frozen.running_var = running_var.clone()
    if bn.weight is not None:
        frozen.weight = bn.weight.detach().clone()
    if bn.bias is not None:
        frozen.bias = bn.bias.detach().clone()
    elif bn.weight is not None:
        frozen.bias = torch.zeros_like(frozen.weight)
    frozen.training = bn.training
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm layer of `module` used on 4-D input by a bnext.FrozenBatchNorm2d, in
    place, as detectron2's FrozenBatchNorm2d.convert_frozen_batchnorm does. Returns `module`; a
    batch norm layer passed as `module` is returned frozen (a new layer).

    Replaced (exact types): nn.BatchNorm2d, nn.SyncBatchNorm (assumed 4-D, as detectron2 assumes),
    bnext.BatchNorm2d, bnext.SyncBatchNorm, bnext.BatchRenorm2d and bnext.GhostBatchNorm2d, with tracked running
    statistics. The frozen layer holds copies of the affine parameters (ones and zeros without
    affine) and of the running statistics: it computes what the layer computed in eval, in training
    too. Other batch-norm-like layers (1-D and 3-D ones, subclasses such as BN + activation layers,
    layers without running statistics, lazy layers not yet run) are left as they are, named in one
    UserWarning.

    Build the optimizer after freezing: the replaced layers' parameters are no longer in the model.
    """
    skipped = {}
    out = _freeze(module, "", skipped)
    if skipped:
        names = ", ".join(f"{name!r} ({type(m).__module__}.{type(m).__qualname__})" for name, m in skipped.items())
        warnings.warn(
            f"bnext.freeze_batchnorm left {len(skipped)} batch norm layer(s) as they are: {names}. It freezes "
            "nn.BatchNorm2d, nn.SyncBatchNorm, bnext.BatchNorm2d, bnext.SyncBatchNorm, bnext.BatchRenorm2d and "
            "bnext.GhostBatchNorm2d with running statistics (exact types: a subclass may compute more than batch norm).",
            UserWarning,
            stacklevel=2,
        )
    return out


def _freeze(module: nn.Module, name: str, skipped: dict) -> nn.Module:
    if _freezable(module):
        return _frozen(module)
    if isinstance(module, _NormBase) and not isinstance(module, _InstanceNorm):
        skipped[name or "<the module itself>"] = module
    for child_name, child in module.named_children():
        new = _freeze(child, f"{name}.{child_name}" if name else child_name, skipped)
        if new is not child:
            setattr(module, child_name, new)
    return module
