"""BatchNormFunction: the single-device training and eval path on the fused bnext ops."""
import torch

from ._fake import acc_dtype
from ._ops import below_autograd, ops


def _constant(t, input_dtype):
    """t detached, in the accumulation type of input_dtype (no op where it already is both)."""
    acc = acc_dtype(input_dtype)
    if t.requires_grad:
        t = t.detach()
    return t if t.dtype == acc else t.to(acc)


def eval_coefficients(mean, invstd, weight, bias, input_dtype):
    """Eval's folded coefficients: out = x * scale + shift, torch's own eval formula.

    scale = invstd * weight, shift = bias - mean * scale, in the accumulation type, with the
    operations and order of the CPU kernel (csrc/cpu/batch_norm_cpu.cpp, normalize_cpu) and of the
    device-generic eval (csrc/train_forward.cpp); batch_norm_elemt(x, None, shift, 0, scale) then
    gives the same bits on every eval path.
    """
    scale = invstd if weight is None else invstd * _constant(weight, input_dtype)
    shift = -(mean * scale) if bias is None else _constant(bias, input_dtype) - mean * scale
    return scale, shift


def eval_normalize(input, mean, invstd, weight, bias):
    """Eval's output with the folded coefficients (eval_coefficients): batch_norm_elemt with mean 0,
    invstd = scale, no weight and bias = shift. Records nothing; the caller chooses the dispatch."""
    scale, shift = eval_coefficients(mean, invstd, weight, bias, input.dtype)
    return ops().batch_norm_elemt(input, None, shift, torch.zeros_like(scale), scale)


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward.

    training=True: forward(input, weight, bias, None, None, True, eps) -> (output, save_mean, save_var)
    returns the batch statistics (save_var biased), non-differentiable, for the running-stat update.
    training=False: forward(input, weight, bias, mean, invstd, False, eps) -> output
    normalizes with the given per-channel `mean` and `invstd`, which are treated as constants (as
    torch treats running statistics).

    First-order backward runs the fused kernels and computes only the gradients asked for. Under
    create_graph=True it recomputes the statistics with the differentiable bnext ops, so second
    derivatives flow through mean and invstd (gradgradcheck holds).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, mean, invstd, training, eps):
        with below_autograd():
            if training:
                output, save_mean, save_invstd, save_var = ops().batch_norm_forward(input, weight, bias, eps)
            else:
                # Folded as on every eval path: the same bits.
                output = eval_normalize(input, mean, invstd, weight, bias)
                save_mean, save_invstd = mean, invstd
        ctx.training = training
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        if not training:
            return output
        ctx.mark_non_differentiable(save_mean, save_var)
        return output, save_mean, save_var

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        input, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None or not (need_x or need_w or need_b):
            return None, None, None, None, None, None, None
        with below_autograd():
            return BatchNormFunction._backward(ctx, grad_out, input, weight, mean, invstd, need_x, need_w, need_b)

    @staticmethod
    def _backward(ctx, grad_out, input, weight, mean, invstd, need_x, need_w, need_b):
        grad_input = grad_weight = grad_bias = None
        if grad_out.dtype != input.dtype:
            grad_out = grad_out.to(input.dtype)
        sum_dy = sum_dy_xmu = None
        if ctx.training:
            if torch.is_grad_enabled():
                mean, var = ops().batch_norm_stats(input)
                invstd = torch.rsqrt(var + ctx.eps)
            if need_x:
                grad_input, sum_dy, sum_dy_xmu = ops().batch_norm_backward(grad_out, input, weight, mean, invstd)
            else:
                sum_dy, sum_dy_xmu = ops().batch_norm_backward_reduce(grad_out, input, mean, invstd)
        else:
            if need_x:
                # Eval: dx = weight * invstd * dy, a per-channel scale of dy.
                scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
                grad_input = ops().batch_norm_elemt(grad_out, None, None, torch.zeros_like(invstd), scale)
            if need_w or need_b:
                sum_dy, sum_dy_xmu = ops().batch_norm_backward_reduce(grad_out, input, mean, invstd)
        if need_w:
            grad_weight = sum_dy_xmu * invstd
            if grad_weight.dtype != weight.dtype:
                grad_weight = grad_weight.to(weight.dtype)
        if need_b:
            grad_bias = sum_dy if sum_dy.dtype == ctx.bias_dtype else sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None

