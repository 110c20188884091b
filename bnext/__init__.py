"""bnext: fused BatchNorm kernels for PyTorch, drop-in for torch.nn.BatchNorm1d/2d/3d.

    import bnext
    model = bnext.convert_model(model)      # or use bnext.BatchNorm2d directly
    y = bnext.batch_norm(x, running_mean, running_var, weight, bias, training=True)
"""
import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

from . import _C  # noqa: F401  (loads the extension: registers torch.ops.bnext.*)
from . import _fake  # noqa: F401  (fake kernels: torch.compile, export, meta tensors)
from . import _op_autograd  # noqa: F401  (autograd formulas of every op)
from ._decompositions import decompositions
from .functional import batch_norm
from . import _quantization
from .convert import convert_model, revert_model
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .sync import SyncBatchNorm

# torch.ao.quantization.fuse_modules finds fusers by exact type; bnext's layers join its table.
_quantization.register()

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "build_info",
    "convert_model",
    "decompositions",
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
