"""bnext: fused BatchNorm kernels for PyTorch, drop-in for torch.nn.BatchNorm1d/2d/3d.

    import bnext
    model = bnext.convert_model(model)      # or use bnext.BatchNorm2d directly
    y = bnext.batch_norm(x, running_mean, running_var, weight, bias, training=True)

Where things live (each module imports only the ones below it):
    masked.py         MaskedBatchNorm1d, SyncMaskedBatchNorm: batch norm of padded sequences (mask (N, L))
    frozen.py         FrozenBatchNorm2d, freeze_batchnorm: fixed statistics and affine parameters
    convert.py        convert_model / revert_model and the torch <-> bnext class tables
    fuse.py           fuse_model: BN -> (add ->) activation chains into fused layers
    sync.py           SyncBatchNorm, SyncBatchNormAct: statistics over a process group
    act.py            BatchNormAct1d/2d/3d: BN, residual add and activation in one layer
    renorm.py         BatchRenorm1d/2d/3d: batch renormalization (Ioffe 2017)
    ghost.py          GhostBatchNorm1d/2d: ghost batch norm (Hoffer 2017), statistics per virtual batch
    modules.py        BatchNorm1d/2d/3d, LazyBatchNorm1d/2d/3d: running-statistic bookkeeping
    _quantization.py  bnext layers in torch.ao.quantization (eager fusion table, FX warning)
    functional.py     batch_norm: how a call is routed (eager C++ call, composed ops, torch's op)
    _shared.py        private helpers more than one of the modules above needs
    testing.py        emulate_cuda(): the CUDA kernels' code (bnext._simt) on CPU tensors
    _ops/             the op contract of torch.ops.bnext.*: dtype and layout conventions, fake
                      kernels, autograd formulas, vmap rules, decompositions
    _C, _simt         the compiled kernels (csrc/) and their emulated CUDA build
"""
import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.bnext.*)
from . import _ops  # noqa: F401  (fake kernels, autograd formulas and vmap rules of every op)
from . import _quantization, convert, modules
from ._ops.decompositions import decompositions
from .convert import convert_model, revert_model
from .fuse import fuse_model
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .frozen import FrozenBatchNorm2d, freeze_batchnorm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d
from .masked import MaskedBatchNorm1d, SyncMaskedBatchNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .functional import batch_norm, batch_norm_act
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .sync import SyncBatchNorm, SyncBatchNormAct

# torch.ao.quantization.fuse_modules finds fusers by exact type; bnext's layers join its table.
_quantization.register(
    {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}
)

# convert_model and BNEXT_TWIN lived in bnext.modules before bnext.convert, and stay importable
# from there. Set here: modules cannot import convert, which imports the layers.
modules.convert_model, modules.BNEXT_TWIN = convert.convert_model, convert.BNEXT_TWIN

__version__ = "0.1.0"

__all__ = [
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "MaskedBatchNorm1d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncMaskedBatchNorm",
    "batch_norm",
    "batch_norm_act",
    "build_info",
    "convert_model",
    "decompositions",
    "freeze_batchnorm",
    "fuse_model",
    "revert_model",
]


def build_info() -> dict:
    """How the loaded extension was built.

    Keys: version, torch_version (built against), torch_runtime_version, cuda (CUDA kernels
    compiled), cuda_archs (list of "8.0"-style strings), cpu_isa (CPU kernel variant in use).
    """
    info = dict(_C.build_info())
    archs = info.pop("cuda_archs")
    return {
        "version": __version__,
        "torch_version": info["torch_version"],
        "torch_runtime_version": torch.__version__.split("+")[0],
        "cuda": bool(info["cuda"]),
        "cuda_archs": [a for a in archs.replace(",", ";").split(";") if a],
        "cpu_isa": info["cpu_isa"],
    }
