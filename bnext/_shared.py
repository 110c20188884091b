"""Private helpers that more than one module needs: functional.py and sync.py share torch's rules for
per-channel tensors and empty batches, sync.py and convert.py share the layer replacement. Each
has its one owner here, so that no module reaches into another's private names.
"""
import torch
from torch import Tensor, nn


def flat(t):
    """A per-channel tensor as the ops take it, (C,): torch accepts any shape with C elements."""
    return t if t is None or t.dim() == 1 else t.reshape(-1)


def empty_batch(input: Tensor, weight, bias) -> Tensor:
    """The output for an input without elements, by torch's rule (aten _batch_norm_impl_index): a
    clone, scaled and shifted by the first weight and bias so the output stays connected to the
    graph; nothing to normalize or reduce."""
    out = input.clone()
    if weight is not None and weight.numel() > 0:
        out = out * weight.reshape(-1)[0]
    if bias is not None and bias.numel() > 0:
        out = out + bias.reshape(-1)[0]
    return out


def replace_layers(cls, module: nn.Module, process_group, select) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm's replacement, for any layer class `cls` with
    SyncBatchNorm's constructor: every layer inside `module` (itself included) for which
    select(layer) holds becomes a new `cls` layer sharing its parameters and buffers (the same
    tensors: requires_grad, device and dtype kept), its training flag and qconfig. Returns the new
    root (`module` itself unless it was replaced)."""
    module_output = module
    if select(module):
        module_output = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            bias=module.bias is not None,
        )
        if module.affine:
            with torch.no_grad():
                module_output.weight = module.weight
                module_output.bias = module.bias
        module_output.running_mean = module.running_mean
        module_output.running_var = module.running_var
        module_output.num_batches_tracked = module.num_batches_tracked
        module_output.training = module.training
        if hasattr(module, "qconfig"):
            module_output.qconfig = module.qconfig
    for name, child in module.named_children():
        module_output.add_module(name, replace_layers(cls, child, process_group, select))
    return module_output
