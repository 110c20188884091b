"""Decompositions of every functional bnext op into aten ops, for programs that must run without
bnext (torch.export, then ExportedProgram.run_decompositions).

torch's default run_decompositions() only decomposes CompositeImplicitAutograd ops; bnext's ops
have backend kernels, so they stay unless their decompositions are passed:

    ep = torch.export.export(model, args)
    ep = ep.run_decompositions(bnext.decompositions())          # bnext ops only
    table = torch.export.default_decompositions()
    table.update(bnext.decompositions())
    ep = ep.run_decompositions(table)                            # core aten, bnext ops included

Each function gives the op's outputs with the op's dtypes and shapes (csrc/common/schemas.h):
per-channel outputs are (C,) tensors of the accumulation dtype (float32 for float16/bfloat16/
float32 input, float64 for float64), the variance is biased, elementwise outputs have the input's
dtype. The math is the kernels' (csrc/cpu/batch_norm_cpu.cpp, csrc/common/math.h) in the
accumulation dtype with one rounding at the end, so results agree with the op up to float
rounding, not bit for bit (aten reduces in another order). Normalization decomposes to aten's own
batch norm ops where those give the op's outputs (batch_norm_eval, batch_norm_forward), so the
decomposed program still has a batch norm op there.

Not here: update_running_stats, _check_batch_norm_args, _batch_norm_train and _batch_norm_act_train,
the module-level ops. Deployment traces of bnext.batch_norm record torch's batch_norm instead (bnext/functional.py),
except training with momentum=None, whose programs keep bnext.update_running_stats.
"""
import torch

from .conventions import acc_dtype

aten = torch.ops.aten


def _bc(v, x):
    # A channel vector viewed as (1, C, 1, ...) against x.
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _dims(x):
    # Every dimension but the channels: what one channel's statistics reduce over.
    return [0] + list(range(2, x.dim()))


def _count(x):
    return x.numel() // x.shape[1]


def _acc(t, x):
    return None if t is None else t.reshape(-1).to(acc_dtype(x.dtype))


def _reduced_precision(x):
    return x.dtype in (torch.float16, torch.bfloat16)


def batch_norm_stats(input):
    """(mean, biased var) per channel, in the accumulation dtype."""
    var, mean = torch.var_mean(input.to(acc_dtype(input.dtype)), _dims(input), correction=0)
    return mean, var


def batch_norm_elemt(input, weight, bias, mean, invstd):
    """(x - mean) * (invstd * weight) + bias in the accumulation dtype, rounded once to input's.
    mean and invstd are given (they may come from other processes' statistics), so this is not
    aten's batch norm, which takes a variance: plain elementwise math."""
    xa = input.to(acc_dtype(input.dtype))
    scale = _acc(invstd, input)
    if weight is not None:
        scale = scale * _acc(weight, input)
    out = (xa - _bc(_acc(mean, input), input)) * _bc(scale, input)
    if bias is not None:
        out = out + _bc(_acc(bias, input), input)
    return out.to(input.dtype)


def batch_norm_eval(input, weight, bias, running_mean, running_var, eps):
    """aten's inference batch norm: the same folded formula (scale = weight * rsqrt(var + eps),
    shift = bias - mean * scale). Per-channel tensors may have any shape with C elements (as
    torch's F.batch_norm accepts); aten wants (C,). For float16/bfloat16 input every parameter
    goes to float32: aten's mixed-precision path, which computes in float32 as the op does (aten
    refuses a mix of float32 and reduced-precision parameters)."""
    dtype = acc_dtype(input.dtype) if _reduced_precision(input) else input.dtype

    def param(t):
        return None if t is None else t.reshape(-1).to(dtype)

    out, _, _ = aten._native_batch_norm_legit_no_training(
        input, param(weight), param(bias), param(running_mean), param(running_var), 0.0, eps
    )
    return out


def batch_norm_forward(input, weight, bias, eps):
    """aten's training batch norm without running statistics (output, mean, invstd), and the
    biased variance around that mean (aten does not return it; invstd^-2 - eps would lose the
    small variances). float16/bfloat16 input is normalized in float32 and rounded once, as the
    op does: aten would return reduced-precision statistics for reduced-precision parameters."""
    dtype = acc_dtype(input.dtype)
    x = input.to(dtype)
    out, mean, invstd = aten._native_batch_norm_legit.no_stats(
        x, _acc(weight, input), _acc(bias, input), True, 0.0, eps
    )
    var = (x - _bc(mean, x)).square().mean(_dims(x))
    return out.to(input.dtype), mean, invstd, var


def batch_norm_backward_reduce(grad_out, input, mean, invstd):
    """(sum(dy), sum(dy * (x - mean))) per channel, in the accumulation dtype."""
    dtype = acc_dtype(input.dtype)
    dy = grad_out.to(dtype)
    xmu = input.to(dtype) - _bc(_acc(mean, input), input)
    return dy.sum(_dims(input)), (dy * xmu).sum(_dims(input))


def _dx(dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu):
    # The closed-form training backward (csrc/common/math.h backward_coeffs):
    # dx = a * (dy - mean_dy) + b * (x - mean), a = weight * invstd, b = -a * invstd^2 * mean_dy_xmu.
    # dy - mean_dy first: a constant dy cancels to zero (DESIGN.md).
    dtype = acc_dtype(x.dtype)
    s = _acc(invstd, x)
    a = s if weight is None else _acc(weight, x) * s
    b = -a * s * s * _acc(mean_dy_xmu, x)
    dya = dy.to(dtype)
    xmu = x.to(dtype) - _bc(_acc(mean, x), x)
    return ((dya - _bc(_acc(mean_dy, x), x)) * _bc(a, x) + xmu * _bc(b, x)).to(x.dtype)


def batch_norm_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    """dx of the closed-form backward, from given per-channel means of dy and dy * (x - mean)."""
    return _dx(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu)


def batch_norm_backward(grad_out, input, weight, save_mean, save_invstd):
    """(dx, sum(dy), sum(dy * (x - mean))): backward_reduce, then backward_elemt with the sums
    divided by the count M of values per channel. Plain math rather than aten's
    native_batch_norm_backward: that returns grad_weight = sum(dy * x_hat), and sum_dy_xmu
    recovered by dividing by invstd would not be the op's."""
    sum_dy, sum_dy_xmu = batch_norm_backward_reduce(grad_out, input, save_mean, save_invstd)
    M = _count(input)
    dx = _dx(grad_out, input, save_mean, save_invstd, weight, sum_dy / M, sum_dy_xmu / M)
    return dx, sum_dy, sum_dy_xmu


_DECOMPOSITIONS = {
    "batch_norm_stats": batch_norm_stats,
    "batch_norm_elemt": batch_norm_elemt,
    "batch_norm_eval": batch_norm_eval,
    "batch_norm_forward": batch_norm_forward,
    "batch_norm_backward_reduce": batch_norm_backward_reduce,
    "batch_norm_backward_elemt": batch_norm_backward_elemt,
    "batch_norm_backward": batch_norm_backward,
}


def decompositions() -> dict:
    """A fresh dict {op overload: decomposition} for every functional bnext op, to pass to
    ExportedProgram.run_decompositions (alone, or merged into
    torch.export.default_decompositions()). Fresh so that callers may edit it."""
    return {getattr(torch.ops.bnext, name).default: fn for name, fn in _DECOMPOSITIONS.items()}


def register(table: dict) -> None:
    """Add {op name: decomposition} for more ops (the fused ops' come from _ops/fused.py, which
    builds them on the functions above)."""
    _DECOMPOSITIONS.update(table)
