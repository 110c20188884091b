"""torch.fx with bnext layers: symbolic_trace, torchvision's feature extraction, FX fusion and FX graph
mode quantization, each compared with the torch model on identical weights and inputs.

FX fusion and quantization match torch's classes exactly; bnext's documented step is
bnext.revert_model before them (bnext/_quantization.py says why), and prepare_fx warns without it.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, fuse_fx, prepare_fx, prepare_qat_fx
from torch.fx.experimental.optimization import fuse

import bnext
from bnext.modules import _BatchNormMixin
from conftest import QUANTIZATION_NOTICES, randomize_batch_norm

torchvision = pytest.importorskip("torchvision")

pytestmark = QUANTIZATION_NOTICES


@pytest.fixture(scope="module")
def resnets():
    torch.manual_seed(0)
    theirs = randomize_batch_norm(torchvision.models.resnet18(weights=None, num_classes=10))
    ours = bnext.convert_model(copy.deepcopy(theirs))
    return theirs, ours


def _bnext_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, _BatchNormMixin)}


def _types(model):
    # Every GraphModule gets a class of its own: compare those as GraphModule.
    return [torch.fx.GraphModule if isinstance(m, torch.fx.GraphModule) else type(m) for m in model.modules()]


def _small_net():
    torch.manual_seed(0)
    return randomize_batch_norm(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
            nn.ReLU(), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
        )
    )


@pytest.mark.parametrize("training", [True, False])
def test_symbolic_trace_resnet18_leaf_nodes_and_parity(resnets, training):
    theirs, ours, eager = (copy.deepcopy(m).train(training) for m in (resnets[0], resnets[1], resnets[1]))
    gm = torch.fx.symbolic_trace(ours)
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _BatchNormMixin)}
    assert leaves == _bnext_names(ours) and len(leaves) == 20
    # The traced module holds the same layer objects: running statistics update as the model's.
    # (4, 3, 64, 64): every layer normalizes over more than a handful of values per channel, so
    # float32 rounding stays small next to torch's (layer4 in training on 2 values per channel
    # amplifies it a hundredfold).
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 3, 64, 64, generator=gen)
        got = gm(x)
        torch.testing.assert_close(got, eager(x), rtol=0, atol=0)
        torch.testing.assert_close(got, theirs(x))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], eager.state_dict()[key], rtol=0, atol=0)
        torch.testing.assert_close(ours.state_dict()[key], value)


@pytest.mark.parametrize("training", [True, False])
def test_create_feature_extractor_matches_torch(resnets, training):
    from torchvision.models.feature_extraction import create_feature_extractor

    theirs, ours = (copy.deepcopy(m).train(training) for m in resnets)
    nodes = {"layer1": "f1", "layer3.1.bn2": "f3", "layer4": "f4"}
    fx_theirs, fx_ours = create_feature_extractor(theirs, nodes), create_feature_extractor(ours, nodes)
    assert type(fx_ours.get_submodule("layer3.1.bn2")) is bnext.BatchNorm2d
    x = torch.randn(4, 3, 64, 64)
    got, expected = fx_ours(x), fx_theirs(x)
    assert got.keys() == expected.keys() == {"f1", "f3", "f4"}
    for k in expected:  # float32 tolerance of tests/conftest.py (features are not normalized, unlike logits)
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-4)


def test_fx_experimental_fuse_skips_bnext_layers_and_folds_after_revert(resnets):
    theirs, ours = (copy.deepcopy(m).eval() for m in resnets)
    fused_theirs = fuse(theirs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_theirs.modules())
    x = torch.randn(2, 3, 32, 32)
    # fuse matches nn.BatchNorm2d exactly: bnext layers stay, unfolded; the eval math is the same.
    fused_ours = fuse(copy.deepcopy(ours))
    assert len(_bnext_names(fused_ours)) == 20
    torch.testing.assert_close(fused_ours(x), fused_theirs(x))
    # After revert_model: torch's fusion, module for module.
    fused_reverted = fuse(bnext.revert_model(copy.deepcopy(ours)))
    assert _types(fused_reverted) == _types(fused_theirs)
    torch.testing.assert_close(fused_reverted(x), fused_theirs(x), rtol=0, atol=0)


def test_fuse_fx_after_revert_matches_torch():
    theirs = _small_net().eval()
    ours = bnext.convert_model(copy.deepcopy(theirs))
    fused_theirs = fuse_fx(copy.deepcopy(theirs))
    fused_ours = fuse_fx(bnext.revert_model(copy.deepcopy(ours)))
    assert _types(fused_ours) == _types(fused_theirs)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x), rtol=0, atol=0)


def _ptq(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no bnext warning: the model holds torch layers
        warnings.filterwarnings("ignore", ".*reduce_range will be deprecated.*", UserWarning)
        prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (x,))
    for _ in range(2):
        prepared(x)
    return convert_fx(prepared)


def test_prepare_fx_warns_on_bnext_layers():
    ours = bnext.convert_model(_small_net()).eval()
    x = torch.randn(3, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"bnext.revert_model\(model\) before prepare_fx") as caught:
        prepared = prepare_fx(ours, get_default_qconfig_mapping("x86"), (x,))
    ours_warnings = [w for w in caught if "bnext.revert_model" in str(w.message)]
    assert len(ours_warnings) == 1 and "'1' (bnext.modules.BatchNorm2d)" in str(ours_warnings[0].message)
    # Without the revert, the layers are left out of fusion (what the warning says).
    assert len(_bnext_names(prepared)) == 4


def test_fx_ptq_after_revert_matches_torch(resnets):
    theirs, ours = (copy.deepcopy(m) for m in resnets)
    x = torch.randn(2, 3, 32, 32)
    q_theirs = _ptq(theirs, x)
    q_ours = _ptq(bnext.revert_model(ours), x)
    assert _types(q_ours) == _types(q_theirs)
    torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)


def test_fx_qat_after_revert_matches_torch():
    theirs = _small_net()
    ours = bnext.convert_model(copy.deepcopy(theirs))
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"bnext.revert_model\(model\) before prepare_fx/prepare_qat_fx"):
        prepare_qat_fx(copy.deepcopy(ours).train(), get_default_qat_qconfig_mapping("x86"), (x,))

    def qat(model):
        prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))
        opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            prepared(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
        return convert_fx(prepared.eval())

    q_theirs, q_ours = qat(theirs), qat(bnext.revert_model(ours))
    assert _types(q_ours) == _types(q_theirs)
    torch.testing.assert_close(q_ours(x), q_theirs(x), rtol=0, atol=0)
