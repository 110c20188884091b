"""bnext.batch_norm: torch.nn.functional.batch_norm on bnext's kernels.

One function decides how a call runs, by plain predicates (never by catching an error and trying
another way):

* traces that become saved programs (torch.jit.trace, torch.export, torch.onnx.export): torch's
  own batch_norm op is recorded, so the saved program runs where bnext is not installed;
* eager calls: one C++ call (bnext::_batch_norm_train or, for the fused layers,
  bnext::_batch_norm_act_train, with a C++ autograd node; or bnext::_batch_norm_infer,
  batch_norm_eval below autograd): the least per-call cost;
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
from ._ops import fused as _fused
from ._ops.conventions import ACTIVATIONS, act_invertible
from ._ops.handles import namespace, ops
from ._shared import empty_batch, flat

_NAME = "bnext.batch_norm"
_HAS_CUDA = bool(_C.build_info()["cuda"])
_bnext = torch.ops.bnext
_train_op = torch.ops.bnext._batch_norm_train.default
_infer_op = torch.ops.bnext._batch_norm_infer.default
_act_train_op = torch.ops.bnext._batch_norm_act_train.default


def check_device(input: Tensor, name: str = "input", op: str = _NAME) -> None:
    """A CUDA tensor needs the CUDA kernels; say so instead of a dispatcher error."""
    if input.is_cuda and not _HAS_CUDA:
        raise RuntimeError(
            f"bnext was built without CUDA kernels; {op} got a CUDA {name}. Rebuild with a CUDA toolkit "
            "(BNEXT_CUDA=1 make install) or move the tensors to the CPU."
        )


def transformed() -> bool:
    """Forward-mode AD or a torch.func transform is active: tensors may be dual or wrapped, which
    only the Python autograd formulas of the functional ops handle."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def eager_route() -> bool:
    """The one-call C++ ops (outside torch.compile): calls of the real kernels with plain autograd."""
    return namespace() == "bnext" and not transformed()


def saved_program() -> bool:
    """A trace that becomes a saved program (torch.export, ONNX, torch.jit.trace): the layers record
    torch's own ops there, so the program runs where bnext is not installed."""
    return (torch.compiler.is_compiling() and torch.compiler.is_exporting()) or torch._C._get_tracing_state() is not None


def _requires_grad(input, weight, bias) -> bool:
    return input.requires_grad or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)


def recomputing() -> bool:
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
    if saved_program() and not (training and momentum is None):
        # A trace that becomes a saved program (torch.export, ONNX, torch.jit.trace): torch's op.
        return _torch_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        )
    if not torch.compiler.is_compiling():
        if training and recomputing():
            # Checkpoint recomputation: the statistics were taken into the running ones when the
            # forward first ran; taking them again would count the batch twice.
            running_mean = running_var = num_batches_tracked = None
        if input.numel() > 0 and eager_route():
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


# The masked route of batch_norm (mask=...): bnext/masked.py's masked_batch_norm_impl. masked.py
# builds on this module, so this one cannot import it; it puts the function here when it is
# imported (bnext/__init__.py imports it), as __init__ gives modules.py convert_model.
masked_batch_norm_impl = None


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Drop-in for torch.nn.functional.batch_norm (same signature, semantics and exception types).

    In training, normalizes with the batch statistics and, when running_mean/running_var are
    given, updates them in place: running = (1 - momentum) * running + momentum * batch (unbiased
    variance). In eval, normalizes with running_mean/running_var. Arguments are checked before
    anything is computed, so a call that raises leaves the running statistics unchanged.

    mask (keyword only): a bool (N, L) tensor for (N, C, L) input, True at the real positions of
    padded sequences; the statistics (batch and running) come from the real positions only and the
    output is zero at the others (bnext.MaskedBatchNorm1d). None: batch norm of every position.
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
    if mask is not None:
        return masked_batch_norm_impl(input, mask, running_mean, running_var, weight, bias, training, momentum, eps)
    return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps)


# ----------------------------------------------------------------------------------------------
# Fused BN + activation (+ residual): y = act(BN(x) + residual). bnext/_ops/fused.py holds the
# ops' contract; this is how a call is routed.


def _act_torch(z: Tensor, activation: str, param: float) -> Tensor:
    return _fused.act(z, ACTIVATIONS[activation], param)


def _fusable_residual(input: Tensor, residual) -> bool:
    """The fused ops add a residual of the input's shape, dtype and device; anything else (a
    broadcast, a dtype promotion) is torch's add, done unfused so the result is torch's."""
    return residual is None or (
        isinstance(residual, Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    )


def _tiny_weight_channels(weight: Optional[Tensor], bias: Optional[Tensor]) -> Optional[Tensor]:
    """Channels the memory-saving backward cannot invert: z = w * xhat + b (+ r) carries xhat with
    a relative error of about eps(dtype) * (1 + |b| + |r|) / |w|, so where |w| < 2^-10 * (1 + |b|)
    (w = 0 included) the input of those channels is kept instead. None when there are none."""
    if weight is None:
        return None
    w = weight.detach().reshape(-1).abs()
    limit = 1.0 if bias is None else 1.0 + bias.detach().reshape(-1).abs()
    tiny = (w < limit * 2.0**-10).nonzero().reshape(-1)
    return tiny if tiny.numel() > 0 else None


class _MemorySavingBatchNormAct(torch.autograd.Function):
    """Training forward of the memory-saving mode: saves the output y (which the next layer keeps
    anyway) instead of the input, and recovers the input from y in backward (invertible
    activations only). Channels with a tiny weight keep their input (_tiny_weight_channels) and
    get their gradients from it."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, eps, activation, param):
        out, mean, invstd, var = ops().batch_norm_act_forward(input, weight, bias, residual, eps, activation, param)
        kept = _tiny_weight_channels(weight, bias)
        kept_input = None if kept is None else input.index_select(1, kept)
        ctx.activation, ctx.param = activation, param
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(out, weight, bias, residual, mean, invstd, kept, kept_input)
        ctx.mark_non_differentiable(mean, invstd, var)
        return out, mean, invstd, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_mean, _g_invstd, _g_var):
        y, weight, bias, residual, mean, invstd, kept, kept_input = ctx.saved_tensors
        g = g if g.dtype == y.dtype else g.to(y.dtype)
        a, p = ctx.activation, ctx.param
        dx, dr, sum_dz, sum_dz_xmu = ops().batch_norm_act_backward(g, y, residual, weight, bias, mean, invstd, a, p, True)
        if kept is not None:
            # The kept channels, from their input: the fused backward on those channels alone.
            def sub(t, dim=1):
                return None if t is None else t.index_select(dim, kept)

            kdx, kdr, ks, ksx = ops().batch_norm_act_backward(
                sub(g), kept_input, sub(residual), sub(weight, 0), sub(bias, 0), sub(mean, 0), sub(invstd, 0), a, p, False
            )
            dx.index_copy_(1, kept, kdx)
            if residual is not None:
                dr.index_copy_(1, kept, kdr)
            sum_dz.index_copy_(0, kept, ks)
            sum_dz_xmu.index_copy_(0, kept, ksx)
        nx, nw, nb, nr = ctx.needs_input_grad[:4]
        d_w = (sum_dz_xmu * invstd).to(ctx.param_dtypes[0]) if nw else None
        d_b = sum_dz.to(ctx.param_dtypes[1]) if nb else None
        return dx if nx else None, d_w, d_b, dr if nr else None, None, None, None


def batch_norm_act_impl(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    param: float = 0.0,
    memory_saving: bool = False,
) -> Tensor:
    """act(batch_norm(input, ...) + residual) with batch_norm_impl's arguments and bookkeeping;
    `param` is leaky_relu's negative_slope or elu's alpha."""
    if input.is_cuda:
        check_device(input)
    compiling = torch.compiler.is_compiling()
    if saved_program() or input.numel() == 0 or not _fusable_residual(input, residual):
        # A saved program (torch's ops, as batch_norm_impl records them), an empty batch, or a
        # residual torch's add would broadcast or promote: batch norm, add and activation apart.
        out = batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
        return _act_torch(out if residual is None else out + residual, activation, param)
    code = ACTIVATIONS[activation]
    grads = _requires_grad(input, weight, bias) or (residual is not None and residual.requires_grad)
    saving = memory_saving and grads and torch.is_grad_enabled()
    if training and not compiling and eager_route() and not saving:
        # One C++ call with a C++ autograd node (csrc/module_ops.cpp), as batch_norm_impl's.
        if recomputing():
            running_mean = running_var = num_batches_tracked = None  # see batch_norm_impl
        return _act_train_op(
            input, weight, bias, running_mean, running_var, momentum, eps, num_batches_tracked, residual, code, param
        )
    _bnext._check_batch_norm_args(input, weight, bias, running_mean, running_var, training, eps)
    weight, bias = flat(weight), flat(bias)
    if not training:
        return ops().batch_norm_act_eval(input, weight, bias, flat(running_mean), flat(running_var), residual, eps, code, param)
    if not compiling and recomputing():
        running_mean = running_var = num_batches_tracked = None  # see batch_norm_impl
    if saving and not transformed():
        out, mean, _invstd, var = _MemorySavingBatchNormAct.apply(input, weight, bias, residual, eps, code, param)
    else:
        out, mean, _invstd, var = ops().batch_norm_act_forward(input, weight, bias, residual, eps, code, param)
    if running_mean is not None or running_var is not None or num_batches_tracked is not None:
        count = input.numel() // input.shape[1]
        _bnext.update_running_stats(flat(running_mean), flat(running_var), num_batches_tracked, mean, var, count, momentum)
    return out


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    memory_saving: bool = False,
) -> Tensor:
    """act(batch_norm(input, ...) + residual) in fused kernels: F.batch_norm's arguments, then the
    residual to add (optional) and the activation (identity, relu, leaky_relu(negative_slope),
    elu(alpha), silu, hardswish). Equal to torch's batch_norm, add and activation in sequence.
    memory_saving=True (identity, leaky_relu with negative_slope > 0, elu with alpha > 0): the
    backward keeps the output instead of the input (see bnext.BatchNormAct2d)."""
    param = check_activation(activation, negative_slope, alpha, memory_saving)
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm_act(): argument 'input' must be Tensor, not {type(input).__name__}")
    return batch_norm_act_impl(
        input, running_mean, running_var, weight, bias, training, momentum, eps, None, residual, activation, param,
        memory_saving,
    )


def check_activation(activation: str, negative_slope: float, alpha: float, memory_saving: bool) -> float:
    """The activation's parameter (negative_slope or alpha; 0.0 for the others), after checking the
    arguments: ValueError naming the argument, what was expected and what came."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"bnext: activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    param = {"leaky_relu": negative_slope, "elu": alpha}.get(activation, 0.0)
    if not isinstance(param, (int, float)) or isinstance(param, bool):
        name = "negative_slope" if activation == "leaky_relu" else "alpha"
        raise TypeError(f"bnext: {name} must be a float, got {type(param).__name__}")
    if memory_saving and not act_invertible(activation, param):
        raise ValueError(
            "bnext: memory_saving=True needs an invertible activation (identity, leaky_relu with negative_slope > 0, "
            f"elu with alpha > 0), got activation={activation!r}"
            + (f" with parameter {param}" if activation in ("leaky_relu", "elu") else "")
        )
    return float(param)
