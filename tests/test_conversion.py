"""convert_model / revert_model, lazy layers, warnings for skipped layers, eager quantization fusion,
and torch.nn.SyncBatchNorm swapped for bnext.SyncBatchNorm. Every result is compared with the torch
model on identical weights and inputs."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    fuse_modules,
    fuse_modules_qat,
    fuser_method_mappings,
    get_default_qat_qconfig,
    prepare_qat,
)

import bnext
import bnext.modules
from bnext.convert import TORCH_SYNC_BATCH_NORM
from conftest import QUANTIZATION_NOTICES, randomize_batch_norm

pytestmark = QUANTIZATION_NOTICES


def _convert_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would be a test bug: these models convert fully
        return bnext.convert_model(model, **kwargs)


def _record(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w for w in caught if issubclass(w.category, UserWarning)]


def _train_steps(model, inputs):
    outs = []
    for x in inputs:
        outs.append(model(x))
    return outs


def test_convert_model_lives_in_bnext_convert_and_stays_importable():
    assert bnext.convert_model is bnext.convert.convert_model
    assert bnext.modules.convert_model is bnext.convert.convert_model
    assert bnext.modules.BNEXT_TWIN is bnext.convert.BNEXT_TWIN
    assert bnext.modules.BNEXT_TWIN[nn.BatchNorm2d] is bnext.BatchNorm2d
    from bnext.modules import BNEXT_TWIN, convert_model

    assert (convert_model, BNEXT_TWIN) == (bnext.convert_model, bnext.convert.BNEXT_TWIN)
    assert "revert_model" in bnext.__all__ and bnext.revert_model is bnext.convert.revert_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bnext.modules.nope


@pytest.mark.parametrize(
    "lazy, dims, torch_cls, bnext_cls",
    [
        (nn.LazyBatchNorm1d, (6, 3, 5), nn.BatchNorm1d, bnext.BatchNorm1d),
        (nn.LazyBatchNorm2d, (6, 3, 5, 4), nn.BatchNorm2d, bnext.BatchNorm2d),
        (nn.LazyBatchNorm3d, (6, 3, 2, 3, 4), nn.BatchNorm3d, bnext.BatchNorm3d),
    ],
)
def test_uninitialized_lazy_layer_becomes_bnext_at_first_forward(lazy, dims, torch_cls, bnext_cls):
    # Uninitialized parameters cannot be deep-copied: two models; materialization initializes them alike.
    theirs = nn.Sequential(lazy(momentum=None))
    ours = _convert_quietly(nn.Sequential(lazy(momentum=None)))
    assert type(ours[0]) is getattr(bnext, lazy.__name__)
    assert isinstance(ours[0], lazy) and ours[0].has_uninitialized_params()
    inputs = [torch.randn(dims) * 2 + 1 for _ in range(3)]
    for x in inputs:
        torch.testing.assert_close(ours(x), theirs(x))
    assert type(theirs[0]) is torch_cls and type(ours[0]) is bnext_cls
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(inputs[0]), theirs(inputs[0]))


def test_lazy_layer_constructed_from_bnext_and_reverted():
    ours = bnext.LazyBatchNorm2d(affine=False)
    theirs = nn.LazyBatchNorm2d(affine=False)
    bnext.revert_model(ours)
    assert type(ours) is nn.LazyBatchNorm2d
    bnext.convert_model(ours)
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert type(ours) is bnext.BatchNorm2d and ours.weight is None


def test_materialized_lazy_layer_converts_as_a_plain_one():
    theirs = nn.Sequential(nn.LazyBatchNorm2d())
    x = torch.randn(4, 3, 5, 5)
    theirs(x)  # materializes: torch switches the class to nn.BatchNorm2d
    assert type(theirs[0]) is nn.BatchNorm2d
    ours = _convert_quietly(copy.deepcopy(theirs))
    assert type(ours[0]) is bnext.BatchNorm2d
    torch.testing.assert_close(ours(x), theirs(x))


def test_one_warning_names_every_skipped_layer():
    class MyBN(nn.BatchNorm2d):
        pass

    class MyBnext(bnext.BatchNorm2d):
        pass

    theirs = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        MyBN(4),
        nn.Sequential(nn.SyncBatchNorm(4), nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4)),
        nn.GroupNorm(2, 4),
        MyBnext(4),
    )
    ours = copy.deepcopy(theirs)
    out, caught = _record(bnext.convert_model, ours)
    assert out is ours and len(caught) == 1
    message = str(caught[0].message)
    assert "left 2 batch norm layer(s)" in message
    assert f"'1' ({MyBN.__module__}.{MyBN.__qualname__})" in message
    assert "'2.0' (torch.nn.modules.batchnorm.SyncBatchNorm)" in message
    assert "sync=True" in message
    # Instance norms share the base class but are not batch norms; bnext layers of any class already run on bnext.
    assert "InstanceNorm" not in message and "MyBnext" not in message
    assert type(ours[1]) is MyBN and type(ours[2][0]) is TORCH_SYNC_BATCH_NORM and type(ours[2][2]) is bnext.BatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    # Nothing left: no warning.
    _, caught = _record(bnext.convert_model, nn.Sequential(nn.BatchNorm1d(3), nn.InstanceNorm1d(3)))
    assert caught == []


def test_timm_batchnormact_layers_are_named_in_the_warning():
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("efficientnet_b0", pretrained=False).eval()
    ours = copy.deepcopy(theirs)
    _, caught = _record(bnext.convert_model, ours)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "left 49 batch norm layer(s)" in message
    assert message.count("(timm.layers.norm_act.BatchNormAct2d)") == 49
    assert "'blocks.0.0.bn1' (timm.layers.norm_act.BatchNormAct2d)" in message
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_sync_true_warns_for_subclasses_and_lazy_layers():
    class MyBN(nn.BatchNorm1d):
        pass

    theirs = nn.Sequential(nn.BatchNorm1d(3), MyBN(3), nn.LazyBatchNorm1d())
    ours, caught = _record(bnext.convert_model, nn.Sequential(nn.BatchNorm1d(3), MyBN(3), nn.LazyBatchNorm1d()), sync=True)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "left 2 batch norm layer(s)" in message and "'1'" in message and "'2' (torch.nn.modules.batchnorm.LazyBatchNorm1d)" in message
    assert "once a forward has materialized them" in message
    assert [type(m) for m in ours] == [bnext.SyncBatchNorm, MyBN, nn.LazyBatchNorm1d]
    x = torch.randn(5, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def test_revert_model_switches_classes_back_in_place():
    def make():
        torch.manual_seed(0)
        return randomize_batch_norm(
            nn.Sequential(
                nn.Conv2d(3, 4, 3),
                nn.BatchNorm2d(4),
                nn.Flatten(),
                nn.LazyBatchNorm1d(),
                nn.Sequential(nn.Unflatten(1, (4, 1, 1, 1)), nn.BatchNorm3d(4, affine=False)),
            )
        )

    theirs = make()
    sync = TORCH_SYNC_BATCH_NORM(4)
    ours = _convert_quietly(make())
    ours_sync = _convert_quietly(copy.deepcopy(sync), sync=True)
    group = object()
    ours_sync.process_group = group
    ours.eval()
    calls = []
    ours[1].register_forward_hook(lambda *_: calls.append(1))
    layers = list(ours.modules())
    params = list(ours.parameters())
    assert bnext.revert_model(ours) is ours
    assert list(ours.modules()) == layers and list(ours.parameters()) == params
    assert [type(ours[1]), type(ours[3]), type(ours[4][1])] == [nn.BatchNorm2d, nn.LazyBatchNorm1d, nn.BatchNorm3d]
    assert not ours.training and not ours[1].training
    assert type(bnext.revert_model(ours_sync)) is TORCH_SYNC_BATCH_NORM and ours_sync.process_group is group
    theirs.eval()
    x = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert calls == [1]
    # A round trip gives the same training behaviour as torch.
    theirs.train(), bnext.convert_model(ours).train()
    torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)


def test_revert_model_warns_for_bnext_subclasses():
    class MyBnext(bnext.BatchNorm2d):
        pass

    model = nn.Sequential(bnext.BatchNorm2d(3), MyBnext(3))
    _, caught = _record(bnext.revert_model, model)
    assert len(caught) == 1 and "'1'" in str(caught[0].message) and "MyBnext" in str(caught[0].message)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1]) is MyBnext


# ----------------------------------------------------------------------------------------------
# Eager quantization: fuse_modules / fuse_modules_qat


def test_every_torch_fuser_entry_has_a_bnext_twin():
    table = fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD
    twins = {nn.BatchNorm1d: bnext.BatchNorm1d, nn.BatchNorm2d: bnext.BatchNorm2d, nn.BatchNorm3d: bnext.BatchNorm3d}
    torch_keys = [k for k in table if any(t in twins for t in k)]
    assert len(torch_keys) == 12
    for key in torch_keys:
        assert tuple(twins.get(t, t) for t in key) in table, key


_EVAL_FUSIONS = [
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), [["0", "1", "2"]], (2, 3, 6, 6)),
    (lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), [["0", "1"]], (2, 3, 7)),
    (lambda: nn.Sequential(nn.Conv3d(3, 4, 2), nn.BatchNorm3d(4), nn.ReLU()), [["0", "1", "2"]], (2, 3, 3, 4, 4)),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), [["0", "1"]], (5, 3)),
    (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), [["0", "1"]], (2, 3, 4, 4)),
    (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)), [["0", "1"]], (2, 3, 4, 4)),
]


@pytest.mark.parametrize("make, groups, shape", _EVAL_FUSIONS)
def test_fuse_modules_eval_matches_torch(make, groups, shape):
    theirs = randomize_batch_norm(make()).eval()
    ours = _convert_quietly(copy.deepcopy(theirs))
    fused_theirs = fuse_modules(theirs, groups)
    fused_ours = fuse_modules(ours, groups)
    assert [type(m) for m in fused_ours.modules()] == [type(m) for m in fused_theirs.modules()]
    # fuse_modules works on a copy (inplace=False): the converted model keeps its bnext layer.
    assert any(isinstance(m, bnext.modules._BatchNormMixin) for m in ours.modules())
    x = torch.randn(shape)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(fused_ours(x), ours(x))


class _QatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.relu(self.bn(self.conv(self.quant(x))))
        x = self.bn2(self.conv2(x))
        return self.dequant(self.bn3(self.fc(self.flat(x))))


def _qat(model, steps=3):
    model.train()
    model.qconfig = get_default_qat_qconfig("x86")
    model = fuse_modules_qat(model, [["conv", "bn", "relu"], ["conv2", "bn2"], ["fc", "bn3"]])
    model = prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8, generator=gen)).square().mean().backward()
        opt.step()
    return model


def test_fuse_modules_qat_prepare_qat_train_convert_matches_torch():
    theirs = randomize_batch_norm(_QatNet())
    ours = _convert_quietly(copy.deepcopy(theirs))
    qat_theirs, qat_ours = _qat(theirs), _qat(ours)
    assert [type(m) for m in qat_ours.modules()] == [type(m) for m in qat_theirs.modules()]
    for (name, a), (_, b) in zip(qat_theirs.state_dict().items(), qat_ours.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    x = torch.randn(4, 3, 8, 8)
    q_theirs, q_ours = convert(qat_theirs.eval()), convert(qat_ours.eval())
    assert [type(m) for m in q_ours.modules()] == [type(m) for m in q_theirs.modules()]
    torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# torch.nn.SyncBatchNorm swapped for bnext.SyncBatchNorm


@pytest.fixture
def swapped(monkeypatch):
    monkeypatch.setattr(torch.nn, "SyncBatchNorm", bnext.SyncBatchNorm)


def test_swapped_sync_batch_norm_constructs_and_runs_like_torch(swapped):
    ours = nn.SyncBatchNorm(4, momentum=None)
    theirs = TORCH_SYNC_BATCH_NORM(4, momentum=None)
    assert type(ours) is bnext.SyncBatchNorm
    ours.load_state_dict(randomize_batch_norm(theirs).state_dict())
    for _ in range(2):
        x = torch.randn(3, 4, 5)
        torch.testing.assert_close(ours(x), theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ours.eval(), theirs.eval()
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(ours(x), theirs(x))
    # torch's checks, messages and exception types, without going through torch.nn.SyncBatchNorm.
    for bad, layer_args in ((torch.randn(4), (4,)), (torch.randn(2, 0), (0,))):
        with pytest.raises(ValueError) as expected:
            TORCH_SYNC_BATCH_NORM(*layer_args)(bad)
        with pytest.raises(ValueError) as got:
            nn.SyncBatchNorm(*layer_args)(bad)
        assert str(got.value) == str(expected.value)


def test_swapped_convert_sync_batchnorm(swapped):
    theirs = randomize_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4))))
    ours = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(theirs))
    assert type(ours[1]) is bnext.SyncBatchNorm and type(ours[2][0]) is bnext.SyncBatchNorm
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    # convert_model(sync=True) and revert_model go to torch's own class whatever torch.nn points to.
    again = _convert_quietly(copy.deepcopy(theirs), sync=True)
    assert type(again[1]) is bnext.SyncBatchNorm
    assert type(bnext.revert_model(again)[1]) is TORCH_SYNC_BATCH_NORM
