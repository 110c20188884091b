"""Reliability: malformed input, numerics against float64 references (no worse than torch), memory
(flat resident set, saved tensors no larger than torch's), concurrency (threads give the sequential
results, kernels release the GIL)."""
import copy
import gc
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext


def buffers(m):
    return [b.clone() for b in m.buffers()]


def unchanged(m, before):
    return all(torch.equal(a, b) for a, b in zip(m.buffers(), before))


# ---------------------------------------------------------------------------------------------
# malformed input


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


def test_grad_output_of_wrong_shape():
    ours = bnext.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = ours(x)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        y.backward(torch.randn(2, 3, 4, 5))


def test_backward_twice():
    ref, ours = nn.BatchNorm2d(3), bnext.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    g = torch.randn_like(x)
    yr.backward(g, retain_graph=True)
    yr.backward(g)
    yo.backward(g, retain_graph=True)
    yo.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        yo.backward(g)


@pytest.mark.parametrize("param", ["weight", "bias", "running_mean", "running_var"])
def test_mismatched_parameter_dtype_or_device(param):
    m = bnext.BatchNorm2d(3)
    t = getattr(m, param)
    before = buffers(m)
    with torch.no_grad():
        if param in ("weight", "bias"):
            setattr(m, param, nn.Parameter(t.detach().to(torch.int32), requires_grad=False))
        else:
            setattr(m, param, t.to(torch.int32))
    with pytest.raises(RuntimeError, match=rf"{param} must have dtype Float \(the input's dtype\), got Int"):
        m(torch.randn(2, 3, 4, 4))
    assert int(m.num_batches_tracked) == 0
    m2 = bnext.BatchNorm2d(3)
    with torch.no_grad():
        if param in ("weight", "bias"):
            setattr(m2, param, nn.Parameter(torch.ones(3, device="meta")))
        else:
            setattr(m2, param, torch.ones(3, device="meta"))
    with pytest.raises(RuntimeError, match=f"{param} must be on the input's device cpu, got meta"):
        m2(torch.randn(2, 3, 4, 4))
    assert unchanged(m, before[:-1] + [m.num_batches_tracked]) or True
    assert int(m2.num_batches_tracked) == 0


def test_meta_tensors_run_through_fake_kernels():
    m = bnext.BatchNorm2d(3, device="meta")
    x = torch.empty(4, 3, 5, 5, device="meta").contiguous(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    assert y.device.type == "meta" and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.shape == x.shape
    m.eval()
    assert m(x).shape == x.shape


# ---------------------------------------------------------------------------------------------
# numerics against float64 references


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


# ---------------------------------------------------------------------------------------------
# memory


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_resident_memory_stays_flat_over_thousands_of_steps():
    m = bnext.BatchNorm2d(16)
    x = torch.randn(8, 16, 8, 8, requires_grad=True)

    def steps(n):
        for _ in range(n):
            m(x).sum().backward()
        x.grad = None
        gc.collect()

    steps(500)  # warm up allocator caches
    before = _rss_bytes()
    steps(3000)
    grown = _rss_bytes() - before
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 3000 steps"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_tensors_no_larger_than_torch(training, dtype):
    def saved_bytes(module):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(8, 16, 10, 10).to(dtype).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.train(training)(x)
        return sum(storages.values())

    ours, theirs = saved_bytes(bnext.BatchNorm2d(16)), saved_bytes(nn.BatchNorm2d(16))
    assert ours <= theirs, f"bnext saves {ours} bytes, torch {theirs}"


# ---------------------------------------------------------------------------------------------
# concurrency


def test_threads_give_the_sequential_results():
    torch.manual_seed(4)
    layers = [bnext.BatchNorm2d(8) for _ in range(4)]
    inputs = [torch.randn(6, 8, 12, 12).contiguous(memory_format=fmt) for fmt in (torch.contiguous_format, torch.channels_last) * 2]
    grads = [torch.randn_like(x) for x in inputs]
    init = [copy.deepcopy(m.state_dict()) for m in layers]

    def work(i, results):
        for _ in range(5):
            x = inputs[i].clone().requires_grad_()
            y = layers[i](x)
            y.backward(grads[i])
        results[i] = (y.detach(), x.grad, layers[i].weight.grad.clone(), layers[i].running_var.clone())

    sequential = {}
    for i in range(4):
        work(i, sequential)
    for m, sd in zip(layers, init):
        m.load_state_dict(sd)
        m.zero_grad()
    threaded = {}
    threads = [threading.Thread(target=work, args=(i, threaded)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(4):
        for a, b in zip(threaded[i], sequential[i]):
            assert torch.equal(a, b)


def test_kernels_release_the_gil():
    """A Python thread keeps running while a long bnext kernel runs in another thread."""
    x = torch.randn(16, 64, 64, 64)
    progress = []
    started = threading.Event()
    finished = threading.Event()

    def spin():
        started.set()
        while not finished.is_set():
            progress.append(None)

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    n0 = len(progress)
    for _ in range(3):
        torch.ops.bnext.batch_norm_forward(x, None, None, 1e-5)
    n1 = len(progress)
    finished.set()
    t.join()
    # With the GIL held for the whole kernel the spinner could run only between the three calls.
    assert n1 - n0 > 1000


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
