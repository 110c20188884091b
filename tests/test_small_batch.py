"""Layers for small and irregular batches: bnext.FrozenBatchNorm2d / bnext.freeze_batchnorm against
torchvision's FrozenBatchNorm2d, and bnext.BatchRenorm1d/2d/3d against the formulas of Ioffe 2017
(arXiv:1702.03275) written with plain torch ops in float64.

Each layer: outputs and gradients against its reference over dtypes and memory formats, what it
saves for backward, gradcheck/gradgradcheck, torch.compile (one compiled model per layer), export,
TorchScript, torch.func, checkpoint, FX, state_dict both ways, bad arguments.
"""
import copy
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import bnext
from bnext.testing import emulate_cuda
from conftest import assert_close, make_input, randomize_batch_norm, saved_for_backward, tensor_bytes, through_torch_save

TorchvisionFrozen = torchvision.ops.misc.FrozenBatchNorm2d
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def randomize_frozen(layer, C):
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C) + 0.5)
        layer.weight[0] = -0.7  # a negative weight
        layer.bias.copy_(torch.rand(C) - 0.5)
        layer.running_mean.copy_(torch.randn(C))
        layer.running_var.copy_(torch.rand(C) * 2 + 0.1)
    return layer


def frozen_pair(C=6, dtype=torch.float32):
    """(torchvision's layer, bnext's layer) with the same random buffers, in `dtype`."""
    theirs = randomize_frozen(TorchvisionFrozen(C), C)
    ours = bnext.FrozenBatchNorm2d(C)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), ours.to(dtype)


def saved_bytes(fn, x):
    """Bytes of the tensors autograd saves for backward in fn(x), and the tensors."""
    saved, _ = saved_for_backward(fn, x)
    return tensor_bytes(saved), saved


# ----------------------------------------------------------------------------------------------
# FrozenBatchNorm2d


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_matches_torchvision(dtype, layout):
    """Outputs and grad_input equal torchvision's over several random inputs, in training and
    eval (both are frozen); the output keeps the input's dtype and memory format."""
    theirs, ours = frozen_pair(6, dtype)
    for trial in range(3):
        ours.train(trial != 1), theirs.train(trial != 1)
        x = make_input((4, 6, 5, 7), dtype, layout, requires_grad=True)
        xt = x.detach().clone().requires_grad_()
        y, yt = ours(x), theirs(xt)
        assert y.dtype == dtype and y.is_contiguous(memory_format=FORMATS[layout])
        assert_close(y, yt, msg=f"output, trial {trial}")
        g = torch.randn_like(y)
        y.backward(g)
        yt.backward(g)
        assert_close(x.grad, xt.grad, msg=f"grad_input, trial {trial}")
    assert all(not b.requires_grad for b in ours.buffers())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_float32_buffers_with_half_input(dtype):
    """float32 buffers with a half input: the output has the input's dtype, as nn.BatchNorm2d's
    (torchvision's promotes it to float32); the values are torchvision's."""
    theirs, ours = frozen_pair(6)
    x = make_input((4, 6, 5, 5), dtype, "channels_last", requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y, yt = ours(x), theirs(xt)
    assert y.dtype == dtype and yt.dtype == torch.float32
    assert_close(y, yt.to(dtype))
    g = torch.randn_like(y)
    y.backward(g)
    yt.backward(g.float())
    assert x.grad.dtype == dtype
    assert_close(x.grad, xt.grad, dtype=dtype)


def test_frozen_keeps_no_new_tensor_for_backward():
    """What autograd keeps for backward (saved_tensors_hooks), input (8, 64, 28, 28) float32 with only
    the input requiring grad: bnext's layer keeps its own weight and running_var buffers (the same
    storages: no byte beyond what the layer holds anyway), torchvision's layer a per-channel scale
    it allocated (64 floats, 256 bytes), nn.BatchNorm2d in eval the input and three per-channel
    tensors. A buffer changed in place before backward is autograd's version error, not a
    different scale."""
    C = 64
    theirs, ours = frozen_pair(C)
    torch_bn = nn.BatchNorm2d(C).eval().requires_grad_(False)
    torch_bn.load_state_dict(ours.state_dict(), strict=False)

    def new_bytes(layer, x):
        held = {t.untyped_storage().data_ptr() for t in layer.buffers()}
        _, saved = saved_bytes(layer, x)
        return sum(t.numel() * t.element_size() for t in saved if t.untyped_storage().data_ptr() not in held), saved

    x = torch.randn(8, C, 28, 28, requires_grad=True)
    ours_bytes, ours_saved = new_bytes(ours, x)
    theirs_bytes, _ = new_bytes(theirs, x)
    torch_bytes, _ = saved_bytes(torch_bn, x)
    assert ours_bytes == 0 and [t.data_ptr() for t in ours_saved] == [ours.weight.data_ptr(), ours.running_var.data_ptr()]
    assert theirs_bytes == C * 4
    assert torch_bytes == x.numel() * 4 + 3 * C * 4
    # channels_last and float64 alike.
    assert new_bytes(ours, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_())[0] == 0
    assert new_bytes(ours.double(), x.detach().double().requires_grad_())[0] == 0
    ours.float()
    y = ours(x)
    with torch.no_grad():
        ours.running_var.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


class _FullSizeOutputs(TorchDispatchMode):
    """Counts the op calls below autograd whose output has `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(isinstance(o, torch.Tensor) and o.numel() == self.numel for o in outs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("requires_grad", [False, True])
def test_frozen_writes_no_temporary_beyond_the_output(requires_grad):
    """One input-sized tensor is written per call, the output (torchvision's layer writes two: x *
    scale, then + shift)."""
    theirs, ours = frozen_pair(6)
    x = torch.randn(2, 6, 5, 5, requires_grad=requires_grad)
    for layer, expected in ((ours, 1), (theirs, 2)):
        with _FullSizeOutputs(x.numel()) as mode:
            layer(x)
        assert len(mode.ops) == expected, mode.ops


def test_frozen_buffers_that_require_grad_get_gradients():
    """A user who sets the buffers to require grad (as parameters) gets torchvision's gradients."""
    theirs, ours = frozen_pair(6, torch.float64)
    for m in (theirs, ours):
        m.weight.requires_grad_(True)
        m.bias.requires_grad_(True)
    x = make_input((3, 6, 4, 4), torch.float64, "contiguous")
    g = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    ours(x).backward(g)
    theirs(x).backward(g)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)


def test_frozen_gradcheck_and_gradgradcheck():
    _, ours = frozen_pair(3, torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x,))
    assert torch.autograd.gradgradcheck(ours, (x,))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(ours, (xc,))
    # The buffers as differentiable inputs (the eval op's formula).
    w, b = ours.weight.clone().requires_grad_(), ours.bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: functional_call(ours, {"weight": w, "bias": b}, (x,)), (x, w, b))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch's jvp decompositions
def test_frozen_torch_func():
    """vmap, grad, per-sample gradients and jvp give torchvision's layer's results."""
    theirs, ours = frozen_pair(6, torch.float64)
    xs = torch.randn(3, 2, 6, 4, 4, dtype=torch.float64)
    assert_close(vmap(ours)(xs), torch.stack([theirs(x) for x in xs]))

    def loss(layer):
        return lambda x: layer(x).square().sum()

    assert_close(grad(loss(ours))(xs[0]), grad(loss(theirs))(xs[0]))
    per_sample = vmap(grad(lambda x: loss(ours)(x[None])))(xs[0])
    assert_close(per_sample, vmap(grad(lambda x: loss(theirs)(x[None])))(xs[0]))
    t = torch.randn_like(xs[0])
    (y, ty), (yt, tyt) = jvp(ours, (xs[0],), (t,)), jvp(theirs, (xs[0],), (t,))
    assert_close(y, yt)
    assert_close(ty, tyt)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_frozen_checkpoint(use_reentrant):
    theirs, ours = frozen_pair(6)
    conv = nn.Conv2d(3, 6, 3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = checkpoint(lambda t: ours(conv(t)), x, use_reentrant=use_reentrant)
    y.square().sum().backward()
    gx, gw = x.grad, conv.weight.grad
    x.grad = conv.weight.grad = None
    theirs(conv(x)).square().sum().backward()
    assert_close(gx, x.grad)
    assert_close(gw, conv.weight.grad)


def test_frozen_state_dict_both_ways():
    """torchvision's checkpoints load into bnext's layer and back, nn.BatchNorm2d's load too (its
    num_batches_tracked dropped), through torch.save as well."""
    theirs, ours = frozen_pair(5)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    back = TorchvisionFrozen(5)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    bn = randomize_batch_norm(nn.BatchNorm2d(5)).eval()
    from_bn = bnext.FrozenBatchNorm2d(5)
    from_bn.load_state_dict(through_torch_save(bn.state_dict()))
    x = torch.randn(2, 5, 3, 3)
    assert_close(from_bn(x), bn(x))
    assert "FrozenBatchNorm2d(5, eps=1e-05)" == repr(from_bn) == repr(TorchvisionFrozen(5))
    restored = pickle.loads(pickle.dumps(ours))
    assert torch.equal(restored(x), ours(x))


def test_frozen_bad_input():
    _, ours = frozen_pair(3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: expected 4D input .*got 3D input"):
        ours(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"weight must have 4 elements .*got shape \[3\]"):
        ours(torch.randn(2, 4, 3, 3, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"weight must have 4 elements .*got shape \[3\]"):
        ours(torch.randn(2, 4, 3, 3))
    with pytest.raises(NotImplementedError, match=r"input must be a floating-point tensor .*got Long"):
        ours(torch.ones(2, 3, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"input must be a Tensor, got list"):
        ours([1.0])
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_torchscript_fx_and_export():
    """Scripted and exported programs hold torch's ops (they run without bnext); in FX the layer is a
    leaf, as bnext's other layers are."""
    _, ours = frozen_pair(6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), ours, nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        scripted = torch.jit.script(model)
    assert_close(scripted(x), expected)
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    assert_close(gm(x), expected)
    ep = torch.export.export(model, (x,)).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "bnext" in t], targets
    assert_close(ep.module()(x), expected)


@pytest.fixture(scope="module")
def compiled_frozen():
    """One compiled Conv -> FrozenBatchNorm2d -> ReLU model (inductor, fullgraph) and its eager twin."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 6, 3), randomize_frozen(bnext.FrozenBatchNorm2d(6), 6), nn.ReLU())
    model = copy.deepcopy(eager)
    return eager, model, torch.compile(model, fullgraph=True, backend="inductor")


def test_frozen_compile_fullgraph(compiled_frozen):
    eager, model, compiled = compiled_frozen
    for step in range(2):
        x = torch.randn(4, 3, 8, 8)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye, msg=f"step {step}: output")
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, msg=f"step {step}: input gradient")
        assert_close(model[0].weight.grad, eager[0].weight.grad, msg=f"step {step}: conv weight gradient")
        eager.zero_grad()
        model.zero_grad()


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # the recording backend
def test_frozen_compiled_graph_saves_per_channel_tensors_only():
    """Under torch.compile the eval op's formula is traced: the compiled forward keeps no input-sized
    tensor for backward, only per-channel ones."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    backend = AotEagerAndRecordGraphs()
    _, ours = frozen_pair(6)
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    compiled(x).sum().backward()
    (output,) = [n for n in backend.fw_graphs[-1].graph.nodes if n.op == "output"]
    saved = [n.meta["val"] for n in output.args[0][1:]]
    assert saved and all(t.shape == (6,) for t in saved), [t.shape for t in saved]


# ----------------------------------------------------------------------------------------------
# freeze_batchnorm


def test_freeze_batchnorm_resnet18():
    """A torchvision resnet18 frozen gives the unfrozen model's eval outputs, in training mode too;
    its checkpoint is the unfrozen one's minus num_batches_tracked, and loads into the same network
    built with torchvision's FrozenBatchNorm2d."""
    torch.manual_seed(0)
    model = randomize_batch_norm(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    frozen = bnext.freeze_batchnorm(copy.deepcopy(model)).train()
    assert sum(isinstance(m, bnext.FrozenBatchNorm2d) for m in frozen.modules()) == 20
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    with torch.no_grad():
        assert_close(frozen(x), expected)
    assert list(frozen.state_dict()) == keys
    theirs = torchvision.models.resnet18(num_classes=10, norm_layer=TorchvisionFrozen)
    theirs.load_state_dict(frozen.state_dict())
    with torch.no_grad():
        assert_close(theirs(x), expected)
    # and back, from torchvision's frozen network
    again = torchvision.models.resnet18(num_classes=10, norm_layer=bnext.FrozenBatchNorm2d)
    again.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        assert_close(again(x), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm2d(4),
        lambda: nn.SyncBatchNorm(4),
        lambda: bnext.BatchNorm2d(4),
        lambda: bnext.SyncBatchNorm(4),
        lambda: bnext.BatchRenorm2d(4),
        lambda: bnext.GhostBatchNorm2d(4, virtual_batch_size=2),
        lambda: nn.BatchNorm2d(4, affine=False),
        lambda: nn.BatchNorm2d(4, bias=False),
        lambda: nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64),
    ],
    ids=["torch", "torch_sync", "bnext", "bnext_sync", "renorm", "ghost", "no_affine", "no_bias", "float64_eps"],
)
def test_freeze_batchnorm_layer(make):
    """A batch norm layer given itself comes back as a new frozen layer computing its eval output,
    holding copies (ones and zeros without affine parameters), its dtype, eps and training flag."""
    bn = make().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.uniform_(-1, 1)
    dtype = bn.running_mean.dtype
    x = torch.randn(2, 4, 3, 3, dtype=dtype)
    with torch.no_grad():
        expected = bn(x)
    frozen = bnext.freeze_batchnorm(bn)
    assert type(frozen) is bnext.FrozenBatchNorm2d and not frozen.training and frozen.eps == bn.eps
    assert all(b.dtype == dtype and not b.requires_grad for b in frozen.buffers())
    assert frozen.running_mean.data_ptr() != bn.running_mean.data_ptr()
    if bn.weight is None:
        assert torch.equal(frozen.weight, torch.ones(4, dtype=dtype))
    if bn.bias is None:
        assert torch.equal(frozen.bias, torch.zeros(4, dtype=dtype))
    assert_close(frozen(x), expected)


def test_freeze_batchnorm_leaves_other_layers_with_one_warning():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        bnext.BatchNormAct2d(4),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 9), nn.InstanceNorm1d(4)),
    )
    with pytest.warns(UserWarning, match=r"left 3 batch norm layer\(s\)") as record:
        out = bnext.freeze_batchnorm(model)
    message = str(record[0].message)
    assert "'2' (bnext.act.BatchNormAct2d)" in message and "'3'" in message and "'4.1'" in message
    assert out is model and type(model[1]) is bnext.FrozenBatchNorm2d
    assert type(model[2]) is bnext.BatchNormAct2d and type(model[4][1]) is nn.BatchNorm1d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnext.freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))


# ----------------------------------------------------------------------------------------------
# BatchRenorm: the reference is Ioffe 2017, Algorithm 1, in plain torch ops (float64).


def paper_batch_renorm(x, running_mean, running_var, weight, bias, r_max, d_max, eps):
    """Training output of batch renorm; r and d are constants for backward (stop_gradient).
    Returns (y, r, d, batch mean, unbiased batch variance)."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, correction=0) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - running_mean) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = weight.reshape(shape) * x_hat + bias.reshape(shape)
    return y, r, d, mu_b.detach(), x.var(dims, correction=1).detach()


# Per-channel means and standard deviations of the batches, far from the initial running statistics
# (0, 1) in some channels, so that r or d clip in those and not in the others.
BATCH_MEAN = torch.tensor([0.0, 3.0, 0.0, 0.0, -4.0, 0.1], dtype=torch.float64)
BATCH_STD = torch.tensor([1.0, 1.0, 0.2, 4.0, 1.0, 1.1], dtype=torch.float64)


def renorm_batch(shape, dtype=torch.float64, fmt=torch.contiguous_format, step=0):
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, dtype=torch.float64) * BATCH_STD[:C].reshape(view) + BATCH_MEAN[:C].reshape(view)
    return x.to(dtype).contiguous(memory_format=fmt)


RENORM = {1: bnext.BatchRenorm1d, 2: bnext.BatchRenorm2d, 3: bnext.BatchRenorm3d}
SHAPES = [
    (1, (16, 6), torch.contiguous_format),
    (1, (8, 6, 5), torch.contiguous_format),
    (2, (4, 6, 5, 3), torch.contiguous_format),
    (2, (4, 6, 5, 3), torch.channels_last),
    (3, (2, 6, 3, 4, 2), torch.contiguous_format),
    (3, (2, 6, 3, 4, 2), torch.channels_last_3d),
]


def run_against_paper(layer, shape, fmt, dtype, momentum, steps, tol, schedule=None, batch=renorm_batch):
    """`steps` training steps of `layer` and of the paper's formulas on the same batches, comparing
    outputs, gradients of input, weight and bias, running statistics and num_batches_tracked;
    schedule: the (r_max, d_max) of each step; batch(shape, dtype, fmt, step): the step's input.
    Returns the r and d of every step."""
    C = shape[1]
    weight = layer.weight.detach().double().clone().requires_grad_()
    bias = layer.bias.detach().double().clone().requires_grad_()
    running_mean = layer.running_mean.detach().double().clone()
    running_var = layer.running_var.detach().double().clone()
    rs, ds = [], []
    for step in range(steps):
        if schedule is not None:
            layer.r_max, layer.d_max = schedule[step]
        x = batch(shape, dtype, fmt, step).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y = layer(x)
        y_ref, r, d, mean, var = paper_batch_renorm(
            x64, running_mean, running_var, weight, bias, layer.r_max, layer.d_max, layer.eps
        )
        rs.append(r)
        ds.append(d)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y.double(), y_ref, **tol, msg=lambda m: f"step {step}: output\n{m}")
        g = torch.randn(shape, dtype=torch.float64)
        y.backward(g.to(dtype))
        y_ref.backward(g)
        for name, ours, ref in (("input", x.grad, x64.grad), ("weight", layer.weight.grad, weight.grad), ("bias", layer.bias.grad, bias.grad)):
            scale = 1.0 if name == "input" else shape[0] * (x.numel() // shape[0] // C) ** 0.5
            torch.testing.assert_close(
                ours.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"step {step}: grad {name}\n{m}"
            )
        layer.weight.grad = layer.bias.grad = weight.grad = bias.grad = None
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        running_mean = (1 - factor) * running_mean + factor * mean
        running_var = (1 - factor) * running_var + factor * var
        torch.testing.assert_close(layer.running_mean.double(), running_mean, **tol)
        torch.testing.assert_close(layer.running_var.double(), running_var, **tol)
        assert int(layer.num_batches_tracked) == step + 1
    return torch.stack(rs), torch.stack(ds)


def assert_clipped_somewhere(rs, ds, r_max, d_max):
    """r and d each hit their bounds in some (step, channel) and stay inside them in others."""
    r_clipped = (rs == r_max) | (rs == 1 / r_max)
    d_clipped = ds.abs() == d_max
    assert r_clipped.any() and (~r_clipped).any(), rs
    assert d_clipped.any() and (~d_clipped).any(), ds


@pytest.mark.parametrize("dims,shape,fmt", SHAPES, ids=lambda v: str(v))
def test_batch_renorm_matches_the_paper(dims, shape, fmt):
    """float64, four steps from the initial running statistics, r and d clipping in some channels."""
    torch.manual_seed(dims)
    layer = RENORM[dims](6, momentum=0.1, r_max=2.0, d_max=1.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    rs, ds = run_against_paper(layer, shape, fmt, torch.float64, 0.1, 4, dict(rtol=1e-9, atol=1e-9))
    assert_clipped_somewhere(rs, ds, 2.0, 1.0)
    # eval: batch norm with the running statistics
    layer.eval()
    x = renorm_batch(shape)
    stats_shape = (1, -1) + (1,) * (len(shape) - 2)
    expected = (x - layer.running_mean.reshape(stats_shape)) / torch.sqrt(layer.running_var.reshape(stats_shape) + layer.eps)
    expected = expected * layer.weight.reshape(stats_shape) + layer.bias.reshape(stats_shape)
    assert_close(layer(x), expected.detach())


def shifting_batch(shape, dtype, fmt, step):
    """renorm_batch, whose channels 0 and 1 change distribution from step 2 on (a shift and a wider
    spread): irregular batches, far from the statistics gathered so far."""
    x = renorm_batch(shape, fmt=fmt)
    if step >= 2:
        x[:, 0] += 3.0
        x[:, 1] *= 3.0
    return x.to(dtype)


def test_batch_renorm_cumulative_momentum_and_changing_limits():
    """momentum=None (cumulative average) and r_max / d_max changed between steps, as the paper's
    warm-up schedule does (from r_max = 1, d_max = 0: batch norm)."""
    torch.manual_seed(4)
    layer = bnext.BatchRenorm2d(6, momentum=None, dtype=torch.float64)
    schedule = [(1.0, 0.0), (1.5, 0.5), (2.0, 1.0), (2.0, 1.0)]
    rs, ds = run_against_paper(
        layer, (4, 6, 3, 3), torch.contiguous_format, torch.float64, None, 4, dict(rtol=1e-9, atol=1e-9), schedule,
        shifting_batch,
    )
    assert torch.equal(rs[0], torch.ones_like(rs[0])) and torch.equal(ds[0].abs(), torch.zeros_like(ds[0]))
    assert float(rs[1].max()) <= 1.5 and float(ds[1].abs().max()) <= 0.5
    assert_clipped_somewhere(rs[2:], ds[2:], 2.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["float32", "input"])
def test_batch_renorm_dtypes(dtype, param_dtype):
    """Half types with float32 parameters or parameters in their own dtype, against the float64
    reference; the output keeps the input's dtype and memory format."""
    torch.manual_seed(1)
    pdtype = torch.float32 if param_dtype == "float32" else dtype
    layer = bnext.BatchRenorm2d(6, momentum=0.1, r_max=2.0, d_max=1.0, dtype=pdtype)
    tol = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}[dtype]
    if pdtype != torch.float32:
        tol = dict(rtol=tol["rtol"] * 2, atol=tol["atol"] * 4)  # parameters and statistics rounded too
    rs, ds = run_against_paper(layer, (4, 6, 5, 3), torch.channels_last, dtype, 0.1, 2, tol)
    assert_clipped_somewhere(rs, ds, 2.0, 1.0)


@pytest.mark.parametrize("dims,shape,fmt", [SHAPES[0], SHAPES[3], SHAPES[5]], ids=["1d", "2d", "3d"])
def test_batch_renorm_with_limits_1_and_0_is_batch_norm(dims, shape, fmt):
    """r_max = 1 and d_max = 0 make r = 1 and d = 0: bnext's batch norm bit for bit (outputs,
    gradients, running statistics), and torch's nn.BatchNorm within float64 rounding."""
    torch.manual_seed(2)
    renorm = RENORM[dims](6, momentum=0.1, r_max=1.0, d_max=0.0, dtype=torch.float64)
    ours = getattr(bnext, f"BatchNorm{dims}d")(6, momentum=0.1, dtype=torch.float64)
    theirs = getattr(nn, f"BatchNorm{dims}d")(6, momentum=0.1, dtype=torch.float64)
    randomize_batch_norm(renorm)
    ours.load_state_dict(renorm.state_dict())
    theirs.load_state_dict(renorm.state_dict())
    for step in range(3):
        x = renorm_batch(shape, fmt=fmt)
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = [m(xi) for m, xi in zip((renorm, ours, theirs), xs)]
        g = torch.randn_like(ys[0])
        for y in ys:
            y.backward(g)
        assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
        assert_close(ys[0], ys[2], msg=f"step {step}: output")
        assert_close(xs[0].grad, xs[2].grad, msg=f"step {step}: grad input")
        for name in ("weight", "bias"):
            a, b, c = (getattr(m, name).grad for m in (renorm, ours, theirs))
            assert torch.equal(a, b)
            assert_close(a, c, msg=f"step {step}: grad {name}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b, c = (getattr(m, name) for m in (renorm, ours, theirs))
            assert torch.equal(a, b)
            assert_close(a.double(), c.double(), msg=f"step {step}: {name}")
        for m in (renorm, ours, theirs):
            m.zero_grad()


def saturated_renorm():
    """float64 layer whose running statistics are so far from any batch of renorm_batch's that r and
    d sit at their bounds in every channel, well away from the clip points; momentum 0 keeps them
    there. There r and d are constants of x locally too, so the stop-gradient backward is the true
    derivative and gradcheck applies (where r or d is not clipped, the paper's backward is by
    design not the derivative of the forward)."""
    layer = bnext.BatchRenorm2d(3, momentum=0.0, r_max=2.0, d_max=0.5, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(30.0)
        layer.running_var.copy_(torch.tensor([100.0, 400.0, 1e-4], dtype=torch.float64))
        layer.weight.copy_(torch.tensor([0.8, -1.2, 1.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    return layer


def test_batch_renorm_gradcheck_and_gradgradcheck():
    layer = saturated_renorm()
    x = renorm_batch((2, 3, 3, 2)).requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    r, d = paper_batch_renorm(x.detach(), layer.running_mean, layer.running_var, w, b, 2.0, 0.5, layer.eps)[1:3]
    assert set(r.tolist()) <= {2.0, 0.5} and set(d.abs().tolist()) == {0.5}
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(f, (xc, w, b))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_batch_renorm_checkpoint(use_reentrant):
    """Running statistics counted once under both checkpoint flavours; with r and d saturated the
    recomputed forward is the first one, and the gradients are those without checkpointing (where r
    or d is not clipped, the recomputation takes them from the running statistics as updated by the
    step, see the README)."""
    layer, plain = saturated_renorm(), saturated_renorm()
    layer.momentum = plain.momentum = 0.1
    x = renorm_batch((4, 3, 3, 3)).requires_grad_()
    xp = x.detach().clone().requires_grad_()
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    plain(xp).square().sum().backward()
    assert int(layer.num_batches_tracked) == 1
    assert torch.equal(layer.running_mean, plain.running_mean) and torch.equal(layer.running_var, plain.running_var)
    assert_close(x.grad, xp.grad)
    assert_close(layer.weight.grad, plain.weight.grad)


def test_batch_renorm_torch_func():
    """torch.func.grad over the parameters (functional_call) and the input: autograd's gradients,
    running statistics updated once per call."""
    layer = bnext.BatchRenorm2d(6, momentum=0.1, r_max=2.0, d_max=1.0, dtype=torch.float64)
    twin = copy.deepcopy(layer)
    x = renorm_batch((4, 6, 3, 3))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    twin(x).square().sum().backward()
    for k in params:
        assert_close(grads[k], getattr(twin, k).grad)
    assert torch.equal(layer.running_var, twin.running_var) and int(layer.num_batches_tracked) == 1
    gx = grad(lambda x: layer(x).square().sum())(x)
    xt = x.clone().requires_grad_()
    twin(xt).square().sum().backward()
    assert_close(gx, xt.grad)


def test_batch_renorm_state_dict_both_ways():
    """Batch norm's state_dict: nn.BatchNorm2d checkpoints load into BatchRenorm2d and back; r_max
    and d_max are not state (deepcopy and pickle keep them)."""
    bn = randomize_batch_norm(nn.BatchNorm2d(5))
    bn(torch.randn(4, 5, 3, 3))
    renorm = bnext.BatchRenorm2d(5, r_max=2.5, d_max=0.5)
    renorm.load_state_dict(through_torch_save(bn.state_dict()))
    assert list(renorm.state_dict()) == list(bn.state_dict())
    renorm(torch.randn(4, 5, 3, 3))
    back = nn.BatchNorm2d(5)
    back.load_state_dict(renorm.state_dict())
    for k, v in renorm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    renorm.eval(), back.eval()
    x = torch.randn(2, 5, 3, 3)
    assert_close(renorm(x), back(x))
    for copied in (copy.deepcopy(renorm), pickle.loads(pickle.dumps(renorm))):
        assert (copied.r_max, copied.d_max) == (2.5, 0.5)
        copied.r_max = 1.5
        assert renorm.r_max == 2.5
    assert "r_max=2.5, d_max=0.5" in repr(renorm)
    half = copy.deepcopy(renorm).half()
    assert half.weight.dtype == torch.float16 and (half.r_max, half.d_max) == (2.5, 0.5)


def test_batch_renorm_bad_arguments():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: r_max must be >= 1.0 .*got 0.5"):
        bnext.BatchRenorm2d(4, r_max=0.5)
    with pytest.raises(ValueError, match=r"BatchRenorm1d: d_max must be >= 0.0 .*got -1.0"):
        bnext.BatchRenorm1d(4, d_max=-1)
    with pytest.raises(ValueError, match=r"r_max must be >= 1.0 .*got nan"):
        bnext.BatchRenorm3d(4, r_max=float("nan"))
    with pytest.raises(TypeError, match=r"r_max must be a float, got str"):
        bnext.BatchRenorm2d(4, r_max="3")
    with pytest.raises(TypeError, match=r"d_max must be a float, got bool"):
        bnext.BatchRenorm2d(4, d_max=True)
    layer = bnext.BatchRenorm2d(4, r_max=2.0)
    with pytest.raises(ValueError, match=r"r_max must be >= 1.0 .*got 0.9"):
        layer.r_max = 0.9
    assert layer.r_max == 2.0 and float(layer._limits[0]) == 2.0
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        layer(torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match=r"weight must have 5 elements .*got shape \[4\]"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4, 1, 1))
    with pytest.raises(NotImplementedError, match=r"input must be a floating-point tensor"):
        layer(torch.ones(2, 4, 2, 2, dtype=torch.int32))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.running_mean = layer.running_var = None
    with pytest.raises(RuntimeError, match=r"training needs running_mean and running_var .*got None"):
        layer(torch.randn(2, 4, 3, 3))


def test_batch_renorm_torchscript_fx_and_export():
    """Scripted (training and eval) and exported (training) programs compute the layer's results
    with torch's ops; in FX the layer is a leaf."""
    torch.manual_seed(3)
    layer = bnext.BatchRenorm2d(6, momentum=0.1, r_max=2.0, d_max=1.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(layer))
    exported_from = copy.deepcopy(layer)
    x = renorm_batch((4, 6, 3, 3))
    ep = torch.export.export(exported_from, (x,)).run_decompositions()
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "bnext" in str(n.target)]
    program = ep.module()
    for step in range(2):
        x = renorm_batch((4, 6, 3, 3))
        expected = layer(x)
        assert_close(scripted(x), expected, msg=f"scripted, step {step}")
        assert_close(program(x), expected, msg=f"exported, step {step}")
        for name in ("running_mean", "running_var"):
            assert_close(getattr(scripted, name), getattr(layer, name))
            assert_close(getattr(program, name), getattr(layer, name))
    scripted.eval(), layer.eval()
    assert_close(scripted(x), layer(x))
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 6, 1).double(), layer))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


@pytest.fixture(scope="module")
def compiled_renorm():
    """One compiled Conv -> BatchRenorm2d -> ReLU model (inductor, fullgraph) with a compile
    counter, its eager twin, and the data that makes r and d clip."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 6, 1), bnext.BatchRenorm2d(6, momentum=0.3, r_max=1.2, d_max=0.1), nn.ReLU())
    with torch.no_grad():
        eager[0].weight.copy_(torch.eye(6, 3).reshape(6, 3, 1, 1))
        eager[0].bias.zero_()
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    return eager, model, torch.compile(model, fullgraph=True, backend=counter), counter


def test_batch_renorm_compile_fullgraph(compiled_renorm):
    """Compiled == eager over four training steps (outputs, gradients, running statistics: the
    effective weight is computed from running_var, which the step then updates in place, DESIGN.md's
    inductor trap), r_max and d_max changed every step without a recompile, the compiled output
    following the new values; then eval."""
    eager, model, compiled, counter = compiled_renorm
    limits = [(1.2, 0.1), (1.5, 0.3), (2.0, 0.6), (3.0, 1.0)]
    for step, (r_max, d_max) in enumerate(limits):
        for m in (eager[1], model[1]):
            m.r_max, m.d_max = r_max, d_max
        x = renorm_batch((4, 3, 4, 4)).float()
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        stale = copy.deepcopy(eager)  # the previous step's limits
        stale[1].r_max, stale[1].d_max = limits[max(step - 1, 0)]
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye, msg=f"step {step}: output")
        if step > 0:
            assert not torch.allclose(stale(x), ye, atol=1e-3), "the new limits change the output"
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, msg=f"step {step}: input gradient")
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            assert_close(pc.grad, pe.grad, msg=f"step {step}: gradient of {name}")
        for (name, be), bc in zip(eager.named_buffers(), model.buffers()):
            assert_close(bc, be, msg=f"step {step}: {name}")
        eager.zero_grad()
        model.zero_grad()
    assert counter.frame_count == 1
    eager.eval(), model.eval()
    x = renorm_batch((2, 3, 4, 4)).float()
    with torch.no_grad():
        assert_close(compiled(x), eager(x))


def test_emulated_cuda_kernels():
    """Both layers on the CUDA kernels' code (bnext.testing.emulate_cuda): the CPU kernels' results,
    forward and backward."""
    torch.manual_seed(5)
    _, frozen = frozen_pair(6)
    renorm = bnext.BatchRenorm2d(6, momentum=0.1, r_max=2.0, d_max=1.0)
    for layer in (frozen, renorm):
        emulated = copy.deepcopy(layer)
        x = renorm_batch((4, 6, 5, 3), torch.float32, torch.channels_last)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = layer(xc)
        with emulate_cuda():
            ye = emulated(xe)
            ye.backward(torch.ones_like(ye) + xe.detach())
        y.backward(torch.ones_like(y) + x)
        assert_close(ye, y)
        assert_close(xe.grad, xc.grad)
        for (name, a), b in zip(layer.named_buffers(), emulated.buffers()):
            assert_close(b, a, msg=name)


def test_conversions_leave_the_small_batch_layers_as_they_are():
    """convert_model (plain and sync), revert_model and fuse_model convert exact types only: the
    small-batch layers (subclasses of bnext's BN layers with their own semantics) stay the same
    objects, followed activations unfused; the frozen layer is not a batch norm layer to them."""
    def layers():
        return [bnext.BatchRenorm2d(4), bnext.GhostBatchNorm2d(4, virtual_batch_size=2), bnext.FrozenBatchNorm2d(4)]

    for convert in (bnext.convert_model, lambda m: bnext.convert_model(m, sync=True), bnext.revert_model):
        originals = layers() + [bnext.MaskedBatchNorm1d(4)]
        model = nn.Sequential(*originals)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the note naming the layers it left
            out = convert(model)
        assert [m for m in out.children()] == originals
    originals = layers()
    model = nn.Sequential(*(m for layer in originals for m in (nn.Conv2d(4, 4, 1), layer, nn.ReLU())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fused = bnext.fuse_model(model)
    kept = [m for m in fused.modules() if isinstance(m, tuple(type(o) for o in originals))]
    assert [type(m) for m in kept] == [type(o) for o in originals]
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 3
