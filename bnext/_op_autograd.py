"""Autograd formulas for every bnext op (torch.library.register_autograd).

Each op is differentiable on its own, so the split ops compose (multi-process training), opcheck
passes with requires_grad inputs, and the double-backward path of BatchNormFunction can call the
ops themselves. Formulas use differentiable torch ops, so they can be differentiated again.

Notation: x is (N, C, *), a "channel vector" is (C,), M = N * prod(*) values per channel,
R(t) sums t over every dimension but 1, bc(v) views a channel vector as (1, C, 1, ...).
"""
import torch

from ._fake import acc_dtype


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


def _weight(weight, x):
    return _acc(weight, x) if weight is not None else torch.ones((), dtype=acc_dtype(x.dtype), device=x.device)


def _sum_grads(*terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


# ----------------------------------------------------------------------------------------------
# vector-Jacobian products shared by several ops


def _reduce_vjp(g_sum_dy, g_sum_dy_xmu, dy, x, mean):
    """VJP of (sum_dy, sum_dy_xmu) = (R(dy), R(dy * (x - mean))) -> (d_dy, d_x, d_mean)."""
    xa, dya, m = _acc(x, x), _acc(dy, x), _acc(mean, x)
    d_dy = d_x = d_mean = None
    if g_sum_dy is not None:
        d_dy = _bc(g_sum_dy, x).expand_as(xa)
    if g_sum_dy_xmu is not None:
        d_dy = _sum_grads(d_dy, _bc(g_sum_dy_xmu, x) * (xa - _bc(m, x)))
        d_x = _bc(g_sum_dy_xmu, x) * dya
        d_mean = -g_sum_dy_xmu * _red(dya)
    return d_dy, d_x, d_mean


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


# ----------------------------------------------------------------------------------------------
# batch_norm_stats(input) -> (mean, var)


def _stats_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])


def _stats_backward(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None
    M = _count(x)
    terms = []
    if g_mean is not None:
        terms.append(_bc(g_mean / M, x).expand(x.shape))
    if g_var is not None:
        terms.append(_bc(g_var * (2.0 / M), x) * (_acc(x, x) - _bc(mean, x)))
    return _to(_sum_grads(*terms), x)


# ----------------------------------------------------------------------------------------------
# batch_norm_elemt(input, weight, bias, mean, invstd) -> output


def _elemt_setup(ctx, inputs, output):
    x, weight, bias, mean, invstd = inputs
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(x, weight, mean, invstd)


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


# ----------------------------------------------------------------------------------------------
# batch_norm_forward(input, weight, bias, eps) -> (output, save_mean, save_invstd, save_var)


def _forward_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.dtypes = (x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(x, weight, output[1], output[2])


def _forward_backward(ctx, g, g_mean, g_invstd, g_var):
    x, weight, mean, invstd = ctx.saved_tensors
    nx, nw, nb, _ = ctx.needs_input_grad
    M = _count(x)
    xa = _acc(x, x)
    xhat = (xa - _bc(mean, x)) * _bc(invstd, x)
    w = _weight(weight, x)
    d_x = d_w = d_b = None
    if g is not None:
        ga = _acc(g, x)
        sum_g = _red(ga)
        sum_gxhat = _red(ga * xhat)
        if nx:
            d_x = _bc(w * invstd, x) * (ga - _bc(sum_g / M, x) - xhat * _bc(sum_gxhat / M, x))
        if nw:
            d_w = sum_gxhat.to(ctx.dtypes[1])
        if nb:
            d_b = sum_g.to(ctx.dtypes[2])
    if nx:
        # mean, invstd and var are outputs too: d invstd / d var = -invstd^3 / 2.
        g_v = g_var
        if g_invstd is not None:
            g_v = _sum_grads(g_v, -0.5 * g_invstd * invstd * invstd * invstd)
        terms = [d_x]
        if g_mean is not None:
            terms.append(_bc(g_mean / M, x).expand(x.shape))
        if g_v is not None:
            terms.append(_bc(g_v * (2.0 / M), x) * (xa - _bc(mean, x)))
        d_x = _to(_sum_grads(*terms), x)
    return d_x, d_w, d_b, None


# ----------------------------------------------------------------------------------------------
# batch_norm_backward_reduce(grad_out, input, mean, invstd) -> (sum_dy, sum_dy_xmu)


def _reduce_setup(ctx, inputs, output):
    dy, x, mean, invstd = inputs
    ctx.save_for_backward(dy, x, mean)
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


# ----------------------------------------------------------------------------------------------
# batch_norm_backward_elemt(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu) -> grad_input


def _belemt_setup(ctx, inputs, output):
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(*inputs)


def _belemt_backward(ctx, G):
    saved = ctx.saved_tensors
    grads = _backward_elemt_vjp(G, *saved)
    # VJP order: dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu (the op's argument order).
    return tuple(
        g.to(dt) if (need and g is not None) else None for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad)
    )


# ----------------------------------------------------------------------------------------------
# batch_norm_backward(grad_out, input, weight, save_mean, save_invstd) -> (grad_input, sum_dy, sum_dy_xmu)
# = backward_reduce, then backward_elemt with mean_dy = sum_dy / M, mean_dy_xmu = sum_dy_xmu / M.


def _bwd_setup(ctx, inputs, output):
    dy, x, weight, mean, invstd = inputs
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)
    ctx.save_for_backward(dy, x, weight, mean, invstd, output[1], output[2])


def _bwd_backward(ctx, G, g_sum_dy, g_sum_dy_xmu):
    dy, x, weight, mean, invstd, sum_dy, sum_dy_xmu = ctx.saved_tensors
    M = _count(x)
    d_dy = d_x = d_mean = d_invstd = d_weight = None
    if G is not None:
        d_dy, d_x, d_mean, d_invstd, d_weight, d_mdy, d_mdxm = _backward_elemt_vjp(
            G, dy, x, mean, invstd, weight, sum_dy / M, sum_dy_xmu / M
        )
        g_sum_dy = _sum_grads(g_sum_dy, d_mdy / M)
        g_sum_dy_xmu = _sum_grads(g_sum_dy_xmu, d_mdxm / M)
    r_dy, r_x, r_mean = _reduce_vjp(g_sum_dy, g_sum_dy_xmu, dy, x, mean)
    grads = (
        _sum_grads(d_dy, r_dy),
        _sum_grads(d_x, r_x),
        d_weight,
        _sum_grads(d_mean, r_mean),
        d_invstd,
    )
    return tuple(
        g.to(dt) if (need and g is not None) else None for g, dt, need in zip(grads, ctx.dtypes, ctx.needs_input_grad)
    )


_FORMULAS = {
    "batch_norm_stats": (_stats_backward, _stats_setup),
    "batch_norm_elemt": (_elemt_backward, _elemt_setup),
    "batch_norm_forward": (_forward_backward, _forward_setup),
    "batch_norm_backward_reduce": (_reduce_backward, _reduce_setup),
    "batch_norm_backward_elemt": (_belemt_backward, _belemt_setup),
    "batch_norm_backward": (_bwd_backward, _bwd_setup),
}


def register_autograd(namespace: str) -> None:
    """Register the formulas for every op of `namespace` (bnext, or bnext_simt when emulating)."""
    for name, (backward, setup) in _FORMULAS.items():
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


register_autograd("bnext")
