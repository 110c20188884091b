"""PyTorch's own test machinery, run with bnext substituted for torch's batch norm.

Sources reproduced (PyTorch's test/ directory is not in the wheel; the helpers they use are):
* test/test_modules.py (TestModule): test_grad / test_gradgrad (_test_gradients_helper: total
  derivative over inputs + parameters, then each parameter alone), test_errors,
  test_non_contiguous_tensors, test_memory_format; run on the ModuleInfos of module_db for
  nn.BatchNorm1d/2d/3d (module_db has no LazyBatchNorm entry), bnext's twin substituted.
* test/test_ops_gradients.py (test_fn_grad, test_fn_gradgrad) and test/test_ops_fwd_gradients.py
  (test_forward_mode_AD, test_fn_fwgrad_bwgrad), i.e. TestGradients._check_helper with the flags
  each passes, on the 'nn.functional.batch_norm' OpInfo of op_db with bnext.batch_norm substituted.
* test/test_ops.py: TestCommon.test_noncontiguous_samples, TestMathBits.test_neg_view,
  TestCompositeCompliance.test_operator / test_backward / test_forward_ad.
* test/functorch/test_ops.py (test_grad, test_vjp, test_jvp) and the vmap exhaustive loop of
  test/functorch/common_utils.py (get_fallback_and_vmap_exhaustive with the batch-norm in_dims
  choices), reimplemented here because that file is not installed; plus jacrev/jacfwd and
  per-sample gradients through torch.func.functional_call + vmap(grad).

Every check runs on torch's own module/function first, with identical inputs. Where torch itself
fails a check, the test is skipped with torch's error (never a silent pass); otherwise bnext must
pass it and agree with torch.
"""
import copy
import functools
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.testing._internal import composite_compliance
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck, noncontiguous_like

import bnext

from conftest import TOL

# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

TWINS = {torch.nn.BatchNorm1d: bnext.BatchNorm1d, torch.nn.BatchNorm2d: bnext.BatchNorm2d,
         torch.nn.BatchNorm3d: bnext.BatchNorm3d}
MODULE_INFOS = [m for m in module_db if m.module_cls in TWINS]
assert len(MODULE_INFOS) == 3, [m.name for m in MODULE_INFOS]

OPINFO = [o for o in op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == ""]
assert len(OPINFO) == 1
OPINFO = OPINFO[0]

DEVICE = "cpu"


def close(actual, expected, dtype=None, msg="", **tol):
    """assert_close of tensors / pytrees of tensors (None allowed where both are None)."""
    dtype = dtype or torch.float64
    tol = tol or TOL.get(dtype, TOL[torch.float32])
    torch.testing.assert_close(actual, expected, **tol, equal_nan=True, msg=lambda m: f"{msg}\n{m}" if msg else m)


def _skip_torch_fails(what, e):
    first = (str(e).strip().splitlines() or [""])[0][:300]
    pytest.skip(f"torch itself fails {what}: {type(e).__name__}: {first}")


def torch_first(what, fn):
    """Run a check on torch's implementation; if torch itself fails it, skip with torch's error.
    Used where bnext's result is compared with torch's value."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (any failure of torch's own implementation)
        _skip_torch_fails(what, e)


def same_check(what, bnext_fn, torch_fn):
    """A pass/fail check (gradcheck, compliance, ...): torch's batch norm first (skip with torch's
    error where torch fails it), then bnext's."""
    torch_first(what, torch_fn)
    bnext_fn()


def clone_tree(tree):
    """Fresh leaves with the same values and requires_grad (so torch and bnext get equal inputs)."""
    def c(t):
        if isinstance(t, torch.Tensor):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return copy.deepcopy(t)
    return pytree.tree_map(c, tree)


# ------------------------------------------------------------------------------------------------
# 1-3. ModuleInfo (test_modules.py)
# ------------------------------------------------------------------------------------------------


def _module_inputs(info, training, requires_grad=True, dtype=torch.float64):
    return info.module_inputs_func(info, device=DEVICE, dtype=dtype, requires_grad=requires_grad, training=training)


def _module_params():
    params = []
    for info in MODULE_INFOS:
        for training in (True, False):
            for i, mi in enumerate(_module_inputs(info, training, requires_grad=False)):
                mode = "train" if training else "eval"
                params.append(pytest.param(info, training, i, id=f"{info.name}-{mode}-{i}-{mi.desc or 'default'}"))
    return params


MODULE_PARAMS = _module_params()


@functools.lru_cache(maxsize=None)
def _module_inputs_cached(info, training):
    torch.manual_seed(0)
    return tuple(_module_inputs(info, training))


def _module_sample(info, training, index):
    mi = copy.copy(_module_inputs_cached(info, training)[index])
    mi.forward_input = copy.copy(mi.forward_input)
    mi.forward_input.args = clone_tree(mi.forward_input.args)
    return mi


def _make_pair(info, module_input, training, randomize=False):
    """torch's module and bnext's twin with identical parameters and buffers, float64."""
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    m_t = info.module_cls(*args, **kwargs).to(DEVICE).to(torch.float64)
    if randomize:
        g = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for p in m_t.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            if m_t.running_mean is not None:
                m_t.running_mean.copy_(torch.randn(m_t.running_mean.shape, generator=g, dtype=torch.float64))
                m_t.running_var.copy_(torch.rand(m_t.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
                m_t.num_batches_tracked.fill_(3)
    m_b = TWINS[info.module_cls](*args, **kwargs).to(DEVICE).to(torch.float64)
    m_b.load_state_dict(m_t.state_dict())
    m_t.train(training)
    m_b.train(training)
    return m_t, m_b


def _compare_buffers(m_b, m_t, msg=""):
    for name, buf in m_t.named_buffers():
        other = dict(m_b.named_buffers())[name]
        close(other, buf, msg=f"{msg} buffer {name}", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("info,training,index", MODULE_PARAMS)
def test_module_parity(info, training, index):
    """Forward output, every gradient, running stats and num_batches_tracked equal torch's (two steps)."""
    mi = _module_sample(info, training, index)
    m_t, m_b = _make_pair(info, mi, training, randomize=True)
    (x,) = mi.forward_input.args
    for step in range(2):
        x_step = x.detach() * (step + 1) + step
        x_t = x_step.clone().requires_grad_()
        x_b = x_step.clone().requires_grad_()
        out_t = m_t(x_t)
        out_b = m_b(x_b)
        close(out_b, out_t, msg=f"step {step}: output")
        assert out_b.dtype == out_t.dtype and out_b.shape == out_t.shape
        _compare_buffers(m_b, m_t, msg=f"step {step}:")
        g = torch.randn_like(out_t)
        params_t, params_b = list(m_t.parameters()), list(m_b.parameters())
        grads_t = torch.autograd.grad(out_t, [x_t] + params_t, g, allow_unused=True)
        grads_b = torch.autograd.grad(out_b, [x_b] + params_b, g, allow_unused=True)
        names = ["input"] + [n for n, _ in m_t.named_parameters()]
        for name, gb, gt in zip(names, grads_b, grads_t):
            if gt is None:
                assert gb is None or not gb.any(), f"step {step}: torch has no grad for {name}, bnext has one"
                continue
            assert gb is not None, f"step {step}: bnext gives no gradient for {name}"
            close(gb, gt, msg=f"step {step}: grad {name}")


def _gradients_helper(m, module_input, check):
    """test_modules.TestModule._test_gradients_helper, for one ModuleInput and one module."""
    params = tuple(m.parameters())
    input_args, input_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
    other_kwargs, kwarg_tensors = {}, []
    for name, obj in input_kwargs.items():
        (kwarg_tensors.append((name, obj)) if isinstance(obj, torch.Tensor) else other_kwargs.__setitem__(name, obj))
    spec = {}

    def fn_to_gradcheck(*flat_input_and_params):
        input_and_params = pytree.tree_unflatten(flat_input_and_params, spec["flat"])
        new_input_args = input_and_params[: len(input_args)]
        kwarg_args = input_and_params[-len(kwarg_tensors):]
        new_kwargs = {name: obj for (name, _), obj in zip(kwarg_tensors, kwarg_args)}
        with freeze_rng_state():
            output = m(*new_input_args, **new_kwargs, **other_kwargs)
            return pytree.tree_flatten(output)[0]

    def run():
        grad_input = input_args + params + tuple(obj for (_, obj) in kwarg_tensors)
        flat_input, spec["flat"] = pytree.tree_flatten(grad_input)
        assert check(fn_to_gradcheck, flat_input, nondet_tol=0.0)

    # total derivative
    run()
    # partial derivatives: each parameter alone (with the inputs)
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad = False
    try:
        for p, o in zip(params, old):
            p.requires_grad = o
            run()
            p.requires_grad = False
    finally:
        for p, o in zip(params, old):
            p.requires_grad = o


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
@pytest.mark.parametrize("info,training,index", MODULE_PARAMS)
def test_module_gradients(info, training, index, check):
    """test_modules test_grad / test_gradgrad: torch.testing._internal's gradcheck/gradgradcheck
    (check_batched_grad=True, fast_mode=True) over input + parameters, then each parameter."""
    fn = {"gradcheck": gradcheck, "gradgradcheck": gradgradcheck}[check]
    mi_b, mi_t = _module_sample(info, training, index), _module_sample(info, training, index)
    m_t, m_b = _make_pair(info, mi_b, training)
    same_check(f"{check} (test_modules)", lambda: _gradients_helper(m_b, mi_b, fn),
               lambda: _gradients_helper(m_t, mi_t, fn))


ERROR_PARAMS = []
for _info in MODULE_INFOS:
    for _training in (True, False):
        for _i, _ei in enumerate(_info.module_error_inputs_func(
                _info, device=DEVICE, dtype=torch.float64, requires_grad=False, training=_training)):
            ERROR_PARAMS.append(pytest.param(_info, _training, _i, id=f"{_info.name}-{'train' if _training else 'eval'}-{_i}"))


@pytest.mark.parametrize("info,training,index", ERROR_PARAMS)
def test_module_errors(info, training, index):
    """test_modules test_errors: same exception type as torch, matching the ErrorModuleInput's regex.

    test_errors never calls train(): the module is in its default (training) mode. The eval rows
    here set the mode torch's generator was asked for and require bnext to do what torch does
    (raise the same type, or succeed with the same output); a failing bnext call leaves buffers as
    they were (bnext's documented contract)."""
    ei = info.module_error_inputs_func(info, device=DEVICE, dtype=torch.float64, requires_grad=False,
                                       training=training)[index]
    mi = ei.module_error_input
    c_args, c_kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    (x,) = mi.forward_input.args
    if ei.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(ei.error_type, match=ei.error_regex):
            info.module_cls(*c_args, **c_kwargs)
        with pytest.raises(ei.error_type, match=ei.error_regex):
            TWINS[info.module_cls](*c_args, **c_kwargs)
        return
    m_t = info.module_cls(*c_args, **c_kwargs).double().train(training)
    m_b = TWINS[info.module_cls](*c_args, **c_kwargs).double().train(training)
    before = {k: v.clone() for k, v in m_b.state_dict().items()}
    try:
        out_t = m_t(x.clone())
        torch_exc = None
    except Exception as e:  # noqa: BLE001
        torch_exc = e
    if torch_exc is None:
        # torch accepts this in this mode (e.g. eps=0 in eval): bnext must too, with the same answer.
        out_b = m_b(x.clone())
        close(out_b, out_t, msg="torch succeeds here; bnext must give torch's output")
        return
    assert isinstance(torch_exc, ei.error_type), f"torch raised {type(torch_exc).__name__}, ModuleInfo says {ei.error_type}"
    # The ModuleInfo's regex describes the training-mode message; where torch's own message does
    # not match it (eval: "eps must be non-negative"), bnext's must still name the argument.
    regex = ei.error_regex if re.search(ei.error_regex, str(torch_exc)) else ei.error_regex.split()[0]
    with pytest.raises(ei.error_type, match=regex) as exc_info:
        m_b(x.clone())
    assert type(exc_info.value) is type(torch_exc), (type(exc_info.value), type(torch_exc))
    for k, v in m_b.state_dict().items():
        assert torch.equal(v, before[k]), f"bnext changed buffer {k} in a call that raised"


def _make_noncontig(t):
    """test_modules test_non_contiguous_tensors' transform."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    out.requires_grad = t.requires_grad
    return out


@pytest.mark.parametrize("info,training,index", MODULE_PARAMS)
def test_module_non_contiguous(info, training, index):
    """test_modules test_non_contiguous_tensors, against torch: every (contiguous / non-contiguous
    input) x (contiguous / non-contiguous grad_output) gives torch's output and gradients."""
    mi = _module_sample(info, training, index)
    (x,) = mi.forward_input.args
    m_t, m_b = _make_pair(info, mi, training, randomize=True)
    grad_output = torch.randn_like(x)  # BatchNorm's output has the input's shape
    inputs = [x.detach(), _make_noncontig(x.detach())]
    grads = [grad_output, _make_noncontig(grad_output)]
    for (ii, inp), (gi, g_out) in itertools.product(enumerate(inputs), enumerate(grads)):
        tag = f"input {'nc' if ii else 'contig'}, grad_output {'nc' if gi else 'contig'}"
        x_t = inp.clone() if ii == 0 else _make_noncontig(x.detach())
        x_b = inp.clone() if ii == 0 else _make_noncontig(x.detach())
        x_t.requires_grad_()
        x_b.requires_grad_()
        for p in list(m_t.parameters()) + list(m_b.parameters()):
            p.grad = None
        out_t = m_t(x_t)
        out_b = m_b(x_b)
        close(out_b, out_t, msg=f"{tag}: output")
        out_t.backward(copy.deepcopy(g_out))
        out_b.backward(copy.deepcopy(g_out))
        close(x_b.grad, x_t.grad, msg=f"{tag}: input grad")
        for (n, pt), pb in zip(m_t.named_parameters(), m_b.parameters()):
            close(pb.grad, pt.grad, msg=f"{tag}: grad {n}")
        _compare_buffers(m_b, m_t, msg=tag)


def _mem_formats(x):
    if x.dim() == 4:
        return [torch.contiguous_format, torch.channels_last], [torch.preserve_format, torch.contiguous_format,
                                                                 torch.channels_last]
    if x.dim() == 5:
        return [torch.contiguous_format, torch.channels_last_3d], [torch.preserve_format, torch.contiguous_format,
                                                                    torch.channels_last_3d]
    return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]


def _format_of(t):
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if t.is_contiguous(memory_format=fmt):
            return fmt
    return None


@pytest.mark.parametrize("info,training,index", MODULE_PARAMS)
def test_module_memory_format(info, training, index):
    """test_modules test_memory_format, against torch: for every input x module memory format,
    output and gradients equal torch's, and their memory formats are torch's."""
    mi = _module_sample(info, training, index)
    (x,) = mi.forward_input.args
    m_t, m_b = _make_pair(info, mi, training, randomize=True)
    in_fmts, mod_fmts = _mem_formats(x)
    g = torch.rand_like(x)
    for in_fmt, mod_fmt in itertools.product(in_fmts, mod_fmts):
        tag = f"input {in_fmt}, module {mod_fmt}"
        m_t.to(memory_format=mod_fmt)
        m_b.to(memory_format=mod_fmt)
        x_t = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
        x_b = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
        out_t, out_b = m_t(x_t), m_b(x_b)
        close(out_b, out_t, msg=f"{tag}: output")
        assert _format_of(out_b) == _format_of(out_t), f"{tag}: output format {_format_of(out_b)}, torch's {_format_of(out_t)}"
        assert out_b.stride() == out_t.stride() or out_b.numel() == 0, f"{tag}: strides {out_b.stride()} vs torch {out_t.stride()}"
        if training:
            gt = torch.autograd.grad(out_t, [x_t] + list(m_t.parameters()), torch.empty_like(out_t).copy_(g))
            gb = torch.autograd.grad(out_b, [x_b] + list(m_b.parameters()), torch.empty_like(out_b).copy_(g))
            close(gb, gt, msg=f"{tag}: grads")
            assert _format_of(gb[0]) == _format_of(gt[0]), f"{tag}: grad_input format {_format_of(gb[0])}, torch's {_format_of(gt[0])}"
        _compare_buffers(m_b, m_t, msg=tag)


# ------------------------------------------------------------------------------------------------
# 4. OpInfo 'nn.functional.batch_norm' (test_ops_gradients.py, test_ops_fwd_gradients.py, test_ops.py)
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _op_samples_cached(dtype, requires_grad):
    torch.manual_seed(0)
    return tuple(OPINFO.sample_inputs(DEVICE, dtype, requires_grad=requires_grad))


def _fresh(sample):
    """A copy of a SampleInput with fresh leaf tensors (same values, same requires_grad); tensors
    the generator shares between arguments stay shared, as in the generated sample."""
    memo = {}

    def c(t):
        if isinstance(t, torch.Tensor):
            if id(t) not in memo:
                memo[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
            return memo[id(t)]
        return t

    new = copy.copy(sample)
    new.input = c(sample.input)
    new.args = tuple(c(a) for a in sample.args)
    new.kwargs = {k: c(v) for k, v in sample.kwargs.items()}
    return new


def _op_samples(dtype, requires_grad):
    return [_fresh(s) for s in _op_samples_cached(dtype, requires_grad)]


def _sample_id(i, s):
    shape = "x".join(map(str, s.input.shape)) or "scalar"
    kw = ",".join(f"{k}={v}" for k, v in s.kwargs.items())
    nones = "".join("N" if a is None else "T" for a in s.args)
    return f"s{i:02d}-{shape}-{nones}-{kw or 'defaults'}"


OP_SAMPLE_IDS = [_sample_id(i, s) for i, s in enumerate(_op_samples(torch.float64, False))]
OP_PARAMS = [pytest.param(i, id=sid) for i, sid in enumerate(OP_SAMPLE_IDS)]


def _op_sample(index, dtype=torch.float64, requires_grad=True):
    return _fresh(_op_samples_cached(dtype, requires_grad)[index])


def _gradcheck_fn(variant, sample):
    """TestGradients._check_helper's fn and gradcheck_args for one sample."""
    all_args = tuple(itertools.chain((sample.input,), sample.args, sample.kwargs.values()))
    gradcheck_args = tuple(x for x in all_args if isinstance(x, torch.Tensor) and x.requires_grad)

    def recompose(inputs, inp, idx):
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            return inputs[idx], idx + 1
        return inp, idx

    def fn(*inputs):
        positional, idx = [], 0
        inp, idx = recompose(inputs, sample.input, idx)
        positional.append(inp)
        for x in sample.args:
            inp, idx = recompose(inputs, x, idx)
            positional.append(inp)
        kwargs = {}
        for k, v in sample.kwargs.items():
            inp, idx = recompose(inputs, v, idx)
            kwargs[k] = inp
        output = OPINFO.gradcheck_wrapper(variant, *positional, **kwargs)
        if sample.output_process_fn_grad is not None:
            return sample.output_process_fn_grad(output)
        return output

    return fn, gradcheck_args


def _run_check(variant, sample, check, gen_non_contig_grad_outputs=False):
    fn, args = _gradcheck_fn(variant, sample)
    op = OPINFO
    if check == "fn_grad":  # test_ops_gradients.test_fn_grad -> _grad_test_helper(defaults)
        assert gradcheck(fn, args, check_batched_grad=op.check_batched_grad, check_grad_dtypes=True,
                         nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode,
                         check_forward_ad=False, check_backward_ad=True, check_undefined_grad=True,
                         check_batched_forward_grad=False)
    elif check == "forward_mode_AD":  # test_ops_fwd_gradients.test_forward_mode_AD
        assert gradcheck(fn, args, check_batched_grad=False, check_grad_dtypes=True,
                         nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode,
                         check_forward_ad=True, check_backward_ad=False, check_undefined_grad=True,
                         check_batched_forward_grad=op.check_batched_forward_grad)
    elif check == "bwgrad_bwgrad":  # test_ops_gradients.test_fn_gradgrad
        assert gradgradcheck(fn, args, gen_non_contig_grad_outputs=gen_non_contig_grad_outputs,
                             check_batched_grad=op.check_batched_gradgrad, check_grad_dtypes=True,
                             nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode)
    elif check == "fwgrad_bwgrad":  # test_ops_fwd_gradients.test_fn_fwgrad_bwgrad
        assert gradgradcheck(fn, args, gen_non_contig_grad_outputs=gen_non_contig_grad_outputs,
                             check_batched_grad=False, check_grad_dtypes=True,
                             nondet_tol=op.gradcheck_nondet_tol, fast_mode=op.gradcheck_fast_mode,
                             check_fwd_over_rev=True, check_rev_over_rev=False, check_undefined_grad=False)
    else:
        raise ValueError(check)


def _has_grad_args(sample):
    return any(isinstance(t, torch.Tensor) and t.requires_grad
               for t in itertools.chain((sample.input,), sample.args, sample.kwargs.values()))


@pytest.mark.parametrize("check", ["fn_grad", "forward_mode_AD"])
@pytest.mark.parametrize("index", OP_PARAMS)
def test_op_gradcheck(index, check):
    """gradcheck of bnext.batch_norm on the OpInfo's float64 samples with test_ops_gradients'
    test_fn_grad flags (check_batched_grad, check_backward_ad, check_undefined_grad) and
    test_ops_fwd_gradients' test_forward_mode_AD flags (check_forward_ad,
    check_batched_forward_grad, check_undefined_grad)."""
    same_check(f"gradcheck[{check}]", lambda: _run_check(bnext.batch_norm, _op_sample(index), check),
               lambda: _run_check(F.batch_norm, _op_sample(index), check))


@pytest.mark.parametrize("non_contig_grad_outputs", [False, True], ids=["contig_go", "noncontig_go"])
@pytest.mark.parametrize("check", ["bwgrad_bwgrad", "fwgrad_bwgrad"])
@pytest.mark.parametrize("index", OP_PARAMS)
def test_op_gradgradcheck(index, check, non_contig_grad_outputs):
    """gradgradcheck as test_fn_gradgrad (check_batched_grad=True) and test_fn_fwgrad_bwgrad
    (check_fwd_over_rev=True), each with contiguous and non-contiguous grad outputs."""
    same_check(f"gradgradcheck[{check}]",
               lambda: _run_check(bnext.batch_norm, _op_sample(index), check, non_contig_grad_outputs),
               lambda: _run_check(F.batch_norm, _op_sample(index), check, non_contig_grad_outputs))


def _call(fn, sample, transform=None):
    """fn on a private copy of the sample (running stats are mutated in training): output, the
    copied args (for their grads / running stats)."""
    inp, args = clone_tree((sample.input, sample.args))
    if transform is not None:
        inp = transform(inp)
    return fn(inp, *args, **sample.kwargs), inp, args


def _grads_of(out, inp, args, g):
    leaves = [t for t in (inp, args[2], args[3]) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not out.requires_grad or not leaves:
        return ()
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", OP_PARAMS)
def test_op_parity(index, dtype):
    """Forward (and backward) of bnext.batch_norm equals torch's on every OpInfo sample for each of
    the OpInfo's dtypes, including the (0,) samples (torch returns an empty tensor), with the
    running statistics after the call."""
    sample = _op_sample(index, dtype)
    out_t, inp_t, args_t = torch_first("the forward", lambda: _call(F.batch_norm, sample))
    out_b, inp_b, args_b = _call(bnext.batch_norm, sample)
    assert out_b.shape == out_t.shape and out_b.dtype == out_t.dtype, (out_b.shape, out_b.dtype, out_t.shape, out_t.dtype)
    close(out_b, out_t, dtype=dtype, msg="output")
    for name, a_b, a_t in zip(("running_mean", "running_var"), args_b[:2], args_t[:2]):
        if a_t is not None:
            close(a_b, a_t, dtype=dtype, msg=name)
    assert out_b.requires_grad == out_t.requires_grad
    g = torch.randn_like(out_t)
    gt = _grads_of(out_t, inp_t, args_t, g)
    gb = _grads_of(out_b, inp_b, args_b, g)
    close(gb, gt, dtype=dtype, msg="grads")


@pytest.mark.parametrize("index", OP_PARAMS)
def test_op_noncontiguous_samples(index):
    """test_ops TestCommon.test_noncontiguous_samples (float32): bnext on sample.noncontiguous()
    equals torch on the contiguous sample, forward and gradients."""
    dtype = torch.float32
    sample = _op_sample(index, dtype)
    nc = sample.noncontiguous()
    out_t, inp_t, args_t = torch_first("the forward", lambda: _call(F.batch_norm, sample))
    out_b, inp_b, args_b = _call(bnext.batch_norm, nc)
    close(out_b, out_t, dtype=dtype, msg="output")
    g = torch.randn_like(out_t)
    gt = _grads_of(out_t, inp_t, args_t, g)
    gb = _grads_of(out_b, inp_b, args_b, noncontiguous_like(g))
    close(gb, gt, dtype=dtype, msg="grads")


@pytest.mark.parametrize("index", OP_PARAMS)
def test_op_neg_view(index):
    """test_ops TestMathBits.test_neg_view (float64): an input carrying the negative bit
    (torch._neg_view of the physically negated input) gives the same output and grads."""
    sample = _op_sample(index, torch.float64, requires_grad=OPINFO.supports_autograd)

    def neg_view(t):
        with torch.no_grad():
            t = torch.neg(t)
        t = torch._neg_view(t)
        assert t.is_leaf
        return t.requires_grad_(sample.input.requires_grad)

    results = {}
    for name, fn in (("torch", F.batch_norm), ("bnext", bnext.batch_norm)):
        def run(fn=fn):
            exp, inp_e, args_e = _call(fn, sample)
            act, inp_a, args_a = _call(fn, sample, transform=neg_view)
            assert torch.is_neg(inp_a) or inp_a.numel() == 0
            close(act, exp, msg=f"{name}: forward with a neg view")
            grads = []
            if exp.requires_grad:
                exp.sum().abs().backward(retain_graph=True)
                act.sum().abs().backward(retain_graph=True)
                if inp_e.grad is not None:
                    close(inp_a.grad, inp_e.grad, msg=f"{name}: grad through sum().abs()")
                    grads.append(inp_e.grad.clone())
                    inp_e.grad, inp_a.grad = None, None
                    g = torch.randn(exp.shape, dtype=exp.dtype, generator=torch.Generator().manual_seed(7))
                    exp.backward(g)
                    act.backward(torch._neg_view(torch.neg(g)))
                    close(inp_a.grad, inp_e.grad, msg=f"{name}: grad with a random grad_output")
                    grads.append(inp_e.grad.clone())
            return act.detach(), grads
        results[name] = torch_first("test_neg_view", run) if name == "torch" else run()
    close(results["bnext"], results["torch"], msg="bnext vs torch")


def test_op_error_inputs():
    """test_ops TestCommon.test_errors on the OpInfo's error inputs."""
    if OPINFO.error_inputs_func is None:
        pytest.skip("the nn.functional.batch_norm OpInfo defines no error_inputs_func in this torch "
                    f"({torch.__version__}); bad inputs are covered by tests/test_errors.py")
    for ei in OPINFO.error_inputs(DEVICE):
        s = ei.sample_input
        with pytest.raises(ei.error_type, match=ei.error_regex):
            bnext.batch_norm(s.input, *s.args, **s.kwargs)


# ------------------------------------------------------------------------------------------------
# 5. torch.func (test/functorch/test_ops.py, test/functorch/common_utils.py)
# ------------------------------------------------------------------------------------------------


def _diff_argnums(args):
    return tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad)


def _autograd_grad(outputs, inputs, grad_outputs=None):
    """functorch test_ops' _autograd_grad: zeros where an input is unused."""
    diff_inputs = tuple(i for i in inputs if i.requires_grad)
    res = torch.autograd.grad(outputs, diff_inputs, grad_outputs, retain_graph=True, create_graph=True,
                              allow_unused=True)
    it = iter(res)
    out = []
    for i in inputs:
        r = next(it) if i.requires_grad else None
        out.append(torch.zeros_like(i) if r is None else r)
    return tuple(out)


def _normalize(fn, sample):
    """functorch's normalize_op_input_output: f(*primals) over the differentiable args."""
    args = [sample.input] + list(sample.args)
    diff = _diff_argnums(args)
    primals = tuple(args[i] for i in diff)

    def wrapped(*ps):
        a = list(args)
        for i, p in zip(diff, ps):
            a[i] = p
        return fn(*a, **sample.kwargs)

    return wrapped, primals


FUNC_TOL = {"rtol": 5e-5, "atol": 4e-5}  # functorch test_jvp's override for batch_norm, float32


def _func_grad(fn, sample):
    """functorch TestOperators.test_grad: grad of the summed output, contiguous and non-contiguous."""
    args = [sample.input] + list(sample.args)
    nc = sample.noncontiguous()
    nc_args = [nc.input] + list(nc.args)
    diff = _diff_argnums(args)

    def summed(*a, **kw):
        return fn(*a, **kw).sum()

    result = torch.func.grad(summed, diff)(*args, **sample.kwargs)
    result_nc = torch.func.grad(summed, diff)(*nc_args, **sample.kwargs)
    expected = _autograd_grad((summed(*args, **sample.kwargs),), tuple(args[i] for i in diff))
    close(result, expected, dtype=torch.float32, msg="grad vs autograd", **FUNC_TOL)
    close(result_nc, expected, dtype=torch.float32, msg="grad (non-contiguous) vs autograd", **FUNC_TOL)
    return result


def _func_vjp(fn, sample):
    """functorch TestOperators.test_vjp."""
    f, primals = _normalize(fn, sample)
    result = f(*primals)
    cot = torch.randn_like(result)
    nf, nprimals = _normalize(fn, sample.noncontiguous())
    out, vjp_fn = torch.func.vjp(f, *primals)
    close(out, result, dtype=torch.float32, msg="vjp primal out", **FUNC_TOL)
    got = vjp_fn(cot)
    out_nc, vjp_nc = torch.func.vjp(nf, *nprimals)
    close(out_nc, result, dtype=torch.float32, msg="vjp primal out (non-contiguous)", **FUNC_TOL)
    got_nc = vjp_nc(noncontiguous_like(cot))
    expected = _autograd_grad((f(*primals),), primals, (cot,))
    close(got, expected, dtype=torch.float32, msg="vjp vs autograd", **FUNC_TOL)
    close(got_nc, expected, dtype=torch.float32, msg="vjp (non-contiguous) vs autograd", **FUNC_TOL)
    return got


def _func_jvp(fn, sample):
    """functorch TestOperators.test_jvp: torch.func.jvp vs forward-mode AD (ref_jvp)."""
    import torch.autograd.forward_ad as fwAD
    f, primals = _normalize(fn, sample)
    primals = tuple(p.detach() for p in primals)
    tangents = tuple(torch.randn_like(p) for p in primals)
    with fwAD.dual_level():
        duals = tuple(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))
        exp_p, exp_t = fwAD.unpack_dual(f(*duals))
    nf, nprimals = _normalize(fn, sample.noncontiguous())
    nprimals = tuple(p.detach() for p in nprimals)
    p_out, t_out = torch.func.jvp(f, primals, tangents)
    np_out, nt_out = torch.func.jvp(nf, nprimals, tuple(noncontiguous_like(t) for t in tangents))
    close(p_out, exp_p, dtype=torch.float32, msg="jvp primal", **FUNC_TOL)
    close(t_out, exp_t, dtype=torch.float32, msg="jvp tangent vs forward AD", **FUNC_TOL)
    close(np_out, exp_p, dtype=torch.float32, msg="jvp primal (non-contiguous)", **FUNC_TOL)
    close(nt_out, exp_t, dtype=torch.float32, msg="jvp tangent (non-contiguous)", **FUNC_TOL)
    return p_out, t_out


def _func_jac(fn, sample, which):
    f, primals = _normalize(fn, sample)
    jac = {"jacrev": torch.func.jacrev, "jacfwd": torch.func.jacfwd}[which]
    return jac(f, argnums=tuple(range(len(primals))))(*(p.detach() for p in primals))


FUNC_CHECKS = {
    "grad": (torch.float32, _func_grad),
    "vjp": (torch.float32, _func_vjp),
    "jvp": (torch.float32, _func_jvp),
    "jacrev": (torch.float64, lambda fn, s: _func_jac(fn, s, "jacrev")),
    "jacfwd": (torch.float64, lambda fn, s: _func_jac(fn, s, "jacfwd")),
}


@pytest.mark.parametrize("transform", list(FUNC_CHECKS))
@pytest.mark.parametrize("index", OP_PARAMS)
def test_func_transforms(index, transform):
    """torch.func grad / vjp / jvp as functorch's TestOperators does (float32, each checked against
    autograd and with non-contiguous samples), and jacrev / jacfwd (float64); bnext's result is also
    compared with torch's."""
    dtype, check = FUNC_CHECKS[transform]
    # the same random cotangents / tangents for torch and bnext
    expected = torch_first(f"torch.func.{transform}",
                           lambda: (torch.manual_seed(1), check(F.batch_norm, _op_sample(index, dtype)))[1])
    torch.manual_seed(1)
    actual = check(bnext.batch_norm, _op_sample(index, dtype))
    close(actual, expected, dtype=dtype, msg=f"bnext vs torch ({transform})",
          **(FUNC_TOL if dtype == torch.float32 else {}))


def _is_batch_norm_training(kwargs):
    flags = [v for v in kwargs.values() if isinstance(v, bool)]
    return flags[0] if flags else False  # F.batch_norm defaults to training=False


def _bdim_choices(num_tensors, arg_values, training):
    """functorch common_utils get_bdim_choices / get_bdim_choices_batch_norm."""
    options = (-1, None)
    if not training:
        choices = [(0,) * num_tensors] + list(itertools.product(options, repeat=num_tensors))
        return tuple(choices[:-1])
    _, running_mean, running_var = (list(arg_values) + [None, None])[:3]
    choices = []
    if running_mean is None or running_var is None:
        choices.append((None,) + (0,) * (num_tensors - 1))
        for c in itertools.product(options, repeat=num_tensors - 1):
            choices.append((None,) + c)
    else:
        choices.append((0,) * num_tensors)
        for c in itertools.product(options, repeat=num_tensors):
            if c[0] and (not c[1] or not c[2]):
                continue
            choices.append(c)
    assert choices[-1] == (None,) * num_tensors
    return tuple(choices[:-1])


def _add_batch_dim(arg, bdim, batch_size=2):
    if bdim == 0:
        shape = [1] * arg.dim()
        shape.insert(0, batch_size)
        return arg.repeat(shape)
    return arg.unsqueeze(-1).expand(*arg.shape, batch_size).contiguous()


def _vmap_params():
    params = []
    for i, s in enumerate(_op_samples(torch.float64, False)):
        arg_values = [s.input] + list(s.args)
        flat, _ = pytree.tree_flatten(tuple(arg_values))
        n = sum(isinstance(a, torch.Tensor) for a in flat)
        training = _is_batch_norm_training(s.kwargs)
        if n == 1 and training:
            continue  # functorch: only an input, nothing to batch the running stats with
        for c in _bdim_choices(n, arg_values, training):
            params.append(pytest.param(i, c, id=f"{OP_SAMPLE_IDS[i]}-in_dims{''.join('N' if d is None else str(d) for d in c)}"))
    return params


def _vmap_exhaustive(fn, sample, choice):
    """functorch get_fallback_and_vmap_exhaustive for one in_dims choice: vmap(fn) equals the
    unbatched result expanded, vmap(vmap(fn)) with an outer dummy batch equals vmap(fn) unsqueezed,
    and vmap(fn) equals a Python loop over the batch (which also gives the running stats)."""
    batch_size = 2
    arg_values = [sample.input] + list(sample.args)
    flat, spec = pytree.tree_flatten(tuple(arg_values))
    is_t = [isinstance(a, torch.Tensor) for a in flat]
    it = iter(choice)
    flat_dims = [next(it) if t else None for t in is_t]
    batched = [a if d is None else _add_batch_dim(a.detach(), d, batch_size) for a, d in zip(flat, flat_dims)]
    in_dims = pytree.tree_unflatten(flat_dims, spec)
    kwargs = sample.kwargs

    args_u = clone_tree(arg_values)
    expected_unbatched = fn(*args_u, **kwargs)
    expected = expected_unbatched.expand(batch_size, *expected_unbatched.shape)

    args_v = clone_tree(pytree.tree_unflatten(batched, spec))
    out = torch.func.vmap(fn, in_dims=in_dims)(*args_v, **kwargs)
    close(out, expected, msg="vmap vs unbatched")

    def f(dummy, *a, **kw):
        return fn(*a, **kw)

    args_vv = clone_tree(pytree.tree_unflatten(batched, spec))
    inner = (0,) + pytree.tree_map(lambda x: None, in_dims)
    outer = (0,) + in_dims
    out_vv = torch.func.vmap(torch.func.vmap(f, inner), outer)(torch.ones(batch_size, 1), *args_vv, **kwargs)
    close(out_vv, out.unsqueeze(1), msg="vmap(vmap) vs vmap")

    args_l = clone_tree(pytree.tree_unflatten(batched, spec))
    fl, _ = pytree.tree_flatten(args_l)
    loop_out = []
    for b in range(batch_size):
        sl = [a.select(d, b) if d is not None else a for a, d in zip(fl, flat_dims)]
        loop_out.append(fn(*pytree.tree_unflatten(sl, spec), **kwargs))
    close(out, torch.stack(loop_out), msg="vmap vs loop")
    stats = [(a, d is not None) for a, d in zip(args_v[1:3], in_dims[1:3]) if isinstance(a, torch.Tensor)]
    loop_stats = [a for a in args_l[1:3] if isinstance(a, torch.Tensor)]
    once_stats = [a for a in args_u[1:3] if isinstance(a, torch.Tensor)]
    return out, out_vv, stats, loop_stats, once_stats


@pytest.mark.parametrize("index,choice", _vmap_params())
def test_func_vmap_exhaustive(index, choice):
    """functorch's vmap exhaustive test of nn.functional.batch_norm (float64), bnext substituted,
    compared with torch's own vmap result (and running stats)."""
    expected = torch_first("vmap", lambda: _vmap_exhaustive(F.batch_norm, _op_sample(index, requires_grad=False), choice))
    actual = _vmap_exhaustive(bnext.batch_norm, _op_sample(index, requires_grad=False), choice)
    close(actual[:2], expected[:2], msg="bnext vs torch")
    # Running statistics batched along the vmapped dimension: each member's statistics must be
    # what a loop over the members gives (vmap(f) replaceable by map(f)). bnext's are; torch's own
    # batching rule gives other values for some in_dims choices (e.g. statistics batched at -1),
    # so its result is not the reference there. Statistics that are not batched take the
    # statistics of an input that is not batched, once per vmapped call: what the call without
    # vmap does (torch leaves them unchanged when the other running statistic is batched).
    for (ours, batched), loop, once in zip(actual[2], actual[3], actual[4]):
        if batched:
            close(ours, loop, msg="bnext vmap running stats vs a loop over the members")
        else:
            close(ours, once, msg="bnext vmap running stats (not batched) vs the call without vmap")


class _TinyNet(torch.nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = bn
        self.fc = torch.nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("dim", [2, 1], ids=["BatchNorm2d", "BatchNorm1d-NC"])
def test_func_per_sample_grads(dim):
    """Per-sample gradients of a tiny model with a bnext layer (track_running_stats=False) via
    torch.func.functional_call + vmap(grad), equal to a loop of per-sample autograd grads and to
    torch's BatchNorm twin."""
    torch.manual_seed(0)
    if dim == 2:
        bn_t, bn_b = torch.nn.BatchNorm2d(4, track_running_stats=False), bnext.BatchNorm2d(4, track_running_stats=False)
        net_t = _TinyNet(bn_t).double()
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    else:
        bn_t, bn_b = torch.nn.BatchNorm1d(4, track_running_stats=False), bnext.BatchNorm1d(4, track_running_stats=False)
        net_t = torch.nn.Sequential(torch.nn.Linear(3, 4), bn_t, torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        x = torch.randn(6, 5, 3, dtype=torch.float64)  # each sample: (5, 3), a batch of 5 rows for BN1d
    with torch.no_grad():
        for p in bn_t.parameters():
            p.copy_(torch.randn_like(p))
    net_b = copy.deepcopy(net_t)
    if dim == 2:
        net_b.bn = bn_b.double()
    else:
        net_b[1] = bn_b.double()
    net_b.load_state_dict(net_t.state_dict())
    y = torch.randn(x.shape[0], *((5,) if dim == 1 else ()), 2, dtype=torch.float64)

    def per_sample_grads(net):
        params = {k: v.detach() for k, v in net.named_parameters()}

        def loss(p, xi, yi):
            xi = xi.unsqueeze(0) if dim == 2 else xi
            out = torch.func.functional_call(net, p, (xi,))
            return torch.nn.functional.mse_loss(out.squeeze(0) if dim == 2 else out, yi)

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)

    def loop_grads(net):
        names = [k for k, _ in net.named_parameters()]
        out = {k: [] for k in names}
        for xi, yi in zip(x, y):
            o = net(xi.unsqueeze(0) if dim == 2 else xi)
            l = torch.nn.functional.mse_loss(o.squeeze(0) if dim == 2 else o, yi)
            gs = torch.autograd.grad(l, list(net.parameters()))
            for k, g in zip(names, gs):
                out[k].append(g)
        return {k: torch.stack(v) for k, v in out.items()}

    expected_loop = loop_grads(net_t)
    expected = torch_first("per-sample grads (vmap(grad))", lambda: per_sample_grads(net_t))
    close(expected, expected_loop, msg="torch: vmap(grad) vs loop")
    close(loop_grads(net_b), expected_loop, msg="bnext loop vs torch loop")
    close(per_sample_grads(net_b), expected_loop, msg="bnext vmap(grad) vs loop")


# ------------------------------------------------------------------------------------------------
# 6. CompositeCompliance (test_ops.py TestCompositeCompliance), float32 as there
# ------------------------------------------------------------------------------------------------


def _cc_assert_equal(tol=None):
    tol = tol or TOL[torch.float32]

    def assert_equal(actual, expected, equal_nan=True, **_):
        torch.testing.assert_close(actual, expected, equal_nan=equal_nan, **tol)

    return assert_equal


def _cc_check(fn, index, which):
    dtype = torch.float32
    if which == "operator":
        s = _op_sample(index, dtype, requires_grad=False)
        args, kwargs = [s.input] + list(s.args), s.kwargs
        composite_compliance.check_with_mode(fn, args, kwargs, _cc_assert_equal())
        s = _op_sample(index, dtype, requires_grad=False)
        args, kwargs = [s.input] + list(s.args), s.kwargs
        composite_compliance.check_all_permutations(fn, args, kwargs, _cc_assert_equal())
    elif which == "backward":
        s = _op_sample(index, dtype, requires_grad=True)
        args, kwargs = [s.input] + list(s.args), s.kwargs
        composite_compliance.check_backward_formula(fn, args, kwargs, s.output_process_fn_grad,
                                                    OPINFO.gradcheck_wrapper, _cc_assert_equal())
    elif which == "forward_ad":
        s = _op_sample(index, dtype, requires_grad=True)
        args, kwargs = [s.input] + list(s.args), s.kwargs
        # OpInfo's toleranceOverride for TestCompositeCompliance.test_forward_ad on CPU
        composite_compliance.check_forward_ad_formula(fn, args, kwargs, OPINFO.gradcheck_wrapper,
                                                      _cc_assert_equal(dict(atol=5e-05, rtol=1e-05)))
    else:
        raise ValueError(which)


def _cc_params():
    return [pytest.param(i, w, id=f"{sid}-{w}") for i, sid in enumerate(OP_SAMPLE_IDS)
            for w in ("operator", "backward", "forward_ad")]


@pytest.mark.parametrize("index,which", _cc_params())
def test_composite_compliance(index, which):
    """TestCompositeCompliance.test_operator (check_with_mode + check_all_permutations),
    test_backward (check_backward_formula) and test_forward_ad (check_forward_ad_formula) on the
    OpInfo's float32 samples with bnext.batch_norm, after torch's F.batch_norm passed the same
    check; bnext's output is also compared with torch's."""
    s = _op_sample(index, torch.float32, requires_grad=False)
    expected = torch_first("the forward", lambda: F.batch_norm(s.input, *clone_tree(s.args), **s.kwargs))
    same_check(f"composite compliance ({which})", lambda: _cc_check(bnext.batch_norm, index, which),
               lambda: _cc_check(F.batch_norm, index, which))
    actual = bnext.batch_norm(s.input, *clone_tree(s.args), **s.kwargs)
    close(actual, expected, dtype=torch.float32, msg="bnext vs torch output")
