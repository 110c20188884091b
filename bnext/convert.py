"""Whole-model conversion between torch's batch norm layers and bnext's: convert_model, revert_model,
and the tables of class twins they follow.

Both switch the class of the existing layer objects (exact types only): parameters, buffers,
hooks, the training flag, device, dtype, requires_grad and any optimizer holding the parameters
stay as they were. bnext's classes add no state to torch's, so the switch is lossless both ways.
convert_model(sync=True) instead builds bnext.SyncBatchNorm layers sharing the parameters and
buffers, as torch's convert_sync_batchnorm does.

A layer that looks like a batch norm but is not of a type in the tables below (a subclass such as
timm's BatchNormAct2d, nn.SyncBatchNorm with sync=False, a lazy layer with sync=True) is left as it
is, with one UserWarning per call naming every such layer: a subclass may change behaviour that
bnext cannot see (its forward, an activation, a property), so converting it could silently change
the model, and leaving it silently would hide that part of the model does not run on bnext.
"""
import warnings

from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from ._shared import replace_layers
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    _BatchNormMixin,
)
from .sync import SyncBatchNorm

# The class torch defines, whatever torch.nn.SyncBatchNorm points to later (users may set it to
# bnext.SyncBatchNorm to swap implementations; torch.nn.modules.batchnorm keeps torch's class).
TORCH_SYNC_BATCH_NORM = nn.modules.batchnorm.SyncBatchNorm

# torch class -> bnext class, exact types only (subclasses may change behaviour we cannot see).
BNEXT_TWIN = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    # An uninitialized lazy layer becomes bnext's lazy twin, whose cls_to_become is the bnext
    # class: at its first forward it materializes and turns into bnext.BatchNorm*d, as
    # nn.LazyBatchNorm*d turns into nn.BatchNorm*d. A materialized lazy layer already is an
    # nn.BatchNorm*d (torch switched its class) and converts through the entries above.
    nn.LazyBatchNorm1d: LazyBatchNorm1d,
    nn.LazyBatchNorm2d: LazyBatchNorm2d,
    nn.LazyBatchNorm3d: LazyBatchNorm3d,
}

# bnext class -> torch class, for revert_model. The torch SyncBatchNorm is the class torch defines,
# whatever torch.nn.SyncBatchNorm points to now (a user may have set it to bnext.SyncBatchNorm).
TORCH_TWIN = {bnext_cls: torch_cls for torch_cls, bnext_cls in BNEXT_TWIN.items()}
TORCH_TWIN[SyncBatchNorm] = TORCH_SYNC_BATCH_NORM

# Exact types convert_model(sync=True) replaces by bnext.SyncBatchNorm (subclasses may change
# behaviour we cannot see).
SYNC_SOURCES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    TORCH_SYNC_BATCH_NORM,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    SyncBatchNorm,
)


def convert_model(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d and nn.LazyBatchNorm1d/2d/3d inside `module` by its bnext twin, in place.

    The modules themselves are kept (their class is switched), so parameters, buffers, hooks,
    the training flag, device, dtype, requires_grad and any optimizer holding the parameters stay
    as they were. Returns `module`. An uninitialized nn.LazyBatchNorm*d becomes a
    bnext.LazyBatchNorm*d, which turns into a bnext.BatchNorm*d at its first forward.

    sync=True: instead replace every nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and bnext.BatchNorm*
    (exact types) by a bnext.SyncBatchNorm over `process_group` (None: the whole world), as
    bnext.SyncBatchNorm.convert_sync_batchnorm does: new layers sharing the parameters and
    buffers, so use the returned module (a layer passed as `module` is returned converted). Call
    it before wrapping the model in DistributedDataParallel. Lazy layers must have run a forward
    first (bnext.SyncBatchNorm has no lazy form).

    Batch-norm-like layers it does not convert (subclasses, nn.SyncBatchNorm with sync=False, lazy
    layers with sync=True) are left as they are, named in one UserWarning.
    """
    if sync:
        skipped = _skipped(module, lambda m: type(m) in SYNC_SOURCES)
        out = replace_layers(SyncBatchNorm, module, process_group, lambda m: type(m) in SYNC_SOURCES)
    else:
        if process_group is not None:
            raise ValueError("bnext.convert_model: process_group is used only with sync=True, got sync=False")
        # A bnext layer of any class (a user's subclass too) already runs on bnext's kernels.
        skipped = _skipped(module, lambda m: type(m) in BNEXT_TWIN or isinstance(m, _BatchNormMixin))
        for m in module.modules():
            twin = BNEXT_TWIN.get(type(m))
            if twin is not None:
                m.__class__ = twin
        out = module
    if skipped:
        hint = ""
        if not sync and any(isinstance(m, TORCH_SYNC_BATCH_NORM) for m in skipped.values()):
            hint = " nn.SyncBatchNorm layers are converted by convert_model(model, sync=True)."
        if sync and any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in skipped.values()):
            hint += " Lazy layers convert with sync=True once a forward has materialized them."
        warnings.warn(
            f"bnext.convert_model left {len(skipped)} batch norm layer(s) unconverted, as they are: "
            f"{_names(skipped)}. It converts exact types only ({_converted_types(sync)}), since a "
            f"subclass may change behaviour bnext cannot see.{hint}",
            UserWarning,
            stacklevel=2,
        )
    return out


def revert_model(module: nn.Module) -> nn.Module:
    """Undo convert_model: every bnext layer inside `module` back to its torch class, in place.

    bnext.BatchNorm1d/2d/3d -> nn.BatchNorm1d/2d/3d, bnext.LazyBatchNorm*d -> nn.LazyBatchNorm*d,
    bnext.SyncBatchNorm -> torch.nn.SyncBatchNorm (torch's class; process_group kept). As
    convert_model, it switches the class of the existing objects: parameters, buffers, hooks and
    the training flag are shared, and the result gives the same outputs. Returns `module`.

    Use it before tools that match torch's classes exactly and would otherwise skip bnext's
    layers: FX graph mode quantization (prepare_fx, prepare_qat_fx), torch.ao's fuse_fx and
    torch.fx.experimental.optimization.fuse. A quantized or Conv-BN-folded model does not run
    bnext's kernels anyway. Subclasses of bnext's classes are left as they are, named in one
    UserWarning.
    """
    skipped = _skipped(module, lambda m: type(m) in TORCH_TWIN or not isinstance(m, _BatchNormMixin))
    for m in module.modules():
        twin = TORCH_TWIN.get(type(m))
        if twin is not None:
            m.__class__ = twin
    if skipped:
        warnings.warn(
            f"bnext.revert_model left {len(skipped)} bnext layer(s) as they are: {_names(skipped)}. It reverts "
            f"exact types only ({', '.join('bnext.' + c.__name__ for c in TORCH_TWIN)}), since a subclass has "
            "no torch class to go back to.",
            UserWarning,
            stacklevel=2,
        )
    return module


def _skipped(module: nn.Module, handled) -> dict:
    """Qualified name -> layer, for every batch-norm-like layer `handled` rejects.

    Batch-norm-like: any torch _NormBase (every _BatchNorm, the lazy layers, SyncBatchNorm) but
    the instance norms, which share the base class and are a different normalization bnext does
    not replace.
    """
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, _NormBase) and not isinstance(m, _InstanceNorm) and not handled(m)
    }


def _names(layers: dict) -> str:
    return ", ".join(
        f"{repr(name) if name else '<the module itself>'} ({type(m).__module__}.{type(m).__qualname__})" for name, m in layers.items()
    )


def _converted_types(sync: bool) -> str:
    if sync:
        return ", ".join(("nn." if c.__module__.startswith("torch.") else "bnext.") + c.__name__ for c in SYNC_SOURCES)
    return ", ".join(f"nn.{c.__name__}" for c in BNEXT_TWIN)
