"""bnext's CUDA kernels, run on the CPU through the SIMT emulator (bnext._simt, ops bnext_simt::*).

The shapes are chosen against the launch heuristics of csrc/cuda/batch_norm_kernels.cuh with the
emulator's limits (csrc/cuda/runtime.h: 2 SMs, channel grid limit 3, 32-bit indexing up to 2048
elements), so that together they launch every kernel in every variant: single- and multi-block
reductions, channel loops beyond the grid limit, 32- and 64-bit indexing, vectorized and scalar
elementwise kernels with vector tails, misaligned storage, channels_last, N=1, H*W=1.

The fused BN + activation (+ residual) ops are checked against float64 references written with
torch ops (F.batch_norm, the residual add, torch's activation; autograd for the backward), since
they reuse the same kernels with other per-element ops.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnext
from conftest import OPS, kernel_ops
from bnext._ops.conventions import ACTIVATIONS
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
        "batch_norm_act_forward": (x, w, b, _like(x, seed + 8), 1e-5, ACTIVATIONS["elu"], 0.7),
        "batch_norm_act_eval": (x, w, b, mean, _vec(C, acc, seed + 7, positive=True), _like(x, seed + 8), 1e-5, ACTIVATIONS["leaky_relu"], 0.1),
        "batch_norm_act_backward": (dy, x, _like(x, seed + 8), w, b, mean, invstd, ACTIVATIONS["silu"], 0.0, False),
    }[name]


ACT_OPS = ("batch_norm_act_forward", "batch_norm_act_eval", "batch_norm_act_backward")


def _act_variants(name, x, acc):
    """Argument tuples of a fused op that together run each of its kernel variants: residual given
    and absent, backward from the input and from the output (elu, invertible)."""
    args = _args(name, x, acc)
    if name == "batch_norm_act_forward":
        return [args, args[:3] + (None,) + args[4:]]
    if name == "batch_norm_act_eval":
        return [args, args[:5] + (None,) + args[6:]]
    if name == "batch_norm_act_backward":
        dy, x_, r = args[:3]
        rest = args[3:7]
        return [args, (dy, x_, None) + rest + (ACTIVATIONS["relu"], 0.0, False),
                (dy, x_, r) + rest + (ACTIVATIONS["elu"], 0.7, True), (dy, x_, None) + rest + (ACTIVATIONS["leaky_relu"], 0.1, True)]
    return [args]


def _cpu_reference(op):
    """The CPU kernel of `op` (bnext's own)."""
    return getattr(torch.ops.bnext, op)


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
    want = _cpu_reference(op)(*args)
    got = getattr(SIMT, op)(*args)
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
    cpu_op = _cpu_reference(op)
    for acc in {_acc(dtype), dtype}:
        args = _args(op, x, acc)
        got = getattr(SIMT, op)(*args)
        want = cpu_op(*args)
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
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bnext_simt::{op}", "Meta"):
        pytest.skip(f"no fake kernel registered for {op} (bnext/_ops/fake.py)")
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
                for args in _act_variants(op, x, _acc(dtype)):
                    getattr(SIMT, op)(*args)
    # Masked batch norm's mask-taking ops (MaskedReducer / MaskedOp; (N, C, L) input only): the
    # cases of tests/test_masked.py that cover both index types, both reductions (L = 1 is rows
    # of C) and both elementwise kernels (misaligned storage).
    for shape, mis in [((4, 5, 9), False), ((2, 3, 400), False), ((8, 3, 1), False), ((700, 3, 1), False),
                       ((2, 3, 35), True), ((2, 3, 400), True)]:
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            x = _input(shape, dtype, misaligned=mis)
            mask = torch.rand(shape[0], shape[2], generator=torch.Generator().manual_seed(3)) < 0.7
            mask.view(-1)[:2] = True
            w, b = _vec(shape[1], _acc(dtype), 1), _vec(shape[1], _acc(dtype), 2)
            _, mean, invstd, _ = SIMT._batch_norm_masked_forward(x, mask, w, b, 1e-5)
            SIMT._batch_norm_masked_backward(_like(x, 4), x, mask, w, mean, invstd)
    log = simt.launches()
    launched = {r["name"] for r in log}
    assert kernels - launched == set(), f"never launched: {sorted(kernels - launched)}"
    assert launched <= kernels, f"launched kernels not found in csrc/cuda: {sorted(launched - kernels)}"
    # Every kernel with every reducer / elementwise op it serves (the op's class templates, e.g.
    # GradReducer/ActGrad: the fused activation backward's reduction), each in both index types and
    # all four input dtypes. Position of the index_t parameter in each kernel's parameter list.
    reducers = {"StatsReducer", "GradReducer/InputGrad", "GradReducer/ActGrad",
                "MaskedReducer/StatsReducer", "MaskedReducer/GradReducer/InputGrad"}
    elementwise = {"NormalizeOp", "BackwardElemtOp", "ActNormalizeOp", "ActBackwardElemtOp",
                   "MaskedOp/NormalizeOp", "MaskedOp/BackwardElemtOp"}
    variants = {
        "reduce_nchw_kernel": (1, reducers),
        "reduce_channels_last_kernel": (1, reducers),
        "elementwise_vec_kernel": (2, elementwise),
        "elementwise_scalar_kernel": (2, elementwise),
    }
    for name, (pos, families) in variants.items():
        sigs = [_params(r["signature"]) for r in log if r["name"] == name]
        by_family = {}
        for p in sigs:
            by_family.setdefault("/".join(re.findall(r"(\w+)<", p[0].replace("bnext::cuda::", ""))), []).append(p)
        assert set(by_family) == families, f"{name}: ops {sorted(by_family)}"
        for family, fsigs in by_family.items():
            assert {p[pos] for p in fsigs} == {"int", "long"}, f"{name} {family}: index types {({p[pos] for p in fsigs})}"
            # The input dtype: the reducer's first template argument, or the elementwise tensors' type.
            scalars = {re.search(r"<(float|double|c10::Half|c10::BFloat16)\b", p[0] if pos == 1 else p[1]).group(1)
                       for p in fsigs}
            assert scalars == {"float", "double", "c10::Half", "c10::BFloat16"}, f"{name} {family}: input types {scalars}"
    nchw = [r for r in log if r["name"] == "reduce_nchw_kernel"]
    cl = [r for r in log if r["name"] == "reduce_channels_last_kernel"]
    assert any(r["grid"][0] > 1 for r in nchw) and any(r["grid"][0] == 1 for r in nchw)
    assert any(r["grid"][1] > 1 for r in cl) and any(r["grid"][1] == 1 for r in cl)
    # Channel loops beyond the emulator's grid limit of 3 channel blocks.
    assert any(r["grid"][1] == 3 for r in nchw)
    assert any(r["grid"][0] == 3 for r in cl)


# ---------------------------------------------------------------------------------------------
# Fused BN + activation (+ residual): batch_norm_act_forward / _eval / _backward against float64
# references written with torch ops.

# (name, activation_param): every activation; the parametrized ones with a parameter that matters.
ACTS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.1), ("elu", 0.7), ("silu", 0.0), ("hardswish", 0.0)]
TORCH_ACT = {
    "identity": lambda z, p: z,
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, p),
    "elu": lambda z, p: F.elu(z, p),
    "silu": lambda z, p: F.silu(z),
    "hardswish": lambda z, p: F.hardswish(z),
}

# (shape, memory format of the input, memory format of the residual): 1d, 2d, 3d, both layouts,
# vector tails, channel loops beyond the grid limit, a residual in another layout than the input.
ACT_CASES = [
    ((5, 130), torch.contiguous_format, torch.contiguous_format),
    ((3, 4, 7), torch.contiguous_format, torch.contiguous_format),
    ((2, 7, 3, 5), torch.contiguous_format, torch.contiguous_format),
    ((4, 6, 5, 5), torch.channels_last, torch.channels_last),
    ((3, 5, 4, 3), torch.channels_last, torch.contiguous_format),
    ((2, 3, 2, 3, 4), torch.contiguous_format, torch.contiguous_format),
    ((2, 5, 2, 3, 3), torch.channels_last_3d, torch.channels_last_3d),
]


def _act_case_id(case):
    shape, fmt, rfmt = case
    tag = {torch.channels_last: "-cl", torch.channels_last_3d: "-cl3d"}.get(fmt, "")
    return "x".join(map(str, shape)) + tag + ("-residual_nchw" if rfmt != fmt else "")


def _weight(C, acc):
    """Per-channel weight with a zero and negative entries."""
    w = _vec(C, torch.float64, 21)
    w[0] = 0.0
    w[1::3] = -w[1::3].abs()
    return w.to(acc)


def _red_dims(x):
    return [0] + list(range(2, x.dim()))


def _bc(v, x):
    return v.view([1, -1] + [1] * (x.dim() - 2))


def _ref_forward(x, w, b, r, eps, act, p):
    """float64: y, mean, invstd, biased var, and the z = BN(x) + r it activated."""
    xd = x.double()
    red = _red_dims(x)
    mean, var = xd.mean(red), xd.var(red, unbiased=False)
    z = F.batch_norm(xd, None, None, w.double(), b.double(), training=True, eps=eps)
    if r is not None:
        z = z + r.double()
    return TORCH_ACT[act](z, p), mean, (var + eps).rsqrt(), var


def _ref_backward(dy, x, r, w, b, eps, act, p):
    """float64 autograd through F.batch_norm (batch statistics) + r + activation."""
    xd = x.detach().double().clone().requires_grad_()
    rd = r.detach().double().clone().requires_grad_() if r is not None else None
    z = F.batch_norm(xd, None, None, w.double(), b.double(), training=True, eps=eps)
    z.retain_grad()
    zr = z + rd if rd is not None else z
    zr.retain_grad()
    TORCH_ACT[act](zr, p).backward(dy.double())
    dz = zr.grad
    red = _red_dims(x)
    xmu = xd.detach() - _bc(xd.detach().mean(red), x)
    return xd.grad, (rd.grad if rd is not None else None), dz.sum(red), (dz * xmu).sum(red)


def _check(got, want, dtype, what, scale=1.0):
    tol = {k: v * scale for k, v in _tol(dtype).items()}
    torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", ACT_CASES, ids=_act_case_id)
@pytest.mark.parametrize("act,param", ACTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_act_ops_match_float64_reference(case, act, param, with_residual):
    """Forward, eval and backward (from the input) of every activation, with and without a residual,
    float32, against float64 torch; outputs keep the input's memory format."""
    shape, fmt, rfmt = case
    dtype, acc, eps = torch.float32, torch.float32, 1e-5
    x = _input(shape, dtype, fmt)
    C = shape[1]
    w, b = _weight(C, acc), _vec(C, acc, 22)
    r = _input(shape, dtype, rfmt, seed=3) if with_residual else None
    code = ACTIVATIONS[act]
    y, mean, invstd, var = SIMT.batch_norm_act_forward(x, w, b, r, eps, code, param)
    y_ref, mean_ref, invstd_ref, var_ref = _ref_forward(x, w, b, r, eps, act, param)
    assert y.dtype == dtype and y.stride() == x.stride() and mean.dtype == acc
    for got, want, what in [(y, y_ref, "output"), (mean, mean_ref, "mean"), (invstd, invstd_ref, "invstd"), (var, var_ref, "var")]:
        _check(got, want, dtype, f"forward {what}")
    # Statistics are batch_norm_forward's, bit for bit.
    plain = SIMT.batch_norm_forward(x, w, b, eps)
    for got, want in zip((mean, invstd, var), plain[1:]):
        assert torch.equal(got, want)
    if act == "identity" and not with_residual:
        assert torch.equal(y, plain[0])

    rm, rv = _vec(C, acc, 23), _vec(C, acc, 24, positive=True)
    ye = SIMT.batch_norm_act_eval(x, w, b, rm, rv, r, eps, code, param)
    ze = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training=False, eps=eps)
    assert ye.stride() == x.stride()
    _check(ye, TORCH_ACT[act](ze + (r.double() if r is not None else 0), param), dtype, "eval output")
    if act == "identity" and not with_residual:
        assert torch.equal(ye, SIMT.batch_norm_eval(x, w, b, rm, rv, eps))

    dy = _like(x, 4)
    dx, dr, sum_dz, sum_dz_xmu = SIMT.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, code, param, False)
    dx_ref, dr_ref, sdz_ref, sdzx_ref = _ref_backward(dy, x, r, w, b, eps, act, param)
    assert dx.stride() == x.stride()
    _check(dx, dx_ref, dtype, "grad_input", 10)
    _check(sum_dz, sdz_ref, dtype, "sum_dz", 10)
    _check(sum_dz_xmu, sdzx_ref, dtype, "sum_dz_xmu", 10)
    if with_residual:
        assert dr.dtype == dtype and dr.stride() == x.stride()
        _check(dr, dr_ref, dtype, "grad_residual")
    else:
        assert dr.shape == (0,) and dr.dtype == dtype
    if act == "identity" and not with_residual:
        # dz = dy: the plain backward's reduction and dx, bit for bit.
        plain_bwd = SIMT.batch_norm_backward(dy, x, w, mean, invstd)
        for got, want in zip((dx, sum_dz, sum_dz_xmu), plain_bwd):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "case,misaligned",
    [(((2, 3, 5, 7), torch.contiguous_format, torch.contiguous_format), True),
     (((4, 6, 5, 5), torch.channels_last, torch.channels_last), False),
     (((5, 130), torch.contiguous_format, torch.contiguous_format), False)],
    ids=["2x3x5x7-misaligned", "4x6x5x5-cl", "5x130"],
)
def test_act_ops_dtypes(dtype, case, misaligned):
    """Half and bfloat16 (float32 accumulation, float32 or own-dtype parameters), double; a
    misaligned input and residual (scalar kernels)."""
    shape, fmt, _ = case
    eps = 1e-5
    x = _input(shape, dtype, fmt, misaligned=misaligned)
    r = _input(shape, dtype, fmt, seed=3, misaligned=misaligned)
    C = shape[1]
    for acc in {_acc(dtype), dtype}:
        w, b = _weight(C, acc), _vec(C, acc, 22)
        for act, param in [("silu", 0.0), ("elu", 0.7)]:
            code = ACTIVATIONS[act]
            y, mean, invstd, _ = SIMT.batch_norm_act_forward(x, w, b, r, eps, code, param)
            assert y.dtype == dtype and mean.dtype == _acc(dtype)
            _check(y, _ref_forward(x, w, b, r, eps, act, param)[0], dtype, f"forward {act} params {acc}")
            rm, rv = _vec(C, acc, 23), _vec(C, acc, 24, positive=True)
            ze = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training=False, eps=eps)
            _check(SIMT.batch_norm_act_eval(x, w, b, rm, rv, r, eps, code, param), TORCH_ACT[act](ze + r.double(), param), dtype, "eval")
            dy = _like(x, 4)
            dx, dr, sdz, sdzx = SIMT.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, code, param, False)
            dx_ref, dr_ref, sdz_ref, sdzx_ref = _ref_backward(dy, x, r, w, b, eps, act, param)
            _check(dx, dx_ref, dtype, "grad_input", 2)
            _check(dr, dr_ref, dtype, "grad_residual")
            _check(sdz, sdz_ref, dtype, "sum_dz", 2)
            _check(sdzx, sdzx_ref, dtype, "sum_dz_xmu", 2)


@pytest.mark.parametrize("case", [ACT_CASES[0], ACT_CASES[3], ACT_CASES[4], ACT_CASES[6]], ids=_act_case_id)
@pytest.mark.parametrize("act,param", [("identity", 0.0), ("leaky_relu", 0.1), ("elu", 0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_act_backward_from_output(case, act, param, dtype):
    """The memory-saving mode: the backward from the forward's output gives the backward from the
    input, except in channels whose weight is 0 (don't-care values there, finite)."""
    shape, fmt, rfmt = case
    eps = 1e-5
    x = _input(shape, dtype, fmt)
    r = _input(shape, dtype, rfmt, seed=3)
    C = shape[1]
    w, b = _weight(C, dtype), _vec(C, dtype, 22)
    code = ACTIVATIONS[act]
    dy = _like(x, 4)
    for res in (None, r):
        y, mean, invstd, _ = SIMT.batch_norm_act_forward(x, w, b, res, eps, code, param)
        got = SIMT.batch_norm_act_backward(dy, y, res, w, b, mean, invstd, code, param, True)
        dx_ref, dr_ref, sdz_ref, sdzx_ref = _ref_backward(dy, x, res, w, b, eps, act, param)
        live = w != 0
        for t in got:
            assert torch.isfinite(t).all()
        scale = 100 if dtype == torch.float32 else 1e3  # x - mean recovered through the activation's inverse
        _check(got[0].movedim(1, -1)[..., live], dx_ref.movedim(1, -1)[..., live], dtype, "grad_input", scale)
        _check(got[2][live], sdz_ref[live], dtype, "sum_dz", scale)
        _check(got[3][live], sdzx_ref[live], dtype, "sum_dz_xmu", scale)
        if res is not None:
            _check(got[1], dr_ref, dtype, "grad_residual", scale)


def test_act_from_output_half():
    """float16 memory-saving backward, weights away from 0."""
    x = _input((4, 6, 5, 5), torch.float16, torch.channels_last)
    w, b = _vec(6, torch.float32, 5, positive=True), _vec(6, torch.float32, 6)
    dy = _like(x, 4)
    y, mean, invstd, _ = SIMT.batch_norm_act_forward(x, w, b, None, 1e-5, ACTIVATIONS["leaky_relu"], 0.2)
    dx, _, sdz, sdzx = SIMT.batch_norm_act_backward(dy, y, None, w, b, mean, invstd, ACTIVATIONS["leaky_relu"], 0.2, True)
    dx_ref, _, sdz_ref, sdzx_ref = _ref_backward(dy, x, None, w, b, 1e-5, "leaky_relu", 0.2)
    _check(dx, dx_ref, torch.float16, "grad_input", 3)
    _check(sdz, sdz_ref, torch.float16, "sum_dz", 3)
    _check(sdzx, sdzx_ref, torch.float16, "sum_dz_xmu", 3)


def test_act_empty_batch():
    x = torch.empty(0, 3, 4, 4)
    for r in (None, torch.empty(0, 3, 4, 4)):
        y, mean, invstd, var = SIMT.batch_norm_act_forward(x, None, None, r, 1e-5, ACTIVATIONS["relu"], 0.0)
        want = SIMT.batch_norm_forward(x, None, None, 1e-5)
        for g, wnt in zip((y, mean, invstd, var), want):
            assert g.shape == wnt.shape
            torch.testing.assert_close(g, wnt)
        assert SIMT.batch_norm_act_eval(x, None, None, torch.zeros(3), torch.ones(3), r, 1e-5, 1, 0.0).shape == x.shape
        dx, dr, sdz, sdzx = SIMT.batch_norm_act_backward(x, x, r, None, None, mean, invstd, 1, 0.0, False)
        assert dx.shape == x.shape and sdz.eq(0).all() and sdzx.eq(0).all()
        assert dr.shape == (x.shape if r is not None else (0,))


@pytest.mark.parametrize("case", [((2, 3, 20, 20), torch.contiguous_format), ((4, 6, 5, 5), torch.channels_last), ((9, 2, 3, 4), torch.contiguous_format)], ids=str)
def test_act_deterministic_whatever_block_finishes_last(case):
    shape, fmt = case
    x = _input(shape, torch.float32, fmt)
    r, dy = _like(x, 6), _like(x, 5)
    w, b = _weight(shape[1], torch.float32), _vec(shape[1], torch.float32, 2)
    simt = simt_module()
    results = []
    try:
        for reverse in (False, True):
            simt.set_block_order(reverse)
            fwd = SIMT.batch_norm_act_forward(x, w, b, r, 1e-5, ACTIVATIONS["silu"], 0.0)
            bwd = SIMT.batch_norm_act_backward(dy, x, r, w, b, fwd[1], fwd[2], ACTIVATIONS["silu"], 0.0, False)
            bwo = SIMT.batch_norm_act_backward(dy, fwd[0], r, w, b, fwd[1], fwd[2], ACTIVATIONS["elu"], 0.5, True)
            results.append(fwd + bwd + bwo)
    finally:
        simt.set_block_order(False)
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_act_bad_arguments():
    """Torch's exception types; messages name the argument, what was expected and what came."""
    x = torch.randn(2, 3, 4)
    w, mean, invstd = torch.ones(3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="activation must be an activation code from 0 to 5.*got 6"):
        SIMT.batch_norm_act_forward(x, None, None, None, 1e-5, 6, 0.0)
    with pytest.raises(ValueError, match="activation must be an activation code.*got -1"):
        SIMT.batch_norm_act_eval(x, None, None, mean, invstd, None, 1e-5, -1, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        SIMT.batch_norm_act_forward(x, None, None, torch.randn(2, 3, 5), 1e-5, 1, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        SIMT.batch_norm_act_eval(x, None, None, mean, invstd, x.double(), 1e-5, 1, 0.0)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor with 3 elements"):
        SIMT.batch_norm_act_forward(x, torch.ones(4), None, None, 1e-5, 1, 0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        SIMT.batch_norm_act_forward(x, None, None, None, -1.0, 1, 0.0)
    with pytest.raises(NotImplementedError, match="saved must be a floating-point tensor"):
        SIMT.batch_norm_act_backward(x.int(), x.int(), None, None, None, mean, invstd, 1, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_out must have the input's shape"):
        SIMT.batch_norm_act_backward(x[:1], x, None, None, None, mean, invstd, 1, 0.0, False)
    for code, param in [(1, 0.0), (4, 0.0), (5, 0.0), (2, 0.0), (2, -0.1), (3, 0.0)]:
        with pytest.raises(ValueError, match=f"from_output=True needs an invertible activation.*got activation {code} with activation_param"):
            SIMT.batch_norm_act_backward(x, x, None, w, None, mean, invstd, code, param, True)
