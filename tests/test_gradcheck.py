"""gradcheck / gradgradcheck in float64: the module path (BatchNormFunction) in train and eval,
and every op on its own (each carries its own autograd formula)."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnext
from conftest import DEVICES, OPS, make_input

D = torch.float64


def _params(C, device, affine, bias):
    w = torch.rand(C, dtype=D, device=device).add_(0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=D, device=device).requires_grad_() if (affine and bias) else None
    return w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape,layout", [((5, 3), "contiguous"), ((3, 2, 4), "contiguous"), ((2, 3, 2, 3), "contiguous"), ((2, 3, 2, 3), "channels_last"), ((2, 2, 2, 2, 3), "strided")])
def test_batch_norm_gradcheck(shape, layout, affine, bias, training, device):
    x = make_input(shape, D, layout, device, requires_grad=True)
    C = shape[1]
    w, b = _params(C, device, affine, bias)
    rm = torch.randn(C, dtype=D, device=device)
    rv = torch.rand(C, dtype=D, device=device) + 0.5

    def f(x, w, b):
        # Fresh running-stat copies: gradcheck calls f many times.
        return bnext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_matches_torch_double_backward(device):
    """Second derivatives equal torch's own batch norm's, not only finite differences."""
    x = make_input((3, 2, 3, 2), D, "contiguous", device, requires_grad=True)
    w, b = _params(2, device, True, True)
    grads = []
    for fn in (torch.nn.functional.batch_norm, bnext.batch_norm):
        y = fn(x, None, None, w, b, True, 0.1, 1e-3)
        gx, gw = torch.autograd.grad(y.sin().sum(), (x, w), create_graph=True)
        grads.append(torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w, b)))
    for a, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def _op_args(name, device, shape=(3, 2, 4)):
    x = torch.randn(shape, dtype=D, device=device)
    C = shape[1]

    def vec(lo=0.5):
        return torch.rand(C, dtype=D, device=device) + lo

    dy = torch.randn_like(x)
    return {
        "batch_norm_stats": (x,),
        "batch_norm_elemt": (x, vec(), vec(-0.5), vec(-0.5), vec()),
        "batch_norm_eval": (x, vec(), vec(-0.5), vec(-0.5), vec(), 1e-3),
        "batch_norm_forward": (x, vec(), vec(-0.5), 1e-3),
        "batch_norm_backward_reduce": (dy, x, vec(-0.5), vec()),
        "batch_norm_backward_elemt": (dy, x, vec(-0.5), vec(), vec(), vec(-0.5), vec(-0.5)),
        "batch_norm_backward": (dy, x, vec(), vec(-0.5), vec()),
        "batch_norm_act_forward": (x, vec(), vec(-0.5), torch.randn_like(x), 1e-3, 4, 0.0),  # silu
        "batch_norm_act_eval": (x, vec(), vec(-0.5), vec(-0.5), vec(), torch.randn_like(x), 1e-3, 3, 0.7),  # elu
        "batch_norm_act_backward": (dy, x, torch.randn_like(x), vec(), vec(-0.5), vec(-0.5), vec(), 5, 0.0, False),
    }[name]




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_op_gradcheck(name, device):
    op = getattr(torch.ops.bnext, name).default
    args = _op_args(name, device)
    # The running statistics are constants of batch_norm_eval's graph, as in torch: no gradient.
    constant = {3, 4} if name in ("batch_norm_eval", "batch_norm_act_eval") else set()
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and i not in constant else a for i, a in enumerate(args))
    assert gradcheck(op, args)
    assert gradgradcheck(op, args)
