"""bnext.GhostBatchNorm1d/2d (bnext/ghost.py) against its definition: a Python loop over the virtual
batches through torch.nn.BatchNorm1d/2d, in float64.

Outputs, all gradients, running statistics and num_batches_tracked over several training steps, then
eval; N a multiple of virtual_batch_size or not; momentum None; without affine parameters or running
statistics; NCHW and channels_last; dtypes; gradcheck/gradgradcheck; one kernel call whatever the
number of virtual batches; torch.compile (one compiled model); torch.func; checkpoint; TorchScript,
FX and export; state_dict; bad arguments.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import bnext  # noqa: F401  (registers the ops)
from bnext import ghost as ghost_module
from bnext.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnext.testing import emulate_cuda
from conftest import TOL, saved_for_backward, tensor_bytes, through_torch_save

GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
CL = torch.channels_last
NCHW = torch.contiguous_format


def batch(shape, fmt=NCHW, dtype=torch.float64):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    if len(shape) == 4:
        x = x.contiguous(memory_format=fmt)
    return x.to(dtype)


def ghost_and_reference(dims, C, v, dtype=torch.float64, **kwargs):
    """A ghost layer in `dtype` with random parameters and running statistics, and the float64
    torch layer with the same state (the reference's batch norm, applied per virtual batch)."""
    ghost = GHOST[dims](C, v, dtype=dtype, **kwargs)
    with torch.no_grad():
        if ghost.affine:
            ghost.weight.uniform_(0.5, 1.5)
            ghost.weight[0] = -0.7
            ghost.bias.uniform_(-0.5, 0.5)
        if ghost.track_running_stats:
            ghost.running_mean.uniform_(-0.5, 0.5)
            ghost.running_var.uniform_(0.5, 2.0)
    ref = TORCH_BN[dims](C, dtype=torch.float64, **kwargs)
    ref.load_state_dict(ghost.state_dict())
    return ghost, ref


def loop_reference(ref, x, v):
    """The definition: consecutive virtual batches of v rows (the last one the rest) through batch
    norm, one after another."""
    return torch.cat([ref(chunk) for chunk in x.split(v)])


def assert_close(actual, expected, tol, msg):
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{msg}\n{m}")


def run_against_loop(ghost, ref, shape, fmt, dtype, steps, tol, grad_tol=None):
    """`steps` training steps then eval: outputs (dtype, memory format), input and parameter
    gradients, running statistics and num_batches_tracked against the loop reference."""
    grad_tol = grad_tol or tol
    v = ghost.virtual_batch_size
    for step in range(steps):
        x = batch(shape, fmt, dtype).requires_grad_()
        xr = x.detach().double().requires_grad_()
        y, yr = ghost(x), loop_reference(ref, xr, v)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=fmt) if len(shape) == 4 else y.is_contiguous()
        assert_close(y, yr, tol, f"step {step}: output")
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        y.backward(g)
        yr.backward(g.double())
        assert_close(x.grad, xr.grad, grad_tol, f"step {step}: grad input")
        if ghost.affine:
            for name in ("weight", "bias"):
                assert_close(getattr(ghost, name).grad, getattr(ref, name).grad, grad_tol, f"step {step}: grad {name}")
        if ghost.track_running_stats:
            assert_close(ghost.running_mean, ref.running_mean, tol, f"step {step}: running_mean")
            assert_close(ghost.running_var, ref.running_var, tol, f"step {step}: running_var")
            assert int(ghost.num_batches_tracked) == int(ref.num_batches_tracked)
        ghost.zero_grad(), ref.zero_grad()
    ghost.eval(), ref.eval()
    x = batch(shape, fmt, dtype)
    expected = loop_reference(ref, x.double(), v)  # per-chunk statistics without running ones
    assert_close(ghost(x), expected, tol, "eval")
    ghost.train(), ref.train()


F64 = dict(rtol=1e-9, atol=1e-9)

# (dims, shape, memory format, virtual_batch_size)
CASES = [
    (1, (12, 5), NCHW, 4),  # 3 virtual batches
    (1, (14, 5), NCHW, 4),  # 3 + a last one of 2 rows
    (1, (10, 4, 3), NCHW, 3),  # 3 + a last one of 1 row (3 values per channel)
    (2, (8, 3, 4, 5), NCHW, 2),
    (2, (11, 3, 3, 4), NCHW, 4),
    (2, (8, 3, 4, 5), CL, 2),
    (2, (11, 3, 3, 4), CL, 4),
    (2, (3, 2, 2, 3), CL, 1),  # one image per virtual batch
]


@pytest.mark.parametrize("dims,shape,fmt,v", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_matches_loop_over_virtual_batches(dims, shape, fmt, v):
    torch.manual_seed(len(shape) * 100 + shape[0] * 10 + v)
    ghost, ref = ghost_and_reference(dims, shape[1], v, momentum=0.1)
    run_against_loop(ghost, ref, shape, fmt, torch.float64, 3, F64)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(momentum=1.0), dict(affine=False), dict(track_running_stats=False), dict(momentum=0.0)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
def test_options(options, fmt):
    """momentum None (the cumulative average: num_batches_tracked counts the virtual batches), the
    momentum extremes, no affine parameters, no running statistics (batch statistics per virtual
    batch in eval too, as the loop's)."""
    torch.manual_seed(7)
    ghost, ref = ghost_and_reference(2, 4, 3, **options)
    run_against_loop(ghost, ref, (11, 4, 2, 3), fmt, torch.float64, 3, F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims,shape,fmt", [(1, (14, 6, 3), NCHW), (2, (10, 6, 4, 3), CL)], ids=["1d", "2d_cl"])
def test_dtypes(dtype, dims, shape, fmt):
    """float32 parameters and statistics with each input dtype, against the float64 reference of
    the same (rounded) input."""
    torch.manual_seed(3)
    ghost, ref = ghost_and_reference(dims, shape[1], 4, dtype=torch.float32)
    tol = TOL[dtype]
    grad_tol = tol if dtype == torch.float32 else dict(rtol=tol["rtol"] * 2, atol=tol["atol"] * 4)
    run_against_loop(ghost, ref, shape, fmt, dtype, 2, tol, grad_tol)


def test_one_virtual_batch_is_batch_norm():
    """N <= virtual_batch_size: bnext's batch norm bit for bit (outputs, gradients, statistics)."""
    ghost, _ = ghost_and_reference(2, 3, 8)
    bn = bnext.BatchNorm2d(3, dtype=torch.float64)
    bn.load_state_dict(ghost.state_dict())
    for n in (8, 5):
        x = batch((n, 3, 2, 2)).requires_grad_()
        xb = x.detach().clone().requires_grad_()
        y, yb = ghost(x), bn(xb)
        assert torch.equal(y, yb)
        y.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(x.grad, xb.grad) and torch.equal(ghost.weight.grad, bn.weight.grad)
        for k, t in ghost.state_dict().items():
            assert torch.equal(t, bn.state_dict()[k]), k


class _OpCalls(TorchDispatchMode):
    """The op calls below autograd, and those writing a tensor of `numel` elements by a copy."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops, self.copies = numel, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and out.numel() == self.numel:
            self.copies.append(str(func))
        return out


def _kernel_calls(N):
    ghost = GhostBatchNorm2d(4, 2)
    x = torch.randn(N, 4, 3, 3, requires_grad=True)
    g = torch.randn(N, 4, 3, 3)
    with _OpCalls((N // 2) * 2 * 4 * 9) as mode:  # the rows of the full virtual batches
        ghost(x).backward(g)
    assert int(ghost.num_batches_tracked) == N // 2 + (N % 2 > 0)
    return mode


@pytest.mark.parametrize("N", [32, 35])
def test_chunk_route_one_call_and_no_copy(N):
    """Eager CPU calls: 16 virtual batches of 2 rows (and a last one of 1) are one call of the chunk
    forward and one of the chunk backward, with no input-sized copy and no other batch norm op."""
    mode = _kernel_calls(N)
    bnext_ops = [op for op in mode.ops if op.startswith("bnext.") and "check" not in op]
    assert bnext_ops == [
        "bnext._batch_norm_forward_chunks.default",
        "bnext._update_running_stats_chunks.default",
        "bnext._batch_norm_backward_chunks.default",
    ], mode.ops
    assert mode.copies == [], mode.copies


@pytest.mark.parametrize("N,expected", [(32, 1), (35, 2)])
def test_fold_route_one_kernel_call_whatever_the_number_of_virtual_batches(N, expected, monkeypatch):
    """The fold route (CUDA, compile, torch.func): one batch norm forward and one backward (a second
    of each for a smaller last virtual batch), and the fold's four input-sized copies (input and
    output in forward, their gradients in backward)."""
    monkeypatch.setattr(ghost_module, "_chunk_route", lambda input: False)
    mode = _kernel_calls(N)
    forward = [op for op in mode.ops if op.startswith("bnext.batch_norm_forward")]
    backward = [op for op in mode.ops if op.startswith("bnext.batch_norm_backward")]
    assert len(forward) == expected and len(backward) == expected, mode.ops
    assert len(mode.copies) == 4, mode.copies


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunk_route_matches_fold_route(fmt, dtype, monkeypatch):
    """The two routes on the same input: outputs, gradients and running statistics, 11 rows in
    virtual batches of 3 (a last one of 2)."""
    torch.manual_seed(6)
    layer, _ = ghost_and_reference(2, 5, 3, dtype=dtype)
    twin = copy.deepcopy(layer)
    x = batch((11, 5, 3, 4), fmt, dtype)
    g = batch((11, 5, 3, 4), fmt, dtype)
    results = []
    for route, module in ((True, layer), (False, twin)):
        monkeypatch.setattr(ghost_module, "_chunk_route", lambda input, r=route: r)
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(g)
        assert y.is_contiguous(memory_format=fmt) and xi.grad.is_contiguous(memory_format=fmt)
        results.append([y, xi.grad, module.weight.grad, module.bias.grad, module.running_mean, module.running_var])
    tol = TOL[dtype]
    for name, a, b in zip(["output", "grad input", "grad weight", "grad bias", "running_mean", "running_var"], *results):
        assert_close(a, b, tol, name)


def saved_bytes(layer, x):
    """Bytes of the tensors autograd keeps for backward of layer(x)."""
    return tensor_bytes(saved_for_backward(layer, x)[0])


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "channels_last"])
def test_saves_one_input_sized_tensor(fmt):
    """Backward keeps the input (the folded input on the fold route) and batch norm's per-channel
    mean and invstd for every chunk (16 here): batch norm's memory but for those small vectors."""
    x = torch.randn(32, 8, 5, 5).contiguous(memory_format=fmt).requires_grad_()
    ghost, bn = GhostBatchNorm2d(8, 2), bnext.BatchNorm2d(8)
    ours, theirs = saved_bytes(ghost, x), saved_bytes(bn, x)
    # bnext.BatchNorm2d: input, weight, mean, invstd; the chunk route: 16 means and invstds.
    assert theirs == x.numel() * 4 + 3 * 8 * 4, theirs
    assert ours == x.numel() * 4 + 8 * 4 + 2 * 16 * 8 * 4, (ours, theirs)


def functional(layer):
    return lambda x, w, b: functional_call(layer, {"weight": w, "bias": b}, (x,))


def test_gradcheck_and_gradgradcheck():
    layer = GhostBatchNorm2d(2, 2, dtype=torch.float64)
    w = torch.tensor([0.8, -1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    x = batch((5, 2, 2, 2)).requires_grad_()  # 2 virtual batches of 2, one of 1
    assert torch.autograd.gradcheck(functional(layer), (x, w, b))
    assert torch.autograd.gradgradcheck(functional(layer), (x, w, b))
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    assert torch.autograd.gradcheck(functional(layer), (xc, w, b))
    layer1d = GhostBatchNorm1d(3, 2, dtype=torch.float64)
    x1 = batch((6, 3)).requires_grad_()
    w1 = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b1 = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(functional(layer1d), (x1, w1, b1))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint(use_reentrant):
    """Both checkpoint flavours: the virtual batches are counted once, gradients as without."""
    torch.manual_seed(4)
    layer, _ = ghost_and_reference(2, 3, 2)
    plain = copy.deepcopy(layer)
    x = batch((7, 3, 2, 2)).requires_grad_()
    xp = x.detach().clone().requires_grad_()
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    plain(xp).square().sum().backward()
    assert int(layer.num_batches_tracked) == 4
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(layer, name), getattr(plain, name)), name
    torch.testing.assert_close(x.grad, xp.grad)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch's jvp decompositions
def test_torch_func():
    """grad over the parameters (functional_call) and the input, vmap (without running statistics,
    as torch's batch norm under vmap) and jvp, against autograd and the loop reference."""
    torch.manual_seed(5)
    layer, ref = ghost_and_reference(1, 4, 3)
    twin = copy.deepcopy(layer)
    x = batch((8, 4, 2))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    twin(x).square().sum().backward()
    for k in params:
        torch.testing.assert_close(grads[k], getattr(twin, k).grad)
    # The fold route (torch.func) takes the chunks in closed form, the chunk route (eager) one by one.
    torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 3
    gx = grad(lambda x: layer(x).square().sum())(x)
    xr = x.clone().requires_grad_()
    loop_reference(ref, xr, 3).square().sum().backward()
    torch.testing.assert_close(gx, xr.grad)

    free, free_ref = ghost_and_reference(1, 4, 3, track_running_stats=False)
    xs = batch((2, 8, 4, 2))
    torch.testing.assert_close(vmap(free)(xs), torch.stack([loop_reference(free_ref, x, 3) for x in xs]))
    t = torch.randn_like(x)
    (y, ty), (yr, tyr) = jvp(free, (x,), (t,)), jvp(lambda x: loop_reference(free_ref, x, 3), (x,), (t,))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(ty, tyr)


def test_state_dict_both_ways():
    """nn.BatchNorm2d's state_dict: its checkpoints load into GhostBatchNorm2d and back."""
    bn = nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3))
    ghost = GhostBatchNorm2d(5, 2)
    ghost.load_state_dict(through_torch_save(bn.state_dict()))
    assert list(ghost.state_dict()) == list(bn.state_dict())
    ghost(torch.randn(6, 5, 3, 3))
    assert int(ghost.num_batches_tracked) == 4
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ghost.state_dict())
    ghost.eval(), back.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ghost(x), back(x))
    assert "virtual_batch_size=2" in repr(ghost)
    assert copy.deepcopy(ghost).virtual_batch_size == 2


def test_bad_arguments():
    bad_values = [(0, ValueError, "got 0"), (-3, ValueError, "got -3"), (2.5, TypeError, "got float"),
                  ("4", TypeError, "got str"), (True, TypeError, "got bool"), (None, TypeError, "got NoneType")]
    for bad, exc, got in bad_values:
        with pytest.raises(exc, match=rf"bnext.GhostBatchNorm2d: virtual_batch_size must be .*{got}"):
            GhostBatchNorm2d(4, bad)
    layer = GhostBatchNorm1d(4, 2)
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d: virtual_batch_size must be >= 1 .*got 0"):
        layer.virtual_batch_size = 0
    assert layer.virtual_batch_size == 2
    layer.virtual_batch_size = torch.tensor(3).numpy()[()]  # a numpy integer
    assert layer.virtual_batch_size == 3 and type(layer.virtual_batch_size) is int
    layer(torch.randn(7, 4, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        layer(torch.randn(6, 4, 2, 2))
    with pytest.raises(RuntimeError, match=r"weight must have 5 elements .*got shape \[4\]"):
        layer(torch.randn(6, 5))
    with pytest.raises(NotImplementedError, match=r"input must be a floating-point tensor"):
        layer(torch.ones(6, 4, dtype=torch.int32))
    # A last virtual batch of one row: one value per channel, batch norm's error, before any update.
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training.*\[1, 4\]"):
        layer(torch.randn(7, 4))
    layer.virtual_batch_size = 1
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        layer(torch.randn(6, 4))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torchscript_fx_and_export():
    """Scripted (training and eval) and exported (training) programs compute the layer's results
    with torch's ops; in FX the layer is a leaf."""
    torch.manual_seed(6)
    layer, _ = ghost_and_reference(2, 3, 2, momentum=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(layer))
    exported_from = copy.deepcopy(layer)
    ep = torch.export.export(exported_from, (batch((5, 3, 2, 2)),)).run_decompositions()
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "bnext" in str(n.target)]
    program = ep.module()
    for step in range(2):
        x = batch((5, 3, 2, 2), CL)
        expected = layer(x)
        torch.testing.assert_close(scripted(x), expected, msg=f"scripted, step {step}")
        torch.testing.assert_close(program(x), expected, msg=f"exported, step {step}")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(scripted, name), getattr(layer, name))
            torch.testing.assert_close(getattr(program, name), getattr(layer, name))
    scripted.eval(), layer.eval()
    torch.testing.assert_close(scripted(x), layer(x))
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1).double(), layer))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_compile_fullgraph():
    """One compiled Conv -> GhostBatchNorm2d (momentum 0.1) -> ReLU -> GhostBatchNorm2d (momentum
    None) model, channels_last, 3 virtual batches and a smaller fourth: compiled == eager over three
    training steps (outputs, gradients, running statistics, num_batches_tracked), one graph, then
    eval."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(8)
    eager = nn.Sequential(nn.Conv2d(3, 4, 1), GhostBatchNorm2d(4, 3), nn.ReLU(), GhostBatchNorm2d(4, 3, momentum=None))
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    tol = dict(rtol=1e-4, atol=1e-4)
    for step in range(3):
        x = batch((11, 3, 4, 4), CL, torch.float32)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye, tol, f"step {step}: output")
        assert yc.is_contiguous(memory_format=CL)
        g = torch.randn_like(ye)
        ye.backward(g)
        yc.backward(g)
        assert_close(xc.grad, xe.grad, tol, f"step {step}: input gradient")
        for (name, pe), pc in zip(eager.named_parameters(), model.parameters()):
            assert_close(pc.grad, pe.grad, tol, f"step {step}: gradient of {name}")
        for (name, be), bc in zip(eager.named_buffers(), model.buffers()):
            assert_close(bc, be, tol, f"step {step}: {name}")
        eager.zero_grad(), model.zero_grad()
    assert int(model[3].num_batches_tracked) == 12
    assert counter.frame_count == 1
    eager.eval(), model.eval()
    x = batch((5, 3, 4, 4), CL, torch.float32)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), tol, "eval")


def test_emulated_cuda_kernels():
    """The CUDA kernels' code (bnext.testing.emulate_cuda) gives the CPU kernels' results."""
    torch.manual_seed(9)
    layer = GhostBatchNorm2d(3, 2)
    emulated = copy.deepcopy(layer)
    x = batch((7, 3, 3, 2), CL, torch.float32)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xc)
    with emulate_cuda():
        ye = emulated(xe)
        ye.backward(torch.ones_like(ye) + xe.detach())
    y.backward(torch.ones_like(y) + x)
    torch.testing.assert_close(ye, y)
    torch.testing.assert_close(xe.grad, xc.grad)
    for (name, a), b in zip(layer.named_buffers(), emulated.buffers()):
        torch.testing.assert_close(b, a, msg=name)
