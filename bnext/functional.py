"""bnext.batch_norm: torch.nn.functional.batch_norm on bnext's kernels."""
from typing import Optional, Union

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers the ops)
from ._ops import below_autograd, namespace, ops
from .autograd import BatchNormFunction, _constant, eval_normalize

_NAME = "bnext.batch_norm"


def _verify_batch_size(size):
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def check_device(input: Tensor, name: str = "input", op: str = _NAME) -> None:
    """A CUDA tensor needs the CUDA kernels; say so instead of a dispatcher error."""
    if input.device.type == "cuda" and not _C.build_info()["cuda"]:
        raise RuntimeError(
            f"bnext was built without CUDA kernels; {op} got a CUDA {name}. Rebuild with a CUDA toolkit "
            "(BNEXT_CUDA=1 make install) or move the tensors to the CPU."
        )


def _check_args(input, running_mean, running_var, weight, bias):
    if not isinstance(input, Tensor):
        raise TypeError(f"{_NAME}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"{_NAME}: input must have at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    if not input.is_floating_point():
        raise TypeError(
            f"{_NAME}: input must be a floating-point tensor (float16, bfloat16, float32 or float64), got {input.dtype}"
        )
    device = input.device
    if device.type == "cuda":
        check_device(input)
    expected = (input.shape[1],)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_NAME}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.shape != expected:
            raise RuntimeError(
                f"{_NAME}: {name} must be a 1-D tensor with {expected[0]} elements (num_features, the input's "
                f"size(1)), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{_NAME}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise RuntimeError(f"{_NAME}: {name} must be on the input's device {device}, got {t.device}")


def _eager_bnext() -> bool:
    # The C++ training path is for eager calls on the real kernels: torch.compile traces the
    # functional ops instead, and emulated CUDA kernels live in another op namespace.
    return namespace() == "bnext" and not torch.compiler.is_compiling()


def _any_requires_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """running = (1 - momentum) * running + momentum * batch, unbiased variance, as torch does.

    `momentum` may be a 0-d tensor (cumulative average, momentum=None) so no Python float is taken
    from a tensor and torch.compile(fullgraph=True) keeps one graph.
    """
    # mean and var are non-differentiable outputs, so in-place updates of buffers that do not
    # require grad record nothing; no_grad() (a few microseconds a call) only where one does.
    if (running_mean is not None and running_mean.requires_grad) or (
        running_var is not None and running_var.requires_grad
    ):
        with torch.no_grad():
            _blend_all(running_mean, running_var, mean, var, count, momentum)
    else:
        _blend_all(running_mean, running_var, mean, var, count, momentum)


def _blend_all(running_mean, running_var, mean, var, count, momentum):
    if running_mean is not None:
        _blend_(running_mean, mean, momentum)
    if running_var is not None:
        _blend_(running_var, var, momentum, count / (count - 1) if count > 1 else 1.0)


def _blend_(running, batch, momentum, scale=1.0):
    # running + momentum * (batch * scale - running), in place: one lerp_ where momentum is a
    # float (the per-call cost of a small layer is these launches; mul_ + add_ took 3.7 us, lerp_
    # 1.35 us). A 0-d tensor momentum (momentum=None) keeps torch's (1 - m) * running + m * batch.
    if scale != 1.0:
        batch = batch * scale
    if batch.dtype != running.dtype:
        batch = batch.to(running.dtype)
    if isinstance(momentum, Tensor):
        running.copy_(momentum * batch + (1 - momentum) * running)
    else:
        running.lerp_(batch, momentum)


def _empty_batch(input, weight, bias):
    # torch returns a graph-connected empty output; there is nothing to normalize or reduce.
    out = input.clone()
    if weight is not None:
        out = out * weight.reshape((1, -1) + (1,) * (input.dim() - 2)).to(input.dtype)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * (input.dim() - 2)).to(input.dtype)
    return out


def batch_norm_impl(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Union[float, Tensor],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """bnext.batch_norm, also taking a 0-d tensor momentum (the modules' momentum=None) and, for the
    modules, a num_batches_tracked to increment by one after a training batch was normalized."""
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and not isinstance(momentum, Tensor) and _eager_bnext() and input.numel() > 0:
        # Eager: the whole training forward in one C++ call (csrc/train_forward.cpp), same ops,
        # same bits, tens of microseconds less per call (most of a small layer's time). It checks
        # its arguments before writing anything; on any error, the Python path below runs the
        # argument checks and raises the error worded as bnext.batch_norm words it.
        try:
            return ops()._batch_norm_train(
                input, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked
            )
        except Exception:
            pass
    elif not training and _eager_bnext() and input.numel() > 0 and not (
        torch.is_grad_enabled() and _any_requires_grad(input, weight, bias)
    ):
        # Eager inference in one C++ call, likewise (the same ops as below).
        try:
            return ops()._batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
        except Exception:
            pass
    _check_args(input, running_mean, running_var, weight, bias)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(
            f"{_NAME}: running_mean and running_var must be defined in evaluation mode (training=False)"
        )
    if input.numel() == 0:
        out = _empty_batch(input, weight, bias)
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return out
    if training:
        out, mean, var = BatchNormFunction.apply(input, weight, bias, None, None, True, eps)
        if running_mean is not None or running_var is not None:
            _update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # an integer buffer: nothing to record
        return out
    # Running statistics are constants of the graph (torch does not differentiate through them).
    mean = _constant(running_mean, input.dtype)
    invstd = torch.rsqrt(_constant(running_var, input.dtype) + eps)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (input, weight, bias)):
        # Nothing to differentiate (inference): the op alone, without recording an autograd node.
        with below_autograd(nothing_requires_grad=True):
            return eval_normalize(input, mean, invstd, weight, bias)
    return BatchNormFunction.apply(input, weight, bias, mean, invstd, False, eps)


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
    """Drop-in for torch.nn.functional.batch_norm (same signature, same semantics).

    In training, normalizes with the batch statistics and, when running_mean/running_var are
    given, updates them in place: running = (1 - momentum) * running + momentum * batch (unbiased
    variance). In eval, normalizes with running_mean/running_var. Arguments are checked before
    anything is computed, so a call that raises leaves the running statistics unchanged.
    """
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)
