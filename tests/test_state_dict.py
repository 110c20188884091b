"""Checkpoints move both ways between torch's and bnext's modules; convert_model; build_info."""
import copy
import io

import pytest
import torch
from torch import nn

import bnext
from conftest import OPS


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_state_dict_both_ways(nd):
    ref = getattr(nn, f"BatchNorm{nd}d")(5)
    ours = getattr(bnext, f"BatchNorm{nd}d")(5)
    x = torch.randn((6, 5) + (3,) * nd)
    ref(x)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours(x * 2 + 1)
    ref2 = getattr(nn, f"BatchNorm{nd}d")(5)
    ref2.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v)
    # Through torch.save / torch.load as well.
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    ref2.load_state_dict(torch.load(buf))


def test_version_1_checkpoint_without_num_batches_tracked():
    ours = bnext.BatchNorm2d(3)
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 0


def test_convert_model_in_place_keeps_everything():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2, affine=False)),
        nn.BatchNorm3d(2, momentum=None, track_running_stats=False),
    ).double()
    model[1].weight.requires_grad_(False)
    model.eval()
    bn = model[1]
    params_before = {k: v for k, v in model.named_parameters()}
    sd_before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = bnext.convert_model(model)
    assert out is model
    assert type(model[1]) is bnext.BatchNorm2d and model[1] is bn
    assert type(model[2][2]) is bnext.BatchNorm1d and type(model[3]) is bnext.BatchNorm3d
    assert not model.training and not model[1].training
    assert model[1].weight.dtype == torch.float64 and not model[1].weight.requires_grad
    assert model[3].momentum is None and model[3].running_mean is None
    for k, v in model.named_parameters():
        assert v is params_before[k]
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd_before[k])
    assert any(p is model[1].bias for p in opt.param_groups[0]["params"])
    # A model that is itself a BatchNorm layer is converted too.
    single = nn.BatchNorm1d(3)
    assert type(bnext.convert_model(single)) is bnext.BatchNorm1d


def test_convert_model_leaves_subclasses_and_other_norms_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3), nn.LayerNorm(3), nn.GroupNorm(1, 3))
    with pytest.warns(UserWarning, match=r"left 1 batch norm layer\(s\) unconverted.*'0'"):
        bnext.convert_model(model)
    assert type(model[0]) is MyBN and type(model[1]) is nn.LayerNorm
    # Lazy layers: tests/test_conversion.py.


def test_build_info():
    info = bnext.build_info()
    assert info["version"] == bnext.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["cuda"] == bool(info["cuda_archs"])
    assert isinstance(info["cpu_isa"], str) and info["cpu_isa"]


def test_ops_are_registered():
    assert len(OPS) >= 7, OPS
    for name in OPS:
        op = getattr(torch.ops.bnext, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"), name
        if bnext.build_info()["cuda"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA"), name
