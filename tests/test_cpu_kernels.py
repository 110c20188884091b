"""Every bnext CPU op against float64 references, for each CPU kernel variant (ISA) this CPU runs.

The variant is forced with BNEXT_CPU_ISA (read at every op call), so the baseline, AVX2,
AVX-512 and AVX-512 + BF16 builds of csrc/cpu/batch_norm_kernel.h are each checked on awkward shapes: C=1, C=3,
C=17, HxW=1, odd HxW tails, a run longer than a statistics block, N=1, (N, C) and (N, C, L),
channels_last and channels_last_3d, and a strided input, in half, bfloat16, float and double.
"""
import pytest
import torch

import bnext

from conftest import ISAS

# (shape, memory format)
CASES = [
    ((5, 1, 7, 9), "contiguous"),
    ((4, 3, 5, 7), "contiguous"),
    ((2, 17, 33, 65), "contiguous"),
    ((3, 17, 33, 65), "channels_last"),
    ((2, 3, 70, 71), "contiguous"),  # HxW = 4970 > one statistics block
    ((1, 17, 9, 9), "contiguous"),  # N = 1
    ((6, 5, 1, 1), "contiguous"),  # HxW = 1
    ((37, 17), "contiguous"),  # BatchNorm1d (N, C)
    ((3, 5, 33), "contiguous"),  # BatchNorm1d (N, C, L)
    ((2, 17, 3, 5, 7), "channels_last"),  # channels_last_3d
    ((2, 3, 4, 5, 6), "contiguous"),
    ((9, 130, 3, 3), "channels_last"),  # C > the super-row width
    # C = 72, not a multiple of 16: rows paired into 144-value super-rows, an odd row count (a
    # lone last row) and two chunks.
    ((4, 72, 16, 17), "channels_last"),
    # At least 2 MiB (kWideBytes) in every 16-bit and wider dtype: below AVX-512 the 64-value rows
    # (C = 64, and super-rows of two C = 32 rows) walk in memory order, four rows at a time.
    ((16, 64, 32, 33), "channels_last"),
    ((32, 32, 32, 33), "channels_last"),
    # Above 1 MiB in float32 and wider: below AVX-512 the NCHW forward takes the memory-order
    # passes instead of per-channel tasks (16-bit dtypes keep the tasks).
    ((8, 64, 24, 24), "contiguous"),
    # C = 4096: the elementwise passes' coefficient arrays (48 KiB and more) exceed half of any L1
    # data cache, so wide rows go four at a time per column block: 27 rows, a group of 3 last.
    ((3, 4096, 3, 3), "channels_last"),
    ((4, 6, 10, 12), "strided"),
    # Planes / super-rows that start on 64-byte lines, so the streaming-store paths run when
    # BNEXT_CPU_STREAM_BYTES=0 (pairs of vectors, single vectors and scalar tails).
    ((3, 5, 8, 8), "contiguous"),
    ((2, 3, 4, 12), "contiguous"),
    ((4, 32, 5, 7), "channels_last"),
    ((3, 256, 2, 3), "channels_last"),
]
ALIGNED_CASES = CASES[-4:]
# NCHW planes that do not start on lines, streamed line by line (lines straddling two planes; a
# line is one vector or, for 16-bit values on AVX-512 and 32-bit ones on AVX2, two): 49, 48 (a
# two-vector line whose second vector starts the next plane) and 20 values per plane, 9 (shorter
# than a line, not streamed), 196 (14x14), and enough planes for two tasks, whose shared boundary
# lines are stored normally. Then channel groups whose planes share lines but whose runs per
# sample are whole lines (line groups, float32 and bfloat16 on AVX-512): 16 or 32 channels of
# 7x7, 4 or 8 of 14x14, 2 of bfloat16 28x28, streamed group by group with per-lane coefficients.
STREAM_CASES = ALIGNED_CASES + [
    ((3, 5, 7, 7), "contiguous"),
    ((3, 5, 6, 8), "contiguous"),
    ((2, 3, 5, 4), "contiguous"),
    ((2, 3, 3, 3), "contiguous"),
    ((2, 9, 14, 14), "contiguous"),
    ((4, 63, 13, 13), "contiguous"),  # two tasks of 126 planes: their boundary is mid-line
    ((2, 256, 7, 7), "contiguous"),
    ((2, 64, 14, 14), "contiguous"),
    ((2, 16, 28, 28), "contiguous"),
    # Channels-last rows of at least a line that do not start on lines (C * itemsize no multiple of
    # 64), streamed line by line across the rows: C = 260 (lines straddling two rows) and 1023, in
    # enough rows for two tasks whose shared boundary is mid-line.
    ((2, 260, 5, 13), "channels_last"),
    ((3, 1023, 2, 3), "channels_last"),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Output tolerance relative to the output's scale: one rounding of the output dtype plus slack.
OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Per-channel results are accumulated in float32 (float64 for double) from the exact input values.
ACC_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.fixture(params=["auto", "always"])
def stream(request, monkeypatch):
    """Streaming (non-temporal) output stores: as chosen by size, or forced on every aligned pass."""
    if request.param == "always":
        monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", "0")
    else:
        monkeypatch.delenv("BNEXT_CPU_STREAM_BYTES", raising=False)
    return request.param


def make(shape, fmt, dtype, scale=2.0, offset=3.0):
    if fmt == "strided":
        base = torch.randn(shape[:-1] + (2 * shape[-1],)) * scale + offset
        x = base[..., ::2]
    else:
        x = torch.randn(shape) * scale + offset
    x = x.to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dims(x):
    return [0] + list(range(2, x.dim()))


def bcast(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    scale = 1.0 + expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,fmt", CASES, ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in CASES])
def test_ops_match_float64(isa, stream, shape, fmt, dtype):
    ops = torch.ops.bnext
    x = make(shape, fmt, dtype)
    dy = make(shape, fmt, dtype, scale=1.0, offset=0.5)
    C = shape[1]
    w = torch.rand(C, dtype=acc(dtype)) + 0.5
    b = torch.randn(C, dtype=acc(dtype))
    eps = 1e-5
    xd, dyd = x.double(), dy.double()
    M = x.numel() // C
    mean_r = xd.mean(dims(x))
    var_r = xd.var(dims(x), unbiased=False)
    invstd_r = 1.0 / torch.sqrt(var_r + eps)
    y_r = (xd - bcast(mean_r, x)) * bcast(invstd_r * w.double(), x) + bcast(b.double(), x)

    mean, var = ops.batch_norm_stats(x)
    assert mean.dtype == acc(dtype) and var.dtype == acc(dtype)
    close(mean, mean_r, ACC_TOL[dtype], "batch_norm_stats mean")
    close(var, var_r, ACC_TOL[dtype], "batch_norm_stats var")

    y, save_mean, save_invstd, save_var = ops.batch_norm_forward(x, w, b, eps)
    assert y.dtype == dtype and y.shape == x.shape
    if fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    close(y, y_r, OUT_TOL[dtype], "batch_norm_forward output")
    close(save_mean, mean_r, ACC_TOL[dtype], "batch_norm_forward save_mean")
    close(save_var, var_r, ACC_TOL[dtype], "batch_norm_forward save_var")
    close(save_invstd, invstd_r, 10 * ACC_TOL[dtype], "batch_norm_forward save_invstd")

    # Elementwise normalize with given statistics (the eval path), absent weight/bias.
    y_e = ops.batch_norm_elemt(x, None, None, save_mean, save_invstd)
    y_er = (xd - bcast(save_mean.double(), x)) * bcast(save_invstd.double(), x)
    close(y_e, y_er, OUT_TOL[dtype], "batch_norm_elemt output")

    # Eval with running statistics: folded coefficients, y = x * scale + shift (every pivot +0: the
    # passes leave the subtraction out), against float64; the same values as the passes that
    # subtract the pivot (a -0.0 pivot is not +0, so that call takes them).
    rm, rv = save_mean - 0.25, save_var * 1.5
    y_ev = ops.batch_norm_eval(x, w, b, rm, rv, eps)
    s_r = w.double() / torch.sqrt(rv.double() + eps)
    close(y_ev, (xd - bcast(rm.double(), x)) * bcast(s_r, x) + bcast(b.double(), x), OUT_TOL[dtype], "batch_norm_eval")
    scale = w / torch.sqrt(rv + eps)
    shift = b - rm * scale
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    folded = ops.batch_norm_elemt(x, scale, shift, zeros, ones)
    centered = ops.batch_norm_elemt(x, scale, shift, zeros.index_fill(0, torch.tensor([0]), -0.0), ones)
    assert torch.equal(folded, centered)
    close(folded, y_ev, OUT_TOL[dtype], "batch_norm_elemt with folded coefficients")

    # Backward against the closed form in float64 with the kernel's own saved statistics.
    m, s = save_mean.double(), save_invstd.double()
    sum_dy_r = dyd.sum(dims(x))
    sum_dy_xmu_r = (dyd * (xd - bcast(m, x))).sum(dims(x))
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, save_mean, save_invstd)
    grad_scale = 1.0 + dyd.abs().sum(dims(x)).max().item() * (1 + (xd - bcast(m, x)).abs().max().item())
    for got, ref, name in ((sum_dy, sum_dy_r, "sum_dy"), (sum_dy_xmu, sum_dy_xmu_r, "sum_dy_xmu")):
        err = (got.double() - ref).abs().max().item()
        assert err <= 1e-5 * grad_scale if dtype != torch.float64 else err <= 1e-10 * grad_scale, (
            f"batch_norm_backward_reduce {name}: max error {err:.3g}")
    dx_r = bcast(w.double() * s, x) * (
        dyd - bcast(sum_dy_r / M, x) - (xd - bcast(m, x)) * bcast(s * s * sum_dy_xmu_r / M, x))
    dx, sum_dy_f, sum_dy_xmu_f = ops.batch_norm_backward(dy, x, w, save_mean, save_invstd)
    close(dx, dx_r, OUT_TOL[dtype] * 4, "batch_norm_backward grad_input")
    assert torch.equal(sum_dy_f, sum_dy) and torch.equal(sum_dy_xmu_f, sum_dy_xmu)
    dx_e = ops.batch_norm_backward_elemt(dy, x, save_mean, save_invstd, w, sum_dy / M, sum_dy_xmu / M)
    close(dx_e, dx_r, OUT_TOL[dtype] * 4, "batch_norm_backward_elemt grad_input")


@pytest.mark.parametrize("shape", [(8, 5, 40, 40), (100, 5, 7, 7)], ids=str)
def test_statistics_of_offset_data_are_accurate(isa, shape):
    # A large offset with a small spread: E[x^2] - E[x]^2 in float32 would lose every digit.
    # (100, 5, 7, 7): short planes, summed per value position over two blocks of runs.
    x = torch.randn(shape, dtype=torch.float64) * 0.01 + 1000.0
    mean, var = torch.ops.bnext.batch_norm_stats(x.float())
    ref = x.float().double()
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_finishing_non_finite_fallback_changes_no_bit(isa, dtype):
    # Channels-last statistics finish each chunk vectorized across channels, and channel by channel
    # (two_pass_welford) in a chunk with a non-finite center or sum: the same operations, so every
    # finite channel keeps its bits when another channel of its chunk holds an Inf or a NaN.
    # (80, 2048, 1, 1): 80 rows of wide rows, chunks of 32 rows (kMinChunkRows), the last one short.
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(80, 2048, 1, 1, generator=gen, dtype=torch.float64) * 3 + 7).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.bnext.batch_norm_stats(x)
    for value, ch in ((float("nan"), 5), (float("inf"), 2047)):
        y = x.clone()
        y[40, ch] = value  # in the second chunk
        m, v = torch.ops.bnext.batch_norm_stats(y)
        others = torch.arange(2048) != ch
        assert torch.equal(m[others], mean[others]) and torch.equal(v[others], var[others])
        assert not m[ch].isfinite() and not v[ch].isfinite()
    ref = x.double()
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("shape,fmt", [
    ((16, 6, 30, 30), "contiguous"),  # blocks of whole runs
    ((2, 3, 100, 90), "contiguous"),  # runs cut into blocks
    ((64, 8, 16, 16), "channels_last"),  # several chunks of rows (narrow rows)
    ((9, 300, 5, 5), "channels_last"),  # wide rows, four at a time, plus leftover rows
    ((100, 6, 7, 7), "contiguous"),  # short planes: per-position sums, two blocks of runs
])
def test_single_pass_16_bit_statistics_are_accurate(isa, shape, fmt, dtype):
    # 16-bit inputs take their statistics in one pass of sums of (x - pivot) and its square, the
    # pivot being each channel's first value. Offset data, and a first value far out in its
    # channel's tail (which scales the rounding of sum2 - sum1 * mean), stay accurate far below
    # the 16-bit output resolution; a NaN poisons its own channel only.
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 40).to(dtype)
    x[0, 1].view(-1)[0] = 40 + 3 * 30  # channel 1's pivot: 30 deviations out
    x[0, 2].view(-1)[0] = float("nan")
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.ops.bnext.batch_norm_stats(x)
    ref = x.double()
    dims = [0] + list(range(2, x.dim()))
    keep = [c for c in range(shape[1]) if c != 2]
    torch.testing.assert_close(var.double()[keep], ref.var(dims, unbiased=False)[keep], rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double()[keep], ref.mean(dims)[keep], rtol=1e-5, atol=0)
    assert mean[2].isnan() and var[2].isnan()


def test_bfloat16_rounding_matches_torch(isa):
    # The vectorized bfloat16 store rounds to nearest even exactly like torch (NaN stays a NaN;
    # its payload bits are not compared).
    x = torch.randn(4, 3, 9, 11)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    xb = x.to(torch.bfloat16)
    ones, zeros = torch.ones(3), torch.zeros(3)
    scale = torch.full((3,), 1.37)
    out = torch.ops.bnext.batch_norm_elemt(xb, scale, None, zeros, ones)
    expected = (xb.float() * 1.37).to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def _cpu_supports(name):
    return bnext.build_info()["cpu_isa"] == name


@pytest.mark.parametrize("shape", [(4, 3, 9, 11), (2, 3, 7, 7), (5, 3, 1, 1), (64, 3)], ids=str)
def test_bfloat16_hardware_rounding_is_exact(monkeypatch, shape):
    # The avx512bf16 variant rounds float -> bfloat16 with vcvtneps2bf16, which flushes denormals
    # to zero and keeps NaN payloads; vectors holding such lanes must take the exact rounding, so
    # every output bit equals the avx512 variant's and c10's (NaN -> 0x7FC0). Vector pairs, single
    # vectors and masked tails (HxW = 99, 49, 1; (N, C)) each meet denormal, NaN, Inf and tie lanes.
    monkeypatch.setenv("BNEXT_CPU_ISA", "avx512bf16")
    if not _cpu_supports("avx512bf16"):
        pytest.skip("this CPU has no AVX512-BF16")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    # Channel 1 holds 1 + k / 128, which its bias 2**-8 puts exactly halfway between two
    # bfloat16 values (ties, rounded to even: down for even k, up for odd k).
    x[:, 1] = 1 + torch.randint(0, 128, x[:, 1].shape, generator=gen) / 128
    special = torch.rand(shape, generator=gen) < 0.05
    x[special] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])[
        torch.randint(0, 4, (int(special.sum()),), generator=gen)]
    x = x.to(torch.bfloat16)
    # Channel 0's products are denormal (1e-39 is itself denormal), channel 2's ordinary.
    scale, bias = torch.tensor([1e-39, 1.0, 1.37]), torch.tensor([0.0, 2.0 ** -8, 0.0])
    zeros, ones = torch.zeros(3), torch.ones(3)
    exact = x.float() * bcast(scale, x) + bcast(bias, x)
    expected = exact.to(torch.bfloat16)
    assert ((exact.view(torch.int32) & 0xFFFF) == 0x8000).sum() > 0 and expected[:, 0].view(torch.int16).ne(0).any()
    nan = expected.isnan()
    outs = {}
    for isa in ("avx512bf16", "avx512"):
        monkeypatch.setenv("BNEXT_CPU_ISA", isa)
        out = torch.ops.bnext.batch_norm_elemt(x, scale, bias, zeros, ones)
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16)), isa
        assert (out[nan].view(torch.int16) == 0x7FC0).all(), isa
        dy = (x.float() * 1e-38).to(torch.bfloat16)  # dx lands among the denormals too
        w = torch.full((3,), 0.5)
        outs[isa] = [out] + _all_outputs(x, dy, w, None)
    for a, b in zip(outs["avx512bf16"], outs["avx512"]):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a.nan_to_num(7.0),
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b.nan_to_num(7.0))


def test_forced_isa_is_reported(isa):
    assert bnext.build_info()["cpu_isa"] == isa


def test_unknown_isa_is_rejected(monkeypatch):
    monkeypatch.setenv("BNEXT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="BNEXT_CPU_ISA must be one of .*got 'sse9'"):
        torch.ops.bnext.batch_norm_stats(torch.randn(4, 3))
    assert bnext.build_info()["cpu_isa"] == "invalid BNEXT_CPU_ISA"


def test_default_isa_is_the_best_supported(monkeypatch):
    monkeypatch.delenv("BNEXT_CPU_ISA", raising=False)
    best = bnext.build_info()["cpu_isa"]
    assert best in ISAS
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    if " avx512bw " in flags and " avx512vl " in flags and " avx512dq " in flags:
        assert best == ("avx512bf16" if " avx512_bf16 " in flags else "avx512")
    elif " avx2 " in flags and " fma " in flags:
        assert best == "avx2"


def _all_outputs(x, dy, w, b):
    ops = torch.ops.bnext
    y, mean, invstd, var = ops.batch_norm_forward(x, w, b, 1e-5)
    y_e = ops.batch_norm_elemt(x, w, b, mean, invstd)
    dx, sum_dy, sum_dy_xmu = ops.batch_norm_backward(dy, x, w, mean, invstd)
    M = x.numel() // x.shape[1]
    dx_e = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy / M, sum_dy_xmu / M)
    y_ev = ops.batch_norm_eval(x, w, b, mean, var, 1e-5)  # folded coefficients: the passes without a pivot
    return [y, mean, invstd, var, y_e, dx, sum_dy, sum_dy_xmu, dx_e, y_ev]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,fmt", STREAM_CASES, ids=[f"{'x'.join(map(str, s))}-{f}" for s, f in STREAM_CASES])
def test_streaming_stores_change_no_bit(isa, monkeypatch, shape, fmt, dtype):
    # Streaming only changes how outputs reach memory: every value must be bitwise the same as
    # with ordinary stores, and every element written (NaN-filled memory would show otherwise).
    x = make(shape, fmt, dtype)
    dy = make(shape, fmt, dtype, scale=1.0, offset=0.5)
    C = shape[1]
    w = torch.rand(C, dtype=acc(dtype)) + 0.5
    b = torch.randn(C, dtype=acc(dtype))
    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", str(1 << 62))
    plain = _all_outputs(x, dy, w, b)
    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", "0")
    streamed = _all_outputs(x, dy, w, b)
    for p, q in zip(plain, streamed):
        assert not q.isnan().any()
        assert torch.equal(p, q)


def test_stream_threshold_must_be_a_byte_count(monkeypatch):
    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", "lots")
    with pytest.raises(RuntimeError, match="BNEXT_CPU_STREAM_BYTES must be a non-negative integer .*got 'lots'"):
        torch.ops.bnext.batch_norm_elemt(torch.randn(4, 3, 2, 2), None, None, torch.zeros(3), torch.ones(3))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("stream", ["never", "always"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(2, 64, 7, 7), (4, 24, 14, 14), (3, 40, 7, 7), (2, 256, 7, 7)], ids=str)
def test_channel_groups_change_no_bit(isa, restore_threads, monkeypatch, shape, dtype, stream):
    # NCHW reductions and the elementwise passes of short planes work on groups of channels whose
    # size follows the thread count (one thread: 16 channels of 7x7, whose runs per sample fill
    # whole vectors with per-lane coefficients; four threads: 4 or 1 channels, run by run; streamed,
    # (2, 256, 7, 7) has line groups of 16 or 32 channels with one thread and none with four).
    # Every output of every op must be the same bits either way.
    monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", str(1 << 62) if stream == "never" else "0")
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    C = shape[1]
    w = (torch.rand(C, generator=gen) + 0.5).to(acc(dtype))
    b = torch.randn(C, generator=gen).to(acc(dtype))
    ops = torch.ops.bnext
    outs = []
    for n in (1, 4):
        torch.set_num_threads(n)
        y, mean, invstd, var = ops.batch_norm_forward(x, w, b, 1e-5)
        outs.append(_all_outputs(x, dy, w, b) + [ops.batch_norm_eval(x, w, b, mean, var, 1e-5), y])
    for p, q in zip(*outs):
        assert torch.equal(p.view(-1).view(torch.uint8), q.view(-1).view(torch.uint8))


def test_kernels_run_on_torch_threads(isa, restore_threads):
    # The kernels' at::parallel_for must run on torch's intra-op threads and follow
    # torch.set_num_threads: a kernel TU built without OpenMP compiles it to a serial loop, and
    # every kernel then runs on one thread whatever the thread count says.
    from bnext import _C

    for n in (1, 2, 3):
        torch.set_num_threads(n)
        assert _C._parallel_probe(8) == n, f"{isa} kernels: 8 tasks ran on another number of threads than {n}"
    torch.set_num_threads(3)
    assert _C._parallel_probe(2) == 2  # never more threads than tasks
    with pytest.raises(ValueError, match="tasks must be >= 1, got 0"):
        _C._parallel_probe(0)
