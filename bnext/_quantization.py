"""bnext layers in torch.ao.quantization: eager fusion (fuse_modules) and FX graph mode quantization.

Eager mode. torch.ao.quantization.fuse_modules / fuse_modules_qat find the fuser of a module list
by the exact tuple of its types in fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD; the only
public alternative is a mapping the user passes at every call. So that fuse_modules(m,
[["conv", "bn", "relu"]]) works on a converted model as on the torch model, register() adds, for
every entry whose key holds nn.BatchNorm1d/2d/3d, the same key with bnext's class in its place.
Its fuser is torch's, given the bnext layer switched back to the torch class (the same object):
torch's fused containers (nni.ConvBn2d, nni.BNReLU2d, nni.LinearBn1d, ...) refuse any other type,
and what comes out is what torch gives for the torch model (eval: the batch norm folded into the
conv; QAT: containers that prepare_qat replaces by torch's QAT modules, which copy the parameters
into their own batch norm). fuse_modules then puts nn.Identity where the layer was, so the switch
changes nothing else in the model.

FX graph mode. prepare_fx / prepare_qat_fx match torch's classes exactly too (their
BackendConfig patterns and the lowering tables behind convert_fx), so a bnext layer is neither
folded into its conv nor quantized: the result differs from the torch model's quantized the same
way. bnext does not try to extend those tables (a BackendConfig would have to be passed at every
call, and lowering has tables it cannot reach); bnext.revert_model(model) before prepare_fx gives
torch's result exactly, and loses nothing: a quantized model does not run bnext's kernels. To make
the skip explicit, a bnext layer traced by the QuantizationTracer (prepare_fx, prepare_qat_fx)
warns once per trace, naming the layer and the fix.
"""
import warnings

from torch import nn
from torch.ao.quantization import fuser_method_mappings
from torch.ao.quantization.fx.tracer import QuantizationTracer


def _with_torch_batch_norm(fuser, torch_class):
    def fuser_method(is_qat, *modules):
        for m in modules:
            torch_cls = torch_class.get(type(m))
            if torch_cls is not None:
                m.__class__ = torch_cls
        return fuser(is_qat, *modules)

    fuser_method.__name__ = f"bnext_{getattr(fuser, '__name__', 'fuser_method')}"
    return fuser_method


def register(bnext_class: dict) -> None:
    """Add bnext's classes to torch's eager fuser table (idempotent).

    bnext_class maps torch's nn.BatchNorm1d/2d/3d to bnext's (given by the caller: the layers import
    this module for the FX warning below)."""
    torch_class = {bnext_cls: torch_cls for torch_cls, bnext_cls in bnext_class.items()}
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for key, fuser in list(table.items()):
        if any(t in bnext_class for t in key):
            table.setdefault(tuple(bnext_class.get(t, t) for t in key), _with_torch_batch_norm(fuser, torch_class))


def warn_if_quantization_tracer(layer: nn.Module, tracer) -> None:
    """Called by a bnext layer traced by torch.fx: warn once per QuantizationTracer trace."""
    if not isinstance(tracer, QuantizationTracer) or getattr(tracer, "_bnext_warned", False):
        return
    tracer._bnext_warned = True
    warnings.warn(
        f"FX graph mode quantization matches torch.nn.BatchNorm*d by exact type: {tracer.path_of_module(layer)!r} "
        f"({type(layer).__module__}.{type(layer).__qualname__}), and every other bnext layer of this model, will "
        "be neither fused with the conv or linear before it nor quantized, unlike the torch model. Call "
        "bnext.revert_model(model) before prepare_fx/prepare_qat_fx to get torch's result (a quantized model "
        "does not run bnext's kernels).",
        UserWarning,
        stacklevel=2,
    )
