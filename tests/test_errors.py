"""Bad input: torch's exception type and message where torch defines one, a clear message naming
the argument otherwise, never a crash, and never a changed buffer."""
import re

import pytest
import torch
from torch import nn

import bnext


def buffers(m):
    return {k: v.clone() for k, v in m.named_buffers()}


def assert_buffers_unchanged(m, before):
    for k, v in m.named_buffers():
        assert torch.equal(v, before[k]), f"buffer {k} changed by a failed call"


def same_error(torch_call, bnext_call):
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(Exception) as ours:
        bnext_call()
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)
    return ours.value


@pytest.mark.parametrize(
    "nd,bad_shape",
    [(1, (4,)), (1, (2, 3, 4, 5)), (2, (2, 3, 4)), (2, (2, 3, 4, 5, 6)), (3, (2, 3, 4, 5))],
)
def test_wrong_dimensionality_matches_torch(nd, bad_shape):
    ref = getattr(nn, f"BatchNorm{nd}d")(3)
    ours = getattr(bnext, f"BatchNorm{nd}d")(3)
    x = torch.randn(bad_shape)
    before = buffers(ours)
    err = same_error(lambda: ref(x), lambda: ours(x))
    assert isinstance(err, ValueError) and "input" in str(err)
    assert_buffers_unchanged(ours, before)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape):
    nd = max(1, len(shape) - 2)
    ref = getattr(nn, f"BatchNorm{nd}d")(3)
    ours = getattr(bnext, f"BatchNorm{nd}d")(3)
    before = buffers(ours)
    err = same_error(lambda: ref(torch.randn(shape)), lambda: ours(torch.randn(shape)))
    assert "Expected more than 1 value per channel when training" in str(err)
    # torch increments num_batches_tracked before failing; bnext leaves every buffer unchanged.
    assert int(ref.num_batches_tracked) == 1
    assert_buffers_unchanged(ours, before)
    # One value per channel is fine in eval.
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(torch.ones(shape)), ref(torch.ones(shape)))


@pytest.mark.parametrize("eps,training", [(0.0, True), (-1.0, True), (-1.0, False)])
def test_eps_checks_match_torch(eps, training):
    ref, ours = nn.BatchNorm2d(3, eps=eps), bnext.BatchNorm2d(3, eps=eps)
    ref.train(training)
    ours.train(training)
    before = buffers(ours)
    x = torch.randn(2, 3, 4, 4)
    err = same_error(lambda: ref(x), lambda: ours(x))
    assert "eps must be" in str(err)
    assert_buffers_unchanged(ours, before)


def test_eps_zero_in_eval_is_allowed():
    ours, ref = bnext.BatchNorm2d(3, eps=0.0).eval(), nn.BatchNorm2d(3, eps=0.0).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_vector_size(name, training):
    m = bnext.BatchNorm2d(4)
    with torch.no_grad():
        setattr(m, name, nn.Parameter(torch.ones(3)) if name in ("weight", "bias") else None)
    if name.startswith("running"):
        m.register_buffer(name, torch.ones(3))
    m.train(training)
    before = buffers(m)
    with pytest.raises(RuntimeError, match=rf"{name} must have 4 elements \(num_features, the input's size\(1\)\), got shape \[3\]"):
        m(torch.randn(2, 4, 3, 3))
    assert_buffers_unchanged(m, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
@pytest.mark.parametrize("training", [True, False])
def test_non_floating_input(dtype, training):
    # NotImplementedError, as torch's "batch_norm" not implemented for 'Long'.
    m = bnext.BatchNorm2d(3).train(training)
    x = torch.ones(2, 3, 2, 2).to(dtype)
    before = buffers(m)
    with pytest.raises(NotImplementedError, match=re.escape("input must be a floating-point tensor (float16, bfloat16, float32 or float64), got ")):
        m(x)
    assert_buffers_unchanged(m, before)


def test_integer_weight_dtype():
    # RuntimeError, as torch's "mixed dtype (CPU): expect parameter to have scalar type of Float".
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"weight must have dtype Float \(the input's dtype\), got Long"):
        bnext.batch_norm(x, None, None, torch.ones(3, dtype=torch.long), None, True)


def test_weight_dtype_mismatch_in_op():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"bnext.batch_norm_forward: weight must have dtype Float .*got Double"):
        torch.ops.bnext.batch_norm_forward(x, torch.ones(3, dtype=torch.float64), None, 1e-5)
    # float32 parameters under bfloat16 input are allowed, as in torch.
    torch.ops.bnext.batch_norm_forward(x.bfloat16(), torch.ones(3), None, 1e-5)


def test_tensors_on_different_devices():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"weight must be on the input's device cpu, got meta"):
        bnext.batch_norm(x, None, None, torch.ones(3, device="meta"), None, True)


@pytest.mark.skipif(bnext.build_info()["cuda"], reason="this build has CUDA kernels")
def test_cuda_tensor_without_cuda_kernels():
    # A meta stand-in is not enough: build a real CUDA tensor when torch can, else check the guard.
    if not torch.cuda.is_available():
        from bnext.functional import check_device

        class FakeCuda:
            device = torch.device("cuda")
            is_cuda = True

        with pytest.raises(RuntimeError, match="bnext was built without CUDA kernels"):
            check_device(FakeCuda())
        return
    with pytest.raises(RuntimeError, match="bnext was built without CUDA kernels"):
        bnext.BatchNorm2d(3).cuda()(torch.randn(2, 3, 2, 2, device="cuda"))


def test_eval_without_running_stats_in_functional():
    with pytest.raises(RuntimeError, match="running_mean and running_var must be defined in evaluation mode"):
        bnext.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_grad_out_of_wrong_shape_in_op():
    x = torch.randn(4, 3)
    v = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"grad_out must have the input's shape \[4, 3\], got \[4, 2\]"):
        torch.ops.bnext.batch_norm_backward(torch.randn(4, 2), x, v, v, v)


def test_op_rejects_1d_input():
    with pytest.raises(RuntimeError, match=r"input must have at least 2 dimensions \(N, C, ...\), got 1D input"):
        torch.ops.bnext.batch_norm_stats(torch.randn(5))
