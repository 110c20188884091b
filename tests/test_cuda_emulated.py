"""bnext's CUDA kernels, run on the CPU through the SIMT emulator (bnext._simt, ops bnext_simt::*).

The shapes are chosen against the launch heuristics of csrc/cuda/batch_norm_kernels.cuh with the
emulator's limits (csrc/cuda/runtime.h: 2 SMs, channel grid limit 3, 32-bit indexing up to 2048
elements), so that together they launch every kernel in every variant: single- and multi-block
reductions, channel loops beyond the grid limit, 32- and 64-bit indexing, vectorized and scalar
elementwise kernels with vector tails, misaligned storage, channels_last, N=1, H*W=1.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bnext
from conftest import OPS, kernel_ops
from bnext.testing import emulate_cuda, simt_module

ROOT = Path(__file__).resolve().parents[1]
simt_module()  # loads bnext._simt: registers torch.ops.bnext_simt.*
SIMT = torch.ops.bnext_simt

# (shape, memory format, what it drives)
SHAPES = [
    ((4, 5, 3, 3), torch.contiguous_format),  # NCHW, one block per channel, 32-bit
    ((2, 3, 20, 20), torch.contiguous_format),  # NCHW, HxW split over blocks, 64-bit
    ((9, 2, 3, 4), torch.contiguous_format),  # NCHW, N split over blocks
    ((2, 7, 3, 5), torch.contiguous_format),  # C above the channel grid limit
    ((1, 4, 6, 6), torch.contiguous_format),  # N = 1
    ((8, 3, 1, 1), torch.contiguous_format),  # H*W = 1 (rows of C)
    ((2, 3, 5, 7), torch.contiguous_format),  # vector tail (210 % 4 != 0)
    ((4, 6, 5, 5), torch.channels_last),  # rows split over blocks
    ((2, 100, 1, 3), torch.channels_last),  # channel tiles above the grid limit
    ((3, 6, 12, 10), torch.channels_last),  # channels_last, 64-bit, vectors straddle rows
]
OTHER_RANKS = [(5, 130), (3, 4, 7), (2, 3, 2, 3, 4)]


def _input(shape, dtype=torch.float32, fmt=torch.contiguous_format, seed=0, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if misaligned:
        # Same values, storage offset of one element: not 16-byte aligned.
        buf = torch.empty(x.numel() + 1, dtype=dtype)
        buf[1:] = x.reshape(-1)
        return buf[1:].view(shape)
    return x.contiguous(memory_format=fmt)


def _like(x, seed):
    """Random values with x's shape, dtype and strides (x's memory format, aligned storage)."""
    g = torch.Generator().manual_seed(seed)
    return torch.empty_like(x).copy_(torch.randn(x.shape, generator=g, dtype=torch.float64))


def _vec(C, dtype, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(C, generator=g, dtype=torch.float64)
    return (v.abs() + 0.5 if positive else v).to(dtype)


def _args(name, x, acc, seed=1):
    """Arguments of op `name` for input x (per-channel tensors in dtype `acc`)."""
    C = x.shape[1]
    w, b = _vec(C, acc, seed), _vec(C, acc, seed + 1)
    mean, invstd = _vec(C, acc, seed + 2), _vec(C, acc, seed + 3, positive=True)
    dy = _like(x, seed + 4)
    return {
        "batch_norm_stats": (x,),
        "batch_norm_elemt": (x, w, b, mean, invstd),
        "batch_norm_eval": (x, w, b, mean, _vec(C, acc, seed + 7, positive=True), 1e-5),
        "batch_norm_forward": (x, w, b, 1e-5),
        "batch_norm_backward_reduce": (dy, x, mean, invstd),
        "batch_norm_backward_elemt": (dy, x, mean, invstd, w, _vec(C, acc, seed + 5), _vec(C, acc, seed + 6)),
        "batch_norm_backward": (dy, x, w, mean, invstd),
    }[name]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


def _assert_close(a, b, dtype, what):
    for i, (u, v) in enumerate(zip(a, b) if isinstance(a, (tuple, list)) else [(a, b)]):
        assert u.dtype == v.dtype, f"{what}[{i}]: dtype {u.dtype} vs {v.dtype}"
        assert u.shape == v.shape, f"{what}[{i}]: shape {u.shape} vs {v.shape}"
        assert u.stride() == v.stride(), f"{what}[{i}]: strides {u.stride()} vs {v.stride()}"
        torch.testing.assert_close(u.double(), v.double(), **_tol(dtype), msg=lambda m: f"{what}[{i}]: {m}")


CASES = [(s, f, False) for s, f in SHAPES] + [(s, torch.contiguous_format, False) for s in OTHER_RANKS]
CASES += [((2, 3, 5, 7), torch.contiguous_format, True), ((2, 3, 20, 20), torch.contiguous_format, True)]


def _case_id(case):
    shape, fmt, mis = case
    return "x".join(map(str, shape)) + ("-cl" if fmt == torch.channels_last else "") + ("-misaligned" if mis else "")


def test_emulated_build_defines_every_op():
    """One schema list (csrc/common/schemas.h) for both builds: the same kernel ops in bnext_simt."""
    assert kernel_ops("bnext_simt") == OPS


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_emulated_cuda_matches_cpu_kernels(op, case):
    """Every op, every shape: the CUDA kernels (emulated) against bnext's CPU kernels, float32."""
    shape, fmt, mis = case
    x = _input(shape, torch.float32, fmt, misaligned=mis)
    args = _args(op, x, torch.float32)
    got = getattr(SIMT, op)(*args)
    want = getattr(torch.ops.bnext, op)(*args)
    _assert_close(got, want, torch.float32, op)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "case",
    [((2, 3, 20, 20), torch.contiguous_format, False), ((4, 6, 5, 5), torch.channels_last, False),
     ((2, 3, 5, 7), torch.contiguous_format, True), ((5, 130), torch.contiguous_format, False)],
    ids=_case_id,
)
def test_emulated_cuda_dtypes(op, dtype, case):
    """Half, bfloat16 (float32 accumulation and float32 parameters) and double."""
    shape, fmt, mis = case
    x = _input(shape, dtype, fmt, misaligned=mis)
    for acc in {_acc(dtype), dtype}:
        args = _args(op, x, acc)
        got = getattr(SIMT, op)(*args)
        want = getattr(torch.ops.bnext, op)(*args)
        _assert_close(got, want, dtype, f"{op} params {acc}")


def _bn_class(x):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]


def _bnext_class(x):
    return {2: bnext.BatchNorm1d, 3: bnext.BatchNorm1d, 4: bnext.BatchNorm2d, 5: bnext.BatchNorm3d}[x.dim()]


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c[0] in [(2, 3, 20, 20), (4, 6, 5, 5), (2, 100, 1, 3), (1, 4, 6, 6), (5, 130), (2, 3, 2, 3, 4)]],
    ids=_case_id,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_parity_with_torch(case, dtype):
    """bnext.BatchNorm*d on the emulated CUDA kernels against nn.BatchNorm*d: outputs, all grads,
    running statistics after several steps, then eval."""
    shape, fmt, _ = case
    C = shape[1]
    ref = _bn_class(torch.empty(shape))(C, momentum=0.3).double()
    with torch.no_grad():
        ref.weight.copy_(_vec(C, torch.float64, 11))
        ref.bias.copy_(_vec(C, torch.float64, 12))
    mod = _bnext_class(torch.empty(shape))(C, momentum=0.3)
    mod.load_state_dict(ref.state_dict())
    tol = _tol(dtype)
    with emulate_cuda():
        for step in range(3):
            x = _input(shape, dtype, fmt, seed=step)
            dy = _like(x, 100 + step)
            xr = x.double().requires_grad_()
            xb = x.clone().requires_grad_()
            yr = ref(xr)
            yb = mod(xb)
            assert yb.dtype == dtype and yb.stride() == x.stride()
            yr.backward(dy.double())
            yb.backward(dy)
            torch.testing.assert_close(yb.double(), yr, **tol)
            torch.testing.assert_close(xb.grad.double(), xr.grad, **tol)
            torch.testing.assert_close(mod.weight.grad.double(), ref.weight.grad, **tol)
            torch.testing.assert_close(mod.bias.grad.double(), ref.bias.grad, **tol)
            for m in (ref, mod):
                m.weight.grad = m.bias.grad = None
        torch.testing.assert_close(mod.running_mean.double(), ref.running_mean, **tol)
        torch.testing.assert_close(mod.running_var.double(), ref.running_var, **tol)
        assert int(mod.num_batches_tracked) == 3
        mod.eval()
        ref.eval()
        x = _input(shape, dtype, fmt, seed=9).requires_grad_()
        xr = x.detach().double().requires_grad_()
        dy = _like(x, 200)
        yb, yr = mod(x), ref(xr)
        yb.backward(dy)
        yr.backward(dy.double())
        torch.testing.assert_close(yb.double(), yr, **tol)
        torch.testing.assert_close(x.grad.double(), xr.grad, **tol)


@pytest.mark.parametrize("shape,fmt", [((3, 2, 2, 3), torch.contiguous_format), ((2, 3, 2, 2), torch.channels_last), ((4, 3), torch.contiguous_format)])
def test_gradcheck_emulated(shape, fmt):
    x = _input(shape, torch.float64, fmt).requires_grad_()
    C = shape[1]
    w = _vec(C, torch.float64, 3).requires_grad_()
    b = _vec(C, torch.float64, 4).requires_grad_()
    with emulate_cuda():
        for training in (True, False):
            rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)

            def f(x, w, b):
                return bnext.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, momentum=0.1, eps=1e-5)

            assert torch.autograd.gradcheck(f, (x, w, b))
            assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("op", OPS)
def test_opcheck_emulated(op):
    with emulate_cuda():
        for shape, fmt in [((2, 3, 4, 4), torch.contiguous_format), ((3, 4, 2, 2), torch.channels_last)]:
            x = _input(shape, torch.float32, fmt)
            args = list(_args(op, x, torch.float32))
            if op not in ("batch_norm_stats",):
                args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
            else:
                args[0] = args[0].requires_grad_()
            torch.library.opcheck(getattr(SIMT, op), tuple(args))


def test_empty_input_emulated():
    x = torch.empty(0, 3, 4, 4)
    out, mean, invstd, var = SIMT.batch_norm_forward(x, None, None, 1e-5)
    want = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    for g, w in zip((out, mean, invstd, var), want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)
    dx, sdy, sdx = SIMT.batch_norm_backward(x, x, None, mean, invstd)
    assert dx.shape == x.shape and sdy.eq(0).all() and sdx.eq(0).all()


@pytest.mark.parametrize("case", [((2, 3, 20, 20), torch.contiguous_format), ((4, 6, 5, 5), torch.channels_last), ((9, 2, 3, 4), torch.contiguous_format)], ids=str)
def test_deterministic_whatever_block_finishes_last(case):
    """Multi-block reductions: the block elected to merge changes with the block order, the merge
    order must not; results are bitwise identical."""
    shape, fmt = case
    x = _input(shape, torch.float32, fmt)
    dy = _like(x, 5)
    simt = simt_module()
    results = []
    try:
        for reverse in (False, True):
            simt.set_block_order(reverse)
            fwd = SIMT.batch_norm_forward(x, None, None, 1e-5)
            bwd = SIMT.batch_norm_backward(dy, x, None, fwd[1], fwd[2])
            results.append(fwd + bwd)
    finally:
        simt.set_block_order(False)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_argument_message_emulated():
    """The CUDA entries share the CPU entries' argument checks and messages."""
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor with 3 elements"):
        SIMT.batch_norm_forward(torch.randn(2, 3, 4), torch.ones(4), None, 1e-5)


def _global_kernels():
    names = set()
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu*")):
        names.update(re.findall(r"__global__\s+void\s+(\w+)\s*\(", path.read_text()))
    return names


def _params(signature):
    """Top-level parameter types of a demangled kernel pointer type 'void (*)(A, B<c, d>, ...)'."""
    inner = signature[signature.index("(*)(") + 4 : signature.rindex(")")]
    out, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch in "<(" 
        depth -= ch in ">)"
        cur += ch
    return out + [cur.strip()]


def test_every_cuda_kernel_launched_in_every_variant():
    """Parses every __global__ function of csrc/cuda and fails if the emulated matrix leaves one
    unlaunched, or leaves a variant (32/64-bit index, multi-block merge, channel loop beyond the
    grid limit) unexercised."""
    kernels = _global_kernels()
    assert len(kernels) >= 6, kernels
    simt = simt_module()
    simt.reset_launches()
    for shape, fmt, mis in CASES:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = _input(shape, dtype, fmt, misaligned=mis)
            for op in OPS:
                getattr(SIMT, op)(*_args(op, x, _acc(dtype)))
    log = simt.launches()
    launched = {r["name"] for r in log}
    assert kernels - launched == set(), f"never launched: {sorted(kernels - launched)}"
    assert launched <= kernels, f"launched kernels not found in csrc/cuda: {sorted(launched - kernels)}"
    # Position of the index_t parameter in each kernel's parameter list.
    index_param = {"reduce_nchw_kernel": 1, "reduce_channels_last_kernel": 1, "elementwise_vec_kernel": 4, "elementwise_scalar_kernel": 4}
    for name, pos in index_param.items():
        sigs = [_params(r["signature"]) for r in log if r["name"] == name]
        assert {p[pos] for p in sigs} == {"int", "long"}, f"{name}: index types {({p[pos] for p in sigs})}"
        # The input dtype: the reducer's first template argument, or the elementwise input type.
        scalars = {re.match(r"[\w:]+<([\w:]+)", p[0]).group(1) if pos == 1 else p[1].replace(" const*", "") for p in sigs}
        assert scalars == {"float", "double", "c10::Half", "c10::BFloat16"}, f"{name}: input types {scalars}"
    nchw = [r for r in log if r["name"] == "reduce_nchw_kernel"]
    cl = [r for r in log if r["name"] == "reduce_channels_last_kernel"]
    assert any(r["grid"][0] > 1 for r in nchw) and any(r["grid"][0] == 1 for r in nchw)
    assert any(r["grid"][1] > 1 for r in cl) and any(r["grid"][1] == 1 for r in cl)
    # Channel loops beyond the emulator's grid limit of 3 channel blocks.
    assert any(r["grid"][1] == 3 for r in nchw)
    assert any(r["grid"][0] == 3 for r in cl)
