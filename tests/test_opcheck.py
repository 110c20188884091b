"""torch.library.opcheck for every bnext op: schema, fake kernel, autograd registration and
AOT dispatch, with and without requires_grad, across dtypes and layouts; meta tensors through the
fake kernels, op by op and through a module."""
import pytest
import torch

import bnext

from bnext._ops.conventions import ACTIVATIONS
from conftest import DEVICES, OPS, make_input

# Per-channel arguments by name: offset added to uniform [0, 1) values (positive where the op divides or takes a root).
VEC = {"weight": 0.5, "bias": -0.5, "mean": -0.5, "invstd": 0.5, "save_mean": -0.5, "save_invstd": 0.5, "mean_dy": -0.5,
       "mean_dy_xmu": -0.5, "running_mean": -0.5, "running_var": 0.5}


def build_args(name, x, param_dtype, requires_grad):
    op = getattr(torch.ops.bnext, name).default
    C = x.shape[1]
    args = []
    for arg in op._schema.arguments:
        if arg.name == "input":
            args.append(x.detach().clone().requires_grad_(requires_grad))
        elif arg.name == "grad_out":
            args.append(torch.randn_like(x).requires_grad_(requires_grad))
        elif arg.name == "eps":
            args.append(1e-3)
        elif arg.name in ("residual", "saved"):
            args.append(torch.randn_like(x).requires_grad_(requires_grad and arg.name == "residual"))
        elif arg.name == "activation":
            args.append(ACTIVATIONS["leaky_relu"])
        elif arg.name == "activation_param":
            args.append(0.1)
        elif arg.name == "from_output":
            args.append(False)
        else:
            v = torch.rand(C, device=x.device).add_(VEC[arg.name]).to(param_dtype)
            args.append(v.requires_grad_(requires_grad))
    return op, tuple(args)


def test_every_op_has_its_python_registrations():
    """The Python tables of the op contract (bnext/_ops/) cover exactly the registered kernel ops."""
    from bnext._ops import autograd, decompositions, fake, fused, vmap

    # The BN ops' tables and the fused ops' (bnext/_ops/fused.py), together exactly the kernel ops.
    assert set(fake._FAKES) | set(fused._FAKES) == set(OPS)
    assert set(autograd._FORMULAS) | set(fused._COMPOSITES) == set(OPS)
    assert set(vmap._rules(torch.ops.bnext)) | set(fused._COMPOSITES) == set(OPS)
    assert set(decompositions._DECOMPOSITIONS) == set(OPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    "dtype,param_dtype,shape,layout",
    [
        (torch.float32, torch.float32, (4, 3, 5, 6), "contiguous"),
        (torch.float64, torch.float64, (4, 3, 5, 6), "channels_last"),
        (torch.bfloat16, torch.float32, (6, 3), "contiguous"),
        (torch.float16, torch.float16, (2, 3, 2, 3, 4), "strided"),
    ],
    ids=["f32-nchw", "f64-nhwc", "bf16-2d", "f16-5d-strided"],
)
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, dtype, param_dtype, shape, layout, requires_grad, device):
    x = make_input(shape, dtype, layout, device)
    op, args = build_args(name, x, param_dtype, requires_grad)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", OPS)
def test_meta_tensors_use_fake_kernels(name):
    x = torch.empty(4, 3, 5, 6, device="meta").contiguous(memory_format=torch.channels_last)
    op, args = build_args(name, torch.empty(4, 3, 5, 6), torch.float32, False)
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    meta_args = tuple(x if (isinstance(a, torch.Tensor) and a.dim() == 4) else a for a in meta_args)
    out = op(*meta_args)
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert o.device.type == "meta"
        if o.dim() == 4:
            assert o.is_contiguous(memory_format=torch.channels_last)
        else:
            assert o.shape == (3,) and o.dtype == torch.float32


def test_module_on_meta_tensors_runs_through_fake_kernels():
    m = bnext.BatchNorm2d(3, device="meta")
    x = torch.empty(4, 3, 5, 5, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    assert y.device.type == "meta" and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.shape == x.shape
    m.eval()
    assert m(x).shape == x.shape
