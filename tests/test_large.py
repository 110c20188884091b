"""64-bit indexing: bfloat16 inputs of more than 2**31 elements (about 4 GiB each).

Opt-in (BNEXT_TEST_LARGE=1; needs ~14 GiB of free memory): `BNEXT_TEST_LARGE=1 make test
PYTEST_ARGS=tests/test_large.py`.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("BNEXT_TEST_LARGE") != "1", reason="opt-in: set BNEXT_TEST_LARGE=1 (needs ~14 GiB of memory)"
)

L = 2**30 + 3  # two channels of L values: the second one ends past element 2**31


def _stats64(x):
    """Per-channel mean and biased variance in float64, in chunks (x is (N, C, L) or (R, C))."""
    chunks = 2**26
    cols = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() == 2 else x[0]
    means, vars_ = [], []
    for row in cols:
        s = torch.zeros((), dtype=torch.float64)
        for i in range(0, row.numel(), chunks):
            s += row[i : i + chunks].double().sum()
        mean = s / row.numel()
        m2 = torch.zeros((), dtype=torch.float64)
        for i in range(0, row.numel(), chunks):
            m2 += (row[i : i + chunks].double() - mean).square().sum()
        means.append(mean)
        vars_.append(m2 / row.numel())
    return torch.stack(means), torch.stack(vars_)


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_more_than_2_31_elements(layout):
    import bnext  # noqa: F401

    g = torch.Generator().manual_seed(0)
    if layout == "ncl":
        x = torch.empty(1, 2, L, dtype=torch.bfloat16)
    else:
        x = torch.empty(L, 2, dtype=torch.bfloat16)
    x.normal_(generator=g)
    x[..., 1] += 3 if layout == "rows" else 0
    if layout == "ncl":
        x[0, 1] += 3
    assert x.numel() > 2**31
    out, mean, invstd, var = torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    ref_mean, ref_var = _stats64(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    # Every output element, last ones included (indices past 2**31).
    inv = (1 / torch.sqrt(ref_var + 1e-5)).float()
    chunks = 2**26
    if layout == "ncl":
        for c in range(2):
            for i in range(0, L, chunks):
                expected = (x[0, c, i : i + chunks].float() - ref_mean[c].float()) * inv[c]
                torch.testing.assert_close(out[0, c, i : i + chunks].float(), expected, rtol=0.02, atol=0.02)
    else:
        for i in range(0, L, chunks):
            expected = (x[i : i + chunks].float() - ref_mean.float()) * inv
            torch.testing.assert_close(out[i : i + chunks].float(), expected, rtol=0.02, atol=0.02)
    del out
    dy = torch.ones_like(x)
    sum_dy, sum_dy_xmu = torch.ops.bnext.batch_norm_backward_reduce(dy, x, mean, invstd)
    torch.testing.assert_close(sum_dy.double(), torch.full((2,), float(L), dtype=torch.float64), rtol=1e-6, atol=0)
    # sum(x - mean) over a channel is zero up to rounding of the float32 mean.
    assert (sum_dy_xmu.abs() < L * 1e-3).all()
