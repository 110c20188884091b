"""64-bit indexing: bfloat16 inputs of more than 2**31 elements (4 GiB each).

Opt-in, because it needs about 13 GiB of free memory: CI sets BNEXT_TEST_LARGE=1 (.ci/run); locally
`BNEXT_TEST_LARGE=1 make test PYTEST_ARGS=tests/test_large.py`.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("BNEXT_TEST_LARGE") != "1", reason="opt-in: set BNEXT_TEST_LARGE=1 (needs ~13 GiB of memory)"
)

L = 2**30 + 3  # two channels of L values: the second one ends past element 2**31
CHUNK = 2**26


def _channel_views(t, layout):
    """The two channels of `t` as 1-D views (strided for the rows layout)."""
    return [t[0, c] for c in range(2)] if layout == "ncl" else [t[:, c] for c in range(2)]


def _stats64(row):
    """Mean and biased variance of a 1-D view in float64, from chunked sums."""
    s = s2 = 0.0
    for i in range(0, row.numel(), CHUNK):
        chunk = row[i : i + CHUNK].double()
        s += chunk.sum().item()
        s2 += chunk.square().sum().item()
    mean = s / row.numel()
    return mean, s2 / row.numel() - mean * mean


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_more_than_2_31_elements(layout):
    import bnext  # noqa: F401

    g = torch.Generator().manual_seed(0)
    x = torch.empty((1, 2, L) if layout == "ncl" else (L, 2), dtype=torch.bfloat16)
    x.normal_(generator=g)
    _channel_views(x, layout)[1].add_(3)
    assert x.numel() > 2**31
    out, mean, invstd, var = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    refs = [_stats64(v) for v in _channel_views(x, layout)]
    for c, (m, v) in enumerate(refs):
        assert abs(mean[c].item() - m) < 1e-4, (c, mean[c].item(), m)
        assert abs(var[c].item() / v - 1) < 1e-4, (c, var[c].item(), v)
    # Output chunks at the start, at 2**31 // 2 (the second channel's start in NCL, past element
    # 2**31 in rows) and at the very end.
    for c, (xv, yv) in enumerate(zip(_channel_views(x, layout), _channel_views(out, layout))):
        inv = 1.0 / (refs[c][1] + 1e-5) ** 0.5
        for start in (0, 2**30 - CHUNK // 2, L - CHUNK):
            sl = slice(start, start + CHUNK)
            expected = (xv[sl].float() - refs[c][0]) * inv
            torch.testing.assert_close(yv[sl].float(), expected, rtol=0.02, atol=0.02)
    del out
    dy = torch.ones_like(x)
    sum_dy, sum_dy_xmu = torch.ops.bnext.batch_norm_backward_reduce(dy, x, mean, invstd)
    assert torch.equal(sum_dy.double(), torch.full((2,), float(L), dtype=torch.float64).float().double())
    # sum(x - mean) over a channel is zero up to the rounding of the float32 mean.
    assert (sum_dy_xmu.abs() < L * 1e-3).all()
