"""bnext on a real GPU: CPU-vs-CUDA cross-check, parity with nn.BatchNorm*d (cuDNN), gradcheck,
opcheck, determinism and torch.compile(mode="reduce-overhead") (CUDA graphs).

Every GPU test skips cleanly when torch.cuda.is_available() is False; the same kernels run on the
CPU in every test run through the SIMT emulator (tests/test_cuda_emulated.py).
"""
import pytest
import torch
import torch.nn as nn

import bnext
from bnext._ops.conventions import ACTIVATIONS
from conftest import OPS

BUILT_WITH_CUDA = bnext.build_info()["cuda"]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.skipif(not BUILT_WITH_CUDA, reason="bnext was built without CUDA (BNEXT_CUDA=0)")
def test_cuda_kernel_registered_for_every_op():
    info = bnext.build_info()
    assert info["cuda_archs"], info
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bnext::{op}", "CUDA"), op


def _args(op, x, acc, gen_device="cpu"):
    g = torch.Generator().manual_seed(1)
    C = x.shape[1]

    def vec(positive=False):
        v = torch.randn(C, generator=g, dtype=torch.float64)
        return (v.abs() + 0.5 if positive else v).to(acc)

    w, b, mean, invstd = vec(), vec(), vec(), vec(positive=True)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g, dtype=torch.float64))
    running_var = vec(positive=True)
    residual = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g, dtype=torch.float64))
    return {
        "batch_norm_stats": (x,),
        "batch_norm_elemt": (x, w, b, mean, invstd),
        "batch_norm_eval": (x, w, b, mean, running_var, 1e-5),
        "batch_norm_forward": (x, w, b, 1e-5),
        "batch_norm_backward_reduce": (dy, x, mean, invstd),
        "batch_norm_backward_elemt": (dy, x, mean, invstd, w, vec(), vec()),
        "batch_norm_backward": (dy, x, w, mean, invstd),
        "batch_norm_act_forward": (x, w, b, residual, 1e-5, ACTIVATIONS["silu"], 0.0),
        "batch_norm_act_eval": (x, w, b, mean, running_var, residual, 1e-5, ACTIVATIONS["leaky_relu"], 0.1),
        "batch_norm_act_backward": (dy, x, residual, w, b, mean, invstd, ACTIVATIONS["elu"], 0.7, False),
    }[op]


def _to_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


SHAPES = [
    ((8, 16, 13, 13), torch.contiguous_format),
    ((2, 3, 300, 300), torch.contiguous_format),  # few channels, large HxW: multi-block reduction
    ((64, 5, 7, 7), torch.channels_last),
    ((2, 70000, 2), torch.contiguous_format),  # NCHW, C above the channel grid limit (65535)
    ((256, 3000), torch.contiguous_format),  # (N, C): rows of C
    ((4, 32, 9, 9), torch.channels_last),
    ((3, 4, 5, 6, 7), torch.contiguous_format),
]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,fmt", SHAPES)
def test_cuda_matches_cpu(op, dtype, shape, fmt):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    args = _args(op, x, acc)
    want = getattr(torch.ops.bnext, op)(*args)
    got = getattr(torch.ops.bnext, op)(*_to_cuda(args))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.device.type == "cuda" and g.dtype == w.dtype and g.stride() == w.stride()
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=tol, atol=tol)


# Every activation; residual absent and given; the memory-saving backward for the invertible ones.
ACT_VARIANTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.0), ("hardswish", 0.0)]


@gpu
@pytest.mark.parametrize("act,param", ACT_VARIANTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,fmt", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[6]])
def test_cuda_act_ops_match_cpu(act, param, with_residual, dtype, shape, fmt):
    """The fused BN + activation (+ residual) ops on the GPU against bnext's CPU kernels: forward,
    eval, backward from the input and (invertible activations) from the output."""
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    C = shape[1]
    w = torch.randn(C, dtype=torch.float64)
    w[0] = 0.0
    w, b = w.float(), torch.randn(C).float()
    r = torch.randn(shape).to(dtype).contiguous(memory_format=fmt) if with_residual else None
    dy = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    code = ACTIVATIONS[act]
    tol = {torch.float32: 1e-4, torch.float16: 1e-2}[dtype]

    def both(op, *args):
        want = getattr(torch.ops.bnext, op)(*args)
        got = getattr(torch.ops.bnext, op)(*_to_cuda(args))
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        for g, w_ in zip(got, want):
            assert g.device.type == "cuda" and g.dtype == w_.dtype and g.shape == w_.shape
            if g.numel():
                assert g.stride() == w_.stride()
                torch.testing.assert_close(g.cpu().double(), w_.double(), rtol=tol, atol=tol)
        return want

    y, mean, invstd, _ = both("batch_norm_act_forward", x, w, b, r, 1e-5, code, param)
    both("batch_norm_act_eval", x, w, b, rm, rv, r, 1e-5, code, param)
    both("batch_norm_act_backward", dy, x, r, w, b, mean, invstd, code, param, False)
    if act in ("identity", "leaky_relu", "elu"):
        # Channel 0 (weight 0) is a don't-care of the memory-saving mode: compare the others.
        args = (dy, y, r, w, b, mean, invstd, code, param, True)
        want = torch.ops.bnext.batch_norm_act_backward(*args)
        got = torch.ops.bnext.batch_norm_act_backward(*_to_cuda(args))
        torch.testing.assert_close(got[0].cpu()[:, 1:].double(), want[0][:, 1:].double(), rtol=10 * tol, atol=10 * tol)
        torch.testing.assert_close(got[2].cpu()[1:], want[2][1:], rtol=10 * tol, atol=10 * tol)
        torch.testing.assert_close(got[3].cpu()[1:], want[3][1:], rtol=10 * tol, atol=10 * tol)


@gpu
def test_cuda_act_bitwise_deterministic():
    x = torch.randn(2, 3, 300, 300, device="cuda")
    r, dy = torch.randn_like(x), torch.randn_like(x)
    w, b = torch.randn(3, device="cuda"), torch.randn(3, device="cuda")

    def run():
        fwd = torch.ops.bnext.batch_norm_act_forward(x, w, b, r, 1e-5, ACTIVATIONS["silu"], 0.0)
        return fwd + torch.ops.bnext.batch_norm_act_backward(dy, x, r, w, b, fwd[1], fwd[2], ACTIVATIONS["silu"], 0.0, False)

    first = run()
    for _ in range(3):
        for a, b_ in zip(first, run()):
            assert torch.equal(a, b_)


@gpu
def test_cuda_misaligned_input():
    base = torch.randn(2 * 3 * 17 * 17 + 1, device="cuda")
    x = base[1:].view(2, 3, 17, 17)
    got = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    want = torch.ops.bnext.batch_norm_forward(x.cpu(), None, None, 1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_module_parity_with_cudnn(fmt):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(16, momentum=0.2).cuda()
    mod = bnext.BatchNorm2d(16, momentum=0.2).cuda()
    mod.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(8, 16, 10, 10, device="cuda").contiguous(memory_format=fmt)
        xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn_like(x)
        yr, yb = ref(xr), mod(xb)
        yr.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(yb, yr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xb.grad, xr.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mod.running_mean, ref.running_mean)
    torch.testing.assert_close(mod.running_var, ref.running_var)


@gpu
def test_cuda_gradcheck():
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device="cuda", requires_grad=True)

    def f(x, w, b):
        rm = torch.zeros(2, dtype=torch.float64, device="cuda")
        rv = torch.ones(2, dtype=torch.float64, device="cuda")
        return bnext.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@gpu
@pytest.mark.parametrize("op", OPS)
def test_cuda_opcheck(op):
    x = torch.randn(4, 3, 5, 5, device="cuda")
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in _to_cuda(_args(op, x.cpu(), torch.float32)))
    torch.library.opcheck(getattr(torch.ops.bnext, op), args)


@gpu
@pytest.mark.parametrize("shape,fmt", [((2, 3, 300, 300), torch.contiguous_format), ((512, 8, 8, 8), torch.channels_last)])
def test_cuda_bitwise_deterministic(shape, fmt):
    x = torch.randn(shape, device="cuda").contiguous(memory_format=fmt)
    dy = torch.randn_like(x)
    first = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    first += torch.ops.bnext.batch_norm_backward(dy, x, None, first[1], first[2])
    for _ in range(3):
        again = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
        again += torch.ops.bnext.batch_norm_backward(dy, x, None, again[1], again[2])
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@gpu
def test_cuda_compile_reduce_overhead():
    """CUDA graphs: the ops allocate only through the caching allocator and use the current stream."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bnext.BatchNorm2d(8), nn.ReLU()).cuda()
    ref = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).cuda()
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(4):
        x = torch.randn(4, 3, 16, 16, device="cuda")
        y = compiled(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=1e-4, atol=1e-5)
