"""bnext.batch_norm: torch.nn.functional.batch_norm on bnext's kernels.

One function decides how a call runs, by plain predicates (never by catching an error and trying
another way):

* traces that become saved programs (torch.jit.trace, torch.export, torch.onnx.export): torch's
  own batch_norm op is recorded, so the saved program runs where bnext is not installed;
* eager calls: one C++ call (bnext::_batch_norm_train with a C++ autograd node, or
  bnext::_batch_norm_infer, batch_norm_eval below autograd): the least per-call cost;
* under torch.compile, torch.func transforms and forward-mode AD: the differentiable functional
  ops (bnext/_ops/: backward, jvp and vmap formulas each), composed here.

Every path checks the arguments with the same C++ rules (csrc/common/checks.h), folds eval
coefficients in bnext::batch_norm_eval and updates running statistics in
bnext::update_running_stats, so every path gives the same errors and the same numbers.
"""
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import _C  # noqa: F401  (registers the ops)
from ._ops.handles import namespace, ops
from ._shared import empty_batch, flat

_NAME = "bnext.batch_norm"
_HAS_CUDA = bool(_C.build_info()["cuda"])
_bnext = torch.ops.bnext
_train_op = torch.ops.bnext._batch_norm_train.default
_infer_op = torch.ops.bnext._batch_norm_infer.default


def check_device(input: Tensor, name: str = "input", op: str = _NAME) -> None:
    """A CUDA tensor needs the CUDA kernels; say so instead of a dispatcher error."""
    if input.is_cuda and not _HAS_CUDA:
        raise RuntimeError(
            f"bnext was built without CUDA kernels; {op} got a CUDA {name}. Rebuild with a CUDA toolkit "
            "(BNEXT_CUDA=1 make install) or move the tensors to the CPU."
        )


def _transformed() -> bool:
    """Forward-mode AD or a torch.func transform is active: tensors may be dual or wrapped, which
    only the Python autograd formulas of the functional ops handle."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _eager_route() -> bool:
    """The one-call C++ ops (outside torch.compile): calls of the real kernels with plain autograd."""
    return namespace() == "bnext" and not _transformed()


def _requires_grad(input, weight, bias) -> bool:
    return input.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def _recomputing() -> bool:
    """The forward runs inside a backward pass: torch.utils.checkpoint recomputing it (either
    flavour). The batch was already counted when the forward first ran."""
    return torch._C._current_graph_task_id() != -1


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    # The module's bookkeeping as torch's _BatchNorm.forward does it, then torch's op.
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, training, 0.0 if momentum is None else momentum, eps,
        torch.backends.cudnn.enabled,
    )


def batch_norm_impl(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """bnext.batch_norm, also taking momentum=None (the cumulative average over the batches
    counted in num_batches_tracked) and, for the modules, a num_batches_tracked to count the batch
    in once it was normalized."""
    if input.is_cuda:
        check_device(input)
    compiling = torch.compiler.is_compiling()
    if ((compiling and torch.compiler.is_exporting()) or torch._C._get_tracing_state() is not None) and not (
        training and momentum is None
    ):
        # A trace that becomes a saved program (torch.export, ONNX, torch.jit.trace): torch's op.
        return _torch_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )
    if not compiling:
        if training and _recomputing():
            # Checkpoint recomputation: the statistics were taken into the running ones when the
            # forward first ran; taking them again would count the batch twice.
            running_mean = running_var = num_batches_tracked = None
        if input.numel() > 0 and _eager_route():
            if training:
                return _train_op(input, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked)
            if not (torch.is_grad_enabled() and _requires_grad(input, weight, bias)):
                # Inference: nothing to record, so batch_norm_eval runs below its (Python) autograd
                # kernel (csrc/module_ops.cpp).
                return _infer_op(input, weight, bias, running_mean, running_var, eps)
    _bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, training, eps)
    weight, bias = flat(weight), flat(bias)
    if input.numel() == 0:
        if training and num_batches_tracked is not None:
            empty = input.new_empty(0)
            _bnext.update_running_stats(None, None, num_batches_tracked, empty, empty, 0, momentum)
        return empty_batch(input, weight, bias)
    if not training:
        return ops().batch_norm_eval(input, weight, bias, flat(running_mean), flat(running_var), eps)
    out, mean, _invstd, var = ops().batch_norm_forward(input, weight, bias, eps)
    if running_mean is not None or running_var is not None or num_batches_tracked is not None:
        count = input.numel() // input.shape[1]
        _bnext.update_running_stats(
            flat(running_mean), flat(running_var), num_batches_tracked, mean, var, count, momentum
        )
    return out


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for torch.nn.functional.batch_norm (same signature, semantics and exception types).

    In training, normalizes with the batch statistics and, when running_mean/running_var are
    given, updates them in place: running = (1 - momentum) * running + momentum * batch (unbiased
    variance). In eval, normalizes with running_mean/running_var. Arguments are checked before
    anything is computed, so a call that raises leaves the running statistics unchanged.
    """
    # The Python-level argument types torch checks, with its exceptions and words (in training
    # torch's first step is input.size(), hence the AttributeError).
    if not isinstance(input, Tensor):
        if training:
            raise AttributeError(
                f"bnext.batch_norm: input must be a Tensor, got {type(input).__name__} "
                f"('{type(input).__name__}' object has no attribute 'size')"
            )
        raise TypeError(f"batch_norm(): argument 'input' (position 1) must be Tensor, not {type(input).__name__}")
    if momentum is None:
        raise TypeError("batch_norm(): argument 'momentum' must be float, not NoneType")
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
