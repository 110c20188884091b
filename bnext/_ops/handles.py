"""Which op namespace bnext's Python layer calls.

Normally torch.ops.bnext. bnext.testing.emulate_cuda() switches to torch.ops.bnext_simt (the CUDA
kernels compiled as host C++ over the SIMT emulation layer, registered for CPU tensors), so the
same modules, autograd Function and tests run the CUDA kernels' code.
"""
import contextlib

import torch

_namespace = "bnext"


def ops():
    """The op namespace in use (torch.ops.bnext unless emulating CUDA)."""
    return getattr(torch.ops, _namespace)


def namespace() -> str:
    return _namespace


@contextlib.contextmanager
def use_namespace(name: str):
    """Route bnext's Python layer through torch.ops.<name> inside the block."""
    global _namespace
    previous, _namespace = _namespace, name
    try:
        yield
    finally:
        _namespace = previous
