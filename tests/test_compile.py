"""torch.compile(fullgraph=True) and torch.export with bnext layers: compiled == eager for outputs,
gradients, running statistics and num_batches_tracked; train and eval; momentum 0.1 and None
(torch's own BN breaks the graph there); dynamic batch sizes; channels_last."""
import copy

import pytest
import torch
from torch import nn

import bnext
from conftest import DEVICES, assert_close


def small_cnn(momentum, device):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), bnext.BatchNorm2d(6, momentum=momentum), nn.ReLU(),
        nn.Conv2d(6, 4, 3), bnext.BatchNorm2d(4, momentum=momentum, affine=False),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), bnext.BatchNorm1d(5, momentum=momentum),
    ).to(device)


def compare_state(eager, compiled):
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        if a.is_floating_point():
            assert_close(b, a, msg=name)
        else:
            assert torch.equal(a, b), f"{name}: {a} != {b}"
    for (name, pa), (_, pb) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert_close(pb.grad, pa.grad, msg=f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compile_fullgraph_dynamic_matches_eager(momentum, channels_last, device):
    torch._dynamo.reset()
    eager = small_cnn(momentum, device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for batch in (4, 7, 5):  # changing batch sizes: one dynamic graph
        x = torch.randn(batch, 3, 8, 8, device=device).contiguous(memory_format=fmt)
        eager.zero_grad()
        model.zero_grad()
        ye, yc = eager(x), compiled(x)
        assert_close(yc, ye, msg=f"train output, batch {batch}")
        ye.square().sum().backward()
        yc.square().sum().backward()
        compare_state(eager, model)
    assert int(model[1].num_batches_tracked) == 3
    eager.eval()
    model.eval()
    x = torch.randn(3, 3, 8, 8, device=device).contiguous(memory_format=fmt)
    assert_close(compiled(x), eager(x), msg="eval output")


def test_torch_batchnorm_momentum_none_breaks_fullgraph():
    """The reason bnext computes the cumulative factor with tensor ops: torch's own BN calls
    float(num_batches_tracked), which fullgraph=True refuses. If torch ever fixes this, this test
    tells us the feature is no longer unique."""
    torch._dynamo.reset()
    model = nn.BatchNorm2d(3, momentum=None)
    with pytest.raises(Exception):
        torch.compile(model, fullgraph=True)(torch.randn(2, 3, 4, 4))


def test_export_eval_model():
    model = small_cnn(0.1, "cpu")
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    # Exported programs record torch's own batch_norm (they must load without bnext).
    assert "aten.batch_norm" in str(ep.graph) and "bnext" not in str(ep.graph)
    assert_close(ep.module()(x), model(x))
