"""bnext.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: outputs, every gradient, running
statistics and num_batches_tracked over several training steps, then eval; output strides."""
import copy

import pytest
import torch
from torch import nn

import bnext
from conftest import DEVICES, assert_close, make_input

SHAPES = {
    "2d": ((6, 5), 1),  # BatchNorm1d on (N, C)
    "3d": ((4, 5, 7), 1),  # BatchNorm1d on (N, C, L)
    "4d": ((3, 5, 4, 6), 2),
    "5d": ((2, 5, 3, 4, 3), 3),
}
LAYOUTS = {
    "2d": ["contiguous", "strided"],
    "3d": ["contiguous", "strided"],
    "4d": ["contiguous", "channels_last", "strided"],
    "5d": ["contiguous", "channels_last", "strided"],
}
CASES = [(dim, layout) for dim in SHAPES for layout in LAYOUTS[dim]]
# (input dtype, parameter dtype): half types run with float32 parameters (AMP) and with their own.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
FLAGS = [
    dict(affine=True, bias=True, track_running_stats=True, momentum=0.1),
    dict(affine=True, bias=False, track_running_stats=True, momentum=None),
    dict(affine=False, bias=True, track_running_stats=True, momentum=0.3),
    dict(affine=True, bias=True, track_running_stats=False, momentum=0.1),
]


def module_pair(nd, C, flags, param_dtype, device):
    torch_cls = getattr(nn, f"BatchNorm{nd}d")
    ref = torch_cls(C, eps=1e-3, device=device, dtype=param_dtype, **flags)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    ours = getattr(bnext, f"BatchNorm{nd}d")(C, eps=1e-3, device=device, dtype=param_dtype, **flags)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch_cls)
    return ref, ours


def step_and_compare(ref, ours, x, dtype, what):
    xr = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert yo.dtype == yr.dtype and yo.shape == yr.shape
    assert yo.stride() == yr.stride(), f"{what}: output strides {yo.stride()} != torch's {yr.stride()}"
    assert_close(yo, yr, dtype, f"{what}: output")
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert_close(xo.grad, xr.grad, dtype, f"{what}: grad_input")
    for name in ("weight", "bias"):
        pr, po = getattr(ref, name), getattr(ours, name)
        if pr is not None:
            assert_close(po.grad, pr.grad, dtype, f"{what}: grad_{name}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        br, bo = getattr(ref, name), getattr(ours, name)
        assert (br is None) == (bo is None)
        if br is not None:
            assert bo.dtype == br.dtype
            if not br.is_floating_point():
                assert torch.equal(bo, br), f"{what}: {name} {bo} != {br}"
                continue
            # Buffers stored in a half type round like it; float buffers of a half input carry
            # float32-accumulated statistics.
            low = (torch.float16, torch.bfloat16)
            tol = br.dtype if br.dtype in low else (torch.float32 if dtype in low else dtype)
            assert_close(bo, br, tol, f"{what}: {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dim,layout", CASES)
def test_module_parity(dim, layout, dtype, param_dtype, flags, device):
    shape, nd = SHAPES[dim]
    ref, ours = module_pair(nd, shape[1], flags, param_dtype, device)
    for step in range(3):
        ref.zero_grad()
        ours.zero_grad()
        step_and_compare(ref, ours, make_input(shape, dtype, layout, device), dtype, f"train step {step}")
    ref.eval()
    ours.eval()
    ref.zero_grad()
    ours.zero_grad()
    step_and_compare(ref, ours, make_input(shape, dtype, layout, device), dtype, "eval")


@pytest.mark.parametrize("device", DEVICES)
def test_eval_without_running_stats_uses_batch_statistics(device):
    ref = nn.BatchNorm2d(4, track_running_stats=False, device=device).eval()
    ours = bnext.BatchNorm2d(4, track_running_stats=False, device=device).eval()
    x = make_input((3, 4, 5, 5), torch.float32, "contiguous", device)
    assert_close(ours(x), ref(x))
    assert ours.running_mean is None and ours.num_batches_tracked is None


@pytest.mark.parametrize("device", DEVICES)
def test_functional_matches_torch(device):
    x = make_input((4, 3, 5, 5), torch.float64, "contiguous", device)
    w = torch.rand(3, dtype=torch.float64, device=device)
    b = torch.rand(3, dtype=torch.float64, device=device)
    rm_r, rv_r = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    rm_o, rv_o = rm_r.clone(), rv_r.clone()
    for training in (True, False):
        yr = torch.nn.functional.batch_norm(x, rm_r, rv_r, w, b, training, 0.2, 1e-4)
        yo = bnext.batch_norm(x, rm_o, rv_o, w, b, training, 0.2, 1e-4)
        assert_close(yo, yr)
        assert_close(rm_o, rm_r)
        assert_close(rv_o, rv_r)
    # Training with no running statistics and no affine parameters.
    assert_close(bnext.batch_norm(x, None, None, training=True), torch.nn.functional.batch_norm(x, None, None, training=True))


def test_functional_signature_matches_torch():
    import inspect

    # torch's parameters, in its order, kinds and defaults; bnext adds only the keyword-only mask
    # (bnext.MaskedBatchNorm1d), which no positional call can reach.
    ours = inspect.signature(bnext.batch_norm).parameters
    theirs = inspect.signature(torch.nn.functional.batch_norm).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values() if p.kind != p.KEYWORD_ONLY] == [
        (p.name, p.kind, p.default) for p in theirs.values()
    ]
    extra = [p for p in ours.values() if p.kind == p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in extra] == [("mask", None)]


def test_module_constructor_signature_matches_torch():
    import inspect

    for nd in (1, 2, 3):
        ours = inspect.signature(getattr(bnext, f"BatchNorm{nd}d").__init__)
        theirs = inspect.signature(getattr(nn, f"BatchNorm{nd}d").__init__)
        assert ours == theirs


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_matches_torch(device):
    ref, ours = module_pair(2, 3, FLAGS[0], torch.float32, device)
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    yr, yo = ref(x), ours(x)
    assert yo.shape == yr.shape == x.shape
    yo.sum().backward()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_none_is_cumulative_average(device):
    ours = bnext.BatchNorm1d(3, momentum=None, device=device, dtype=torch.float64)
    batches = [torch.randn(8, 3, device=device, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        ours(x)
    expected_mean = torch.stack([x.mean(0) for x in batches]).mean(0)
    expected_var = torch.stack([x.var(0, unbiased=True) for x in batches]).mean(0)
    assert_close(ours.running_mean, expected_mean)
    assert_close(ours.running_var, expected_var)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_small_cnn_trains_like_torch(device):
    """A small CNN with bnext layers trains like the same CNN with torch layers."""
    torch_model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
        nn.BatchNorm1d(4),
    ).to(device).double()
    ours = bnext.convert_model(copy.deepcopy(torch_model))
    opt_r = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(5, 3, 6, 6, device=device, dtype=torch.float64)
        for model, opt in ((torch_model, opt_r), (ours, opt_o)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(torch_model.state_dict().items(), ours.state_dict().items()):
        assert_close(b, a, msg=n)

