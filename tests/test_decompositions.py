"""bnext.decompositions(): every functional op's decomposition into aten ops gives the op's outputs
(values up to float rounding, dtypes, shapes, memory format), and an exported program that calls
every op, after run_decompositions with the table, has no bnext op left and gives the same
results."""
import pytest
import torch
from torch import nn

import bnext
from bnext._ops.conventions import ACTIVATIONS
from conftest import OPS, assert_close, make_input

ops = torch.ops.bnext

SHAPES = {"1d": (6, 3), "1d_seq": (4, 3, 7), "2d": (3, 4, 5, 6), "3d": (2, 3, 3, 4, 5)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel(C, dtype, positive=False):
    t = torch.randn(C, dtype=torch.float64)
    t = t.abs() + 0.5 if positive else t
    return t.to(dtype)


def op_args(name, x, affine, param_dtype):
    """Arguments of op `name` for input x: per-channel tensors in param_dtype (the op accepts the
    input's dtype or the accumulation dtype), statistics in the accumulation dtype."""
    C, a = x.shape[1], acc(x.dtype)
    w = channel(C, param_dtype) if affine else None
    b = channel(C, param_dtype) if affine else None
    dy = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).contiguous(memory_format=_format(x))
    mean, var = ops.batch_norm_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    return {
        "batch_norm_stats": (x,),
        "batch_norm_elemt": (x, w, b, mean, invstd),
        "batch_norm_eval": (x, w, b, channel(C, param_dtype), channel(C, param_dtype, positive=True), 1e-5),
        "batch_norm_forward": (x, w, b, 1e-5),
        "batch_norm_backward_reduce": (dy, x, mean, invstd),
        "batch_norm_backward_elemt": (dy, x, mean, invstd, w, channel(C, a), channel(C, a)),
        "batch_norm_backward": (dy, x, w, mean, invstd),
        "batch_norm_act_forward": (x, w, b, dy, 1e-5, ACTIVATIONS["silu"], 0.0),
        "batch_norm_act_eval": (
            x, w, b, channel(C, param_dtype), channel(C, param_dtype, positive=True), dy, 1e-5, ACTIVATIONS["elu"], 0.7
        ),
        "batch_norm_act_backward": (dy, x, dy, w, b, mean, invstd, ACTIVATIONS["hardswish"], 0.0, False),
    }[name]


def _format(x):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def test_table_covers_every_functional_op_and_is_fresh():
    table = bnext.decompositions()
    assert set(table) == {getattr(ops, name).default for name in OPS}
    table.clear()
    assert len(bnext.decompositions()) == len(OPS)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ("1d", "contiguous"),
        ("1d_seq", "contiguous"),
        ("2d", "contiguous"),
        ("2d", "channels_last"),
        ("2d", "strided"),
        ("3d", "contiguous"),
        ("3d", "channels_last"),
    ],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_decomposition_matches_op(name, dtype, shape, layout, affine):
    x = make_input(SHAPES[shape], dtype, layout)
    # Reduced-precision inputs: parameters as a bfloat16 model has them (bfloat16) and as autocast
    # or a float32 model has them (float32); the op takes both.
    param_dtypes = [dtype, torch.float32] if dtype == torch.bfloat16 else [dtype]
    op = getattr(ops, name).default
    decomposition = bnext.decompositions()[op]
    for param_dtype in param_dtypes:
        args = op_args(name, x, affine, param_dtype)
        expected, actual = op(*args), decomposition(*args)
        if isinstance(expected, torch.Tensor):
            expected, actual = (expected,), (actual,)
        assert len(actual) == len(expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            msg = f"{name} output {i}, params {param_dtype}"
            assert a.dtype == e.dtype, msg
            assert a.shape == e.shape, msg
            if e.shape == x.shape and layout != "strided":
                assert a.stride() == e.stride(), msg
            # Per-channel outputs are float32 for bfloat16 input: compared at float32's tolerance.
            assert_close(a, e, msg=msg)


class EveryOp(nn.Module):
    """Calls every functional bnext op directly (what SyncBatchNorm-style code records)."""

    def forward(self, x, dy, w, b, running_mean, running_var):
        mean, var = ops.batch_norm_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
        return (
            mean,
            var,
            ops.batch_norm_elemt(x, w, b, mean, invstd),
            ops.batch_norm_eval(x, w, b, running_mean, running_var, 1e-5),
            *ops.batch_norm_forward(x, w, b, 1e-5),
            *ops.batch_norm_backward_reduce(dy, x, mean, invstd),
            ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, mean * 0.1, var * 0.2),
            *ops.batch_norm_backward(dy, x, w, mean, invstd),
            *ops.batch_norm_act_forward(x, w, b, dy, 1e-5, ACTIVATIONS["relu"], 0.0),
            ops.batch_norm_act_eval(x, w, b, running_mean, running_var, None, 1e-5, ACTIVATIONS["silu"], 0.0),
            *ops.batch_norm_act_backward(dy, x, None, w, b, mean, invstd, ACTIVATIONS["leaky_relu"], 0.2, False),
        )


def targets(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_exported_ops_decompose_to_aten(layout):
    def inputs(batch):
        x = make_input((batch, 3, 5, 6), torch.float32, layout)
        return (x, torch.randn_like(x), torch.randn(3), torch.randn(3), torch.randn(3), torch.rand(3) + 0.5)

    model = EveryOp()
    # A dynamic batch size: the decompositions trace with a symbolic count of values per channel.
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, inputs(4), dynamic_shapes=({0: batch}, {0: batch}, None, None, None, None))
    assert {f"bnext.{name}.default" for name in OPS} <= targets(ep)

    # bnext's table alone, and merged into torch's core-aten table.
    core = torch.export.default_decompositions()
    core.update(bnext.decompositions())
    for table, label in ((bnext.decompositions(), "bnext table"), (core, "core aten + bnext table")):
        decomposed = ep.run_decompositions(table)
        names = targets(decomposed)
        assert not [t for t in names if t.startswith("bnext.")], f"{label}: {sorted(names)}"
        # Normalization stays recognizable as batch norm.
        assert "aten._native_batch_norm_legit_no_training.default" in names, label
        assert "aten._native_batch_norm_legit.no_stats" in names, label
        for args in (inputs(4), inputs(7)):
            actual, expected = decomposed.module()(*args), model(*args)
            assert len(actual) == len(expected)
            for i, (a, e) in enumerate(zip(actual, expected)):
                msg = f"{label}, batch {args[0].shape[0]}: output {i}"
                assert a.dtype == e.dtype, msg
                assert_close(a, e, msg=msg)


def test_default_run_decompositions_keeps_bnext_ops():
    """Why the table exists: torch's default run_decompositions() decomposes only
    CompositeImplicitAutograd ops, and bnext's ops have backend kernels. If torch ever starts
    decomposing them by itself (to what?), this test says so."""
    x = torch.randn(4, 3, 5, 6)
    args = (x, torch.randn_like(x), torch.randn(3), torch.randn(3), torch.randn(3), torch.rand(3) + 0.5)
    decomposed = torch.export.export(EveryOp(), args).run_decompositions()
    assert "bnext.batch_norm_forward.default" in targets(decomposed)
