"""bnext.MaskedBatchNorm1d and bnext.batch_norm(..., mask=...) against the definition: torch's
nn.BatchNorm1d (a float64 copy) on the real positions gathered into (K, C), its output and input
gradient scattered back with zeros at the padding.

Outputs, grad_input, weight/bias gradients and running statistics over several training steps,
then eval; mask=None is bnext.BatchNorm1d exactly; dtypes, strides, gradcheck/gradgradcheck,
torch.compile (one model), torch.func (vmap over inputs and masks too), forward AD, checkpoint,
export, the emulated CUDA kernels, bad arguments.
"""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.utils.checkpoint import checkpoint

import bnext
from bnext import masked
from bnext.masked import MaskedBatchNorm1d

F64 = dict(rtol=1e-9, atol=1e-9)
TOL = {
    torch.float64: F64,
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-1),
}


@pytest.fixture(params=["runs", "torch_ops"])
def route(request, monkeypatch):
    """Each eager training route: bnext.masked._compact_route picks one from the mask's runs (the
    runs route: the masked kernels on CPU, the compact copies on other devices)."""
    monkeypatch.setattr(masked, "_compact_route", lambda runs, input: request.param == "runs")
    return request.param


def lengths_mask(lengths, L):
    """(N, L) bool mask: the first lengths[n] positions of row n are real."""
    return torch.arange(L)[None, :] < torch.as_tensor(lengths)[:, None]


def random_mask(N, L, generator=None):
    """Variable-length rows (at least one real position each), then a few holes inside them."""
    lengths = torch.randint(1, L + 1, (N,), generator=generator)
    mask = lengths_mask(lengths, L)
    holes = torch.rand(N, L, generator=generator) < 0.1
    mask = mask & ~holes
    mask[:, 0] = True
    return mask


def make_layer(C, **kwargs):
    layer = MaskedBatchNorm1d(C, **kwargs)
    with torch.no_grad():
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
        if layer.track_running_stats:
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2)
    return layer


def reference_of(layer):
    """nn.BatchNorm1d in float64 with `layer`'s parameters, buffers and flags."""
    ref = nn.BatchNorm1d(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    ref.load_state_dict(layer.state_dict())
    ref.train(layer.training)
    return ref.double()


def reference_step(ref, x, mask, g):
    """The definition: ref on x's real positions (K, C), scattered back. Returns (out, grad_input)
    in float64, zero at the padding; ref's parameters get their gradients."""
    x = x.detach().double().requires_grad_(True)
    gathered = x.permute(0, 2, 1)[mask]  # (K, C)
    y = ref(gathered)
    out = torch.zeros(x.shape[0], x.shape[2], x.shape[1], dtype=torch.float64)
    out[mask] = y
    out = out.permute(0, 2, 1)
    out.backward(g.double())
    return out.detach(), x.grad


def close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def run_and_compare(layer, batches, dtype=torch.float32, check_grads=True):
    """Train `layer` (and its float64 reference) on `batches` [(x, mask, g)], comparing everything
    after each step; then eval on the last batch."""
    ref = reference_of(layer)
    for x, mask, g in batches:
        x = x.to(dtype).requires_grad_(True)
        layer.zero_grad()
        ref.zero_grad()
        out = layer(x, mask)
        out.backward(g.to(dtype))
        ref_out, ref_dx = reference_step(ref, x, mask, g.to(dtype))
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.all(out.detach()[~mask.unsqueeze(1).expand_as(out)] == 0)
        assert torch.all(x.grad[~mask.unsqueeze(1).expand_as(x)] == 0)
        close(out, ref_out, dtype)
        if check_grads:
            close(x.grad, ref_dx, dtype)
            if layer.affine:
                close(layer.weight.grad, ref.weight.grad, dtype)
                close(layer.bias.grad, ref.bias.grad, dtype)
        if layer.track_running_stats:
            stats = torch.float64 if dtype == torch.float64 else torch.float32  # accumulated in float32
            close(layer.running_mean, ref.running_mean, stats)
            close(layer.running_var, ref.running_var, stats)
            assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)
    layer.eval()
    ref.eval()
    x, mask, g = batches[-1]
    with torch.no_grad():
        out = layer(x.to(dtype), mask)
        ref_out = torch.zeros(x.shape[0], x.shape[2], x.shape[1], dtype=torch.float64)
        ref_out[mask] = ref(x.double().permute(0, 2, 1)[mask])
    close(out, ref_out.permute(0, 2, 1), dtype)
    assert torch.all(out[~mask.unsqueeze(1).expand_as(out)] == 0)


def batches(N=4, C=5, L=7, steps=3, offset=3.0):
    out = []
    for _ in range(steps):
        x = torch.randn(N, C, L) * 2 + offset
        out.append((x, random_mask(N, L), torch.randn(N, C, L)))  # dy nonzero at the padding too
    return out


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_batchnorm_on_the_real_positions(momentum, affine, dtype, route):
    layer = make_layer(5, momentum=momentum, affine=affine).to(dtype)
    run_and_compare(layer, batches(), dtype)


def test_without_running_stats_uses_batch_statistics_in_eval_too(route):
    layer = make_layer(5, track_running_stats=False)
    x, mask, g = batches(steps=1)[0]
    ref = reference_of(layer)
    out = layer(x.requires_grad_(True), mask)
    out.backward(g)
    ref_out, ref_dx = reference_step(ref, x, mask, g)
    close(out, ref_out, torch.float32)
    close(x.grad, ref_dx, torch.float32)
    layer.eval()
    close(layer(x, mask), ref_out, torch.float32)  # no running statistics: batch statistics in eval


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_accumulate_in_float32(dtype, route):
    # float32 parameters and buffers with half input, as with nn.BatchNorm1d under autocast.
    run_and_compare(make_layer(6), batches(N=3, C=6, L=16, steps=2, offset=1.0), dtype)


def test_half_module(route):
    layer = make_layer(6).to(torch.bfloat16)
    x, mask, g = batches(N=3, C=6, L=16, steps=1, offset=1.0)[0]
    ref = reference_of(layer)
    x = x.to(torch.bfloat16).requires_grad_(True)
    out = layer(x, mask)
    out.backward(g.to(torch.bfloat16))
    assert out.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.bfloat16
    ref_out, _ = reference_step(ref, x, mask, g.to(torch.bfloat16))
    close(out, ref_out, torch.bfloat16)


def test_mask_none_is_bnext_batchnorm1d_exactly():
    for shape in [(4, 5, 7), (6, 5)]:
        ours, plain = make_layer(5), bnext.BatchNorm1d(5)
        plain.load_state_dict(ours.state_dict())
        torch_bn = nn.BatchNorm1d(5)
        torch_bn.load_state_dict(ours.state_dict())
        for _ in range(2):
            x = torch.randn(shape)
            xs = [x.clone().requires_grad_(True) for _ in range(3)]
            outs = [m(xi) for m, xi in zip((ours, plain, torch_bn), xs)]
            for o in outs:
                o.backward(torch.ones_like(o) + x)
            assert torch.equal(outs[0], outs[1]) and torch.equal(xs[0].grad, xs[1].grad)
            torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xs[0].grad, xs[2].grad, rtol=1e-4, atol=1e-4)
        for (k, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), k
        torch.testing.assert_close(ours.running_var, torch_bn.running_var)


def test_all_true_mask_is_batchnorm(route):
    ours = make_layer(5)
    theirs = nn.BatchNorm1d(5)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(2):
        x = torch.randn(4, 5, 7) + 2
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        g = torch.randn_like(x)
        ours(x1, torch.ones(4, 7, dtype=torch.bool)).backward(g)
        theirs(x2).backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


def test_strided_input_and_mask_and_nonfinite_padding(route):
    layer = make_layer(5).double()
    wide = torch.randn(4, 5, 14, dtype=torch.float64)
    x = wide[..., ::2]  # contiguous in no format
    mask = random_mask(4, 14)[:, ::2]
    mask[:, 0] = True
    x = x.detach().clone()
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding holding garbage
    x[0, 0, ~mask[0]] = float("inf")
    strided = torch.empty(4, 5, 14, dtype=torch.float64)[..., ::2].copy_(x)
    assert not strided.is_contiguous()
    ref = reference_of(layer)
    g = torch.randn(4, 5, 7, dtype=torch.float64)
    xr = strided.requires_grad_(True)
    out = layer(xr, mask)
    out.backward(g)
    ref_out, ref_dx = reference_step(ref, x, mask, g)
    assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all()
    close(out, ref_out)
    close(xr.grad, ref_dx)
    close(layer.running_var, ref.running_var)


def test_constant_grad_output_cancels(route):
    layer = make_layer(3).double()
    x = (torch.randn(4, 3, 9, dtype=torch.float64) * 1e-3 + 100).requires_grad_(True)
    mask = random_mask(4, 9)
    layer(x, mask).backward(torch.full_like(x, 0.7))
    assert x.grad.abs().max() < 1e-8  # where the gradient scale weight / sigma is about 1e3


def test_gradcheck_and_gradgradcheck(route):
    C = 3
    x = torch.randn(3, C, 5, dtype=torch.float64, requires_grad=True)
    mask = lengths_mask([5, 2, 3], 5)
    w = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return bnext.batch_norm(x, None, None, w, b, training=True, mask=mask)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    # No affine parameters.
    assert torch.autograd.gradgradcheck(lambda x: bnext.batch_norm(x, None, None, training=True, mask=mask), (x,))


def test_functional_matches_module_and_checks_momentum(route):
    layer = make_layer(5)
    x, mask, _ = batches(steps=1)[0]
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    out = bnext.batch_norm(x, rm, rv, layer.weight, layer.bias, True, 0.1, 1e-5, mask=mask)
    torch.testing.assert_close(out, layer(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(rm, layer.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(rv, layer.running_var, rtol=0, atol=0)
    layer.eval()
    out = bnext.batch_norm(x, rm, rv, layer.weight, layer.bias, False, mask=mask)
    torch.testing.assert_close(out, layer(x, mask), rtol=0, atol=0)
    # mask=None: the unmasked call.
    assert torch.equal(bnext.batch_norm(x, rm, rv, training=False, mask=None), bnext.batch_norm(x, rm, rv))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch's jvp decompositions
def test_torch_func_grad_and_forward_ad():
    layer = make_layer(5)
    x, mask, g = batches(steps=1)[0]
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}

    def loss(p, x):
        return (functional_call(layer, (p, buffers), (x, mask)) * g).sum()

    grads, dx = grad(loss, argnums=(0, 1))(params, x)
    ref = reference_of(layer)
    _, ref_dx = reference_step(ref, x, mask, g)
    close(dx, ref_dx, torch.float32)
    close(grads["weight"], ref.weight.grad, torch.float32)
    close(grads["bias"], ref.bias.grad, torch.float32)
    # The transform updated the running statistics it was given, once.
    close(buffers["running_var"], ref.running_var, torch.float32)
    assert int(buffers["num_batches_tracked"]) == 1

    # Forward AD: the tangent against the reference's, and against the double-backward trick.
    layer.track_running_stats = False
    t = torch.randn_like(x)
    _, tangent = jvp(lambda x: layer(x, mask), (x,), (t,))

    w, b = layer.weight.detach().double(), layer.bias.detach().double()

    def reference(x):
        out = torch.zeros(x.shape[0], x.shape[2], x.shape[1], dtype=x.dtype)
        out = out.index_put((mask,), nn.functional.batch_norm(x.permute(0, 2, 1)[mask], None, None, w, b, True))
        return out.permute(0, 2, 1)

    _, ref_tangent = jvp(reference, (x.double(),), (t.double(),))
    close(tangent, ref_tangent, torch.float32)


def test_vmap_over_inputs_and_masks():
    """vmap over a stack of (input, mask) pairs, masks differing per member: each member is the
    definition on its own real positions, in training (batch statistics, no running statistics)
    and in eval (the shared running statistics); per-member weight gradients (vmap of grad) match a
    loop. A member with fewer than 2 real positions cannot raise under vmap: it gets what the
    formulas give (its one real position normalized to 0, so the output is the bias there)."""
    from torch.func import vmap

    torch.manual_seed(12)
    B, N, C, L = 3, 2, 5, 8
    x = torch.randn(B, N, C, L, dtype=torch.float64)
    masks = torch.stack([random_mask(N, L) for _ in range(B)])
    weight, bias = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    mean, var = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def train(x, m, w):
        return bnext.batch_norm(x, None, None, w, bias, training=True, mask=m)

    def evaluate(x, m):
        return bnext.batch_norm(x, mean, var, weight, bias, training=False, mask=m)

    for fn, args in ((train, (x, masks, weight.expand(B, C))), (evaluate, (x, masks))):
        expected = torch.stack([fn(*(a[i] for a in args)) for i in range(B)])
        close(vmap(fn)(*args), expected)
    g = torch.randn_like(x)
    per_member = vmap(grad(lambda x, m, w, g: (train(x, m, w) * g).sum(), argnums=2))(x, masks, weight.expand(B, C), g)
    for i in range(B):
        w = weight.clone().requires_grad_()
        (train(x[i], masks[i], w) * g[i]).sum().backward()
        close(per_member[i], w.grad)
    masks[1] = False
    masks[1, 0, 0] = True
    out = vmap(train)(x, masks, weight.expand(B, C))
    close(out[1][0, :, 0], bias)
    assert torch.all(out[1][1] == 0) and torch.all(out[1][0, :, 1:] == 0)
    close(out[0], train(x[0], masks[0], weight))


def test_export_eval_and_training():
    """torch.export of a model with a masked layer, in eval and in training (the exported program
    updates the running statistics): the eager model's outputs and buffers."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv1d(3, 5, 1), make_layer(5)

        def forward(self, x, mask):
            return self.bn(self.conv(x), mask)

    torch.manual_seed(13)
    x, mask = torch.randn(3, 3, 9), random_mask(3, 9)
    for training in (False, True):
        eager = Model().train(training)
        exported = torch.export.export(copy.deepcopy(eager), (x, mask)).module()
        for step in range(2):
            close(exported(x + step, mask), eager(x + step, mask), torch.float32)
        for (name, a), b in zip(eager.state_dict().items(), exported.state_dict().values()):
            close(b, a, torch.float32) if a.is_floating_point() else torch.equal(a, b)


def test_checkpoint_counts_the_batch_once(route):
    layer, plain = make_layer(5), None
    plain = copy.deepcopy(layer)
    x, mask, g = batches(steps=1)[0]
    for use_reentrant in (False, True):
        a, b = copy.deepcopy(layer), copy.deepcopy(plain)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        checkpoint(a, xa, mask, use_reentrant=use_reentrant).backward(g)
        b(xb, mask).backward(g)
        assert torch.equal(xa.grad, xb.grad)
        assert torch.equal(a.weight.grad, b.weight.grad)
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), (use_reentrant, k)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = MaskedBatchNorm1d(8)
        self.head = nn.Conv1d(8, 2, 1)

    def forward(self, x, mask):
        return self.head(torch.relu(self.bn(self.conv(x), mask)))


def test_compiled_model_matches_eager_and_bad_count_leaves_buffers():
    torch.manual_seed(0)
    eager = _Model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 10)
        mask = random_mask(4, 10)
        g = torch.randn(4, 2, 10)
        outs = []
        for model, fn in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad()
            out = fn(x, mask)
            out.backward(g)
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        for (k, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=k)
        for (k, b), c in zip(eager.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=k)
    # One real position: the graph's assertion raises (same shapes: no recompile), buffers untouched.
    before = {k: v.clone() for k, v in compiled_model.named_buffers()}
    one = torch.zeros(4, 10, dtype=torch.bool)
    one[2, 3] = True
    with pytest.raises(RuntimeError, match="Expected more than 1 value per channel when training"):
        compiled(torch.randn(4, 3, 10), one)
    for k, v in compiled_model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_bad_arguments_raise_and_leave_buffers_unchanged(route):
    layer = make_layer(5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 5, 7)
    ok = torch.ones(4, 7, dtype=torch.bool)
    cases = [
        (x, ok.float(), TypeError, "mask must be a torch.bool tensor.*got torch.float32"),
        (x, [[True] * 7] * 4, TypeError, "mask must be a Tensor or None, got list"),
        (x, ok[:, :6], RuntimeError, r"mask must have shape \(N, L\) = \[4, 7\].*got \[4, 6\]"),
        (x, ok.t(), RuntimeError, r"mask must have shape \(N, L\)"),
        (x[..., 0], ok, ValueError, "a mask needs \\(N, C, L\\) input, got 2D"),
        (torch.randn(4, 5, 7, 2), ok, ValueError, "expected 2D or 3D input"),
        (torch.randn(4, 6, 7), ok, RuntimeError, "weight must have 6 elements"),
        (x, torch.zeros(4, 7, dtype=torch.bool), ValueError, "Expected more than 1 value per channel.*0 real"),
        (x, lengths_mask([1, 0, 0, 0], 7), ValueError, "Expected more than 1 value per channel.*1 real"),
        (torch.randn(0, 5, 7), torch.ones(0, 7, dtype=torch.bool), ValueError, "Expected more than 1 value"),
    ]
    for inp, mask, exc, match in cases:
        with pytest.raises(exc, match=match):
            layer(inp, mask)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), (match, k)
    # One real position is fine in eval (running statistics), and so is a row without any.
    layer.eval()
    out = layer(x, lengths_mask([1, 0, 0, 0], 7))
    assert out[1:].abs().max() == 0 and out[0, :, 0].abs().max() > 0
    with pytest.raises(TypeError, match="mask must be a torch.bool tensor"):
        bnext.batch_norm(x, None, None, training=True, mask=ok.int())


def test_state_dict_both_ways_and_repr():
    ours = make_layer(5)
    theirs = nn.BatchNorm1d(5)
    theirs.load_state_dict(ours.state_dict())
    ours2 = MaskedBatchNorm1d(5)
    ours2.load_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(ours2.state_dict()[k], v)
    assert isinstance(ours, bnext.BatchNorm1d) and isinstance(ours, nn.BatchNorm1d)
    assert repr(ours).startswith("MaskedBatchNorm1d(5")
    assert torch.fx.symbolic_trace(nn.Sequential(ours)).graph.find_nodes(op="call_module")


def test_route_predicate():
    x = torch.empty(64, 8, 512)
    padded = lengths_mask(torch.randint(1, 513, (64,)), 512)
    assert masked._compact_route(masked._Runs(padded), x)  # one run per row: always compact
    holes = torch.rand(64, 512) < 0.5  # about 128 runs per row, 32 elements each
    assert not masked._compact_route(masked._Runs(holes), x)
    runs = masked._Runs(lengths_mask([3, 0, 2], 4) | torch.tensor([[0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]]).bool())
    assert (runs.rows, runs.starts, runs.stops, runs.count) == ([0, 1, 1, 2], [0, 1, 3, 0], [4, 2, 4, 2], 8)


# ------------------------------------------------------------------------------------------------
# bnext.masked.SyncMaskedBatchNorm: 2 gloo processes (spawned once), unequal real counts per rank,
# against the definition on the concatenated batch in one process.

SYNC_SIZES = [3, 4]  # rows per rank
SYNC_C, SYNC_L = 4, 6
JOIN_TIMEOUT_S = 120


def _sync_worker(rank, world_size, init_file, result_dir, data):
    import datetime
    import os
    import pickle
    import traceback

    import torch.distributed as dist

    from bnext.masked import SyncMaskedBatchNorm

    torch.set_num_threads(1)
    res = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        start = sum(SYNC_SIZES[:rank])
        rows = slice(start, start + SYNC_SIZES[rank])
        bn = SyncMaskedBatchNorm(SYNC_C, momentum=None).double()  # the reference's momentum
        bn.load_state_dict(data["state"])
        steps = []
        for x, mask, g in data["steps"]:
            xr = x[rows].clone().requires_grad_(True)
            bn.zero_grad()
            out = bn(xr, mask[rows])
            out.backward(g[rows])
            steps.append(dict(
                out=out.detach(), dx=xr.grad, dw=bn.weight.grad.clone(), db=bn.bias.grad.clone(),
                buffers={k: v.clone() for k, v in bn.named_buffers()},
            ))
        res["steps"] = steps
        before = {k: v.clone() for k, v in bn.named_buffers()}
        x, mask, _ = data["steps"][0]
        one = torch.zeros_like(mask[rows])
        one[0, 0] = rank == 0  # one real position over both ranks
        errors = {}
        for name, m in [("bad_mask", mask[rows].double() if rank == 1 else mask[rows]), ("one_value", one)]:
            try:
                bn(x[rows], m)
                errors[name] = None
            except Exception as e:  # noqa: BLE001  (the parent checks type and message)
                errors[name] = (type(e).__name__, str(e))
        res["errors"] = errors
        res["unchanged"] = all(torch.equal(before[k], v) for k, v in bn.named_buffers())
        bn.eval()
        res["eval"] = bn(x[rows], mask[rows])
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        res["__error__"] = traceback.format_exc()
    with open(os.path.join(result_dir, f"{rank}.tmp"), "wb") as f:
        pickle.dump(res, f)
    os.replace(os.path.join(result_dir, f"{rank}.tmp"), os.path.join(result_dir, f"{rank}.pkl"))


def _spawn_sync(data):
    import os
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_sync_worker, args=(r, 2, init, tmp, data), daemon=True) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
        assert not hung, f"ranks {hung} did not finish within {JOIN_TIMEOUT_S} s"
        results = []
        for r in range(2):
            with open(os.path.join(tmp, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    for r, res in enumerate(results):
        assert "__error__" not in res, f"rank {r} failed:\n{res['__error__']}"
    return results


def test_sync_masked_two_ranks_match_one_process():
    N = sum(SYNC_SIZES)
    layer = make_layer(SYNC_C, momentum=None).double()
    masks = [random_mask(N, SYNC_L) for _ in range(3)]
    masks[1][SYNC_SIZES[0]:] = False  # rank 1 has no real position
    masks[2][: SYNC_SIZES[0]] = False
    masks[2][0, 2] = True  # rank 0 has one
    shape = (N, SYNC_C, SYNC_L)
    steps = [(torch.randn(shape, dtype=torch.float64) + 1, m, torch.randn(shape, dtype=torch.float64)) for m in masks]
    results = _spawn_sync(dict(state=layer.state_dict(), steps=steps))
    ref = reference_of(layer)
    for i, (x, mask, g) in enumerate(steps):
        ref.zero_grad()
        ref_out, ref_dx = reference_step(ref, x, mask, g)
        close(torch.cat([r["steps"][i]["out"] for r in results]), ref_out)
        close(torch.cat([r["steps"][i]["dx"] for r in results]), ref_dx)
        close(sum(r["steps"][i]["dw"] for r in results), ref.weight.grad)  # DDP sums the local grads
        close(sum(r["steps"][i]["db"] for r in results), ref.bias.grad)
        for r in results:
            for k, v in ref.named_buffers():
                close(r["steps"][i]["buffers"][k], v)
    assert all(r["unchanged"] for r in results)
    assert results[1]["errors"]["bad_mask"][0] == "TypeError"
    kind, words = results[0]["errors"]["bad_mask"]  # the rank with a good mask stops too
    assert kind == "RuntimeError" and "rank(s) [1]" in words
    for r in results:
        assert r["errors"]["one_value"][0] == "ValueError"
        assert "Expected more than 1 value per channel when training" in r["errors"]["one_value"][1]
    # Eval: the running statistics, no collective; the single-process layer's result.
    ref.eval()
    x, mask, _ = steps[0]
    with torch.no_grad():
        expected = torch.zeros(N, SYNC_L, SYNC_C, dtype=torch.float64)
        expected[mask] = ref(x.permute(0, 2, 1)[mask])
    close(torch.cat([r["eval"] for r in results]), expected.permute(0, 2, 1))


def test_sync_masked_without_process_group_is_masked_batchnorm():
    """No process group (or eval, or a group of one): MaskedBatchNorm1d; mask=None: SyncBatchNorm."""
    state = make_layer(5).state_dict()
    x, mask, _ = batches(steps=1)[0]
    for other, args in ((MaskedBatchNorm1d(5), (x, mask)), (bnext.SyncBatchNorm(5), (x,))):
        ours = masked.SyncMaskedBatchNorm(5)
        ours.load_state_dict(state)
        other.load_state_dict(state)
        assert torch.equal(ours(*args), other(*args))
        for (k, a), b in zip(ours.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k
    with pytest.raises(TypeError, match="bnext.SyncMaskedBatchNorm: mask must be a torch.bool tensor"):
        ours(x, mask.float())


def test_emulated_cuda_kernels():
    """The layer on the CUDA route's kernels (bnext.testing.emulate_cuda: the mask-taking kernels,
    the running-statistic update, eval): the definition's results over several steps, double
    backward through the formulas."""
    from bnext.testing import emulate_cuda, simt_module

    torch.manual_seed(11)
    simt = simt_module()
    simt.reset_launches()
    with emulate_cuda():
        run_and_compare(make_layer(5, momentum=0.3), batches(N=4, C=5, L=9, steps=3))
        layer = make_layer(3).double()
        x, mask = torch.randn(3, 3, 6, dtype=torch.float64, requires_grad=True), random_mask(3, 6)
        assert torch.autograd.gradgradcheck(lambda x: layer(x, mask), (x,))
    names = {r["signature"] for r in simt.launches()}
    assert any("MaskedReducer" in n for n in names) and any("MaskedOp" in n for n in names), names


# The CUDA route's mask-taking kernels (bnext::_batch_norm_masked_forward / _backward: csrc/cuda's
# reduction and elementwise kernels with MaskedReducer / MaskedOp), on the SIMT emulator
# (torch.ops.bnext_simt), against the CPU ops of the same schema (the runs kernels, checked against
# the definition above). The shapes drive the launch variants under the emulator's limits (see
# tests/test_cuda_emulated.py): one block a channel; L split over blocks with 64-bit indexing (2400
# elements); N split; channels beyond the grid limit; L = 1 (rows of C: the channels-last
# reduction); a vector tail; misaligned storage (the scalar elementwise kernel).
MASKED_CUDA_CASES = [
    ((4, 5, 9), False),
    ((2, 3, 400), False),
    ((9, 2, 12), False),
    ((2, 7, 5), False),
    ((8, 3, 1), False),
    ((700, 3, 1), False),
    ((2, 3, 35), False),
    ((2, 3, 35), True),
    ((2, 3, 400), True),
]


def masked_cuda_case(shape, misaligned, dtype, seed=0):
    """x and dy of `shape` (NaN at the padding: never read into a result), a mask with holes and at
    least two real positions, weight and bias in the accumulation type."""
    N, C, L = shape
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(N, L, g) if L > 1 else torch.rand(N, 1, generator=g) < 0.6
    mask.view(-1)[:2] = True
    pad = ~mask.unsqueeze(1).expand(shape)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = []
    for scale, shift in ((2.0, 0.5), (1.0, 0.0)):
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        t[pad] = float("nan")
        if misaligned:  # same values at a storage offset of one element: not 16-byte aligned
            buf = torch.empty(t.numel() + 1, dtype=dtype)
            buf[1:] = t.reshape(-1)
            t = buf[1:].view(shape)
        tensors.append(t)
    w = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(acc)
    return tensors[0], tensors[1], mask, w, b


def masked_cuda_results(ns, x, dy, mask, w, b):
    out, mean, invstd, var = ns._batch_norm_masked_forward(x, mask, w, b, 1e-5)
    dx, sum_dy, sum_dy_xmu = ns._batch_norm_masked_backward(dy, x, mask, w, mean, invstd)
    return out, mean, invstd, var, dx, sum_dy, sum_dy_xmu


# float32 on every case; the other dtypes on the 64-bit, rows and vector-tail ones.
MASKED_CUDA_PARAMS = [(case, torch.float32) for case in MASKED_CUDA_CASES] + [
    (case, dtype)
    for case in MASKED_CUDA_CASES
    if case[0] in ((2, 3, 400), (700, 3, 1), (2, 3, 35))
    for dtype in (torch.float64, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize(
    "case,dtype",
    MASKED_CUDA_PARAMS,
    ids=["x".join(map(str, c[0])) + ("-misaligned" if c[1] else "") + "-" + str(d)[6:] for c, d in MASKED_CUDA_PARAMS],
)
def test_emulated_cuda_masked_kernels_match_cpu(case, dtype):
    from bnext.testing import simt_module

    simt_module()
    shape, misaligned = case
    x, dy, mask, w, b = masked_cuda_case(shape, misaligned, dtype)
    got = masked_cuda_results(torch.ops.bnext_simt, x, dy, mask, w, b)
    want = masked_cuda_results(torch.ops.bnext, x, dy, mask, w, b)
    pad = ~mask.unsqueeze(1).expand(shape)
    for i, (u, v) in enumerate(zip(got, want)):
        assert u.dtype == v.dtype and u.shape == v.shape and u.stride() == v.stride(), i
        if u.shape == x.shape:
            assert torch.all(u[pad] == 0) and torch.isfinite(u[~pad].float()).all(), i
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else TOL[dtype]
        torch.testing.assert_close(u.double(), v.double(), **tol, msg=lambda m: f"result {i}: {m}")


def test_emulated_cuda_masked_kernels_deterministic_and_checked():
    """Multi-block reductions merge in block order whichever block finishes last (bitwise); the
    entries refuse bad masks with the CPU entries' messages; no real position gives the empty count's
    results on both."""
    from bnext.testing import simt_module

    simt = simt_module()
    for shape in ((2, 3, 400), (700, 3, 1)):
        x, dy, mask, w, b = masked_cuda_case(shape, False, torch.float32)
        results = []
        try:
            for reverse in (False, True):
                simt.set_block_order(reverse)
                results.append(masked_cuda_results(torch.ops.bnext_simt, x, dy, mask, w, b))
        finally:
            simt.set_block_order(False)
        for u, v in zip(*results):
            assert torch.equal(u.nan_to_num(), v.nan_to_num())
    x = torch.randn(2, 3, 5)
    for ns in (torch.ops.bnext, torch.ops.bnext_simt):
        with pytest.raises(RuntimeError, match=r"mask must have shape \(N, L\) = \[2, 5\], got \[2, 4\]"):
            ns._batch_norm_masked_forward(x, torch.ones(2, 4, dtype=torch.bool), None, None, 1e-5)
        with pytest.raises(RuntimeError, match="mask must be a bool tensor, got Float"):
            ns._batch_norm_masked_forward(x, torch.ones(2, 5), None, None, 1e-5)
        with pytest.raises(RuntimeError, match=r"input must be \(N, C, L\) with a mask, got 4D"):
            ns._batch_norm_masked_forward(x[..., None], torch.ones(2, 5, dtype=torch.bool), None, None, 1e-5)
        out, mean, invstd, var = ns._batch_norm_masked_forward(x, torch.zeros(2, 5, dtype=torch.bool), None, None, 1e-5)
        assert torch.equal(out, torch.zeros_like(x)) and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))
        dx, sum_dy, _ = ns._batch_norm_masked_backward(x, x, torch.zeros(2, 5, dtype=torch.bool), None, mean, invstd)
        assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(sum_dy, torch.zeros(3))


def test_masked_ops_opcheck():
    """The mask-taking ops' schemas and fake kernels (bnext/_ops/fake.py), on CPU and emulated."""
    from bnext.testing import simt_module

    simt_module()
    x, dy, mask, w, b = masked_cuda_case((3, 4, 7), False, torch.float32)
    x, dy = x.nan_to_num(), dy.nan_to_num()
    for ns in (torch.ops.bnext, torch.ops.bnext_simt):
        _, mean, invstd, _ = ns._batch_norm_masked_forward(x, mask, w, b, 1e-5)
        torch.library.opcheck(ns._batch_norm_masked_forward, (x, mask, w, b, 1e-5))
        torch.library.opcheck(ns._batch_norm_masked_backward, (dy, x, mask, w, mean, invstd))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_copy_ops_match_the_slices(dtype, monkeypatch):
    """csrc/cpu/masked_runs.cpp against the slice copies of the other devices (_Compact and _Expand
    with the copy ops switched off): masks with holes, rows without real positions, no real
    position at all, every position real; a strided input."""
    torch.manual_seed(11)
    N, C, L = 6, 37, 29
    holes = random_mask(N, L)
    holes[2] = False
    holes[5] = False
    masks = [random_mask(N, L), holes, torch.zeros(N, L, dtype=torch.bool), torch.ones(N, L, dtype=torch.bool)]
    x = torch.randn(N, L, C).to(dtype).transpose(1, 2)  # (N, C, L), not contiguous
    for mask in masks:
        runs = masked._Runs(mask)
        expected = torch.cat(runs.slices(x), dim=1).unsqueeze(0) if len(runs) else x.new_zeros((1, C, 0))
        compact = torch.ops.bnext._masked_compact(x, runs.table)
        assert compact.is_contiguous() and torch.equal(compact, expected)
        back = torch.ops.bnext._masked_expand(compact, runs.table, N, L)
        assert torch.equal(back, torch.where(mask.unsqueeze(1), x, 0)), mask
        with monkeypatch.context() as m:
            m.setattr(masked, "_copy_ops", lambda t: False)
            assert torch.equal(masked._Compact.apply(x, runs), compact)
            assert torch.equal(masked._Expand.apply(compact, runs, x.shape), back)


def test_cpu_copy_ops_refuse_bad_runs():
    x = torch.randn(2, 3, 5)
    good = masked._Runs(lengths_mask([3, 5], 5)).table
    compact = torch.ops.bnext._masked_compact(x, good)
    bad_tables = {
        "shape": good[:, :2],
        "dtype": good.int(),
        "row out of range": torch.tensor([[2, 0, 1]]),
        "rows out of order": torch.tensor([[1, 0, 1], [0, 0, 1]]),
        "overlapping runs": torch.tensor([[0, 0, 3], [0, 2, 4]]),
        "past the end": torch.tensor([[0, 0, 6]]),
        "empty run": torch.tensor([[0, 2, 2]]),
    }
    for name, table in bad_tables.items():
        with pytest.raises(RuntimeError, match="run"):
            torch.ops.bnext._masked_compact(x, table)
        with pytest.raises(RuntimeError, match="run"):
            torch.ops.bnext._masked_expand(compact, table, 2, 5)
    with pytest.raises(RuntimeError, match="compact must be"):
        torch.ops.bnext._masked_expand(compact[:, :, 1:], good, 2, 5)
    with pytest.raises(RuntimeError, match="non-negative"):
        torch.ops.bnext._masked_expand(compact, good, -1, 5)


# The CPU kernels of the runs route (csrc/cpu/kernel/masked.h): statistics blocks of at most 4096
# values a channel (kBlock), so channels of more real positions take several blocks, and a run
# longer than a block is cut; rows whose length in bytes is a multiple of 64 and larger outputs
# stream their stores (BNEXT_CPU_STREAM_BYTES=0 forces it on small ones).
# From 16 channels the forward and backward run fused channel by channel (kMaskedFusedChannels),
# with the same bits.
KERNEL_CASES = [
    # (N, C, L, lengths): one block a channel; several blocks, a run cut in three; rows of 64-byte
    # lines; the same three fused
    (3, 5, 37, [37, 20, 1]),
    (3, 4, 5000, [4500, 5000, 1200]),
    (4, 3, 512, [512, 300, 17, 100]),
    (3, 17, 37, [37, 20, 1]),
    (2, 16, 5000, [5000, 4200]),
    (4, 18, 512, [512, 300, 17, 100]),
]


def _kernel_case(N, C, L, lengths, dtype):
    g = torch.Generator().manual_seed(N * 1000 + L)
    mask = lengths_mask(lengths, L) & ~(torch.rand(N, L, generator=g) < 0.05)
    mask[:, 0] = True
    x = (torch.randn(N, C, L, generator=g, dtype=torch.float64) * 2 + 5).to(dtype)
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding is never read
    dy = torch.randn(N, C, L, generator=g, dtype=torch.float64).to(dtype)
    return x, dy, mask


def _run_kernels(x, dy, mask, w, b):
    runs = masked._Runs(mask)
    y, mean, var, invstd = torch.ops.bnext._masked_forward(x, runs.table, w, b, 1e-5)
    dx, sum_dy, sum_dy_xmu = torch.ops.bnext._masked_backward(dy, x, runs.table, mean, invstd, w, True)
    return mean, var, y, dx, sum_dy, sum_dy_xmu, invstd


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "x".join(map(str, c[:3])))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_masked_kernels_match_the_definition(case, dtype, isa, monkeypatch):
    """Every kernel variant, streamed and not: statistics, output, backward sums and grad_input
    against float64 formulas on the gathered real positions; the same bits for 1 and 2 threads and
    with and without streaming stores."""
    N, C, L, lengths = case
    x, dy, mask = _kernel_case(N, C, L, lengths, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.linspace(-1.5, 2, C, dtype=acc)
    b = torch.linspace(-1, 1, C, dtype=acc)
    results = {}
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            for stream in ("0", "1000000000000"):
                torch.set_num_threads(n_threads)
                monkeypatch.setenv("BNEXT_CPU_STREAM_BYTES", stream)
                results[n_threads, stream] = _run_kernels(x, dy, mask, w, b)
    finally:
        torch.set_num_threads(threads)
    first = next(iter(results.values()))
    for key, res in results.items():
        for a, e in zip(res, first):
            assert torch.equal(a.nan_to_num(), e.nan_to_num()), key
    mean, var, y, dx, sum_dy, sum_dy_xmu, invstd = first
    if C >= 16:  # fused: the same bits as the unfused kernels (which run for fewer channels)
        for c in range(0, C, 5):
            part = _run_kernels(x[:, c : c + 5], dy[:, c : c + 5], mask, w[c : c + 5], b[c : c + 5])
            for a, e in zip(part, (mean, var, y, dx, sum_dy, sum_dy_xmu, invstd)):
                e = e[c : c + 5] if e.dim() == 1 else e[:, c : c + 5]
                assert torch.equal(a.nan_to_num(), e.nan_to_num()), c

    # The definition on the gathered (K, C) real positions, in float64.
    m3 = mask.unsqueeze(1).expand_as(x)
    xr = x.double().permute(0, 2, 1)[mask]  # (K, C)
    gr = dy.double().permute(0, 2, 1)[mask]
    K = xr.shape[0]
    ref_mean, ref_var = xr.mean(0), xr.var(0, unbiased=False)
    ref_invstd = torch.rsqrt(ref_var + 1e-5)
    xhat = (xr - ref_mean) * ref_invstd
    ref_y = xhat * w.double() + b.double()
    ref_sum_dy, ref_sum_dy_xmu = gr.sum(0), (gr * (xr - ref_mean)).sum(0)
    ref_dx = w.double() * ref_invstd * (gr - ref_sum_dy / K - xhat * (gr * xhat).sum(0) / K)
    stats_tol = F64 if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, **stats_tol)
    torch.testing.assert_close(var.double(), ref_var, **stats_tol)
    torch.testing.assert_close(invstd.double(), ref_invstd, **stats_tol)
    torch.testing.assert_close(sum_dy.double(), ref_sum_dy, **(F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)))
    torch.testing.assert_close(
        sum_dy_xmu.double(), ref_sum_dy_xmu, **(F64 if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3))
    )
    for out, ref in ((y, ref_y), (dx, ref_dx)):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert torch.all(out[~m3] == 0)  # zeros at the padding, whatever it holds
        close(out.permute(0, 2, 1)[mask], ref, dtype)


@pytest.mark.parametrize("C", [5, 17])
def test_masked_kernels_strided_input_and_no_input_grad(C):
    x, dy, mask = _kernel_case(3, C, 37, [37, 20, 1], torch.float32)
    runs = masked._Runs(mask)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L) with other strides
    dyt = dy.transpose(1, 2).contiguous().transpose(1, 2)
    fwd = torch.ops.bnext._masked_forward(x, runs.table, None, None, 1e-5)
    assert all(torch.equal(a.nan_to_num(), e.nan_to_num()) for a, e in zip(torch.ops.bnext._masked_forward(xt, runs.table, None, None, 1e-5), fwd))
    _, mean, _, invstd = fwd
    full = torch.ops.bnext._masked_backward(dy, x, runs.table, mean, invstd, None, True)
    strided = torch.ops.bnext._masked_backward(dyt, xt, runs.table, mean, invstd, None, True)
    assert all(torch.equal(a, e) for a, e in zip(strided, full))
    no_dx = torch.ops.bnext._masked_backward(dy, x, runs.table, mean, invstd, None, False)
    assert no_dx[0].numel() == 0 and torch.equal(no_dx[1], full[1]) and torch.equal(no_dx[2], full[2])


def test_masked_kernels_refuse_bad_arguments():
    x = torch.randn(2, 3, 5)
    runs = masked._Runs(lengths_mask([3, 5], 5)).table
    _, mean, _, invstd = torch.ops.bnext._masked_forward(x, runs, None, None, 1e-5)
    bnm = torch.ops.bnext
    cases = [
        (lambda: bnm._masked_forward(x[0], runs, None, None, 1e-5), "input must be \\(N, C, L\\)"),
        (lambda: bnm._masked_forward(x.int(), runs, None, None, 1e-5), "input must be float32"),
        (lambda: bnm._masked_forward(x, runs[:0], None, None, 1e-5), "at least one real position"),
        (lambda: bnm._masked_forward(x, torch.tensor([[0, 0, 6]]), None, None, 1e-5), "run 0 of row 0"),
        (lambda: bnm._masked_forward(x, runs, torch.ones(4), None, 1e-5), "weight must have shape \\(3\\)"),
        (lambda: bnm._masked_forward(x, runs, None, torch.ones(2), 1e-5), "bias must have shape"),
        (lambda: bnm._masked_forward(x, runs, None, None, -1.0), "eps must be non-negative"),
        (lambda: bnm._masked_backward(x, x, runs, mean[:2], invstd, None, True), "mean must have shape"),
        (lambda: bnm._masked_backward(x[:1], x, runs, mean, invstd, None, True), "grad_out must match input"),
        (lambda: bnm._masked_backward(x.double(), x, runs, mean, invstd, None, True), "grad_out must match input"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def test_cpu_route_runs_on_the_kernels_without_copies(monkeypatch):
    """On CPU the runs route reads the real positions in place: no compact copy is made."""

    def no_copy(*args):
        raise AssertionError("the CPU runs route made a compact copy")

    monkeypatch.setattr(masked._Compact, "apply", no_copy)
    monkeypatch.setattr(masked._Expand, "apply", no_copy)
    layer = make_layer(5)
    run_and_compare(layer, batches(N=4, C=5, L=40))


def test_runs_of_a_mask():
    """bnext._masked_runs against the runs read off the mask's edges with torch ops."""
    torch.manual_seed(5)
    holes = random_mask(6, 29)
    holes[2] = False
    masks = [random_mask(6, 29), holes, torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool),
             torch.rand(7, 33) < 0.5, torch.zeros(0, 5, dtype=torch.bool)]
    for mask in masks:
        edges = torch.nn.functional.pad(mask.to(torch.int8), (1, 1)).diff(dim=1)  # +1 at a start, -1 past an end
        starts, stops = (edges == 1).nonzero(), (edges == -1).nonzero()
        expected = torch.stack([starts[:, 0], starts[:, 1], stops[:, 1]], 1)
        table = torch.ops.bnext._masked_runs(mask)
        assert table.dtype == torch.int64 and torch.equal(table, expected), mask
        assert masked._Runs(mask).count == int(mask.sum())
    assert torch.equal(torch.ops.bnext._masked_runs(holes.t().contiguous().t()), torch.ops.bnext._masked_runs(holes))
    for bad in (torch.ones(2, 3), torch.ones(2, 3, 4, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match="mask must be a 2-D bool tensor"):
            torch.ops.bnext._masked_runs(bad)
