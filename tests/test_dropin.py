"""The drop-in contract, scenario by scenario: what a user does with nn.BatchNorm*d works with bnext
and gives torch's answer, on identical weights and inputs (torch.func, forward AD, batched
gradients, checkpoint, parametrize, attributes set in place of parameters, empty inputs).

Deployment paths (TorchScript, export, ONNX, compile) are in test_deployment.py, FX and
quantization in test_fx.py and test_conversion.py, torch's own test machinery in
test_torch_suites.py.
"""
import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap
from torch.utils.checkpoint import checkpoint

import bnext

D = torch.float64


def twins(nd=2, C=3, dtype=D, **kw):
    """A torch layer and its bnext twin with the same random parameters and statistics."""
    ref = getattr(nn, f"BatchNorm{nd}d")(C, dtype=dtype, **kw)
    ours = getattr(bnext, f"BatchNorm{nd}d")(C, dtype=dtype, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
        if ref.running_mean is not None:
            ref.running_mean.normal_()
            ref.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def assert_tree_close(a, b, **kw):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y, **kw)


def assert_same_state(ours, ref):
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{k}: {m}")


MODES = ["train", "eval"]


# ------------------------------------------------------------------------------------------------
# torch.func


@pytest.mark.parametrize("mode", MODES)
def test_func_grad_jacrev_jvp(mode):
    # torch's BN refuses grad/jvp in training with tracked statistics (an in-place update of a
    # captured buffer), so the comparison uses track_running_stats=False there; see
    # test_func_transforms_with_tracked_statistics for what bnext does beyond.
    ref, ours = twins(track_running_stats=(mode == "eval"))
    ref.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(4, 3, 5, 5, dtype=D)
    t = torch.randn_like(x)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(m):
        return lambda p, x: (functional_call(m, p, (x,)) ** 3).sum()

    assert_tree_close(grad(loss(ours), argnums=(0, 1))(params, x), grad(loss(ref), argnums=(0, 1))(params, x))
    assert_tree_close(jacrev(lambda x: ours(x).sum((0, 2, 3)))(x), jacrev(lambda x: ref(x).sum((0, 2, 3)))(x))
    assert_tree_close(jvp(ours, (x,), (t,)), jvp(ref, (x,), (t,)))
    # second order through the transforms
    assert_tree_close(
        grad(lambda x: grad(lambda y: (ours(y) ** 3).sum())(x).square().sum())(x),
        grad(lambda x: grad(lambda y: (ref(y) ** 3).sum())(x).square().sum())(x),
    )
    assert_same_state(ours, ref)


def test_func_transforms_with_tracked_statistics():
    # Beyond torch: grad and jvp of a training layer with tracked statistics work (torch raises on
    # its in-place update of a captured buffer); the statistics are updated once per call.
    ref, ours = twins()
    x = torch.randn(4, 3, 5, 5, dtype=D)
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        grad(lambda x: ref(x).square().sum())(x)
    expected_grad = grad(lambda x: bnext.batch_norm(x, None, None, ours.weight, ours.bias, True).square().sum())(x)
    torch.testing.assert_close(grad(lambda x: ours(x).square().sum())(x), expected_grad)
    reference = twins()[0]
    reference.load_state_dict(ref.state_dict())
    reference(x)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nd,shape", [(1, (6, 3)), (1, (4, 3, 7)), (2, (4, 3, 5, 5)), (3, (2, 3, 2, 3, 4))])
def test_vmap(mode, nd, shape):
    ref, ours = twins(nd, track_running_stats=(mode == "eval"))
    ref.train(mode == "train")
    ours.train(mode == "train")
    xb = torch.randn(5, *shape, dtype=D)
    assert_tree_close(vmap(ours)(xb), vmap(ref)(xb))
    # batch dimension elsewhere, channels_last per sample
    xb = torch.randn(*shape, 5, dtype=D)
    assert_tree_close(vmap(ours, in_dims=-1, out_dims=1)(xb), vmap(ref, in_dims=-1, out_dims=1)(xb))


def test_vmap_with_unbatched_running_statistics_raises_as_torch():
    ref, ours = twins()
    xb = torch.randn(2, 4, 3, 5, 5, dtype=D)
    with pytest.raises(RuntimeError) as theirs:
        vmap(ref)(xb)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError) as err:
        vmap(ours)(xb)
    assert str(err.value) == str(theirs.value)
    assert_tree_close(ours.state_dict(), before)


def test_replace_all_batch_norm_modules_and_stacked_buffers():
    ref, ours = twins()
    xb = torch.randn(2, 4, 3, 5, 5, dtype=D)
    torch.func.replace_all_batch_norm_modules_(ref)
    torch.func.replace_all_batch_norm_modules_(ours)
    assert_tree_close(vmap(ours)(xb), vmap(ref)(xb))
    # An ensemble of layers with stacked parameters and buffers: each member's statistics updated.
    refs = [twins()[0] for _ in range(2)]
    ourss = []
    for r in refs:
        o = bnext.BatchNorm2d(3, dtype=D)
        o.load_state_dict(r.state_dict())
        ourss.append(o)

    def run(members):
        params, buffers = torch.func.stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")
        out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xb)
        return out, buffers

    assert_tree_close(run(ourss), run(refs))


def test_per_sample_gradients():
    ref, ours = twins(track_running_stats=False)
    x = torch.randn(6, 3, 4, 4, dtype=D)
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def per_sample(m):
        def loss(p, xi):
            batch = torch.stack([xi, 2 * xi + 1, xi.flip(-1)])  # BN needs a batch per sample
            return (functional_call(m, p, (batch,)) ** 3).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    assert_tree_close(per_sample(ours), per_sample(ref))


# ------------------------------------------------------------------------------------------------
# Forward-mode AD and batched gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_ad(mode, requires_grad):
    # An eval layer whose input does not require grad used to drop the tangent (the inference
    # fast path); the dual input must give torch's tangent in both modes.
    ref, ours = twins()
    ref.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(4, 3, 5, 5, dtype=D, requires_grad=requires_grad)
    t = torch.randn_like(x)
    outs = []
    for m in (ours, ref):
        with forward_ad.dual_level():
            y = m(forward_ad.make_dual(x, t))
            outs.append(forward_ad.unpack_dual(y))
    torch.testing.assert_close(outs[0].primal, outs[1].primal)
    assert outs[0].tangent is not None and outs[0].tangent.abs().max() > 0
    torch.testing.assert_close(outs[0].tangent, outs[1].tangent)
    assert_same_state(ours, ref)


@pytest.mark.parametrize("mode", MODES)
def test_batched_gradients(mode):
    ref, ours = twins()
    ref.train(mode == "train")
    ours.train(mode == "train")
    x = torch.randn(4, 3, 5, 5, dtype=D)
    v = torch.randn(7, 4, 3, 5, 5, dtype=D)
    results = []
    for m in (ours, ref):
        xr = x.clone().requires_grad_()
        y = m(xr)
        results.append(torch.autograd.grad(y, (xr, m.weight, m.bias), v, is_grads_batched=True))
    assert_tree_close(*results)


# ------------------------------------------------------------------------------------------------
# torch.utils.checkpoint


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_updates_running_statistics_once(use_reentrant, momentum):
    # torch updates the running statistics again when checkpoint recomputes the forward
    # (pytorch/pytorch#62471); bnext counts each batch once: its statistics equal those of the
    # same steps without checkpointing.
    torch.manual_seed(0)

    def block(cls):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cls(4, momentum=momentum), nn.ReLU()).to(D)

    ref, ours, plain = block(nn.BatchNorm2d), block(bnext.BatchNorm2d), block(nn.BatchNorm2d)
    ours.load_state_dict(ref.state_dict())
    plain.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=D)
        grads = []
        for m, ckpt in ((ours, True), (ref, True), (plain, False)):
            xr = x.clone().requires_grad_()
            y = checkpoint(m, xr, use_reentrant=use_reentrant) if ckpt else m(xr)
            y.square().sum().backward()
            grads.append((y.detach(), xr.grad, m[0].weight.grad.clone()))
            m.zero_grad()
        assert_tree_close(grads[0], grads[2])
        assert_tree_close(grads[1], grads[2])
    assert int(ours[1].num_batches_tracked) == int(plain[1].num_batches_tracked) == 3
    assert int(ref[1].num_batches_tracked) == 6  # torch counts the recomputation too
    assert_same_state(ours, plain)


def test_checkpoint_raising_pack_hook_is_called_once():
    calls = []

    def pack(t):
        calls.append(1)
        raise RuntimeError("pack hook refused")

    m = bnext.BatchNorm2d(3)
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), pytest.raises(RuntimeError, match="pack hook"):
        m(x)
    assert len(calls) == 1
    assert_tree_close(m.state_dict(), before)


# ------------------------------------------------------------------------------------------------
# Module semantics


class Scale(nn.Module):
    def forward(self, w):
        return 2 * w.abs() + 0.1


@pytest.mark.parametrize("mode", MODES)
def test_parametrize(mode):
    ref, ours = twins()
    for m in (ref, ours):
        torch.nn.utils.parametrize.register_parametrization(m, "weight", Scale())
        m.train(mode == "train")
    x = torch.randn(4, 3, 5, 5, dtype=D, requires_grad=True)
    outs = [m(x) for m in (ours, ref)]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.square().sum(), (x, m.parametrizations.weight.original)) for o, m in zip(outs, (ours, ref))]
    assert grads[0][1].abs().max() > 0  # the original gets its gradient
    assert_tree_close(grads[0], grads[1])


def test_plain_tensors_in_place_of_parameters_and_buffers():
    ref, ours = twins(dtype=torch.float32)
    for m in (ref, ours):
        del m.weight
        m.weight = torch.full((3,), 3.0)
        del m.running_mean
        m.running_mean = torch.full((3,), 0.5)
    x = torch.randn(8, 3, 3, 3)
    out = ours(x)
    torch.testing.assert_close(out, ref(x))
    assert out.std().item() == pytest.approx(3.0, rel=0.05)
    assert_same_state(ours, ref)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_getattr_override_in_a_subclass():
    class Shared(bnext.BatchNorm2d):
        # weight served by __getattr__ from a tensor kept elsewhere (as weight-tying wrappers do)
        def __init__(self, C, store):
            super().__init__(C)
            del self.weight
            self.store = store

        def __getattr__(self, name):
            if name == "weight" and "store" in self.__dict__:
                return self.__dict__["store"]
            return super().__getattr__(name)

    store = torch.full((3,), 2.0)
    m = Shared(3, store)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(store)
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 3, 4, 4), (2, 0, 4)])
def test_empty_inputs(training, shape):
    C = shape[1] if len(shape) > 1 else 0
    args = [torch.zeros(C), torch.ones(C), torch.rand(C) if C else None, torch.rand(C) if C else None]
    x = torch.randn(shape, requires_grad=True)
    ref = torch.nn.functional.batch_norm(x, *args, training=training)
    ours = bnext.batch_norm(x, *[a.clone() if a is not None else None for a in args], training=training)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    (g,) = torch.autograd.grad(ours.sum(), x)
    assert g.shape == x.shape


@pytest.mark.parametrize("training", [True, False])
def test_per_channel_tensors_of_any_shape_with_C_elements(training):
    # torch's forward accepts e.g. a (1, C) weight; so does bnext, and its backward gives the
    # gradient in the weight's shape (torch's CPU backward fails there: "TensorAccessor expected 1
    # dims but tensor has 2").
    x = torch.randn(4, 3, 5, dtype=D)
    w = torch.rand(1, 3, dtype=D, requires_grad=True)
    rm, rv = torch.zeros(1, 3, dtype=D), torch.ones(3, 1, dtype=D)
    y = bnext.batch_norm(x, rm, rv, w, None, training)
    ref_stats = (torch.zeros(3, dtype=D), torch.ones(3, dtype=D))
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, *ref_stats, w, None, training))
    torch.testing.assert_close((rm.reshape(3), rv.reshape(3)), ref_stats)
    (g,) = torch.autograd.grad(y.square().sum(), w)
    w1 = w.detach().reshape(3).requires_grad_()
    y1 = torch.nn.functional.batch_norm(x, torch.zeros(3, dtype=D), torch.ones(3, dtype=D), w1, None, training)
    (g1,) = torch.autograd.grad(y1.square().sum(), w1)
    assert g.shape == (1, 3)
    torch.testing.assert_close(g, g1.reshape(1, 3))
