"""The op contract of the fused BN + activation (+ residual) ops, in one module: fake kernels,
autograd, vmap rules and decompositions of batch_norm_act_forward, batch_norm_act_eval and
batch_norm_act_backward (csrc/common/schemas.h, csrc/common/act.h).

    output = act(BN(input) + residual)

Each op also has a *composite*: the same function written with bnext's differentiable BN ops and
torch's activations. The composites are the reference the tests compare with, the decompositions
(with aten's batch norm instead of bnext's), and what runs where the fused kernels cannot carry
a derivative:

* the forward op's backward is the fused backward op (one kernel, dz never stored);
* the backward op, differentiated again (double backward), runs its composite, whose ops all
  have backward and jvp formulas;
* under forward-mode AD and torch.func transforms every fused op runs its composite (the
  transforms then see only ops with formulas and vmap rules); vmap of a fused op vmaps its
  composite.

So the fused kernels are what eager training and torch.compile run; every other mode gets the
same math with one more rounding of BN's output for float16/bfloat16.
"""
import torch
import torch.nn.functional as F

from . import decompositions as _decomp
from .autograd import _below_autograd_keysets, _make_function, _stats_output_grads, _transforms_active
from .conventions import ACTIVATIONS, acc_dtype, layout_format
from .fake import _channel, _check_channel, _check_input, _check_like_input, _like_input
from .handles import ops

_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def _bc(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _count(x):
    return x.numel() // max(x.shape[1], 1)


# ----------------------------------------------------------------------------------------------
# Activations in torch ops (differentiable in every mode): torch's own functions, and the
# derivative / inverse formulas of csrc/common/act.h.


def act(z, activation, param):
    """torch's activation `activation` (an Act code) applied to z."""
    name = _NAMES[activation]
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, param)
    if name == "elu":
        return F.elu(z, param)
    if name == "silu":
        return F.silu(z)
    if name == "hardswish":
        return F.hardswish(z)
    return z


def act_derivative(z, activation, param):
    """act'(z), torch's backward formulas (csrc/common/act.h act_derivative)."""
    name = _NAMES[activation]
    one = torch.ones((), dtype=z.dtype, device=z.device)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "leaky_relu":
        return torch.where(z > 0, one, one * param)
    if name == "elu":
        return torch.where(z > 0, one, param * torch.exp(z))
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "hardswish":
        return torch.where(z < -3, 0 * one, torch.where(z <= 3, z / 3 + 0.5, one))
    return torch.ones_like(z)


def act_inverse(y, activation, param):
    """z from y = act(z), invertible activations only (csrc/common/act.h act_inverse)."""
    name = _NAMES[activation]
    if name == "leaky_relu":
        return torch.where(y > 0, y, y / param)
    if name == "elu":
        # The argument kept above -1 where elu saturated (csrc/common/act.h elu_inverse_arg).
        return torch.where(y > 0, y, torch.log1p((y / param).clamp_min(-1 + torch.finfo(y.dtype).eps)))
    return y


def act_derivative_from_output(y, activation, param):
    name = _NAMES[activation]
    one = torch.ones((), dtype=y.dtype, device=y.device)
    if name == "leaky_relu":
        return torch.where(y > 0, one, one * param)
    if name == "elu":
        return torch.where(y > 0, one, y + param)
    return torch.ones_like(y)


# ----------------------------------------------------------------------------------------------
# Composites: each op in differentiable bnext ops and torch ops.


def _plus(out, residual):
    return out if residual is None else out + residual


def forward_composite(input, weight, bias, residual, eps, activation, param):
    out, mean, invstd, var = ops().batch_norm_forward(input, weight, bias, eps)
    return act(_plus(out, residual), activation, param), mean, invstd, var


def eval_composite(input, weight, bias, running_mean, running_var, residual, eps, activation, param):
    out = ops().batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
    return act(_plus(out, residual), activation, param)


def _acc(t, x):
    return None if t is None else t.to(acc_dtype(x.dtype))


def _backward_math(elemt, bn_backward, round_dz, grad_out, saved, residual, weight, bias, save_mean, save_invstd, activation, param, from_output):
    """The backward op with BN's elementwise and backward functions `elemt`, `bn_backward` (bnext's
    differentiable ops, which take dz in the input's dtype: round_dz; or the aten decompositions,
    which take it in the accumulation dtype, as the kernels keep it)."""
    dtype = acc_dtype(saved.dtype)
    if from_output:
        # z from the output, then the input it came from: x = mean + (z - bias - residual) / (w * invstd).
        y = saved.to(dtype)
        zc = act_inverse(y, activation, param) - (0 if residual is None else residual.to(dtype))
        if bias is not None:
            zc = zc - _bc(_acc(bias, saved), saved)
        scale = save_invstd if weight is None else _acc(weight, saved) * save_invstd
        x = (_bc(save_mean, saved) + zc / _bc(scale, saved)).to(saved.dtype)
        deriv = act_derivative_from_output(y, activation, param)
    else:
        x = saved
        z = _plus(elemt(x, weight, bias, save_mean, save_invstd).to(dtype), _acc(residual, x))
        deriv = act_derivative(z, activation, param)
    dz = grad_out.to(dtype) * deriv
    dx, sum_dz, sum_dz_xmu = bn_backward(dz.to(saved.dtype) if round_dz else dz, x, weight, save_mean, save_invstd)
    return dx, (dz.to(saved.dtype) if residual is not None else saved.new_empty(0)), sum_dz, sum_dz_xmu


def backward_composite(*args):
    return _backward_math(ops().batch_norm_elemt, ops().batch_norm_backward, True, *args)


_COMPOSITES = {
    "batch_norm_act_forward": forward_composite,
    "batch_norm_act_eval": eval_composite,
    "batch_norm_act_backward": backward_composite,
}


# ----------------------------------------------------------------------------------------------
# Fake kernels


def _check_act(activation, param, op):
    torch._check_value(
        activation in _NAMES,
        lambda: f"{op}: activation must be one of the codes {sorted(_NAMES)} ({', '.join(ACTIVATIONS)}), got {activation}",
    )


def _check_residual(residual, input, op):
    if residual is not None:
        _check_like_input(residual, "residual", input, op)


def _forward_fake(input, weight, bias, residual, eps, activation, param):
    op = "bnext.batch_norm_act_forward"
    _check_input(input, op)
    _check_channel(weight, "weight", input, op)
    _check_channel(bias, "bias", input, op)
    _check_residual(residual, input, op)
    _check_act(activation, param, op)
    return _like_input(input), _channel(input), _channel(input), _channel(input)


def _eval_fake(input, weight, bias, running_mean, running_var, residual, eps, activation, param):
    op = "bnext.batch_norm_act_eval"
    _check_input(input, op)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        torch._check(t is not None or name in ("weight", "bias"), lambda: f"{op}: {name} must be defined in evaluation mode")
        _check_channel(t if t is None else t.reshape(-1), name, input, op)
    _check_residual(residual, input, op)
    _check_act(activation, param, op)
    return _like_input(input)


def _backward_fake(grad_out, saved, residual, weight, bias, save_mean, save_invstd, activation, param, from_output):
    op = "bnext.batch_norm_act_backward"
    _check_input(saved, op)
    _check_like_input(grad_out, "grad_out", saved, op)
    _check_residual(residual, saved, op)
    for t, name in ((weight, "weight"), (bias, "bias"), (save_mean, "save_mean"), (save_invstd, "save_invstd")):
        _check_channel(t, name, saved, op)
    _check_act(activation, param, op)
    grad_residual = _like_input(saved) if residual is not None else saved.new_empty(0)
    return _like_input(saved), grad_residual, _channel(saved), _channel(saved)


_FAKES = {
    "batch_norm_act_forward": _forward_fake,
    "batch_norm_act_eval": _eval_fake,
    "batch_norm_act_backward": _backward_fake,
}


# ----------------------------------------------------------------------------------------------
# Autograd of the forward op: its backward is the fused backward op.


def _forward_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, activation, param = inputs
    ctx.activation, ctx.param = activation, param
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (x, weight, bias, residual))
    ctx.save_for_backward(x, weight, bias, residual, output[1], output[2])
    # The statistics outputs usually get no gradient (the running-statistics update takes them):
    # None then, not zeros that would cost two more passes over x in backward.
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, g, g_mean, g_invstd, g_var):
    x, weight, bias, residual, mean, invstd = ctx.saved_tensors
    nx, nw, nb, nr = ctx.needs_input_grad[:4]
    d_x = d_w = d_b = d_r = None
    if g is not None and (nx or nw or nb or nr):
        g = g if g.dtype == x.dtype else g.to(x.dtype)
        d_x, grad_residual, sum_dz, sum_dz_xmu = ops().batch_norm_act_backward(
            g, x, residual, weight, bias, mean, invstd, ctx.activation, ctx.param, False
        )
        if nw:
            d_w = (sum_dz_xmu * invstd).to(ctx.dtypes[1])
        if nb:
            d_b = sum_dz.to(ctx.dtypes[2])
        if nr:
            d_r = grad_residual
    if nx:
        d_x = _stats_output_grads(d_x, x, mean, invstd, g_mean, g_invstd, g_var)
    return d_x if nx else None, d_w, d_b, d_r, None, None, None


# ----------------------------------------------------------------------------------------------
# Registration


_libraries = []


def _vmap_rule(composite):
    def rule(info, in_dims, *args):
        # vmap of the composite: its ops have vmap rules (the vmapped dim folded into channels).
        dims = tuple(d if isinstance(a, torch.Tensor) else None for a, d in zip(args, in_dims))
        out = torch.vmap(composite, in_dims=dims, randomness="error")(*args)
        return out, (0,) * len(out) if isinstance(out, tuple) else 0

    return rule


def register(namespace: str) -> None:
    """Fake kernels, Autograd kernels and vmap rules of the fused ops of `namespace`."""
    lib = torch.library.Library(namespace, "IMPL")
    _libraries.append(lib)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    # No jvp: under forward AD (and every torch.func transform) the kernel below runs the
    # composite, whose ops carry their own forward formulas, and never reaches this Function.
    fn = _make_function(getattr(torch.ops, namespace).batch_norm_act_forward.default, _forward_setup, _forward_backward)
    for name, composite in _COMPOSITES.items():
        op = getattr(getattr(torch.ops, namespace), name).default
        fused_backward = name == "batch_norm_act_forward"

        def kernel(keyset, *args, _op=op, _composite=composite, _fused_backward=fused_backward):
            below = keyset & torch._C._after_autograd_keyset
            differentiated = torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
            if not (_transforms_active() or differentiated):
                return _op.redispatch(below, *args)
            if _transforms_active() or not _fused_backward:
                # Forward AD, torch.func, double backward, eval with gradients: the composite,
                # whose every op carries its own formulas.
                return _composite(*args)
            stack = _below_autograd_keysets()
            stack.append(below)
            try:
                return fn.apply(*args)
            finally:
                stack.pop()

        lib.impl(name, kernel, "Autograd", with_keyset=True)
        torch.library.register_vmap(f"{namespace}::{name}", _vmap_rule(composite))


# ----------------------------------------------------------------------------------------------
# Decompositions (programs that must run without bnext): aten batch norm, then torch's
# activation.


def _forward_decomposition(input, weight, bias, residual, eps, activation, param):
    out, mean, invstd, var = _decomp.batch_norm_forward(input, weight, bias, eps)
    return act(_plus(out, residual), activation, param), mean, invstd, var


def _eval_decomposition(input, weight, bias, running_mean, running_var, residual, eps, activation, param):
    out = _decomp.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
    return act(_plus(out, residual), activation, param)


def _elemt_acc(x, weight, bias, mean, invstd):
    # z in the accumulation dtype, unrounded, as the kernels recompute it.
    scale = invstd if weight is None else _acc(weight, x) * invstd
    z = (_acc(x, x) - _bc(mean, x)) * _bc(scale, x)
    return z if bias is None else z + _bc(_acc(bias, x), x)


def _backward_decomposition(*args):
    return _backward_math(_elemt_acc, _decomp.batch_norm_backward, False, *args)


DECOMPOSITIONS = {
    "batch_norm_act_forward": _forward_decomposition,
    "batch_norm_act_eval": _eval_decomposition,
    "batch_norm_act_backward": _backward_decomposition,
}
_decomp.register(DECOMPOSITIONS)
