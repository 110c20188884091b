"""The dtype and memory-format conventions every bnext op follows (csrc/common/schemas.h).

The ground floor of the Python layer: it imports torch only, so the fake kernels, the autograd
formulas, the decompositions and SyncBatchNorm all take the rules from here rather than from each
other.
"""
import torch
from torch._prims_common import suggest_memory_format

# The input dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype):
    """The dtype statistics and per-channel outputs are computed in: float64 for float64 input,
    float32 for every other (half types accumulate in float32, as in torch)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout_format(input):
    """The output memory format of every bnext op: csrc/common/layout.h layout_format()."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return suggest_memory_format(input)


# The activations of the fused ops (csrc/common/act.h, enum Act): name -> the op's `activation`
# code. The parameter (`activation_param`) is negative_slope for leaky_relu and alpha for elu.
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "elu": 3, "silu": 4, "hardswish": 5}


def act_invertible(activation: str, param: float) -> bool:
    """Whether z can be recovered from act(z) (the memory-saving mode): csrc/common/act.h
    act_invertible()."""
    return activation == "identity" or (activation in ("leaky_relu", "elu") and param > 0)
