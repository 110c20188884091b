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


def below_autograd(nothing_requires_grad: bool = False):
    """Context that calls the ops below their (Python-registered) autograd kernels.

    Where nothing is to be recorded (grad mode off, e.g. inside an autograd.Function's forward or
    a first-order backward; or the caller knows no argument requires grad) those kernels only
    re-dispatch, at a cost of tens of microseconds per call; skipping them changes no result. Under torch.compile the tracer sees the plain
    calls (it does not trace this C++ guard).
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and not nothing_requires_grad):
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


@contextlib.contextmanager
def use_namespace(name: str):
    """Route bnext's Python layer through torch.ops.<name> inside the block."""
    global _namespace
    previous, _namespace = _namespace, name
    try:
        yield
    finally:
        _namespace = previous
