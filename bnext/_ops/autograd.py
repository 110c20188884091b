"""Autograd of every bnext kernel op: a backward formula (reverse mode) and a jvp formula (forward
mode); with the vmap rules (vmap.py) each op works under autograd, forward AD, double backward,
batched gradients and every torch.func transform, on its own and composed.

torch.library.register_autograd covers reverse mode only, and its autograd.Function predates
setup_context, which torch.func requires. So each op gets here an autograd.Function of its own
(forward = the op below autograd, setup_context, backward, jvp), registered as the op's Autograd
kernel.

Formulas use torch ops and bnext ops that are themselves differentiable in both modes, so they can
be differentiated again (gradgradcheck, forward-over-reverse).

Notation: x is (N, C, *), a "channel vector" is (C,), M = N * prod(*) values per channel,
R(t) sums t over every dimension but 1, bc(v) views a channel vector as (1, C, 1, ...).
"""
import threading

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd import forward_ad

from .conventions import acc_dtype
from .handles import ops


def _bc(v, like):
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


def _red(t):
    return t.sum([0] + list(range(2, t.dim())))


def _count(x):
    return x.numel() // max(x.shape[1], 1)


def _acc(t, like):
    return t.to(acc_dtype(like.dtype))


def _to(t, like):
    return None if t is None else t.to(like.dtype)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _weight(weight, x):
    return _acc(weight, x) if weight is not None else torch.ones((), dtype=acc_dtype(x.dtype), device=x.device)


def _sum(*terms):
    """The sum of the terms that are not None (None if all are)."""
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _mul(a, b):
    return None if a is None or b is None else a * b


def _zero_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


# ----------------------------------------------------------------------------------------------
# Shared formulas


def _xhat(x, mean, invstd):
    return (_acc(x, x) - _bc(mean, x)) * _bc(invstd, x)


def _input_jvp(tx, x, mean, invstd, weight):
    """Tangent of BN's training output for an input tangent tx (statistics of x itself):
    w * invstd * (tx - mean(tx) - xhat * mean(tx * xhat)), BN's Jacobian being symmetric: the
    closed-form backward applied to tx."""
    M = _count(x)
    ta = _acc(tx, x)
    xhat = _xhat(x, mean, invstd)
    w = _weight(weight, x)
    return _bc(w * invstd, x) * (ta - _bc(_red(ta) / M, x) - xhat * _bc(_red(ta * xhat) / M, x))


def _stats_jvp(tx, x, mean):
    """Tangents of (mean, biased var) for an input tangent tx."""
    M = _count(x)
    ta = _acc(tx, x)
    return _red(ta) / M, 2.0 * _red(ta * (_acc(x, x) - _bc(mean, x))) / M


def _reduce_vjp(g_sum_dy, g_sum_dy_xmu, dy, x, mean):
    """VJP of (sum_dy, sum_dy_xmu) = (R(dy), R(dy * (x - mean))) -> (d_dy, d_x, d_mean)."""
    xa, dya, m = _acc(x, x), _acc(dy, x), _acc(mean, x)
    d_dy = d_x = d_mean = None
    if g_sum_dy is not None:
        d_dy = _bc(g_sum_dy, x).expand_as(xa)
    if g_sum_dy_xmu is not None:
        d_dy = _sum(d_dy, _bc(g_sum_dy_xmu, x) * (xa - _bc(m, x)))
        d_x = _bc(g_sum_dy_xmu, x) * dya
        d_mean = -g_sum_dy_xmu * _red(dya)
    return d_dy, d_x, d_mean


def _reduce_jvp(t_dy, t_x, t_mean, dy, x, mean):
    """Tangents of (R(dy), R(dy * (x - mean)))."""
    xm = _acc(x, x) - _bc(_acc(mean, x), x)
    t_sum_dy = None if t_dy is None else _red(_acc(t_dy, x))
    t_inner = _sum(
        None if t_dy is None else _acc(t_dy, x) * xm,
        None if t_x is None else _acc(dy, x) * _acc(t_x, x),
        None if t_mean is None else -_acc(dy, x) * _bc(_acc(t_mean, x), x),
    )
    t_sum_dy_xmu = None if t_inner is None else _red(t_inner)
    return t_sum_dy, t_sum_dy_xmu


def _backward_elemt_vjp(G, dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu):
    """VJP of dx = w * s * (dy - mean_dy - (x - mean) * s^2 * mean_dy_xmu).

    Returns (d_dy, d_x, d_mean, d_invstd, d_weight, d_mean_dy, d_mean_dy_xmu).
    """
    xa, dya, Ga = _acc(x, x), _acc(dy, x), _acc(G, x)
    m, s, w = _acc(mean, x), _acc(invstd, x), _weight(weight, x)
    mdy, mdxm = _acc(mean_dy, x), _acc(mean_dy_xmu, x)
    a = w * s
    k = s * s * mdxm
    xm = xa - _bc(m, x)
    sum_G = _red(Ga)
    sum_Gxm = _red(Ga * xm)
    d_dy = Ga * _bc(a, x)
    d_x = -Ga * _bc(a * k, x)
    d_mean = sum_G * a * k
    d_weight = None if weight is None else s * (_red(Ga * dya) - mdy * sum_G - k * sum_Gxm)
    d_invstd = w * (_red(Ga * dya) - mdy * sum_G) - 3 * w * s * s * mdxm * sum_Gxm
    d_mean_dy = -a * sum_G
    d_mean_dy_xmu = -w * s * s * s * sum_Gxm
    return d_dy, d_x, d_mean, d_invstd, d_weight, d_mean_dy, d_mean_dy_xmu


def _backward_elemt_jvp(tangents, dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu):
    """Tangent of dx = A * u, A = w * s, u = dy - mean_dy - (x - mean) * K, K = s^2 * mean_dy_xmu."""
    t_dy, t_x, t_m, t_s, t_w, t_mdy, t_mdxm = tangents
    xa = _acc(x, x)
    s, w, mdxm = _acc(invstd, x), _weight(weight, x), _acc(mean_dy_xmu, x)
    A, K = w * s, s * s * mdxm
    xm = xa - _bc(_acc(mean, x), x)
    u = _acc(dy, x) - _bc(_acc(mean_dy, x), x) - xm * _bc(K, x)
    t_A = _sum(_mul(None if t_w is None else _acc(t_w, x), s), _mul(w, None if t_s is None else _acc(t_s, x)))
    t_K = _sum(
        None if t_s is None else 2 * s * _acc(t_s, x) * mdxm,
        None if t_mdxm is None else s * s * _acc(t_mdxm, x),
    )
    t_u = _sum(
        None if t_dy is None else _acc(t_dy, x),
        None if t_mdy is None else -_bc(_acc(t_mdy, x), x),
        None if t_x is None else -_acc(t_x, x) * _bc(K, x),
        None if t_m is None else _bc(_acc(t_m, x) * K, x),
        None if t_K is None else -xm * _bc(t_K, x),
    )
    out = _sum(None if t_A is None else _bc(t_A, x) * u, None if t_u is None else _bc(A, x) * t_u)
    return _zero_if_none(out, xa)


# ----------------------------------------------------------------------------------------------
# batch_norm_stats(input) -> (mean, var)


def _stats_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])
    ctx.save_for_forward(x, output[0])


def _stats_backward(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,)
    M = _count(x)
    terms = []
    if g_mean is not None:
        terms.append(_bc(g_mean / M, x).expand(x.shape))
    if g_var is not None:
        terms.append(_bc(g_var * (2.0 / M), x) * (_acc(x, x) - _bc(mean, x)))
    return (_to(_sum(*terms), x),)


def _stats_jvp_formula(ctx, tx):
    x, mean = ctx.saved_tensors
    return _stats_jvp(tx, x, mean)


# ----------------------------------------------------------------------------------------------
# batch_norm_elemt(input, weight, bias, mean, invstd) -> (x - mean) * invstd * weight + bias


def _elemt_setup(ctx, inputs, output):
    x, weight, bias, mean, invstd = inputs
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.save_for_forward(x, weight, mean, invstd)


def _elemt_backward(ctx, g):
    x, weight, mean, invstd = ctx.saved_tensors
    nx, nw, nb, nm, ns = ctx.needs_input_grad
    ga = _acc(g, x)
    s, w = _acc(invstd, x), _weight(weight, x)
    d_x = d_w = d_b = d_m = d_s = None
    if nx:
        d_x = (ga * _bc(w * s, x)).to(x.dtype)
    sum_g = _red(ga) if (nb or nm) else None
    sum_gxm = _red(ga * (_acc(x, x) - _bc(_acc(mean, x), x))) if (nw or ns) else None
    if nw:
        d_w = (sum_gxm * s).to(ctx.dtypes[1])
    if nb:
        d_b = sum_g.to(ctx.dtypes[2])
    if nm:
        d_m = (-sum_g * w * s).to(ctx.dtypes[3])
    if ns:
        d_s = (sum_gxm * w).to(ctx.dtypes[4])
    return d_x, d_w, d_b, d_m, d_s


def _elemt_jvp(ctx, t_x, t_w, t_b, t_m, t_s):
    x, weight, mean, invstd = ctx.saved_tensors
    xa = _acc(x, x)
    s, w = _acc(invstd, x), _weight(weight, x)
    xm = xa - _bc(_acc(mean, x), x)
    out = _sum(
        None if t_x is None else _acc(t_x, x) * _bc(w * s, x),
        None if t_w is None else xm * _bc(s * _acc(t_w, x), x),
        None if t_s is None else xm * _bc(w * _acc(t_s, x), x),
        None if t_m is None else -_bc(w * s * _acc(t_m, x), x),
        None if t_b is None else _bc(_acc(t_b, x), x),
    )
    return _zero_if_none(out, xa).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# batch_norm_forward(input, weight, bias, eps) -> (output, save_mean, save_invstd, save_var)


def _forward_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.save_for_forward(x, weight, output[1], output[2])


def _forward_backward(ctx, g, g_mean, g_invstd, g_var):
    x, weight, mean, invstd = ctx.saved_tensors
    nx, nw, nb, _ = ctx.needs_input_grad
    d_x = d_w = d_b = None
    if g is not None and (nx or nw or nb):
        # The fused kernels: dx, R(dy) and R(dy * (x - mean)) in one pass over dy and x. They are
        # differentiable ops, and mean and invstd are outputs of this op, so a double backward
        # flows through the statistics (below) as well as through dy and x.
        g = g if g.dtype == x.dtype else g.to(x.dtype)
        if nx:
            d_x, sum_dy, sum_dy_xmu = ops().batch_norm_backward(g, x, weight, mean, invstd)
        else:
            sum_dy, sum_dy_xmu = ops().batch_norm_backward_reduce(g, x, mean, invstd)
        if nw:
            d_w = (sum_dy_xmu * invstd).to(ctx.dtypes[1])
        if nb:
            d_b = sum_dy.to(ctx.dtypes[2])
    if nx:
        d_x = _stats_output_grads(d_x, x, mean, invstd, g_mean, g_invstd, g_var)
    return d_x, d_w, d_b, None


def _stats_output_grads(d_x, x, mean, invstd, g_mean, g_invstd, g_var):
    """d_x plus the gradient reaching x through a training forward's statistics outputs (mean,
    invstd, var), which callers may use (shared with the fused ops, _ops/fused.py)."""
    if g_mean is None and g_invstd is None and g_var is None:
        return d_x
    # d invstd / d var = -invstd^3 / 2.
    M = _count(x)
    g_v = g_var
    if g_invstd is not None:
        g_v = _sum(g_v, -0.5 * g_invstd * invstd * invstd * invstd)
    terms = [None if d_x is None else _acc(d_x, x)]
    if g_mean is not None:
        terms.append(_bc(g_mean / M, x).expand(x.shape))
    if g_v is not None:
        terms.append(_bc(g_v * (2.0 / M), x) * (_acc(x, x) - _bc(mean, x)))
    return _to(_sum(*terms), x)


def _forward_jvp(ctx, t_x, t_w, t_b, _t_eps):
    x, weight, mean, invstd = ctx.saved_tensors
    xa = _acc(x, x)
    xhat = _xhat(x, mean, invstd)
    t_out = _sum(
        None if t_x is None else _input_jvp(t_x, x, mean, invstd, weight),
        None if t_w is None else xhat * _bc(_acc(t_w, x), x),
        None if t_b is None else _bc(_acc(t_b, x), x),
    )
    if t_x is None:
        zeros = torch.zeros_like(mean)
        t_mean, t_var = zeros, zeros
    else:
        t_mean, t_var = _stats_jvp(t_x, x, mean)
    t_invstd = -0.5 * invstd * invstd * invstd * t_var
    return _zero_if_none(t_out, xa).to(x.dtype), t_mean, t_invstd, t_var


# ----------------------------------------------------------------------------------------------
# batch_norm_eval(input, weight, bias, running_mean, running_var, eps) -> output
# The running statistics are constants of the graph, as torch treats them: no gradient, no tangent.


def _eval_invstd(running_var, eps, x):
    return torch.rsqrt(_acc(running_var.detach().reshape(-1), x) + eps)


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.eps = eps
    ctx.save_for_backward(x, weight, running_mean, running_var)
    ctx.save_for_forward(x, weight, running_mean, running_var)


def _eval_backward(ctx, g):
    x, weight, running_mean, running_var = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad[:3]
    g = g if g.dtype == x.dtype else g.to(x.dtype)
    invstd = _eval_invstd(running_var, ctx.eps, x)
    d_x = d_w = d_b = None
    if nx:
        # dx = weight * invstd * dy, a per-channel scale of dy.
        scale = invstd if weight is None else _acc(weight, x) * invstd
        d_x = ops().batch_norm_elemt(g, None, None, torch.zeros_like(invstd), scale)
    if nw or nb:
        mean = _acc(running_mean.detach().reshape(-1), x)
        sum_dy, sum_dy_xmu = ops().batch_norm_backward_reduce(g, x, mean, invstd)
        if nw:
            d_w = (sum_dy_xmu * invstd).to(ctx.dtypes[1])
        if nb:
            d_b = sum_dy.to(ctx.dtypes[2])
    return d_x, d_w, d_b, None, None, None


def _eval_jvp(ctx, t_x, t_w, t_b, _t_rm, _t_rv, _t_eps):
    x, weight, running_mean, running_var = ctx.saved_tensors
    xa = _acc(x, x)
    invstd = _eval_invstd(running_var, ctx.eps, x)
    w = _weight(weight, x)
    out = _sum(
        None if t_x is None else _acc(t_x, x) * _bc(w * invstd, x),
        None if t_w is None else (xa - _bc(_acc(running_mean.detach().reshape(-1), x), x))
        * _bc(invstd * _acc(t_w, x), x),
        None if t_b is None else _bc(_acc(t_b, x), x),
    )
    return _zero_if_none(out, xa).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# batch_norm_backward_reduce(grad_out, input, mean, invstd) -> (sum_dy, sum_dy_xmu)


def _reduce_setup(ctx, inputs, output):
    dy, x, mean, invstd = inputs
    ctx.save_for_backward(dy, x, mean)
    ctx.save_for_forward(dy, x, mean)
    ctx.mean_dtype = mean.dtype


def _reduce_backward(ctx, g_sum_dy, g_sum_dy_xmu):
    dy, x, mean = ctx.saved_tensors
    d_dy, d_x, d_mean = _reduce_vjp(g_sum_dy, g_sum_dy_xmu, dy, x, mean)
    n_dy, n_x, n_mean, _ = ctx.needs_input_grad
    return (
        _to(d_dy, dy) if n_dy else None,
        _to(d_x, x) if n_x else None,
        d_mean.to(ctx.mean_dtype) if (n_mean and d_mean is not None) else None,
        None,
    )


def _reduce_jvp_formula(ctx, t_dy, t_x, t_mean, _t_invstd):
    dy, x, mean = ctx.saved_tensors
    t1, t2 = _reduce_jvp(t_dy, t_x, t_mean, dy, x, mean)
    zeros = torch.zeros_like(_acc(mean, x))
    return _zero_if_none(t1, zeros), _zero_if_none(t2, zeros)


# ----------------------------------------------------------------------------------------------
# batch_norm_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu) -> grad_input


def _belemt_setup(ctx, inputs, output):
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(*inputs)
    ctx.save_for_forward(*inputs)


def _belemt_backward(ctx, G):
    grads = _backward_elemt_vjp(G, *ctx.saved_tensors)
    # VJP order: dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu (the op's argument order).
    return tuple(
        g.to(dt) if (need and g is not None) else None for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad)
    )


def _belemt_jvp(ctx, *tangents):
    dy, x = ctx.saved_tensors[:2]
    return _backward_elemt_jvp(tangents, *ctx.saved_tensors).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# batch_norm_backward(grad_out, input, weight, save_mean, save_invstd) -> (grad_input, sum_dy, sum_dy_xmu)
# = backward_reduce, then backward_elemt with mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M.


def _bwd_setup(ctx, inputs, output):
    dy, x, weight, mean, invstd = inputs
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(dy, x, weight, mean, invstd, output[1], output[2])
    ctx.save_for_forward(dy, x, weight, mean, invstd, output[1], output[2])


def _bwd_backward(ctx, G, g_sum_dy, g_sum_dy_xmu):
    dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu = ctx.saved_tensors
    M = _count(x)
    d_dy = d_x = d_mean = d_invstd = d_weight = None
    if G is not None:
        d_dy, d_x, d_mean, d_invstd, d_weight, d_mdy, d_mdxm = _backward_elemt_vjp(
            G, dy, x, mean, invstd, weight, sum_dy / M, sum_dy_xmu / M
        )
        g_sum_dy = _sum(g_sum_dy, d_mdy / M)
        g_sum_dy_xmu = _sum(g_sum_dy_xmu, d_mdxm / M)
    r_dy, r_x, r_mean = _reduce_vjp(g_sum_dy, g_sum_dy_xmu, dy, x, mean)
    grads = (_sum(d_dy, r_dy), _sum(d_x, r_x), d_weight, _sum(d_mean, r_mean), d_invstd)
    return tuple(
        g.to(dt) if (need and g is not None) else None for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad)
    )


def _bwd_jvp(ctx, t_dy, t_x, t_w, t_mean, t_invstd):
    dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu = ctx.saved_tensors
    M = _count(x)
    t_sum_dy, t_sum_dy_xmu = _reduce_jvp(t_dy, t_x, t_mean, dy, x, mean)
    t_dx = _backward_elemt_jvp(
        (
            t_dy,
            t_x,
            t_mean,
            t_invstd,
            t_w,
            None if t_sum_dy is None else t_sum_dy / M,
            None if t_sum_dy_xmu is None else t_sum_dy_xmu / M,
        ),
        dy,
        x,
        mean,
        invstd,
        weight,
        sum_dy / M,
        sum_dy_xmu / M,
    )
    zeros = torch.zeros_like(sum_dy)
    return t_dx.to(x.dtype), _zero_if_none(t_sum_dy, zeros), _zero_if_none(t_sum_dy_xmu, zeros)


# ----------------------------------------------------------------------------------------------
# Registration


_FORMULAS = {
    # op: (setup_context, backward, jvp)
    "batch_norm_stats": (_stats_setup, _stats_backward, _stats_jvp_formula),
    "batch_norm_elemt": (_elemt_setup, _elemt_backward, _elemt_jvp),
    "batch_norm_eval": (_eval_setup, _eval_backward, _eval_jvp),
    "batch_norm_forward": (_forward_setup, _forward_backward, _forward_jvp),
    "batch_norm_backward_reduce": (_reduce_setup, _reduce_backward, _reduce_jvp_formula),
    "batch_norm_backward_elemt": (_belemt_setup, _belemt_backward, _belemt_jvp),
    "batch_norm_backward": (_bwd_setup, _bwd_backward, _bwd_jvp),
}


def _transforms_active() -> bool:
    """Forward AD or a torch.func transform is running: dual or wrapped tensors may come in."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


# The dispatch key set below autograd of each op call in flight on this thread (a stack: the
# forward of one level's call dispatches the next level's). The forward redispatches with it
# instead of excluding the autograd keys thread-wide: inside torch.func transforms the levels below
# must still record their own autograd (a TLS exclusion would reach them and hide, e.g., the
# second derivative of grad(grad(f))).
_keysets = threading.local()


def _below_autograd_keysets():
    stack = getattr(_keysets, "stack", None)
    if stack is None:
        stack = _keysets.stack = []
    return stack


def _make_function(op, setup_context, backward, jvp=None):
    """The Autograd kernel's Function of `op`; without `jvp`, forward AD must never reach it."""

    def forward(*args):
        keyset = _below_autograd_keysets()[-1]
        if _transforms_active():
            # Function.apply turned both gradient modes off for this level; the levels below
            # (reached through this redispatch) record their own, as functorch's single-level
            # functions let them.
            with torch.enable_grad(), forward_ad._set_fwd_grad_enabled(True):
                return op.redispatch(keyset, *args)
        return op.redispatch(keyset, *args)

    # A single-level Function, as the autograd kernels of torch's own ops are: it runs inside the
    # dispatcher, where torch.func has already unwrapped the transform's level (vmap never reaches
    # it: the vmap rules come first), so it records one node per level like a native op does.
    methods = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    }
    if jvp is not None:
        methods["jvp"] = staticmethod(jvp)
    return type(f"{op._schema.name.replace('::', '_')}_autograd", (torch.autograd.function._SingleLevelFunction,), methods)


_libraries = []  # torch.library.Library objects must outlive their registrations


def register_autograd(namespace: str) -> None:
    """Register the formulas for every op of `namespace` (bnext, or bnext_simt when emulating)."""
    lib = torch.library.Library(namespace, "IMPL")
    _libraries.append(lib)
    for name, (setup_context, backward, jvp) in _FORMULAS.items():
        op = getattr(getattr(torch.ops, namespace), name).default
        fn = _make_function(op, setup_context, backward, jvp)

        def kernel(keyset, *args, _op=op, _fn=fn):
            below = keyset & torch._C._after_autograd_keyset
            if not (_transforms_active() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))):
                return _op.redispatch(below, *args)
            stack = _below_autograd_keysets()
            stack.append(below)
            try:
                if _transforms_active():
                    # Inside a torch.func transform the dispatcher has unwrapped this level already;
                    # functorch applies its own single-level Functions the same way.
                    with enable_single_level_autograd_function():
                        return _fn.apply(*args)
                return _fn.apply(*args)
            finally:
                stack.pop()

        lib.impl(name, kernel, "Autograd", with_keyset=True)
