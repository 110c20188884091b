"""Test helpers: run bnext's CUDA kernels on the CPU.

    from bnext.testing import emulate_cuda
    with emulate_cuda():
        y = bnext.BatchNorm2d(8)(torch.randn(4, 8, 5, 5))   # the CUDA kernels' code, on CPU tensors

bnext._simt is the CUDA source of csrc/cuda compiled as host C++ over a SIMT emulator
(csrc/simt). It registers the same ops as bnext, for CPU tensors, in namespace bnext_simt. Inside
emulate_cuda() bnext's modules, functional API and autograd Function call those ops.
"""
import contextlib

from . import _ops
from ._ops.handles import use_namespace

NAMESPACE = "bnext_simt"
_registered = False


def simt_module():
    """The emulated-CUDA extension (bnext._simt): launch log and block order."""
    from . import _simt

    return _simt


def _register_once():
    global _registered
    if not _registered:
        simt_module()
        _ops.register(NAMESPACE)
        _registered = True


@contextlib.contextmanager
def emulate_cuda():
    """Route bnext's Python layer through the emulated CUDA kernels (torch.ops.bnext_simt)."""
    _register_once()
    with use_namespace(NAMESPACE):
        yield
