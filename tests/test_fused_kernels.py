"""The CPU kernels of the fused BN + activation (+ residual) ops against float64 references.

batch_norm_act_forward / _eval / _backward (csrc/common/schemas.h, csrc/common/act.h) are compared
with torch ops in float64: torch.nn.functional.batch_norm, + residual, torch's activation, and
torch.autograd for the backward. Every activation (with the parameters the layers use), with and
without a residual, in float16, bfloat16, float32 and float64, NCHW and channels_last (2d, 3d) and
(N, C), (N, C, L) inputs, for every CPU kernel variant this CPU runs (BNEXT_CPU_ISA), with
streaming stores forced on and off. Then the memory-saving backward (from_output=True), the
accuracy of the vector exp/expm1 against float64, determinism across thread counts, empty inputs
and bad arguments.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ISAS  # noqa: F401  (the `isa` fixture of conftest.py switches variants)
from test_cpu_kernels import acc, bcast, stream  # noqa: F401  (stream: a fixture, streaming stores on and off)
from test_cpu_kernels import dims as red_dims

IDENTITY, RELU, LEAKY, ELU, SILU, HARDSWISH = range(6)
# (code, param, name)
ACTS = [
    (IDENTITY, 0.0, "identity"),
    (RELU, 0.0, "relu"),
    (LEAKY, 0.01, "leaky0.01"),
    (LEAKY, 0.2, "leaky0.2"),
    (ELU, 1.0, "elu1.0"),
    (ELU, 0.5, "elu0.5"),
    (SILU, 0.0, "silu"),
    (HARDSWISH, 0.0, "hardswish"),
]
INVERTIBLE = [a for a in ACTS if a[0] == IDENTITY or (a[0] in (LEAKY, ELU) and a[1] > 0)]

# (shape, memory format)
CASES = [
    ((4, 3, 7, 7), "contiguous"),
    ((2, 5, 14, 14), "contiguous"),
    ((2, 128, 7, 7), "contiguous"),  # channel groups of 16 7x7 planes: passes by lanes
    ((3, 32, 14, 14), "contiguous"),  # groups of 4 14x14 planes: the forward pass by lanes
    ((3, 1, 5, 9), "contiguous"),  # C = 1, odd plane
    ((1, 17, 9, 11), "contiguous"),  # N = 1
    ((2, 3, 70, 71), "contiguous"),  # a run longer than a statistics block
    ((3, 17, 6, 5), "channels_last"),
    ((4, 32, 5, 7), "channels_last"),  # whole 64-byte super-rows: streamed where forced
    ((9, 130, 3, 3), "channels_last"),  # C wider than a super-row
    ((3, 72, 5, 7), "channels_last"),  # C = 72: rows paired into super-rows, a lone last row
    ((2, 3, 4, 5, 6), "channels_last"),  # channels_last_3d
    ((2, 3, 4, 5, 6), "contiguous"),
    ((37, 17), "contiguous"),  # (N, C)
    ((3, 5, 33), "contiguous"),  # (N, C, L)
    ((4, 6, 10, 12), "strided"),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["f64", "f32", "f16", "bf16"]
# Tolerances relative to the scale of each result (1 + max |reference|), as tests/test_cpu_kernels.py.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}
SUM_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
EPS = 1e-5


def act64(code, param, z):
    return {
        IDENTITY: lambda: z,
        RELU: lambda: F.relu(z),
        LEAKY: lambda: F.leaky_relu(z, param),
        ELU: lambda: F.elu(z, param),
        SILU: lambda: F.silu(z),
        HARDSWISH: lambda: F.hardswish(z),
    }[code]()


def fmt_of(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def make(shape, fmt, dtype, gen, scale=2.0, offset=0.3):
    if fmt == "strided":
        x = (torch.randn(shape[:-1] + (2 * shape[-1],), generator=gen, dtype=torch.float64) * scale + offset)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    x = x.to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=fmt_of(x))
    return x


def close(actual, expected, tol, what, channels=None):
    actual, expected = actual.double(), expected.double()
    if channels is not None:
        actual, expected = actual[:, channels], expected[:, channels]
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def params(C, dtype, gen):
    # Weights with a zero and negative values, biases around 0 (so that z crosses every kink).
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5) * torch.where(
        torch.rand(C, generator=gen) < 0.3, -1.0, 1.0).double()
    if C > 2:
        w[1] = 0.0
    b = torch.randn(C, generator=gen, dtype=torch.float64) * 0.5
    return w.to(acc(dtype)), b.to(acc(dtype))


def without_kinks(dy, x, w, b, r, code):
    """dy with zeros where z lies within 1e-3 of a kink of the activation (where act' jumps): z
    is recomputed there by the kernels in the accumulation type, a rounding away from the
    reference's, and could fall on the other side."""
    kinks = {RELU: [0.0], LEAKY: [0.0], ELU: [0.0], HARDSWISH: [-3.0, 3.0]}.get(code, [])
    if not kinks:
        return dy
    z = F.batch_norm(x.double(), None, None, w.double(), b.double(), training=True, eps=EPS)
    z = z + r.double() if r is not None else z
    near = torch.zeros_like(z, dtype=torch.bool)
    for k in kinks:
        near |= (z - k).abs() < 1e-3
    return dy.masked_fill(near, 0)


def reference(x, w, b, r, dy, code, param):
    """Forward and backward of act(BN(x) + r) in float64: y, dx, dz, sum_dz, sum_dz_xmu."""
    xd = x.double().clone().requires_grad_()  # (a copy: float64 x.double() is x itself)
    rd = r.double().clone().requires_grad_() if r is not None else None
    z = F.batch_norm(xd, None, None, w.double(), b.double(), training=True, eps=EPS)
    if rd is not None:
        z = z + rd
    z.retain_grad()
    y = act64(code, param, z)
    y.backward(dy.double())
    mean = xd.detach().mean(red_dims(x))
    dz = z.grad
    sum_dz = dz.sum(red_dims(x))
    sum_dz_xmu = (dz * (xd.detach() - bcast(mean, x))).sum(red_dims(x))
    return y.detach(), xd.grad, dz, sum_dz, sum_dz_xmu


def reference_from_output(y, r, dy, w, b, mean, invstd, code, param):
    """The memory-saving backward's formulas in float64: dx, dz, sum_dz, sum_dz_xmu."""
    yd, dyd = y.double(), dy.double()
    if code == LEAKY:
        z, d = torch.where(yd > 0, yd, yd / param), torch.where(yd > 0, 1.0, torch.full_like(yd, param))
    elif code == ELU:
        z, d = torch.where(yd > 0, yd, torch.log1p(yd / param)), torch.where(yd > 0, torch.ones_like(yd), yd + param)
    else:
        z, d = yd, torch.ones_like(yd)
    ws = (w.double() * invstd.double())
    zr = z - bcast(b.double(), y) - (r.double() if r is not None else 0.0)
    xmu = zr / bcast(torch.where(ws != 0, ws, 1.0), y)
    dz = dyd * d
    M = max(1, y.numel() // y.shape[1])
    sum_dz, sum_dz_xmu = dz.sum(red_dims(y)), (dz * xmu).sum(red_dims(y))
    k = invstd.double() ** 2 * sum_dz_xmu / M
    dx = bcast(ws, y) * ((dz - bcast(sum_dz / M, y)) - xmu * bcast(k, y))
    return dx, dz, sum_dz, sum_dz_xmu


def check_sums(got, ref, dz, x, mean, tol, what):
    # The sums' scale: sum |dz| (times max |x - mean| for sum_dz_xmu).
    s = 1.0 + dz.abs().sum(red_dims(x)).max().item() if dz.numel() else 1.0
    xmu = (x.double() - bcast(mean.double(), x)).abs().max().item() if x.numel() else 0.0
    for g, r_, name, sc in ((got[0], ref[0], "sum_dz", s), (got[1], ref[1], "sum_dz_xmu", s * (1 + xmu))):
        err = (g.double() - r_).abs().max().item() if r_.numel() else 0.0
        assert err <= tol * sc, f"{what} {name}: max error {err:.3g} > {tol:.1g} * {sc:.3g}"


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("code,param,name", ACTS, ids=[a[2] for a in ACTS])
def test_ops_match_float64(isa, stream, code, param, name, dtype, residual):
    ops = torch.ops.bnext
    gen = torch.Generator().manual_seed(1000 * code + int(100 * param) + 7 * DTYPES.index(dtype) + residual)
    for shape, fmt in CASES:
        what = f"{name} {tuple(shape)} {fmt}"
        x = make(shape, fmt, dtype, gen)
        # The residual in the other memory format than the input where it has one: the op converts it.
        r = make(shape, "contiguous" if fmt != "contiguous" or len(shape) < 4 else "channels_last", dtype, gen)
        r = r if residual else None
        dy = make(shape, fmt, dtype, gen, scale=1.0, offset=0.1)
        C = shape[1]
        w, b = params(C, dtype, gen)
        dy = without_kinks(dy, x, w, b, r, code)
        y_r, dx_r, dz_r, sdz_r, sdzx_r = reference(x, w, b, r, dy, code, param)

        y, mean, invstd, var = ops.batch_norm_act_forward(x, w, b, r, EPS, code, param)
        assert y.dtype == dtype and y.shape == x.shape and mean.dtype == acc(dtype)
        if fmt == "channels_last":
            assert y.is_contiguous(memory_format=fmt_of(x)), what
        # The statistics of batch_norm_forward, bit for bit.
        y0, mean0, invstd0, var0 = ops.batch_norm_forward(x, w, b, EPS)
        assert torch.equal(mean, mean0) and torch.equal(invstd, invstd0) and torch.equal(var, var0), what
        close(y, y_r, OUT_TOL[dtype], f"forward output {what}")
        if code == IDENTITY and r is None and isa in ("baseline", "avx2"):
            # The same values as batch_norm_forward's pass (AVX-512's masked tails compute the
            # last values of a run as vector lanes there, as scalars here: other roundings).
            assert torch.equal(y, y0), what

        # Eval: torch's folded coefficients, + r, act.
        rm, rv = mean - 0.25, var * 1.5 + 0.1
        ye = ops.batch_norm_act_eval(x, w, b, rm, rv, r, EPS, code, param)
        s_r = w.double() / torch.sqrt(rv.double() + EPS)
        ze = (x.double() - bcast(rm.double(), x)) * bcast(s_r, x) + bcast(b.double(), x)
        ze = ze + r.double() if r is not None else ze
        close(ye, act64(code, param, ze), OUT_TOL[dtype], f"eval output {what}")
        if code == IDENTITY and r is None and isa in ("baseline", "avx2"):
            assert torch.equal(ye, ops.batch_norm_eval(x, w, b, rm, rv, EPS)), what

        dx, dr, sdz, sdzx = ops.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, code, param, False)
        assert dx.dtype == dtype and dx.shape == x.shape and sdz.dtype == acc(dtype)
        if fmt == "channels_last":
            assert dx.is_contiguous(memory_format=fmt_of(x)), what
        close(dx, dx_r, GRAD_TOL[dtype], f"grad_input {what}")
        check_sums((sdz, sdzx), (sdz_r, sdzx_r), dz_r, x, mean, SUM_TOL[dtype] * 5, what)
        if r is None:
            assert dr.numel() == 0 and dr.dtype == dtype
        else:
            assert dr.dtype == dtype and dr.shape == x.shape
            close(dr, dz_r, OUT_TOL[dtype], f"grad_residual {what}")

        if (code, param, name) in INVERTIBLE:
            # Memory-saving mode, from the output y, against the same formulas in float64 from
            # the same (rounded) y: recovering x - mean from a rounded y is ill-conditioned where
            # the activation is flat (elu far below 0) whatever the arithmetic. Channels with
            # weight 0 are don't-care (the caller recomputes them).
            # elu: a 16-bit y that rounded to -alpha (z far below 0) has no finite inverse.
            flat = y.double().transpose(0, 1).reshape(C, -1)
            keep = [c for c in range(C) if w[c] != 0 and (code != ELU or bool((flat[c] / param > -1).all()))]
            dxo, dro, sdzo, sdzxo = ops.batch_norm_act_backward(dy, y, r, w, b, mean, invstd, code, param, True)
            dx_o, dz_o, sdz_o, sdzx_o = reference_from_output(y, r, dy, w, b, mean, invstd, code, param)
            close(dxo, dx_o, GRAD_TOL[dtype], f"from_output grad_input {what}", keep)
            if r is not None:
                close(dro, dz_o, OUT_TOL[dtype], f"from_output grad_residual {what}", keep)
            check_sums((sdzo[keep], sdzxo[keep]), (sdz_o[keep], sdzx_o[keep]), dz_o[:, keep], x[:, keep],
                       mean[keep], SUM_TOL[dtype] * 5, f"from_output {what}")
            if dtype in (torch.float32, torch.float64) and code != ELU:
                close(dxo, dx_r, GRAD_TOL[dtype], f"from_output grad_input vs autograd {what}", keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["f32", "bf16", "f64"])
@pytest.mark.parametrize("shape,fmt", [
    ((3, 5, 8, 8), "contiguous"),  # planes on 64-byte lines: streamed
    ((2, 3, 4, 12), "contiguous"),
    ((4, 32, 5, 7), "channels_last"),
    ((3, 256, 2, 3), "channels_last"),
    ((3, 5, 7, 7), "contiguous"),  # not on lines: never streamed
    ((2, 128, 7, 7), "contiguous"),  # groups of 16 planes are whole lines: streamed by lanes
], ids=str)
def test_streaming_stores_change_no_bit(isa, monkeypatch, shape, fmt, dtype):
    ops = torch.ops.bnext
    gen = torch.Generator().manual_seed(3)
    x, r, dy = (make(shape, fmt, dtype, gen) for _ in range(3))
    w, b = params(shape[1], dtype, gen)

    def run():
        y, mean, invstd, _ = ops.batch_norm_act_forward(x, w, b, r, EPS, SILU, 0.0)
        ye = ops.batch_norm_act_eval(x, w, b, mean, invstd, r, EPS, ELU, 0.5)
        bwd = ops.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, SILU, 0.0, False)
        bwd2 = ops.batch_norm_act_backward(dy, y, None, w, b, mean, invstd, IDENTITY, 0.0, True)
        return (y, ye) + bwd + bwd2

    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", str(1 << 62))
    never = run()
    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", "0")
    always = run()
    for a, b_ in zip(never, always):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("shape,fmt", [
    ((4, 256, 16, 16), "channels_last"),  # rows four at a time (at most 4 MiB), wide rows
    ((3, 130, 7, 9), "channels_last"),  # four at a time with lanes past the last vector, 189 rows
    ((3, 17, 6, 5), "channels_last"),  # super-rows of k rows and a tail row
    ((8, 64, 48, 48), "channels_last"),  # 4.5 MiB: a row at a time
    ((4, 1024, 17, 17), "channels_last"),  # 4.5 MiB, rows whose lane arrays exceed 16 KiB: four at a time
    ((8, 16, 40, 40), "contiguous"),
], ids=str)
def test_sum_dz_exact_for_constant_dy(isa, shape, fmt):
    """dy constant per channel through ReLU: dz is dy or 0, and sum(dz) must be exactly k * dy
    (k: the channel's positive z), as the plain backward's sum(dy) is exact. The kernels add dz
    in pairs in float (0, dy or 2 dy: exact) before the double sums; a sum of three dy in float is
    not exact for most dy."""
    gen = torch.Generator().manual_seed(7)
    C = shape[1]
    # x = +-1 (mean strictly inside (-1, 1)), weight 1, bias 0: z > 0 exactly where x > 0.
    x = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    dy_c = 0.1 + torch.rand(C, generator=gen)  # full float mantissas: 3 * dy rounds in float
    dy = dy_c.view(1, C, *([1] * (len(shape) - 2))).expand(shape).contiguous()
    if fmt == "channels_last":
        x, dy = x.contiguous(memory_format=fmt_of(x)), dy.contiguous(memory_format=fmt_of(x))
    w, b = torch.ones(C), torch.zeros(C)
    bn = torch.ops.bnext
    _, mean, invstd, _ = bn.batch_norm_act_forward(x, w, b, None, EPS, RELU, 0.0)
    assert mean.abs().max() < 1
    _, _, sum_dz, _ = bn.batch_norm_act_backward(dy, x, None, w, b, mean, invstd, RELU, 0.0, False)
    positives = (x > 0).transpose(0, 1).reshape(C, -1).sum(1).double()
    expected = (positives * dy_c.double()).float()  # k * dy in double, rounded once
    assert torch.equal(sum_dz, expected), (sum_dz - expected).abs().max()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,fmt", [
    ((8, 16, 40, 40), "contiguous"),  # several statistics blocks per channel
    ((4, 64, 7, 7), "contiguous"),  # one thread: groups of 16 planes by lanes; two: of 8, plane by plane
    ((2, 128, 7, 7), "contiguous"),
    ((8, 32, 30, 30), "channels_last"),  # several chunks of rows
    ((4, 1024, 17, 17), "channels_last"),  # over 4 MiB, wide rows: the fused sums four rows at a time
    ((700, 24), "contiguous"),
], ids=str)
def test_deterministic_across_thread_counts(isa, restore_threads, shape, fmt, dtype):
    ops = torch.ops.bnext
    gen = torch.Generator().manual_seed(5)
    x, r, dy = (make(shape, fmt, dtype, gen) for _ in range(3))
    w, b = params(shape[1], dtype, gen)

    def run():
        y, mean, invstd, var = ops.batch_norm_act_forward(x, w, b, r, EPS, SILU, 0.0)
        out = [y, mean, invstd, var]
        out += ops.batch_norm_act_backward(dy, x, r, w, b, mean, invstd, SILU, 0.0, False)
        out += ops.batch_norm_act_backward(dy, x, None, w, b, mean, invstd, RELU, 0.0, False)
        out += ops.batch_norm_act_backward(dy, y, r, w, b, mean, invstd, LEAKY, 0.1, True)
        return out

    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(2)
    two = run()
    for a, b_ in zip(one, two):
        assert torch.equal(a, b_)


def ulps(got, ref, dtype):
    """|got - ref| in units of the last place of ref rounded to dtype."""
    ref_t = ref.to(dtype)
    spacing = (torch.nextafter(ref_t.abs(), torch.tensor(math.inf, dtype=dtype)) - ref_t.abs()).double()
    return ((got.double() - ref) / spacing).abs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_vector_exp_is_accurate(isa, dtype):
    # z = x exactly (eval with mean 0, variance 1, eps 0, no weight or bias), so elu (expm1) and
    # silu (exp) are those of the vector exp against float64 / exact references; most values go
    # through the vectors, the last few through act.h's std::exp.
    ops = torch.ops.bnext
    z = torch.linspace(-80, 80, 40001, dtype=torch.float64)
    z = torch.cat([z, torch.linspace(-1e-3, 1e-3, 4001, dtype=torch.float64)]).to(dtype)
    x = z.reshape(1, 1, -1)
    zeros, ones = torch.zeros(1, dtype=acc(dtype)), torch.ones(1, dtype=acc(dtype))
    zl = z.double() if dtype == torch.float32 else z.to(torch.float64)
    # Exact references: float64 for float32; for float64, mpmath-free check at relative 1e-15.
    elu = ops.batch_norm_act_eval(x, None, None, zeros, ones, None, 0.0, ELU, 1.0).reshape(-1)
    silu = ops.batch_norm_act_eval(x, None, None, zeros, ones, None, 0.0, SILU, 0.0).reshape(-1)
    if dtype == torch.float32:
        assert ulps(elu, torch.expm1(zl).where(zl <= 0, zl), dtype).max() <= 3
        assert ulps(silu, zl / (1 + torch.exp(-zl)), dtype).max() <= 5
    else:
        # torch's own float64 expm1/exp as the reference (correctly rounded to ~1 ulp).
        assert ulps(elu, torch.expm1(zl).where(zl <= 0, zl), dtype).max() <= 4
        assert ulps(silu, F.silu(zl), dtype).max() <= 8
    # NaN in, NaN out, for every activation.
    xn = torch.full((1, 1, 37), float("nan"), dtype=dtype)
    for code, param, _ in ACTS:
        assert ops.batch_norm_act_eval(xn, None, None, zeros, ones, None, 0.0, code, param).isnan().all()


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_empty_inputs(isa, fmt):
    ops = torch.ops.bnext
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
        x = make(shape, fmt, torch.float32, torch.Generator().manual_seed(0))
        w, b = torch.ones(3), torch.zeros(3)
        y, mean, invstd, var = ops.batch_norm_act_forward(x, w, b, x, EPS, RELU, 0.0)
        assert y.shape == x.shape and mean.shape == (3,)
        dx, dr, sdz, sdzx = ops.batch_norm_act_backward(x, x, x, w, b, mean, invstd, SILU, 0.0, False)
        assert dx.shape == x.shape and dr.shape == x.shape
        assert torch.equal(sdz, torch.zeros(3)) and torch.equal(sdzx, torch.zeros(3))
        assert ops.batch_norm_act_eval(x, w, b, mean, var, x, EPS, ELU, 1.0).shape == x.shape


def test_bad_arguments_raise_torch_exception_types():
    ops = torch.ops.bnext
    x = torch.randn(2, 3, 4, 4)
    w, b, m, s = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="activation must be an activation code from 0 to 5.*got 6"):
        ops.batch_norm_act_forward(x, w, b, None, EPS, 6, 0.0)
    with pytest.raises(ValueError, match="activation must be .*got -1"):
        ops.batch_norm_act_eval(x, w, b, m, s, None, EPS, -1, 0.0)
    with pytest.raises(ValueError, match="activation must be"):
        ops.batch_norm_act_backward(x, x, None, w, b, m, s, 9, 0.0, False)
    for code, param in [(RELU, 0.0), (SILU, 0.0), (HARDSWISH, 0.0), (LEAKY, 0.0), (LEAKY, -0.1), (ELU, 0.0)]:
        with pytest.raises(ValueError, match="from_output=True needs an invertible activation.*got activation"):
            ops.batch_norm_act_backward(x, x, None, w, b, m, s, code, param, True)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        ops.batch_norm_act_forward(x, w, b, torch.randn(2, 3, 4, 5), EPS, RELU, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        ops.batch_norm_act_forward(x, w, b, x.double(), EPS, RELU, 0.0)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        ops.batch_norm_act_backward(x, x, x[:1], w, b, m, s, RELU, 0.0, False)
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        ops.batch_norm_act_eval(x, w, b, m, s, x.half(), EPS, RELU, 0.0)
    with pytest.raises(RuntimeError, match="grad_out must have the input's shape"):
        ops.batch_norm_act_backward(x[:1], x, None, w, b, m, s, RELU, 0.0, False)
    with pytest.raises(RuntimeError, match="weight must be a 1-D tensor with 3 elements"):
        ops.batch_norm_act_forward(x, torch.ones(4), b, None, EPS, RELU, 0.0)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor with 3 elements"):
        ops.batch_norm_act_backward(x, x, None, w, torch.zeros(2), m, s, RELU, 0.0, False)
    with pytest.raises(RuntimeError, match="save_invstd must be a 1-D tensor"):
        ops.batch_norm_act_backward(x, x, None, w, b, m, s[:2], RELU, 0.0, False)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        ops.batch_norm_act_forward(x, w, b, None, -1.0, RELU, 0.0)
    with pytest.raises(NotImplementedError, match="saved must be a floating-point tensor"):
        ops.batch_norm_act_backward(x.int(), x.int(), None, w, b, m, s, RELU, 0.0, False)
    with pytest.raises(NotImplementedError, match="input must be a floating-point tensor"):
        ops.batch_norm_act_forward(x.int(), w, b, None, EPS, RELU, 0.0)
    with pytest.raises(RuntimeError, match="saved must have at least 2 dimensions"):
        ops.batch_norm_act_backward(x[0, 0, 0], x[0, 0, 0], None, None, None, m, s, RELU, 0.0, False)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined"):
        ops.batch_norm_act_eval(x, w, b, None, s, None, EPS, RELU, 0.0)
