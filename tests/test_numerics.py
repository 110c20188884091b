"""Numerics against torch and float64 references: unusual values (NaN, Inf, the float32 limit,
constant channels), data with a large offset, strides that overlap or repeat, sums over more than
2**24 values, and ordinary data in every dtype: bnext's error is no worse than torch's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext


# ---------------------------------------------------------------------------------------------
# unusual values and strides


def test_zero_stride_and_overlapping_inputs_match_torch():
    expanded = torch.randn(1, 3, 1, 5).expand(4, 3, 6, 5)
    overlapping = torch.randn(200).as_strided((4, 3, 5, 5), (3, 1, 2, 1))
    for x in (expanded, overlapping):
        ref, ours = nn.BatchNorm2d(3), bnext.BatchNorm2d(3)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_var, ref.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_nan_and_inf_propagate_like_torch(training):
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    ref, ours = nn.BatchNorm2d(3).train(training), bnext.BatchNorm2d(3).train(training)
    if not training:
        for m in (ref, ours):
            m.running_mean[1] = float("nan")
            m.running_var[2] = float("inf")
    yr, yo = ref(x), ours(x)
    assert torch.equal(yr.isnan(), yo.isnan())
    assert torch.equal(yr.isinf(), yo.isinf())
    finite = yr.isfinite()
    torch.testing.assert_close(yo[finite], yr[finite], rtol=1e-4, atol=1e-4)
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("scale", [1e30, 1e37, 3e38])
def test_values_near_the_float32_limit_match_torch(scale):
    """The variance overflows float32 (invstd 0): torch's NCHW result, zeros (plus bias), in every
    layout. torch's own channels_last path returns NaN there; bnext does not depend on layout."""
    x = (torch.rand(4, 3, 8, 8) * 0.1 + 0.9) * scale
    yr = F.batch_norm(x, None, None, training=True)
    assert not yr.isnan().any()
    for layout in (torch.contiguous_format, torch.channels_last):
        yo = bnext.batch_norm(x.contiguous(memory_format=layout), None, None, training=True)
        torch.testing.assert_close(yo, yr, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_constant_channels(layout):
    x = torch.full((4, 3, 5, 5), 3.25).contiguous(memory_format=layout)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y = bnext.batch_norm(x, None, None, w, b, training=True)
    # Zero variance: every value equals the mean, so the output is exactly the bias.
    assert torch.equal(y, b.view(1, 3, 1, 1).expand_as(y).contiguous(memory_format=layout))
    # eps = 0 in eval with zero running variance: 0 * inf, NaN as in torch.
    yr = F.batch_norm(x, torch.zeros(3), torch.zeros(3), eps=0.0)
    yo = bnext.batch_norm(x, torch.zeros(3), torch.zeros(3), eps=0.0)
    assert torch.equal(yr.isnan(), yo.isnan())
    xs = x.clone()
    xs[:, :, 0, 0] = 0.0
    torch.testing.assert_close(bnext.batch_norm(xs, torch.full((3,), 3.25), torch.zeros(3), eps=0.0),
                               F.batch_norm(xs, torch.full((3,), 3.25), torch.zeros(3), eps=0.0), equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 2, 2**25 + 3), (2**25 + 3, 2)], ids=["ncl", "rows"])
def test_sums_over_more_than_2_24_values_per_channel(shape):
    """A float32 running sum stops growing at 2**24 ones; reductions keep their block sums in double."""
    x = torch.randn(shape).bfloat16()
    dy = torch.ones_like(x)
    sum_dy, _ = torch.ops.bnext.batch_norm_backward_reduce(dy, x, torch.zeros(2), torch.ones(2))
    assert torch.equal(sum_dy, torch.full((2,), float(2**25 + 3)))
    mean, var = torch.ops.bnext.batch_norm_stats(x + 5)
    torch.testing.assert_close(mean, torch.full((2,), 5.0), rtol=0, atol=2e-3)
    torch.testing.assert_close(var, torch.ones(2), rtol=0, atol=2e-3)


def test_ambiguous_channels_last_strides_backward_is_exact():
    """(1, 2, 2, 1) with strides (4, 1, 2, 1) is channels_last-contiguous only through its size-1
    dimensions. torch's CPU backward is wrong there (it returns +5.8e-4 where the exact value is
    -5.3e-3); bnext matches a float64 composite, and keeps torch's output format."""
    x = torch.empty_strided((1, 2, 2, 1), (4, 1, 2, 1))
    x.copy_(torch.tensor([-0.43851518, -0.19327068, 0.19331294, 1.36407304]).view(1, 2, 2, 1))
    g = torch.tensor([-0.85667461, 1.10060418, -1.07118738, 0.12270124]).view(1, 2, 2, 1)
    xd = x.double().requires_grad_()
    m, v = xd.mean((0, 2, 3), keepdim=True), xd.var((0, 2, 3), unbiased=False, keepdim=True)
    ((xd - m) / torch.sqrt(v + 1e-5)).backward(g.double())
    xo = x.clone().requires_grad_()
    y = bnext.batch_norm(xo, None, None, training=True)
    y.backward(g)
    torch.testing.assert_close(xo.grad.double(), xd.grad, rtol=1e-3, atol=1e-6)
    assert y.stride() == F.batch_norm(x, None, None, training=True).stride()



# ---------------------------------------------------------------------------------------------
# errors against float64 references, next to torch's


def _err(y, ref):
    return (y.double() - ref).abs().max().item()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_large_mean_tiny_spread_no_worse_than_torch(layout):
    torch.manual_seed(1)
    x = (torch.randn(8, 4, 16, 16) * 1e-2 + 1e4).contiguous(memory_format=layout)
    ref = F.batch_norm(x.double(), None, None, training=True)
    e_torch = _err(F.batch_norm(x, None, None, training=True), ref)
    e_ours = _err(bnext.batch_norm(x, None, None, training=True), ref)
    # Pivot-shifted statistics and the unfolded normalization: orders of magnitude below torch.
    assert e_ours * 100 <= e_torch, f"bnext error {e_ours}, torch error {e_torch}"
    # Running variance (unbiased) from the same batch.
    rv_t, rv_o = torch.ones(4), torch.ones(4)
    F.batch_norm(x, torch.zeros(4), rv_t, training=True, momentum=1.0)
    bnext.batch_norm(x, torch.zeros(4), rv_o, training=True, momentum=1.0)
    rv_ref = x.double().transpose(0, 1).reshape(4, -1).var(1)
    assert (rv_o.double() - rv_ref).abs().max() <= (rv_t.double() - rv_ref).abs().max() + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_eval_offset_running_mean_no_worse_than_torch(layout, dtype):
    # Eval folds the running mean into the shift, out = x * scale + (bias - mean * scale): torch's
    # own eval formula, whose error grows with |mean| / std; it stays within torch's.
    torch.manual_seed(4)
    x = (torch.randn(8, 4, 16, 16) + 100).to(dtype).contiguous(memory_format=layout)
    rm, rv = 100 + 0.1 * torch.randn(4), torch.rand(4) + 0.5
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    ref = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double())
    e_torch = _err(F.batch_norm(x, rm, rv, w, b), ref)
    e_ours = _err(bnext.batch_norm(x, rm, rv, w, b), ref)
    assert e_ours <= 2 * e_torch, f"bnext error {e_ours}, torch error {e_torch}"


def test_bfloat16_large_offset_no_worse_than_torch():
    torch.manual_seed(2)
    x = (torch.randn(8, 4, 16, 16) + 100).bfloat16()
    ref = F.batch_norm(x.double(), None, None, training=True)
    e_torch = _err(F.batch_norm(x, None, None, training=True), ref)
    e_ours = _err(bnext.batch_norm(x, None, None, training=True), ref)
    assert e_ours <= e_torch, f"bnext error {e_ours} > torch error {e_torch}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_errors_against_float64_reference_no_worse_than_torch(dtype):
    """Forward and backward on ordinary data, both layouts: bnext's max error against float64 stays
    within 2x torch's (both are about one ulp of the output here; bnext's channels_last error is
    several times smaller than torch's)."""
    torch.manual_seed(3)
    x = (torch.randn(16, 8, 12, 12) * 3 + 2).to(dtype)
    g = torch.randn_like(x)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    errs = {}
    xd = x.double().requires_grad_()
    yd = F.batch_norm(xd, None, None, w.double(), b.double(), training=True)
    yd.backward(g.double())
    for name, fn in (("torch", F.batch_norm), ("bnext", bnext.batch_norm)):
        xi = x.clone().requires_grad_()
        y = fn(xi, None, None, w, b, training=True)
        y.backward(g)
        errs[name] = (_err(y, yd.detach()), _err(xi.grad, xd.grad))
    slack = 2.0
    assert errs["bnext"][0] <= errs["torch"][0] * slack + 1e-7, errs
    assert errs["bnext"][1] <= errs["torch"][1] * slack + 1e-7, errs

