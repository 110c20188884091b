"""Fused BN + activation (+ residual): bnext.BatchNormAct1d/2d/3d and bnext.batch_norm_act against
torch's BatchNorm followed by the add and the activation, on identical weights and inputs.

Kernel-level parity of the three ops over every ISA variant is tests/test_fused_kernels.py; the
emulated CUDA kernels are tests/test_cuda_emulated.py; fuse_model is tests/test_fuse_model.py.
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext
from bnext._ops import fused as fused_ops

ACTS = [
    ("identity", {}),
    ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.1}),
    ("elu", {"alpha": 0.7}),
    ("silu", {}),
    ("hardswish", {}),
]
INVERTIBLE = [("identity", {}), ("leaky_relu", {"negative_slope": 0.1}), ("elu", {"alpha": 1.0})]

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
ACT = {1: bnext.BatchNormAct1d, 2: bnext.BatchNormAct2d, 3: bnext.BatchNormAct3d}


def torch_act(name, kw):
    return {
        "identity": nn.Identity(),
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(kw.get("negative_slope", 0.01)),
        "elu": nn.ELU(kw.get("alpha", 1.0)),
        "silu": nn.SiLU(),
        "hardswish": nn.Hardswish(),
    }[name]


class TorchRef(nn.Module):
    def __init__(self, bn, act):
        super().__init__()
        self.bn, self.act = bn, act

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return self.act(y)


def make_pair(dims, C, name, kw, dtype=torch.float32, memory_saving=False, **bn_kw):
    ref_bn = BN[dims](C, **bn_kw)
    with torch.no_grad():
        w = torch.randn(C)
        w[0] = 0.0  # a zero weight
        if C > 2:
            w[1] = -abs(w[1]) - 0.5  # a negative one
        ref_bn.weight.copy_(w) if ref_bn.weight is not None else None
        if ref_bn.bias is not None:
            ref_bn.bias.copy_(torch.randn(C) * 0.5)
    ours = ACT[dims](C, activation=name, memory_saving=memory_saving, **kw, **bn_kw)
    ours.load_state_dict(ref_bn.state_dict())
    return TorchRef(ref_bn, torch_act(name, kw)).to(dtype), ours.to(dtype)


def shape_of(dims, N=4, C=6):
    return {1: (N, C, 5), 2: (N, C, 7, 5), 3: (N, C, 3, 4, 5)}[dims]


def tol(dtype):
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-8),
        torch.float32: dict(atol=2e-5, rtol=1e-4),
        torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
        torch.float16: dict(atol=1e-2, rtol=1e-2),
    }[dtype]


def check_training_steps(ref, ours, shape, dtype, residual, fmt=torch.contiguous_format, steps=3):
    for step in range(steps):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        if fmt != torch.contiguous_format:
            x = x.contiguous(memory_format=fmt)
        r = torch.randn(shape, dtype=dtype) if residual else None
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        rr = None if r is None else r.clone().requires_grad_()
        ro = None if r is None else r.clone().requires_grad_()
        yr, yo = ref(xr, rr), ours(xo, ro)
        assert yo.dtype == yr.dtype and yo.shape == yr.shape
        assert yo.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(yo, yr, **tol(dtype))
        g = torch.randn_like(yr)
        yr.backward(g)
        yo.backward(g)
        torch.testing.assert_close(xo.grad, xr.grad, **tol(dtype))
        if residual:
            torch.testing.assert_close(ro.grad, rr.grad, **tol(dtype))
        if ref.bn.affine:
            gt = dict(atol=tol(dtype)["atol"] * 10 * x.numel() ** 0.5, rtol=tol(dtype)["rtol"] * 10)
            torch.testing.assert_close(ours.weight.grad, ref.bn.weight.grad, **gt)
            torch.testing.assert_close(ours.bias.grad, ref.bn.bias.grad, **gt)
            ours.weight.grad = ours.bias.grad = ref.bn.weight.grad = ref.bn.bias.grad = None
        if ref.bn.track_running_stats:
            torch.testing.assert_close(ours.running_mean, ref.bn.running_mean, **tol(dtype))
            torch.testing.assert_close(ours.running_var, ref.bn.running_var, **tol(dtype))
            assert ours.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == step + 1


@pytest.mark.parametrize("name,kw", ACTS, ids=[a for a, _ in ACTS])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_train_and_eval_match_torch(name, kw, residual, dims):
    torch.manual_seed(dims * 10 + residual)
    ref, ours = make_pair(dims, 6, name, kw)
    check_training_steps(ref, ours, shape_of(dims), torch.float32, residual)
    ref.eval(), ours.eval()
    x = torch.randn(shape_of(dims))
    r = torch.randn(shape_of(dims)) if residual else None
    torch.testing.assert_close(ours(x, r), ref(x, r), **tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", [ACTS[1], ACTS[4]], ids=["relu", "silu"])
def test_dtypes(dtype, name, kw):
    torch.manual_seed(1)
    ref, ours = make_pair(2, 5, name, kw)
    if dtype == torch.float64:
        ref, ours = ref.double(), ours.double()
    # Half types: float32 parameters (autocast's layout), as torch's BN keeps them.
    check_training_steps(ref, ours, shape_of(2, C=5), dtype, residual=True)


@pytest.mark.parametrize("dims,fmt", [(2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("name,kw", [ACTS[1], ACTS[5]], ids=["relu", "hardswish"])
def test_channels_last(dims, fmt, name, kw):
    torch.manual_seed(2)
    ref, ours = make_pair(dims, 8, name, kw)
    check_training_steps(ref, ours, shape_of(dims, C=8), torch.float32, residual=True, fmt=fmt)


@pytest.mark.parametrize(
    "bn_kw", [dict(affine=False), dict(track_running_stats=False), dict(momentum=None)], ids=["no-affine", "no-stats", "cma"]
)
def test_bn_options(bn_kw):
    torch.manual_seed(3)
    ref, ours = make_pair(2, 4, "relu", {}, **bn_kw)
    check_training_steps(ref, ours, shape_of(2, C=4), torch.float32, residual=True)


@pytest.mark.parametrize("name,kw", INVERTIBLE, ids=[a for a, _ in INVERTIBLE])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_memory_saving_matches_torch_and_default_mode(name, kw, residual):
    """Weights include 0, a negative and a tiny one (kept channels), in float64 so that any
    reconstruction error would show."""
    torch.manual_seed(4)
    ref, ours = make_pair(2, 6, name, kw, dtype=torch.float64, memory_saving=True)
    with torch.no_grad():
        ours.weight[2] = 1e-9
        ref.bn.weight[2] = 1e-9
    check_training_steps(ref, ours, shape_of(2, C=6), torch.float64, residual)
    plain = copy.deepcopy(ours)
    plain.memory_saving = False
    x = torch.randn(shape_of(2, C=6), dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (gs,) = torch.autograd.grad(ours(x), x, g)
    (gp,) = torch.autograd.grad(plain(x), x, g)
    torch.testing.assert_close(gs, gp, atol=1e-9, rtol=1e-7)


def saved_bytes(fn, *args):
    """Bytes of the distinct tensors autograd saves while fn runs (a tensor saved by several nodes
    counts once, as it is stored once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


@pytest.mark.parametrize("name,kw,torch_act_mod", [
    ("leaky_relu", {"negative_slope": 0.1}, nn.LeakyReLU(0.1)),
    ("elu", {"alpha": 1.0}, nn.ELU()),
])
def test_memory_saving_saves_one_activation_per_layer(name, kw, torch_act_mod):
    """BN -> act -> conv, three times: the bytes autograd keeps, torch vs fused vs memory-saving."""
    torch.manual_seed(5)
    C, shape = 16, (8, 16, 16, 16)

    def net(bn_factory):
        layers = []
        for _ in range(3):
            layers += [nn.Conv2d(C, C, 3, padding=1, bias=False), *bn_factory()]
        # Every BN layer's output is the next conv's input (which that conv keeps anyway).
        return nn.Sequential(*layers, nn.Conv2d(C, C, 1, bias=False))

    torch_net = net(lambda: [nn.BatchNorm2d(C), copy.deepcopy(torch_act_mod)])
    fused_net = net(lambda: [bnext.BatchNormAct2d(C, activation=name, **kw)])
    saving_net = net(lambda: [bnext.BatchNormAct2d(C, activation=name, memory_saving=True, **kw)])
    # The same weights: torch's layers without the (stateless) activations, in order.
    weights = [m for m in torch_net if not isinstance(m, type(torch_act_mod))]
    for other in (fused_net, saving_net):
        for a, b in zip(other, weights):
            a.load_state_dict(b.state_dict())
    x = torch.randn(shape, requires_grad=True)
    act_bytes = x.numel() * x.element_size()
    b_torch, y_torch = saved_bytes(torch_net, x)
    b_fused, y_fused = saved_bytes(fused_net, x)
    b_saving, y_saving = saved_bytes(saving_net, x)
    # torch: per layer the conv output (BN's input), the BN output (activation's input) and the
    # activation output (next conv's input). Fused: no BN output. Memory-saving: no BN input either.
    assert b_torch - b_fused >= 3 * act_bytes
    assert b_fused - b_saving >= 3 * act_bytes
    g = torch.randn_like(y_torch)
    grads = [torch.autograd.grad(y, x, g)[0] for y in (y_torch, y_fused, y_saving)]
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-4, rtol=1e-4)


def test_state_dict_is_batch_norms_both_ways():
    bn = nn.BatchNorm2d(7)
    bn.train()(torch.randn(4, 7, 3, 3))
    ours = bnext.BatchNormAct2d(7, activation="silu")
    assert ours.state_dict().keys() == bn.state_dict().keys()
    ours.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(7)
    back.load_state_dict(ours.state_dict())
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert isinstance(ours, bnext.BatchNorm2d) and isinstance(ours, nn.BatchNorm2d)
    assert "activation=silu" in repr(ours)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        bnext.BatchNormAct2d(4, activation="gelu")
    with pytest.raises(ValueError, match="memory_saving=True needs an invertible activation"):
        bnext.BatchNormAct2d(4, activation="relu", memory_saving=True)
    with pytest.raises(ValueError, match="negative_slope > 0"):
        bnext.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.0, memory_saving=True)
    m = bnext.BatchNormAct2d(4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="must have 5 elements"):
        m(torch.randn(4, 5, 3, 3))  # wrong channel count: torch's exception type
    with pytest.raises(ValueError):
        m(torch.randn(4, 4))  # wrong dimension count (_check_input_dim)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_residual_torch_would_broadcast_or_promote():
    """A residual of another shape or dtype: torch's add semantics (broadcast, promotion)."""
    torch.manual_seed(6)
    ref, ours = make_pair(2, 4, "relu", {})
    x = torch.randn(2, 4, 3, 3)
    for r in (torch.randn(1, 4, 1, 1), torch.randn(2, 4, 3, 3, dtype=torch.float64)):
        torch.testing.assert_close(ours(x, r), ref(x, r), atol=1e-6, rtol=1e-6)


def test_empty_batch():
    ref, ours = make_pair(2, 3, "relu", {})
    x = torch.randn(0, 3, 4, 4)
    torch.testing.assert_close(ours(x, torch.randn(0, 3, 4, 4)), ref(x, torch.randn(0, 3, 4, 4)))


def test_functional_matches_module():
    torch.manual_seed(7)
    x, r = torch.randn(4, 5, 6, 6), torch.randn(4, 5, 6, 6)
    w, b = torch.randn(5), torch.randn(5)
    rm, rv = torch.zeros(5), torch.ones(5)
    y = bnext.batch_norm_act(x, rm, rv, w, b, training=True, residual=r, activation="elu", alpha=0.5)
    rm2, rv2 = torch.zeros(5), torch.ones(5)
    expected = F.elu(F.batch_norm(x, rm2, rv2, w, b, training=True) + r, 0.5)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


# ----------------------------------------------------------------------------------------------
# Autograd machinery: gradcheck / gradgradcheck through the layer, forward AD, torch.func,
# checkpoint, opcheck of the ops.


@pytest.mark.parametrize("name,kw", ACTS, ids=[a for a, _ in ACTS])
def test_gradcheck_gradgradcheck(name, kw):
    torch.manual_seed(8)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        return bnext.batch_norm_act(x, None, None, w, b, training=True, residual=r, activation=name, **kw)

    # hardswish/relu have kinks: inputs land away from them with this seed in float64.
    assert torch.autograd.gradcheck(f, (x, r, w, b))
    assert torch.autograd.gradgradcheck(f, (x, r, w, b))


@pytest.mark.parametrize("name,kw", INVERTIBLE[1:], ids=["leaky_relu", "elu"])
def test_gradcheck_memory_saving(name, kw):
    torch.manual_seed(9)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        return bnext.batch_norm_act(
            x, None, None, w, b, training=True, residual=r, activation=name, memory_saving=True, **kw
        )

    assert torch.autograd.gradcheck(f, (x, r, w, b))


def test_eval_gradients_and_forward_ad():
    torch.manual_seed(10)
    ref, ours = make_pair(2, 4, "silu", {}, dtype=torch.float64)
    ref.eval(), ours.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ours(x), (x,))
    import torch.autograd.forward_ad as fwAD

    t = torch.randn_like(x)
    for mode in ("eval", "train"):
        ref.train(mode == "train"), ours.train(mode == "train")
        outs = []
        for m in (ref, ours):
            with fwAD.dual_level():
                y = m(fwAD.make_dual(x.detach(), t))
                outs.append(fwAD.unpack_dual(y).tangent)
        torch.testing.assert_close(outs[1], outs[0])


def test_torch_func_grad_vmap_and_checkpoint():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(11)
    ref, ours = make_pair(2, 4, "hardswish", {}, track_running_stats=False)
    x, r = torch.randn(5, 3, 4, 3, 3), torch.randn(5, 3, 4, 3, 3)

    def loss(model, params, x, r):
        return functional_call(model, params, (x, r)).square().sum()

    pr = {k: v.detach() for k, v in ref.named_parameters()}
    po = {k.replace("bn.", ""): v for k, v in pr.items()}
    g_ref = vmap(grad(lambda p, x, r: loss(ref, p, x, r)), in_dims=(None, 0, 0))(pr, x, r)
    g_ours = vmap(grad(lambda p, x, r: loss(ours, p, x, r)), in_dims=(None, 0, 0))(po, x, r)
    for k in po:
        torch.testing.assert_close(g_ours[k], g_ref["bn." + k], atol=1e-4, rtol=1e-4)
    # checkpoint: running statistics counted once, gradients as without it.
    ref, ours = make_pair(2, 4, "relu", {})
    xi = torch.randn(4, 4, 5, 5, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(ours, xi, torch.randn(4, 4, 5, 5), use_reentrant=False)
    out.sum().backward()
    assert ours.num_batches_tracked.item() == 1
    ref(xi.detach()).sum()
    torch.testing.assert_close(ours.running_mean, ref.bn.running_mean)


@pytest.mark.parametrize("op", ["batch_norm_act_forward", "batch_norm_act_eval", "batch_norm_act_backward"])
def test_opcheck(op):
    torch.manual_seed(12)
    x = torch.randn(3, 4, 5, 5)
    r = torch.randn(3, 4, 5, 5)
    w, b = torch.randn(4), torch.randn(4)
    mean, invstd = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False).add(1e-5).rsqrt()
    o = getattr(torch.ops.bnext, op).default
    cases = {
        "batch_norm_act_forward": [(x, w, b, r, 1e-5, 1, 0.0), (x.requires_grad_(), w, None, None, 1e-5, 4, 0.0)],
        "batch_norm_act_eval": [(x.detach(), w, b, mean, invstd, r, 1e-5, 3, 0.5)],
        "batch_norm_act_backward": [
            (torch.randn_like(x), x.detach(), r, w, b, mean, invstd, 2, 0.1, False),
            (torch.randn_like(x), x.detach(), None, w, b, mean, invstd, 2, 0.1, True),
        ],
    }[op]
    for args in cases:
        torch.library.opcheck(o, args)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(13)
    ref, ours = make_pair(2, 8, "relu", {})
    compiled = torch.compile(copy.deepcopy(ours), fullgraph=True)
    eager = copy.deepcopy(ours)
    for _ in range(2):
        x, r = torch.randn(4, 8, 6, 6, requires_grad=True), torch.randn(4, 8, 6, 6)
        xc = x.detach().clone().requires_grad_()
        y, yc = eager(x, r), compiled(xc, r)
        torch.testing.assert_close(yc, y)
        g = torch.randn_like(y)
        y.backward(g), yc.backward(g)
        torch.testing.assert_close(xc.grad, x.grad)
        torch.testing.assert_close(compiled.weight.grad, eager.weight.grad)
        torch.testing.assert_close(compiled.running_var, eager.running_var)


def test_export_torchscript_and_decompositions():
    torch.manual_seed(14)
    ref, ours = make_pair(2, 4, "leaky_relu", {"negative_slope": 0.2})
    ours.eval(), ref.eval()
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    ep = torch.export.export(ours, (x, r))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("bnext" in n for n in names), names
    torch.testing.assert_close(ep.module()(x, r), ref(x, r))
    scripted = torch.jit.script(ours)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    torch.testing.assert_close(scripted(x, r), ref(x, r))
    # The ops' decompositions agree with the ops.
    table = bnext.decompositions()
    w, b = ours.weight.detach(), ours.bias.detach()
    for args in [(x, w, b, r, 1e-5, 5, 0.0), (x, None, b, None, 1e-5, 3, 0.3)]:
        out = torch.ops.bnext.batch_norm_act_forward(*args)
        dec = table[torch.ops.bnext.batch_norm_act_forward.default](*args)
        for o, d in zip(out, dec):
            torch.testing.assert_close(o, d)


def test_composites_are_the_reference():
    """The composites (what forward AD, torch.func and double backward run) agree with the
    kernels on every activation, both backward modes."""
    torch.manual_seed(15)
    x, r = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64) + 2, torch.randn(3, dtype=torch.float64)
    dy = torch.randn_like(x)
    for code in range(6):
        p = 0.3
        out = torch.ops.bnext.batch_norm_act_forward(x, w, b, r, 1e-5, code, p)
        comp = fused_ops.forward_composite(x, w, b, r, 1e-5, code, p)
        for o, c in zip(out, comp):
            torch.testing.assert_close(o, c)
        modes = [False] + ([True] if code in (0, 2, 3) else [])
        for from_output in modes:
            saved = out[0] if from_output else x
            got = torch.ops.bnext.batch_norm_act_backward(dy, saved, r, w, b, out[1], out[2], code, p, from_output)
            want = fused_ops.backward_composite(dy, saved, r, w, b, out[1], out[2], code, p, from_output)
            for o, c in zip(got, want):
                torch.testing.assert_close(o, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_saving_elu_where_it_saturates(dtype):
    """A channel driven far below 0: elu's output is exactly -alpha there, whose inverse would be
    -inf. The gradients stay finite and match the input-saving layer (dz is 0 at those values)."""
    torch.manual_seed(16)
    saving = bnext.BatchNormAct2d(3, activation="elu", memory_saving=True)
    plain = bnext.BatchNormAct2d(3, activation="elu")
    with torch.no_grad():
        for m in (saving, plain):
            m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            m.bias.copy_(torch.tensor([0.0, -30.0, 0.3]))  # channel 1: z about -30 +- 2
    x = torch.randn(4, 3, 6, 6).to(dtype)
    g = torch.randn(4, 3, 6, 6).to(dtype)
    grads = []
    for m in (saving, plain):
        xi = x.clone().requires_grad_()
        m(xi).backward(g)
        grads.append((xi.grad.float(), m.weight.grad.clone(), m.bias.grad.clone()))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol(dtype))
