"""bnext.fuse_model on whole networks: torchvision resnet18/50, mobilenet_v3_small, efficientnet_b0
and timm, against the unfused torch model (outputs, gradients, running statistics, state_dict)."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext

torchvision = pytest.importorskip("torchvision")


def train_step_matches(ref, fused, x, steps=2, atol=1e-4, rtol=1e-4):
    ref_params = dict(ref.named_parameters())
    fused_params = dict(fused.named_parameters())
    assert ref_params.keys() == fused_params.keys()
    for _ in range(steps):
        # The same random numbers for both (dropout, stochastic depth).
        torch.manual_seed(100)
        y_ref = ref(x)
        torch.manual_seed(100)
        y_fused = fused(x)
        torch.testing.assert_close(y_fused, y_ref, atol=atol, rtol=rtol)
        g = torch.randn_like(y_ref)
        grads_ref = torch.autograd.grad(y_ref, list(ref_params.values()), g)
        grads_fused = torch.autograd.grad(y_fused, list(fused_params.values()), g)
        for name, a, b in zip(ref_params, grads_fused, grads_ref):
            # Gradients that cancel to rounding noise (a bias followed by another batch norm) are
            # compared at the scale of 0.1, not relative to their own noise.
            scale = b.abs().max().clamp_min(0.1)
            torch.testing.assert_close(a / scale, b / scale, atol=atol * 10, rtol=rtol * 10, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)


def fused_types(model):
    return [type(m).__name__ for m in model.modules() if isinstance(m, bnext.act._BatchNormActMixin)]


def test_resnet18_fuses_every_chain_and_trains_like_torch():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    fused = bnext.fuse_model(copy.deepcopy(ref))
    # 20 BN layers: 1 stem BN + ReLU, 8 blocks x (BN + ReLU, BN + add + ReLU), 3 downsample BNs (no activation).
    assert len(fused.bnext_fused) == 17, fused.bnext_fused
    assert sum("add" in f for f in fused.bnext_fused) == 8
    assert fused.state_dict().keys() == ref.state_dict().keys()
    # Batch 4: layer4's batch norms then see 16 values per channel (8, at batch 2, make the network's
    # gradients ill-conditioned enough that bnext's BatchNorm2d and torch's differ by 1%).
    x = torch.randn(4, 3, 64, 64)
    train_step_matches(ref, fused, x)
    ref.eval(), fused.eval()
    torch.testing.assert_close(fused(x), ref(x), atol=1e-4, rtol=1e-4)


def test_resnet50_channels_last():
    torch.manual_seed(1)
    # float64: a 50-layer network at this small input size (layer4: 16 values per channel) amplifies
    # float32 rounding differences past any fixed tolerance, bnext's plain BatchNorm2d's as well.
    ref = torchvision.models.resnet50(num_classes=10).double().to(memory_format=torch.channels_last)
    fused = bnext.fuse_model(copy.deepcopy(ref))
    assert len(fused.bnext_fused) == 49  # 53 BNs, 4 downsample BNs without activation
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    train_step_matches(ref, fused, x, steps=1, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name,expected", [("mobilenet_v3_small", {"relu", "hardswish"}), ("efficientnet_b0", {"silu"})])
def test_mobilenet_and_efficientnet(name, expected):
    torch.manual_seed(2)
    ref = getattr(torchvision.models, name)(num_classes=10)
    fused = bnext.fuse_model(copy.deepcopy(ref))
    acts = {f.rsplit(" + ", 1)[1] for f in fused.bnext_fused}
    assert acts == expected, fused.bnext_fused
    x = torch.randn(2, 3, 64, 64)
    train_step_matches(ref, fused, x, steps=1, atol=3e-4, rtol=3e-4)


def test_functional_and_inplace_forms_and_what_is_left_alone(caplog):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.bn3, self.bn4, self.bn5 = (nn.BatchNorm2d(4) for _ in range(5))
            self.act = nn.LeakyReLU(0.2, inplace=True)

        def forward(self, x):
            a = F.relu(self.bn1(x), inplace=True)  # fused
            b = self.act(self.bn2(a) + x)  # fused with residual
            c = self.bn3(b)
            d = torch.sigmoid(c) + c  # bn3's output has two users: left alone
            e = F.elu(x + self.bn4(d), alpha=0.5)  # residual first: fused
            f = self.bn5(e).relu_()  # method form: fused
            return F.gelu(f)

    torch.manual_seed(3)
    ref = Net()
    with caplog.at_level(logging.INFO, logger="bnext"):
        fused = bnext.fuse_model(copy.deepcopy(ref))
    assert sorted(fused.bnext_fused) == ["bn1 + relu", "bn2 + add + leaky_relu", "bn4 + add + elu", "bn5 + relu"]
    assert "fused bn2 + add + leaky_relu" in caplog.text
    assert isinstance(fused.bn3, nn.BatchNorm2d) and not isinstance(fused.bn3, bnext.BatchNormAct2d)
    assert fused.bn2.negative_slope == 0.2 and fused.bn4.alpha == 0.5
    train_step_matches(ref, fused, torch.randn(3, 4, 5, 5))


def test_timm_batchnormact_maps_directly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    ref = timm.create_model("efficientnet_b0", num_classes=10)
    fused = bnext.fuse_model(copy.deepcopy(ref))
    n_timm = sum(type(m).__name__ == "BatchNormAct2d" for m in ref.modules())
    assert len(fused_types(fused)) == n_timm
    assert fused.state_dict().keys() == ref.state_dict().keys()
    train_step_matches(ref, fused, torch.randn(2, 3, 64, 64), steps=1, atol=3e-4, rtol=3e-4)


def test_fused_model_compiles_fullgraph():
    torch.manual_seed(5)
    ref = torchvision.models.resnet18(num_classes=10)
    fused = bnext.fuse_model(copy.deepcopy(ref))
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(4, 3, 64, 64)  # layer4 still has 4 * 2 * 2 values per channel
    y = compiled(x)
    torch.testing.assert_close(y, ref(x), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert fused.conv1.weight.grad is not None
