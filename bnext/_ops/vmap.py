"""vmap rules of the bnext ops (torch.library.register_vmap).

Every bnext kernel treats channels independently, so B vmapped samples of (N, C, *) are one call
on (N, B * C, *): the vmapped dimension is folded into the channels, per-channel arguments become
B * C vectors, and per-channel results are viewed back as (B, C). One kernel call whatever B is.

The running-statistics update follows torch's batch norm under vmap: statistics of a batched input
cannot be written into running statistics that are not batched (torch raises the same error; use
torch.func.replace_all_batch_norm_modules_, track_running_stats=False, or buffers stacked with
torch.func.stack_module_state).
"""
import torch

# torch's message for the same situation (aten/src/ATen/functorch/BatchRulesNorm.cpp).
UNBATCHED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated "
    "in place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please "
    "see the functorch website for resources on how to patch your module to work with vmap"
)


def _logical_channels(t, bdim):
    shape = list(t.shape)
    if bdim is not None:
        del shape[bdim]
    return shape[1] if len(shape) > 1 else 0


def _fold(t, bdim, B):
    """A per-sample (N, C, *) tensor, batched at bdim (or not batched), as (N, B * C, *)."""
    if t is None:
        return None
    if bdim is None:
        t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:])
    else:
        t = t.movedim(bdim, 1)
    return t.flatten(1, 2)


def _fold_channel(v, bdim, B):
    """A per-sample channel vector (C,), batched at bdim (or not batched), as (B * C,)."""
    if v is None:
        return None
    v = v.unsqueeze(0).expand(B, *v.shape) if bdim is None else v.movedim(bdim, 0)
    return v.reshape(-1)


def _unfold(t, B, C):
    return t.unflatten(1, (B, C))


def _unfold_channel(v, B, C):
    return v.reshape(B, C)


def _input_info(info, in_dims, *inputs):
    """(B, C) from the first batched input-like argument."""
    for t, d in zip(inputs, in_dims):
        if t is not None and d is not None:
            return info.batch_size, _logical_channels(t, d)
    for t in inputs:
        if t is not None:
            return info.batch_size, _logical_channels(t, None)
    raise AssertionError("no input-like argument")


def _rules(ops):
    def stats(info, in_dims, x):
        B, C = _input_info(info, in_dims, x)
        mean, var = ops.batch_norm_stats(_fold(x, in_dims[0], B))
        return (_unfold_channel(mean, B, C), _unfold_channel(var, B, C)), (0, 0)

    def elemt(info, in_dims, x, weight, bias, mean, invstd):
        B, C = _input_info(info, in_dims[:1], x)
        vecs = [_fold_channel(v, d, B) for v, d in zip((weight, bias, mean, invstd), in_dims[1:])]
        return _unfold(ops.batch_norm_elemt(_fold(x, in_dims[0], B), *vecs), B, C), 1

    def eval_(info, in_dims, x, weight, bias, running_mean, running_var, eps):
        B, C = _input_info(info, in_dims[:1], x)
        vecs = [_fold_channel(v, d, B) for v, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])]
        return _unfold(ops.batch_norm_eval(_fold(x, in_dims[0], B), *vecs, eps), B, C), 1

    def forward(info, in_dims, x, weight, bias, eps):
        B, C = _input_info(info, in_dims[:1], x)
        w, b = (_fold_channel(v, d, B) for v, d in zip((weight, bias), in_dims[1:3]))
        if in_dims[0] is None:
            # One input, batched parameters: the statistics are the input's alone (not batched, so
            # they may go into running statistics that are not batched either, as in torch); the
            # parameters apply per sample to the normalized input.
            xhat, mean, invstd, var = ops.batch_norm_forward(x, None, None, eps)
            ones = torch.ones_like(mean).repeat(B)
            out = ops.batch_norm_elemt(_fold(xhat, None, B), w, b, torch.zeros_like(ones), ones)
            return (_unfold(out, B, C), mean, invstd, var), (1, None, None, None)
        out, mean, invstd, var = ops.batch_norm_forward(_fold(x, in_dims[0], B), w, b, eps)
        stats = tuple(_unfold_channel(v, B, C) for v in (mean, invstd, var))
        return (_unfold(out, B, C), *stats), (1, 0, 0, 0)

    def backward_reduce(info, in_dims, dy, x, mean, invstd):
        B, C = _input_info(info, in_dims[:2], dy, x)
        m, s = (_fold_channel(v, d, B) for v, d in zip((mean, invstd), in_dims[2:]))
        sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(_fold(dy, in_dims[0], B), _fold(x, in_dims[1], B), m, s)
        return (_unfold_channel(sum_dy, B, C), _unfold_channel(sum_dy_xmu, B, C)), (0, 0)

    def backward_elemt(info, in_dims, dy, x, mean, invstd, weight, mean_dy, mean_dy_xmu):
        B, C = _input_info(info, in_dims[:2], dy, x)
        vecs = [_fold_channel(v, d, B) for v, d in zip((mean, invstd, weight, mean_dy, mean_dy_xmu), in_dims[2:])]
        dx = ops.batch_norm_backward_elemt(_fold(dy, in_dims[0], B), _fold(x, in_dims[1], B), *vecs)
        return _unfold(dx, B, C), 1

    def backward(info, in_dims, dy, x, weight, mean, invstd):
        B, C = _input_info(info, in_dims[:2], dy, x)
        vecs = [_fold_channel(v, d, B) for v, d in zip((weight, mean, invstd), in_dims[2:])]
        dx, sum_dy, sum_dy_xmu = ops.batch_norm_backward(_fold(dy, in_dims[0], B), _fold(x, in_dims[1], B), *vecs)
        return (_unfold(dx, B, C), _unfold_channel(sum_dy, B, C), _unfold_channel(sum_dy_xmu, B, C)), (1, 0, 0)

    return {
        "batch_norm_stats": stats,
        "batch_norm_elemt": elemt,
        "batch_norm_eval": eval_,
        "batch_norm_forward": forward,
        "batch_norm_backward_reduce": backward_reduce,
        "batch_norm_backward_elemt": backward_elemt,
        "batch_norm_backward": backward,
    }


def _sample(t, bdim, i):
    return t if t is None or bdim is None else t.select(bdim, i)


def _update_running_stats(info, in_dims, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    """Running statistics that are not batched take statistics that are not batched, once; each
    slice of stacked (batched) running statistics takes its sample's statistics."""
    rm_d, rv_d, n_d, mean_d, var_d = in_dims[:5]
    batched_stats = mean_d is not None or var_d is not None
    for t, d in ((running_mean, rm_d), (running_var, rv_d)):
        if t is not None and d is None and batched_stats:
            raise RuntimeError(UNBATCHED_RUNNING_STATS)
    update = torch.ops.bnext.update_running_stats
    if num_batches_tracked is not None and n_d is None:
        # One count for the whole vmapped call (as torch's num_batches_tracked.add_(1) in the
        # module), and the factor it implies for every sample.
        update(None, None, num_batches_tracked, mean.new_empty(0), var.new_empty(0), count, momentum)
        if momentum is None:
            momentum = 1.0 / float(num_batches_tracked.item())
        num_batches_tracked = None
    once = [t if d is None else None for t, d in ((running_mean, rm_d), (running_var, rv_d))]
    if any(t is not None for t in once):
        update(*once, None, mean, var, count, momentum)
    per_sample = [t if d is not None else None for t, d in ((running_mean, rm_d), (running_var, rv_d))]
    if any(t is not None for t in per_sample) or num_batches_tracked is not None:
        for i in range(info.batch_size):
            update(
                _sample(per_sample[0], rm_d, i),
                _sample(per_sample[1], rv_d, i),
                _sample(num_batches_tracked, n_d, i),
                _sample(mean, mean_d, i),
                _sample(var, var_d, i),
                count,
                momentum,
            )
    return None, None


def _check_args(info, in_dims, input, weight, bias, running_mean, running_var, training, eps, check_count=True):
    """The checks on one sample (every sample has the same shape, dtype and device)."""
    if info.batch_size > 0:
        args = [_sample(t, d, 0) for t, d in zip((input, weight, bias, running_mean, running_var), in_dims[:5])]
        torch.ops.bnext._check_batch_norm_args(*args, training, eps, check_count)
    return None, None


def register_vmap_rules(namespace: str) -> None:
    """The vmap rules of the kernel ops of `namespace` (bnext, or bnext_simt when emulating), and for
    bnext the running-statistics update and the argument checks."""
    ops = getattr(torch.ops, namespace)
    for name, rule in _rules(ops).items():
        torch.library.register_vmap(f"{namespace}::{name}", rule)
    if namespace == "bnext":
        torch.library.register_vmap("bnext::update_running_stats", _update_running_stats)
        torch.library.register_vmap("bnext::_check_batch_norm_args", _check_args)
