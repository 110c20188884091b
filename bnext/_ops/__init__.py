"""The op contract: everything that makes torch.ops.bnext.* behave as PyTorch operators.

The schemas and the CPU/CUDA kernels are C++ (csrc/common/schemas.h, csrc/ops.cpp); this package
registers the rest, per op, for the real library (namespace bnext) and for the emulated CUDA build
(namespace bnext_simt, bnext.testing):

    conventions.py     accumulation dtype and output memory format, the rules every op follows
    handles.py         which namespace the Python layer calls (bnext, or bnext_simt when emulating)
    fake.py            fake (meta) kernels: shapes, dtypes and strides for torch.compile and export
    autograd.py        backward and jvp formulas, registered as each op's Autograd kernel
    vmap.py            vmap rules: the vmapped dimension folded into the channels
    decompositions.py  each op in aten ops, for programs that must run without bnext
    fused.py           all of the above for the fused BN + activation (+ residual) ops

Importing it registers everything for namespace bnext.
"""
from .. import _C  # noqa: F401  (defines the schemas and kernels of torch.ops.bnext.*)
from . import autograd, fake, fused, vmap


def register(namespace: str) -> None:
    """Fake kernels, autograd formulas and vmap rules for every op of `namespace`."""
    fake.register_fakes(namespace)
    autograd.register_autograd(namespace)
    vmap.register_vmap_rules(namespace)
    fused.register(namespace)


register("bnext")
