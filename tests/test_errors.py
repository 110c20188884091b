"""Bad input: torch's exception type and message where torch defines one, a clear message naming
the argument otherwise, never a crash, and never a changed buffer.

1. bnext against torch, case by case: each bad input runs through torch.nn.functional.batch_norm
   and bnext.batch_norm (training and eval), and the module cases through torch.nn.BatchNorm2d and
   bnext.BatchNorm2d (train and eval), on identical inputs. Where torch raises, bnext raises the
   same exception type (or a subclass of it, so a user's `except` clause still catches it), with a
   message naming the argument at fault, and a failing call leaves the running statistics (and, for
   the modules, every buffer) as they were. Where torch succeeds, bnext succeeds with the same
   result (output, dtype, running statistics). `python tests/test_errors.py` prints the catalogue:
   bad input -> torch's type -> bnext's type.
2. The same message as torch's, word for word, where the modules check the same thing.
3. bnext's own messages: which argument, what was expected and what came.
4. Autograd misuse: gradients of the wrong shape, backward twice.
"""
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext


def buffers(m):
    """Copies of the module's buffers (None for meta buffers, which hold no values)."""
    return {k: (v.detach().clone() if v.device.type != "meta" else None) for k, v in m.named_buffers()}


def assert_buffers_unchanged(m, before):
    for k, v in m.named_buffers():
        if before.get(k) is not None:
            assert torch.equal(v, before[k]), f"buffer {k} changed by a failed call"


def same_error(torch_call, bnext_call):
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(Exception) as ours:
        bnext_call()
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    return ours.value


# ---------------------------------------------------------------------------------------------
# 1. bnext against torch, case by case

C = 3


def _stats(c=C, dtype=torch.float32):
    return torch.full((c,), 0.1, dtype=dtype), torch.full((c,), 0.9, dtype=dtype)


def _base(x=None, c=C, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 4, 4, generator=g) if x is None else x
    rm, rv = _stats(c, dtype)
    return dict(input=x, running_mean=rm, running_var=rv,
                weight=torch.randn(c, generator=g, dtype=dtype), bias=torch.randn(c, generator=g, dtype=dtype),
                momentum=0.1, eps=1e-5)


def _with(**changes):
    def build():
        kw = _base()
        for k, v in changes.items():
            kw[k] = v() if callable(v) else v
        return kw
    return build


def _g(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


# id -> (builder of F.batch_norm keyword arguments, words one of which the message must contain)
FUNCTIONAL_CASES = {
    "input 0-d": (lambda: dict(_base(), input=torch.tensor(1.0), running_mean=_stats(1)[0], running_var=_stats(1)[1],
                               weight=None, bias=None), ("input",)),
    "input 1-D non-empty (6,)": (lambda: dict(_base(c=6), input=_g(6)), ("input",)),
    "input 1-D empty (0,)": (lambda: dict(input=torch.empty(0), running_mean=torch.empty(0), running_var=torch.empty(0),
                                          weight=None, bias=None, momentum=0.1, eps=1e-5), ("input",)),
    "input int64": (_with(input=lambda: torch.randint(0, 5, (2, C, 4, 4))), ("input", "Long", "int64")),
    "input bool": (_with(input=lambda: torch.ones(2, C, 4, 4, dtype=torch.bool)), ("input", "Bool")),
    "input complex64": (_with(input=lambda: _g(2, C, 4, 4).to(torch.complex64)), ("input", "complex", "Complex")),
    "input not a tensor (list)": (_with(input=lambda: _g(2, C, 4, 4).tolist()), ("input",)),
    "float input + double weight": (_with(weight=lambda: _g(C, dtype=torch.float64)), ("weight",)),
    "float input + double bias": (_with(bias=lambda: _g(C, dtype=torch.float64)), ("bias",)),
    "double input + float params/stats": (_with(input=lambda: _g(2, C, 4, 4, dtype=torch.float64)), ("weight", "running_mean", "input")),
    "float input + double running stats": (_with(running_mean=lambda: _stats(dtype=torch.float64)[0],
                                                 running_var=lambda: _stats(dtype=torch.float64)[1]), ("running_mean", "running_var")),
    "half input + float params/stats": (_with(input=lambda: _g(2, C, 4, 4, dtype=torch.float16)), ("weight", "input")),
    "bfloat16 input + float params/stats": (_with(input=lambda: _g(2, C, 4, 4, dtype=torch.bfloat16)), ("weight", "input")),
    "float input + half weight/bias": (_with(weight=lambda: _g(C, dtype=torch.float16), bias=lambda: _g(C, dtype=torch.float16)), ("weight",)),
    "half input + half params, float stats": (_with(input=lambda: _g(2, C, 4, 4, dtype=torch.float16),
                                                    weight=lambda: _g(C, dtype=torch.float16),
                                                    bias=lambda: _g(C, dtype=torch.float16)), ("running_mean", "weight")),
    "int64 weight": (_with(weight=lambda: torch.ones(C, dtype=torch.int64)), ("weight",)),
    "bool running_var": (_with(running_var=lambda: torch.ones(C, dtype=torch.bool)), ("running_var",)),
    "weight has 4 channels": (_with(weight=lambda: _g(C + 1)), ("weight",)),
    "bias has 4 channels": (_with(bias=lambda: _g(C + 1)), ("bias",)),
    "running_mean has 4 channels": (_with(running_mean=lambda: torch.zeros(C + 1)), ("running_mean",)),
    "running_var has 4 channels": (_with(running_var=lambda: torch.ones(C + 1)), ("running_var",)),
    "weight 2-D (3, 1)": (_with(weight=lambda: _g(C, 1)), ("weight",)),
    "running_mean None": (_with(running_mean=None), ("running_mean",)),
    "running_var None": (_with(running_var=None), ("running_var",)),
    "running stats both None": (_with(running_mean=None, running_var=None), ("running_mean", "running_var")),
    "1 value per channel (1, 3)": (_with(input=lambda: _g(1, C)), ("value per channel", "input")),
    "1 value per channel (1, 3, 1, 1)": (_with(input=lambda: _g(1, C, 1, 1)), ("value per channel", "input")),
    "eps = 0": (_with(eps=0.0), ("eps",)),
    "eps = -1": (_with(eps=-1.0), ("eps",)),
    "meta weight, cpu input": (_with(weight=lambda: torch.empty(C, device="meta")), ("weight", "device", "meta")),
    "meta running_mean, cpu input": (_with(running_mean=lambda: torch.empty(C, device="meta")), ("running_mean", "device", "meta")),
    "meta input, cpu params": (_with(input=lambda: torch.empty(2, C, 4, 4, device="meta")), ("input", "device", "meta")),
    "running_mean requires grad": (_with(running_mean=lambda: torch.zeros(C, requires_grad=True)), ("running_mean",)),
    "momentum None": (_with(momentum=None), ("momentum",)),
    "momentum -1.0": (_with(momentum=-1.0), ("momentum",)),
    "momentum 2.0": (_with(momentum=2.0), ("momentum",)),
    "momentum nan": (_with(momentum=math.nan), ("momentum",)),
    "momentum int 1": (_with(momentum=1), ("momentum",)),
    "momentum 0-d tensor": (_with(momentum=lambda: torch.tensor(0.1)), ("momentum",)),
}


def _clone(v):
    return v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v


def _call_functional(fn, kw, training):
    kw = {k: _clone(v) for k, v in kw.items()}
    stats = (kw["running_mean"], kw["running_var"])
    before = [s.detach().clone() if isinstance(s, torch.Tensor) and s.device.type != "meta" else None for s in stats]
    try:
        out = fn(kw["input"], kw["running_mean"], kw["running_var"], kw["weight"], kw["bias"], training,
                 kw["momentum"], kw["eps"])
        return out, None, stats, before
    except Exception as e:  # noqa: BLE001
        return None, e, stats, before


def _tol(dtype):
    return {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
            torch.float32: dict(rtol=1e-4, atol=1e-4)}.get(dtype, dict(rtol=1e-9, atol=1e-9))


def _same_result(out_b, out_t, stats_b, stats_t):
    assert type(out_b) is type(out_t)
    assert out_b.shape == out_t.shape and out_b.dtype == out_t.dtype and out_b.device == out_t.device, (
        f"bnext {tuple(out_b.shape)} {out_b.dtype} {out_b.device}, torch {tuple(out_t.shape)} {out_t.dtype} {out_t.device}")
    if out_t.device.type != "meta":
        torch.testing.assert_close(out_b, out_t, equal_nan=True, **_tol(out_t.dtype))
    for name, sb, st in zip(("running_mean", "running_var"), stats_b, stats_t):
        if isinstance(st, torch.Tensor) and st.device.type != "meta":
            torch.testing.assert_close(sb, st, equal_nan=True, **_tol(st.dtype), msg=lambda m: f"{name}: {m}")


def _check_types(exc_b, exc_t, names):
    if exc_t is None:
        raise AssertionError(f"torch succeeds; bnext raises {type(exc_b).__name__}: {exc_b}")
    if exc_b is None:
        raise AssertionError(f"torch raises {type(exc_t).__name__} ({str(exc_t)[:200]}); bnext succeeds")
    assert isinstance(exc_b, type(exc_t)), (
        f"torch raises {type(exc_t).__name__} ({str(exc_t)[:200]}); bnext raises {type(exc_b).__name__} ({str(exc_b)[:200]})")
    msg = str(exc_b).lower()
    assert any(n.lower() in msg for n in names), f"bnext's message does not name {names}: {exc_b}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_error_type(case, training):
    build, names = FUNCTIONAL_CASES[case]
    kw = build()
    out_t, exc_t, stats_t, _ = _call_functional(F.batch_norm, kw, training)
    out_b, exc_b, stats_b, before_b = _call_functional(bnext.batch_norm, kw, training)
    if exc_t is None and exc_b is None:
        _same_result(out_b, out_t, stats_b, stats_t)
        return
    if exc_b is not None:
        for name, s, b in zip(("running_mean", "running_var"), stats_b, before_b):
            if b is not None and isinstance(s, torch.Tensor) and s.shape == b.shape:
                assert torch.equal(s.detach(), b) or (s.isnan().any() and b.isnan().any()), (
                    f"bnext changed {name} in a call that raised {type(exc_b).__name__}")
    _check_types(exc_b, exc_t, names)


# Module cases: (change applied to each fresh BatchNorm2d(3) with identical state, input builder, names)
def _set(**attrs):
    def apply(m):
        for k, v in attrs.items():
            setattr(m, k, v() if callable(v) else v)
    return apply


def _param(t):
    return lambda: torch.nn.Parameter(t())


MODULE_CASES = {
    "input 3-D (2, 3, 4)": (None, lambda: _g(2, C, 4), ("input", "4D", "dim")),
    "input 5-D": (None, lambda: _g(2, C, 2, 2, 2), ("input", "4D", "dim")),
    "input 1-D empty (0,)": (None, lambda: torch.empty(0), ("input", "4D", "dim")),
    "input int64": (None, lambda: torch.randint(0, 5, (2, C, 4, 4)), ("input", "Long", "int64")),
    "input complex64": (None, lambda: _g(2, C, 4, 4).to(torch.complex64), ("input", "complex", "Complex")),
    "double input, float module": (None, lambda: _g(2, C, 4, 4, dtype=torch.float64), ("weight", "input", "running_mean")),
    "half input, float module": (None, lambda: _g(2, C, 4, 4, dtype=torch.float16), ("weight", "input")),
    "bfloat16 input, float module": (None, lambda: _g(2, C, 4, 4, dtype=torch.bfloat16), ("weight", "input")),
    "input has 4 channels": (None, lambda: _g(2, C + 1, 4, 4), ("weight", "running_mean", "channel", "input")),
    "1 value per channel (1, 3, 1, 1)": (None, lambda: _g(1, C, 1, 1), ("value per channel", "input")),
    "eps = 0": (_set(eps=0.0), lambda: _g(2, C, 4, 4), ("eps",)),
    "eps = -1": (_set(eps=-1.0), lambda: _g(2, C, 4, 4), ("eps",)),
    "momentum -1.0": (_set(momentum=-1.0), lambda: _g(2, C, 4, 4), ("momentum",)),
    "momentum 2.0": (_set(momentum=2.0), lambda: _g(2, C, 4, 4), ("momentum",)),
    "momentum nan": (_set(momentum=math.nan), lambda: _g(2, C, 4, 4), ("momentum",)),
    "weight is a double Parameter": (_set(weight=_param(lambda: _g(C, dtype=torch.float64))), lambda: _g(2, C, 4, 4), ("weight",)),
    "weight is a meta Parameter": (_set(weight=_param(lambda: torch.empty(C, device="meta"))), lambda: _g(2, C, 4, 4),
                                   ("weight", "device", "meta")),
    "running_mean buffer has 4 channels": (_set(running_mean=lambda: torch.zeros(C + 1)), lambda: _g(2, C, 4, 4), ("running_mean",)),
    "running_var buffer None (running_mean kept)": (_set(running_var=None), lambda: _g(2, C, 4, 4), ("running_var",)),
}


def _module_pair(change):
    g = torch.Generator().manual_seed(3)
    m_t = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        m_t.weight.copy_(torch.randn(C, generator=g))
        m_t.bias.copy_(torch.randn(C, generator=g))
        m_t.running_mean.copy_(torch.randn(C, generator=g))
        m_t.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    m_b = bnext.BatchNorm2d(C)
    m_b.load_state_dict(m_t.state_dict())
    if change is not None:
        torch.manual_seed(4)
        change(m_t)
        torch.manual_seed(4)
        change(m_b)
        if hasattr(m_t, "weight") and isinstance(m_t.weight, torch.Tensor) and m_t.weight.device.type != "meta":
            with torch.no_grad():
                m_b.weight.copy_(m_t.weight)
    return m_t, m_b


def _call_module(m, x):
    try:
        return m(x), None
    except Exception as e:  # noqa: BLE001
        return None, e


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_error_type(case, training):
    change, make_input, names = MODULE_CASES[case]
    m_t, m_b = _module_pair(change)
    m_t.train(training)
    m_b.train(training)
    x = make_input()
    before_b = buffers(m_b)
    out_t, exc_t = _call_module(m_t, x.clone())
    out_b, exc_b = _call_module(m_b, x.clone())
    if exc_t is None and exc_b is None:
        _same_result(out_b, out_t, (), ())
        for k, v in m_t.named_buffers():
            torch.testing.assert_close(dict(m_b.named_buffers())[k], v, equal_nan=True, msg=lambda m: f"{k}: {m}")
        return
    if exc_b is not None:
        after = buffers(m_b)
        for k, v in before_b.items():
            if v is not None and after.get(k) is not None:
                assert torch.equal(after[k], v) or (v.isnan().any() and after[k].isnan().any()), (
                    f"bnext changed buffer {k} in a call that raised {type(exc_b).__name__}")
    _check_types(exc_b, exc_t, names)


def catalogue():
    """Rows (kind, case, mode, torch's outcome, bnext's outcome)."""
    def outcome(exc):
        return "ok" if exc is None else type(exc).__name__

    rows = []
    for case, (build, _) in FUNCTIONAL_CASES.items():
        for training in (True, False):
            kw = build()
            _, exc_t, _, _ = _call_functional(F.batch_norm, kw, training)
            _, exc_b, _, _ = _call_functional(bnext.batch_norm, kw, training)
            rows.append(("F.batch_norm", case, "train" if training else "eval", outcome(exc_t), outcome(exc_b),
                         str(exc_t).splitlines()[0][:90] if exc_t else ""))
    for case, (change, make_input, _) in MODULE_CASES.items():
        for training in (True, False):
            m_t, m_b = _module_pair(change)
            m_t.train(training)
            m_b.train(training)
            x = make_input()
            _, exc_t = _call_module(m_t, x.clone())
            _, exc_b = _call_module(m_b, x.clone())
            rows.append(("BatchNorm2d", case, "train" if training else "eval", outcome(exc_t), outcome(exc_b),
                         str(exc_t).splitlines()[0][:90] if exc_t else ""))
    return rows


# ---------------------------------------------------------------------------------------------
# 2. torch's message, word for word


@pytest.mark.parametrize(
    "nd,bad_shape",
    [(1, (4,)), (1, (2, 3, 4, 5)), (2, (2, 3, 4)), (2, (2, 3, 4, 5, 6)), (3, (2, 3, 4, 5))],
)
def test_wrong_dimensionality_matches_torch(nd, bad_shape):
    ref = getattr(nn, f"BatchNorm{nd}d")(3)
    ours = getattr(bnext, f"BatchNorm{nd}d")(3)
    x = torch.randn(bad_shape)
    before = buffers(ours)
    err = same_error(lambda: ref(x), lambda: ours(x))
    assert isinstance(err, ValueError) and "input" in str(err)
    assert_buffers_unchanged(ours, before)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    nd = max(1, len(shape) - 2)
    ref = getattr(nn, f"BatchNorm{nd}d")(3)
    ours = getattr(bnext, f"BatchNorm{nd}d")(3)
    before = buffers(ours)
    err = same_error(lambda: ref(torch.randn(shape)), lambda: ours(torch.randn(shape)))
    assert "Expected more than 1 value per channel when training" in str(err)
    # torch increments num_batches_tracked before failing; bnext leaves every buffer unchanged.
    assert int(ref.num_batches_tracked) == 1
    assert_buffers_unchanged(ours, before)
    # One value per channel is fine in eval.
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(torch.ones(shape)), ref(torch.ones(shape)))


@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_eps_checks_match_torch(eps, training):
    ref, ours = nn.BatchNorm2d(3, eps=eps), bnext.BatchNorm2d(3, eps=eps)
    ref.train(training)
    ours.train(training)
    before = buffers(ours)
    x = torch.randn(2, 3, 4, 4)
    err = same_error(lambda: ref(x), lambda: ours(x))
    assert "eps must be" in str(err)
    assert_buffers_unchanged(ours, before)


# ---------------------------------------------------------------------------------------------
# 3. bnext's own messages


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_vector_size(name, training):
    m = bnext.BatchNorm2d(4)
    with torch.no_grad():
        setattr(m, name, nn.Parameter(torch.ones(3)) if name in ("weight", "bias") else None)
    if name.startswith("running"):
        m.register_buffer(name, torch.ones(3))
    m.train(training)
    before = buffers(m)
    with pytest.raises(RuntimeError, match=rf"{name} must have 4 elements \(num_features, the input's size\(1\)\), got shape \[3\]"):
        m(torch.randn(2, 4, 3, 3))
    assert_buffers_unchanged(m, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("training", [True, False])
def test_non_floating_input(dtype, training):
    # NotImplementedError, as torch's "batch_norm" not implemented for 'Long'.
    m = bnext.BatchNorm2d(3).train(training)
    x = torch.ones(2, 3, 2, 2).to(dtype)
    before = buffers(m)
    with pytest.raises(NotImplementedError, match=re.escape("input must be a floating-point tensor (float16, bfloat16, float32 or float64), got ")):
        m(x)
    assert_buffers_unchanged(m, before)


def test_integer_weight_dtype():
    # RuntimeError, as torch's "mixed dtype (CPU): expect parameter to have scalar type of Float".
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"weight must have dtype Float \(the input's dtype\), got Long"):
        bnext.batch_norm(x, None, None, torch.ones(3, dtype=torch.long), None, True)


def test_weight_dtype_mismatch_in_op():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"bnext.batch_norm_forward: weight must have dtype Float .*got Double"):
        torch.ops.bnext.batch_norm_forward(x, torch.ones(3, dtype=torch.float64), None, 1e-5)
    # float32 parameters under bfloat16 input are allowed, as in torch.
    torch.ops.bnext.batch_norm_forward(x.bfloat16(), torch.ones(3), None, 1e-5)


def test_tensors_on_different_devices():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"weight must be on the input's device cpu, got meta"):
        bnext.batch_norm(x, None, None, torch.ones(3, device="meta"), None, True)


@pytest.mark.skipif(bnext.build_info()["cuda"], reason="this build has CUDA kernels")
def test_cuda_tensor_without_cuda_kernels():
    # A meta stand-in is not enough: build a real CUDA tensor when torch can, else check the guard.
    if not torch.cuda.is_available():
        from bnext.functional import check_device

        class FakeCuda:
            device = torch.device("cuda")
            is_cuda = True

        with pytest.raises(RuntimeError, match="bnext was built without CUDA kernels"):
            check_device(FakeCuda())
        return
    with pytest.raises(RuntimeError, match="bnext was built without CUDA kernels"):
        bnext.BatchNorm2d(3).cuda()(torch.randn(2, 3, 2, 2, device="cuda"))


def test_eval_without_running_stats_in_functional():
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined in evaluation mode"):
        bnext.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_grad_out_of_wrong_shape_in_op():
    x = torch.randn(4, 3)
    v = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"grad_out must have the input's shape \[4, 3\], got \[4, 2\]"):
        torch.ops.bnext.batch_norm_backward(torch.randn(4, 2), x, v, v, v)


def test_op_rejects_1d_input():
    with pytest.raises(RuntimeError, match=r"input must have at least 2 dimensions \(N, C, ...\), got 1D input"):
        torch.ops.bnext.batch_norm_stats(torch.randn(5))


@pytest.mark.parametrize("param", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda t: t.detach().to(torch.int32), r"{param} must have dtype Float \(the input's dtype\), got Int"),
        (lambda t: torch.ones(3, device="meta"), r"{param} must be on the input's device cpu, got meta"),
    ],
    ids=["int32", "meta"],
)
def test_module_parameter_or_buffer_of_wrong_dtype_or_device(param, bad, message):
    m = bnext.BatchNorm2d(3)
    with torch.no_grad():
        t = bad(getattr(m, param))
        if param in ("weight", "bias"):
            t = nn.Parameter(t, requires_grad=t.is_floating_point())
        setattr(m, param, t)
    before = buffers(m)
    with pytest.raises(RuntimeError, match=message.format(param=param)):
        m(torch.randn(2, 3, 4, 4))
    assert_buffers_unchanged(m, before)


# ---------------------------------------------------------------------------------------------
# 4. autograd misuse


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



if __name__ == "__main__":
    print("| API | bad input | mode | torch | bnext today | torch's message |")
    print("|---|---|---|---|---|---|")
    for row in catalogue():
        mark = "" if row[3] == row[4] else " **≠**"
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]}{mark} | {row[5].replace('|', '/')} |")
    sys.exit(0)
