"""The eager path in C++ (torch.ops.bnext._batch_norm_train, csrc/module_ops.cpp, and the eval op
called below autograd) against the composed path (the differentiable functional ops, then
bnext::update_running_stats) that torch.compile, torch.func, forward AD and the emulated CUDA
kernels run. Both must give the same bits: outputs, every gradient asked for (and only those),
running statistics, second derivatives.
"""
import pytest
import torch

import bnext
import bnext.functional as F_bnext


@pytest.fixture
def python_path(monkeypatch):
    """Runs the block on the composed path."""
    def use():
        monkeypatch.setattr(F_bnext, "eager_route", lambda: False)
    return use


def spy_on(monkeypatch, name):
    """Records every call bnext's functional layer makes to torch.ops.bnext.<name>."""
    calls = []
    op = getattr(torch.ops.bnext, name)

    class Spy:
        def __getattr__(self, attr):
            if attr != name:
                return getattr(torch.ops.bnext, attr)

            def record(*args):
                calls.append(args)
                return op(*args)

            return record

    # The eager call of that op: the training one itself; for batch_norm_eval the inference call,
    # which runs it below autograd (csrc/module_ops.cpp).
    attr, eager = {
        "_batch_norm_train": ("_train_op", torch.ops.bnext._batch_norm_train.default),
        "batch_norm_eval": ("_infer_op", torch.ops.bnext._batch_norm_infer.default),
    }[name]

    def record_default(*args):
        calls.append(args)
        return eager(*args)

    monkeypatch.setattr(F_bnext, "_bnext", Spy())
    monkeypatch.setattr(F_bnext, "ops", lambda: Spy())
    monkeypatch.setattr(F_bnext, attr, record_default)
    return calls


def calls_cpp_path(monkeypatch):
    return spy_on(monkeypatch, "_batch_norm_train")


def run(x, weight, bias, rm, rv, momentum, dy):
    x = x.detach().requires_grad_(x.requires_grad)
    out = bnext.batch_norm(x, rm, rv, weight, bias, True, momentum, 1e-5)
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, dy) if wanted else ()
    return out, grads


CASES = [
    # shape, memory format, dtype, parameter dtype
    ((8, 6, 5, 5), torch.contiguous_format, torch.float32, torch.float32),
    ((8, 6, 5, 5), torch.channels_last, torch.float32, torch.float32),
    ((16, 5), torch.contiguous_format, torch.float64, torch.float64),
    ((4, 6, 3, 5, 5), torch.channels_last_3d, torch.bfloat16, torch.float32),
    ((8, 6, 7), torch.contiguous_format, torch.float16, torch.float16),
    # bfloat16 parameters and statistics: converted, blended and rounded on the host by the C++ path
    ((8, 6, 5, 5), torch.channels_last, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("shape,fmt,dtype,pdtype", CASES)
@pytest.mark.parametrize("grads", ["xwb", "x", "w", "b", "wb", "", "x-noweight", "b-noweight", "w-nobias", "none-noaffine"])
@pytest.mark.parametrize("stats", [True, False])
def test_same_bits_as_the_python_path(shape, fmt, dtype, pdtype, grads, stats, python_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    weight = None if "noweight" in grads or "noaffine" in grads else (torch.rand(C, generator=gen) + 0.5).to(pdtype)
    bias = None if "nobias" in grads or "noaffine" in grads else torch.randn(C, generator=gen).to(pdtype)
    x.requires_grad_("x" in grads)
    if weight is not None:
        weight.requires_grad_("w" in grads.split("-")[0])
    if bias is not None:
        bias.requires_grad_("b" in grads.split("-")[0])
    rm0 = torch.randn(C, generator=gen).to(pdtype)
    rv0 = (torch.rand(C, generator=gen) + 0.5).to(pdtype)

    def call():
        rm, rv = (rm0.clone(), rv0.clone()) if stats else (None, None)
        return run(x, weight, bias, rm, rv, 0.1, dy) + (rm, rv)

    results = on_both_paths(call, lambda: calls_cpp_path(monkeypatch), python_path)
    assert_same_results(results, rm0 if stats else None)


def on_both_paths(call, spy, python_path):
    """call() on the C++ path (spy() records its calls: exactly one) and on the composed path."""
    calls = spy()
    ours = call()
    assert len(calls) == 1
    python_path()
    ref = call()
    assert len(calls) == 1
    return ours, ref


def assert_same_results(results, rm0):
    """The two paths' (output, gradients, running_mean, running_var) are the same bits; the running
    statistics moved from rm0 (None: no running statistics)."""
    (out_c, g_c, rm_c, rv_c), (out_p, g_p, rm_p, rv_p) = results
    assert out_c.dtype == out_p.dtype and out_c.stride() == out_p.stride()
    assert torch.equal(out_c, out_p)
    assert len(g_c) == len(g_p)
    for a, b in zip(g_c, g_p):
        assert a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    if rm0 is not None:
        assert torch.equal(rm_c, rm_p) and torch.equal(rv_c, rv_p)
        assert not torch.equal(rm_c, rm0)


def test_only_the_gradients_asked_for(monkeypatch):
    # weight given but frozen, bias trainable: the node's inputs are (x, weight, bias), and a
    # None weight shifts bias to the second input; both must map to the right gradient.
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    w = torch.rand(3) + 0.5
    b = torch.randn(3, requires_grad=True)
    out = bnext.batch_norm(x, None, None, w, b, True)
    gx, gb = torch.autograd.grad((out * out).sum(), (x, b))
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, True)
    rx, rb = torch.autograd.grad((ref * ref).sum(), (x, b))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)
    out = bnext.batch_norm(x, None, None, None, b, True)
    (gb2,) = torch.autograd.grad(out.sum(), (b,))
    assert torch.equal(gb2, torch.full((3,), 16.0))  # 4 * 2 * 2 values per channel


def test_double_backward_matches_torch():
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: bnext.batch_norm(a[0], None, None, a[1], a[2], True), (x, w, b))
    dy = torch.randn_like(x)
    for fn in (bnext.batch_norm, torch.nn.functional.batch_norm):
        out = fn(x, None, None, w, b, True)
        gx, = torch.autograd.grad(out, x, dy, create_graph=True)
        gg = torch.autograd.grad(gx.square().sum(), (x, w))
        if fn is bnext.batch_norm:
            ours = gg
        else:
            for a, r in zip(ours, gg):
                torch.testing.assert_close(a, r)


@pytest.mark.parametrize("bad", ["running_mean_shape", "running_var_device", "running_var_int", "weight_device"])
def test_failed_call_changes_nothing(bad):
    C = 4
    x = torch.randn(3, C, 2, 2)
    rm, rv = torch.zeros(C), torch.ones(C)
    w, b = torch.ones(C), torch.zeros(C)
    if bad == "running_mean_shape":
        rm = torch.zeros(C + 1)
        match = r"running_mean must have 4 elements \(num_features, the input's size\(1\)\), got shape \[5\]"
    elif bad == "running_var_device":
        rv = torch.ones(C, device="meta")
        match = r"running_var must be on the input's device cpu, got meta"
    elif bad == "running_var_int":
        rv = torch.ones(C, dtype=torch.int64)
        match = r"running_var must have dtype Float \(the input's dtype\), got Long"
    else:
        w = torch.ones(C, device="meta")
        match = r"weight must be on the input's device cpu, got meta"
    before = [t.clone() for t in (rm, rv) if t.device.type == "cpu"]
    with pytest.raises(RuntimeError, match=match):
        bnext.batch_norm(x, rm, rv, w, b, True)
    after = [t for t in (rm, rv) if t.device.type == "cpu"]
    for a, b_ in zip(after, before):
        assert torch.equal(a, b_)


def test_module_training_uses_the_cpp_path(monkeypatch):
    calls = calls_cpp_path(monkeypatch)
    m = bnext.BatchNorm2d(3)
    version = m.num_batches_tracked._version
    m(torch.randn(2, 3, 4, 4))
    # Counted inside the C++ call, as an in-place add_ would (the version counter too).
    assert len(calls) == 1 and int(m.num_batches_tracked) == 1
    assert m.num_batches_tracked._version == version + 1
    m.momentum = None  # the cumulative average: also one C++ call
    m(torch.randn(2, 3, 4, 4))
    assert len(calls) == 2 and int(m.num_batches_tracked) == 2


@pytest.mark.parametrize("shape,fmt,dtype,pdtype", CASES)
@pytest.mark.parametrize("affine", ["wb", "w", "b", ""])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_eval_same_bits_as_the_python_path(shape, fmt, dtype, pdtype, affine, grad_mode, python_path, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    C = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.rand(C, generator=gen) + 0.5).to(pdtype) if "w" in affine else None
    bias = torch.randn(C, generator=gen).to(pdtype) if "b" in affine else None
    rm = torch.randn(C, generator=gen).to(pdtype)
    rv = (torch.rand(C, generator=gen) + 0.5).to(pdtype)
    calls = spy_on(monkeypatch, "batch_norm_eval")
    with torch.set_grad_enabled(grad_mode):
        ours = bnext.batch_norm(x, rm, rv, weight, bias, False)
        assert len(calls) == 1
        python_path()
        ref = bnext.batch_norm(x, rm, rv, weight, bias, False)
        assert len(calls) == 2  # the same op, through its autograd kernel
    assert ours.dtype == ref.dtype and ours.stride() == ref.stride() and not ours.requires_grad
    assert torch.equal(ours, ref)
    # The device-generic kernel (what CUDA tensors run, csrc/common/eval.h) on these CPU tensors:
    # reached through the CUDA dispatch key, its inner ops then run on the CPU.
    if not bnext.build_info()["cuda"]:
        return
    generic = torch.ops.bnext.batch_norm_eval.default.redispatch(
        torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), x, weight, bias, rm, rv, 1e-5)
    assert generic.stride() == ref.stride() and torch.equal(generic, ref)


def test_eval_with_grad_takes_the_autograd_path(monkeypatch):
    # Frozen-statistics fine-tuning: eval mode, parameters trainable; gradients as torch's.
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    m = bnext.BatchNorm2d(3).eval()
    ref = torch.nn.BatchNorm2d(3).eval()
    m.running_mean.uniform_(-1, 1)
    m.running_var.uniform_(0.5, 2)
    ref.load_state_dict(m.state_dict())
    out, out_ref = m(x), ref(x)
    g = torch.autograd.grad(out.square().sum(), (x, m.weight, m.bias))
    g_ref = torch.autograd.grad(out_ref.square().sum(), (x, ref.weight, ref.bias))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    # The autograd path folds the eval coefficients as the one-call inference path does: same bits.
    with torch.no_grad():
        assert torch.equal(m(x), out)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    out = m(x)
    assert out.requires_grad
    with torch.no_grad():
        assert torch.equal(m(x), out)


@pytest.mark.parametrize("bad", ["running_var_shape", "running_mean_meta", "running_var_int", "no_running_var"])
def test_eval_errors_are_worded_by_bnext(bad):
    C = 4
    x = torch.randn(3, C, 2, 2)
    rm, rv = torch.zeros(C), torch.ones(C)
    if bad == "running_var_shape":
        rv, match, exc = torch.ones(C, 2), r"running_var must have 4 elements .*got shape \[4, 2\]", RuntimeError
    elif bad == "running_mean_meta":
        rm, match, exc = torch.zeros(C, device="meta"), r"running_mean must be on the input's device cpu, got meta", RuntimeError
    elif bad == "running_var_int":
        rv, match, exc = torch.ones(C, dtype=torch.int32), r"running_var must have dtype Float .*got Int", RuntimeError
    else:
        rv, match, exc = None, r"running_mean and running_var must be defined in evaluation mode", RuntimeError
    with torch.no_grad(), pytest.raises(exc, match=match):
        bnext.batch_norm(x, rm, rv, None, None, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stat_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("C", [3, 16, 37])
def test_running_stats_update_same_bits_as_lerp(dtype, stat_dtype, C):
    # bnext::update_running_stats blends plain CPU running statistics on the host (no ATen ops):
    # the same bits as batch * scale, .to(running dtype), lerp_, for every dtype pair, strided
    # statistics and the large-momentum branch of lerp; and the version bumps as lerp_'s does.
    if stat_dtype not in (dtype, torch.float64 if dtype == torch.float64 else torch.float32):
        pytest.skip("running statistics in the input's dtype or its accumulation type")
    gen = torch.Generator().manual_seed(C)
    x = (torch.randn(5, C, 3, 3, generator=gen) * 2 + 3).to(dtype)
    rm0 = torch.randn(2 * C, generator=gen).to(stat_dtype)[::2]
    rv0 = (torch.rand(2 * C, generator=gen) + 0.5).to(stat_dtype)[::2]
    count = x.numel() // C
    for momentum in (0.1, 0.75):
        rm, rv = torch.empty_like(rm0.repeat(2))[::2].copy_(rm0), torch.empty_like(rv0.repeat(2))[::2].copy_(rv0)
        versions = (rm._version, rv._version)
        bnext.batch_norm(x, rm, rv, None, None, True, momentum, 1e-5)
        assert (rm._version, rv._version) == (versions[0] + 1, versions[1] + 1)
        mean, var = torch.ops.bnext.batch_norm_stats(x)
        ref_m = rm0.clone().lerp_(mean.to(stat_dtype), momentum)
        ref_v = rv0.clone().lerp_((var * (count / (count - 1))).to(stat_dtype), momentum)
        assert rm.dtype == stat_dtype and torch.equal(rm, ref_m) and torch.equal(rv, ref_v)


def test_running_stats_strided_and_inference_mode(monkeypatch):
    calls = calls_cpp_path(monkeypatch)
    x = torch.randn(4, 3, 2, 2)
    base = torch.zeros(6)
    rm, rv = base[::2], torch.ones(3)
    bnext.batch_norm(x, rm, rv, None, None, True, 0.5)
    assert len(calls) == 1
    torch.testing.assert_close(base[::2], 0.5 * x.mean((0, 2, 3)))
    assert torch.equal(base[1::2], torch.zeros(3))  # the other elements of the storage untouched
    with torch.inference_mode():
        m = bnext.BatchNorm2d(3)  # inference-tensor buffers (no version counter)
        m(x)
    assert len(calls) == 2 and int(m.num_batches_tracked) == 1
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean((0, 2, 3)))


# ----------------------------------------------------------------------------------------------
# The fused layers' eager training call: torch.ops.bnext._batch_norm_act_train (a C++ autograd
# node around batch_norm_act_forward / batch_norm_act_backward) against the composed path (the
# op's Python autograd Function, then update_running_stats).


def calls_act_cpp_path(monkeypatch):
    calls = []
    op = torch.ops.bnext._batch_norm_act_train.default

    def record(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(F_bnext, "_act_train_op", record)
    return calls


ACT_CASES = [
    # shape, memory format, dtype, parameter dtype, activation, its parameter
    ((8, 6, 5, 5), torch.contiguous_format, torch.float32, torch.float32, "relu", 0.0),
    ((8, 6, 5, 5), torch.channels_last, torch.float32, torch.float32, "leaky_relu", 0.1),
    ((16, 5), torch.contiguous_format, torch.float64, torch.float64, "elu", 0.7),
    ((4, 6, 3, 5, 5), torch.channels_last_3d, torch.bfloat16, torch.float32, "silu", 0.0),
    ((8, 6, 7), torch.contiguous_format, torch.float16, torch.float16, "hardswish", 0.0),
    ((8, 6, 5, 5), torch.channels_last, torch.bfloat16, torch.bfloat16, "identity", 0.0),
]


@pytest.mark.parametrize("shape,fmt,dtype,pdtype,act,param", ACT_CASES)
@pytest.mark.parametrize("grads", ["xwbr", "x", "w", "b", "r", "wb", "", "xr-noweight", "b-noweight", "w-nobias",
                                   "xr-noaffine", "xwb-noresidual", "w-noresidual"])
@pytest.mark.parametrize("stats", [True, False])
def test_act_same_bits_as_the_python_path(shape, fmt, dtype, pdtype, act, param, grads, stats, python_path, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    C = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    residual = None if "noresidual" in grads else torch.randn(shape, generator=gen).to(dtype)
    weight = None if "noweight" in grads or "noaffine" in grads else (torch.randn(C, generator=gen)).to(pdtype)
    bias = None if "nobias" in grads or "noaffine" in grads else torch.randn(C, generator=gen).to(pdtype)
    wanted = grads.split("-")[0]
    for t, key in ((x, "x"), (weight, "w"), (bias, "b"), (residual, "r")):
        if t is not None:
            t.requires_grad_(key in wanted)
    rm0 = torch.randn(C, generator=gen).to(pdtype)
    rv0 = (torch.rand(C, generator=gen) + 0.5).to(pdtype)
    def call():
        rm, rv = (rm0.clone(), rv0.clone()) if stats else (None, None)
        n = torch.zeros((), dtype=torch.long) if stats else None
        out = F_bnext.batch_norm_act_impl(x, rm, rv, weight, bias, True, 0.1, 1e-5, n, residual, act, param)
        inputs = [t for t in (x, weight, bias, residual) if t is not None and t.requires_grad]
        g = torch.autograd.grad(out, inputs, dy) if inputs else ()
        assert out.requires_grad == bool(inputs)
        assert n is None or int(n) == 1
        return out, g, rm, rv

    results = on_both_paths(call, lambda: calls_act_cpp_path(monkeypatch), python_path)
    assert_same_results(results, rm0 if stats else None)


def test_act_module_training_uses_the_cpp_path(monkeypatch):
    calls = calls_act_cpp_path(monkeypatch)
    m = bnext.BatchNormAct2d(3)
    x, r = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    m(x, r).sum().backward()
    assert len(calls) == 1 and int(m.num_batches_tracked) == 1
    # The memory-saving mode keeps its own (Python) autograd Function: not this call.
    saving = bnext.BatchNormAct2d(3, activation="leaky_relu", memory_saving=True)
    saving(x).sum().backward()
    assert len(calls) == 1 and int(saving.num_batches_tracked) == 1
    with torch.no_grad():  # nothing to save: the one-call path again
        saving(x)
    assert len(calls) == 2 and int(saving.num_batches_tracked) == 2


@pytest.mark.parametrize("act", ["relu", "silu", "elu"])
def test_act_double_backward_matches_the_python_path(act, python_path):
    # create_graph: the node recomputes the statistics with differentiable ops and runs the
    # backward op's composite, as the Python Function does; second derivatives agree to rounding.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    r = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=gen).requires_grad_()
    dy = torch.randn_like(x)

    def second(f):
        out = f(x, None, None, w, b, True, 0.1, 1e-5, None, r, act, 1.0)
        gx, gw = torch.autograd.grad(out, (x, w), dy, create_graph=True)
        return (gx, gw) + torch.autograd.grad(gx.square().sum() + gw.sum(), (x, r, w, b), materialize_grads=True)

    ours = second(F_bnext.batch_norm_act_impl)
    assert torch.autograd.gradgradcheck(
        lambda *a: F_bnext.batch_norm_act_impl(a[0], None, None, a[2], a[3], True, 0.1, 1e-5, None, a[1], act, 1.0),
        (x, r, w, b))
    python_path()
    ref = second(F_bnext.batch_norm_act_impl)
    for a, b_ in zip(ours, ref):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["running_mean_shape", "weight_device", "residual_layout", "activation_code"])
def test_act_failed_call_changes_nothing(bad):
    C = 4
    x, r = torch.randn(3, C, 2, 2), torch.randn(3, C, 2, 2)
    rm, rv, n = torch.zeros(C), torch.ones(C), torch.zeros((), dtype=torch.long)
    w, b, code, exc = torch.ones(C), torch.zeros(C), 1, RuntimeError
    if bad == "running_mean_shape":
        rm, match = torch.zeros(C + 1), r"running_mean must have 4 elements"
    elif bad == "weight_device":
        w, match = torch.ones(C, device="meta"), r"weight must be on the input's device cpu, got meta"
    elif bad == "residual_layout":
        r, match = torch.randn(3, C, 2, 3), r"residual"
    else:
        code, match, exc = 9, r"activation must be an activation code from 0 to 5", ValueError
    before = [rm.clone(), rv.clone(), n.clone()]
    with pytest.raises(exc, match=match):
        torch.ops.bnext._batch_norm_act_train(x, w, b, rm, rv, 0.1, 1e-5, n, r, code, 0.0)
    for a, b_ in zip((rm, rv, n), before):
        assert torch.equal(a, b_)
