"""Fake (meta) kernels for every bnext op: shapes, dtypes and strides, no data.

They let torch.compile, torch.export and meta tensors run bnext ops without touching data. Each
mirrors its C++ kernel: outputs keep the input's suggested memory format, per-channel outputs are
1-D tensors of the accumulation dtype (float32 for float16/bfloat16/float32, float64 for float64).
"""
import torch

from .conventions import SUPPORTED_DTYPES, acc_dtype, layout_format


def _check_input(input, op):
    torch._check(input.dim() >= 2, lambda: f"{op}: input must have at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    torch._check_not_implemented(
        input.dtype in SUPPORTED_DTYPES,
        lambda: f"{op}: input must be a floating-point tensor (float16, bfloat16, float32 or float64), got {input.dtype}",
    )


def _check_channel(t, name, input, op):
    if t is None:
        return
    C = input.shape[1]
    torch._check(
        t.dim() == 1 and t.shape[0] == C,
        lambda: f"{op}: {name} must be a 1-D tensor with {C} elements (num_features, the input's size(1)), got shape {tuple(t.shape)}",
    )
    # A meta tensor among CPU ones makes the dispatcher pick this kernel: say so, as the real
    # kernels do (under FakeTensorMode every tensor has the same fake device).
    torch._check(
        t.device == input.device,
        lambda: f"{op}: {name} must be on the input's device {input.device}, got {t.device}",
    )
    torch._check(
        t.dtype in (input.dtype, acc_dtype(input.dtype)),
        lambda: f"{op}: {name} must have dtype {input.dtype} or {acc_dtype(input.dtype)}, got {t.dtype}",
    )


def _check_like_input(t, name, input, op):
    torch._check(
        t.shape == input.shape,
        lambda: f"{op}: {name} must have the input's shape {tuple(input.shape)}, got {tuple(t.shape)}",
    )
    torch._check(t.dtype == input.dtype, lambda: f"{op}: {name} must have the input's dtype {input.dtype}, got {t.dtype}")


def _like_input(input):
    return torch.empty_like(input, memory_format=layout_format(input))


def _channel(input):
    return input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype))


def _stats_fake(input):
    _check_input(input, "bnext.batch_norm_stats")
    return _channel(input), _channel(input)


def _elemt_fake(input, weight, bias, mean, invstd):
    op = "bnext.batch_norm_elemt"
    _check_input(input, op)
    for t, name in ((weight, "weight"), (bias, "bias"), (mean, "mean"), (invstd, "invstd")):
        _check_channel(t, name, input, op)
    return _like_input(input)


def _eval_fake(input, weight, bias, running_mean, running_var, eps):
    op = "bnext.batch_norm_eval"
    if input.numel() == 0:
        return torch.empty_like(input)
    _check_input(input, op)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        torch._check(t is not None or name in ("weight", "bias"), lambda: f"{op}: {name} must be defined in evaluation mode")
        _check_channel(t if t is None else t.reshape(-1), name, input, op)
    return _like_input(input)


def _forward_fake(input, weight, bias, eps):
    op = "bnext.batch_norm_forward"
    _check_input(input, op)
    _check_channel(weight, "weight", input, op)
    _check_channel(bias, "bias", input, op)
    return _like_input(input), _channel(input), _channel(input), _channel(input)


def _backward_reduce_fake(grad_out, input, mean, invstd):
    op = "bnext.batch_norm_backward_reduce"
    _check_input(input, op)
    _check_like_input(grad_out, "grad_out", input, op)
    _check_channel(mean, "mean", input, op)
    _check_channel(invstd, "invstd", input, op)
    return _channel(input), _channel(input)


def _backward_elemt_fake(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu):
    op = "bnext.batch_norm_backward_elemt"
    _check_input(input, op)
    _check_like_input(grad_out, "grad_out", input, op)
    for t, name in ((mean, "mean"), (invstd, "invstd"), (weight, "weight"), (mean_dy, "mean_dy"), (mean_dy_xmu, "mean_dy_xmu")):
        _check_channel(t, name, input, op)
    return _like_input(input)


def _backward_fake(grad_out, input, weight, save_mean, save_invstd):
    op = "bnext.batch_norm_backward"
    _check_input(input, op)
    _check_like_input(grad_out, "grad_out", input, op)
    for t, name in ((weight, "weight"), (save_mean, "save_mean"), (save_invstd, "save_invstd")):
        _check_channel(t, name, input, op)
    return _like_input(input), _channel(input), _channel(input)


def _check_mask(input, mask, op):
    _check_input(input, op)
    torch._check(input.dim() == 3, lambda: f"{op}: input must be (N, C, L) with a mask, got {input.dim()}D input")
    torch._check(mask.dtype == torch.bool, lambda: f"{op}: mask must be a bool tensor, got {mask.dtype}")
    torch._check(
        mask.shape == (input.shape[0], input.shape[2]),
        lambda: f"{op}: mask must have shape (N, L) = {[input.shape[0], input.shape[2]]}, got {list(mask.shape)}",
    )


def _masked_forward_fake(input, mask, weight, bias, eps):
    op = "bnext._batch_norm_masked_forward"
    _check_mask(input, mask, op)
    _check_channel(weight, "weight", input, op)
    _check_channel(bias, "bias", input, op)
    return torch.empty_like(input, memory_format=torch.contiguous_format), _channel(input), _channel(input), _channel(input)


def _masked_backward_fake(grad_out, input, mask, weight, save_mean, save_invstd):
    op = "bnext._batch_norm_masked_backward"
    _check_mask(input, mask, op)
    _check_like_input(grad_out, "grad_out", input, op)
    for t, name in ((weight, "weight"), (save_mean, "save_mean"), (save_invstd, "save_invstd")):
        _check_channel(t, name, input, op)
    return torch.empty_like(input, memory_format=torch.contiguous_format), _channel(input), _channel(input)


_FAKES = {
    "batch_norm_stats": _stats_fake,
    "batch_norm_elemt": _elemt_fake,
    "batch_norm_eval": _eval_fake,
    "batch_norm_forward": _forward_fake,
    "batch_norm_backward_reduce": _backward_reduce_fake,
    "batch_norm_backward_elemt": _backward_elemt_fake,
    "batch_norm_backward": _backward_fake,
}

# The private kernel ops of schemas.h (masked batch norm's CUDA route: eager only, never traced, so
# outside the op contract's other tables), for opcheck.
_PRIVATE_FAKES = {
    "_batch_norm_masked_forward": _masked_forward_fake,
    "_batch_norm_masked_backward": _masked_backward_fake,
}


def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None


def register_fakes(namespace: str) -> None:
    """Register the fake kernels for every kernel op of `namespace` (bnext, or bnext_simt when
    emulating), and for bnext the running-statistics update (the emulated build has no such op)."""
    for name, fn in {**_FAKES, **_PRIVATE_FAKES}.items():
        torch.library.register_fake(f"{namespace}::{name}", fn)
    if namespace == "bnext":
        torch.library.register_fake("bnext::update_running_stats", _update_running_stats_fake)
