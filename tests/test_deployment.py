"""Deployment paths of bnext models: torch.export (and run_decompositions), torch.jit.trace and
torch.jit.script, torch.onnx.export (dynamo and legacy exporters), torch.compile (aot_eager and
inductor). Each compares with the same model on torch.nn.BatchNorm, identical weights and inputs.

Saved programs (torch.export, TorchScript) are loaded and run in a fresh Python process where
bnext cannot be imported and no bnext op is registered: deployment traces record torch's own batch
norm (bnext/functional.py), so the programs do not need bnext.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import bnext
from conftest import assert_close

# ------------------------------------------------------------------------------------------------
# Models: a Conv-BN-ReLU stack with a BatchNorm1d head, and torchvision's resnet18 (20 BN layers).


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6),
    )


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None, num_classes=10)


MODELS = {"cnn": (cnn, (2, 3, 8, 8)), "resnet18": (resnet18, (2, 3, 32, 32))}

# Training-mode export runs on the small model only: resnet18's layers add tracing time (seconds)
# and no other kind of BN call; its eval programs cover downsample and residual layers.
TRAIN_EXPORT = ("cnn",)


def count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def make_pair(name):
    """(name, torch.nn reference, bnext twin on a deepcopy, input). Two training steps first, so
    the running statistics are not their initial zeros and ones."""
    torch.manual_seed(0)
    build, shape = MODELS[name]
    reference = build()
    for _ in range(2):
        reference(torch.randn(4, *shape[1:]))
    model = bnext.convert_model(copy.deepcopy(reference))
    assert count_bn(model) == sum(isinstance(m, (bnext.BatchNorm1d, bnext.BatchNorm2d)) for m in model.modules())
    return name, reference, model, torch.randn(shape)


def memoized(make):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make(name)
        return cache[name]

    return get


# Module-scoped getters by model name rather than parametrized fixtures: tests take different
# subsets of the models, and pytest would build a parametrized fixture again for each subset.
@pytest.fixture(scope="module")
def pairs():
    return memoized(make_pair)


def in_mode(pair, training):
    """Fresh copies of the pair's models in train or eval mode (tests may update buffers)."""
    name, reference, model, x = pair
    reference, model = copy.deepcopy(reference).train(training), copy.deepcopy(model).train(training)
    return reference, model, x


def fx_targets(graph):
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


def bnext_targets(graph):
    return sorted(t for t in fx_targets(graph) if "bnext" in t)


def compare_buffers(actual, expected, msg):
    for name, e in expected.items():
        a = actual[name]
        if e.is_floating_point():
            assert_close(a, e, msg=f"{msg}: {name}")
        else:
            assert torch.equal(a, e), f"{msg}: {name}: {a} != {e}"


# ------------------------------------------------------------------------------------------------
# Saved programs, and a fresh process without bnext that runs them

_NO_BNEXT = """
import sys
sys.modules["bnext"] = None  # `import bnext` raises ImportError
import torch
try:
    import bnext
except ImportError:
    pass
else:
    raise AssertionError("bnext was importable")
assert not [op for op in torch._C._dispatch_get_all_op_names() if op.startswith("bnext")]
"""

# Each saved program once: torch.export programs from the buffers as they were before the
# in-process runs (a training program updates them), TorchScript modules as saved.
_RUN_SAVED = """
inputs = torch.load("inputs.pt")
x, outputs = inputs["x"], {}
for mode in inputs["modes"]:
    program = torch.export.load(f"export_{mode}.pt2").module()
    assert not program.load_state_dict(inputs["buffers_" + mode], strict=False).unexpected_keys
    with torch.no_grad():
        y = program(x)
    outputs["export_" + mode] = {"y": y, "buffers": dict(program.named_buffers())}
for label in ("traced", "scripted"):
    with torch.no_grad():
        outputs[label] = {"y": torch.jit.load(label + ".pt")(x)}
torch.save(outputs, "outputs.pt")
"""


def run_without_bnext(code, cwd):
    """Runs `code` in a fresh interpreter, in `cwd` (no bnext there), without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_BNEXT + textwrap.dedent(code)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"


def deploy(pair, path):
    """The pair's bnext model exported (eval, and train for TRAIN_EXPORT; after
    run_decompositions()), traced and scripted (eval), each saved under `path`, and the outputs of
    the saved programs run in one process without bnext (one interpreter start per model, not one
    per program)."""
    name, reference, model, x = pair
    modes = ("eval", "train") if name in TRAIN_EXPORT else ("eval",)
    out = {"path": path, "inputs": {"x": x, "modes": modes}}
    for mode in modes:
        _, m, _ = in_mode(pair, training=mode == "train")
        out["inputs"]["buffers_" + mode] = copy.deepcopy(dict(m.named_buffers()))
        ep = torch.export.export(m, (x,))
        decomposed = ep.run_decompositions()
        torch.export.save(decomposed, path / f"export_{mode}.pt2")
        out["export_" + mode] = (ep, decomposed)
    _, m, _ = in_mode(pair, training=False)
    with torch.no_grad():
        out["traced"] = torch.jit.trace(m, (x,), check_trace=True)
        out["scripted"] = torch.jit.script(m)
    for label in ("traced", "scripted"):
        out[label].save(str(path / f"{label}.pt"))
    torch.save(out["inputs"], path / "inputs.pt")
    run_without_bnext(_RUN_SAVED, path)
    out["without_bnext"] = torch.load(path / "outputs.pt")
    return out


@pytest.fixture(scope="module")
def deployments(pairs, tmp_path_factory):
    return memoized(lambda name: deploy(pairs(name), tmp_path_factory.mktemp(f"deployed_{name}")))


# ------------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize(
    "name,training",
    [("cnn", False), ("cnn", True), ("resnet18", False)],
    ids=["cnn-eval", "cnn-train", "resnet18-eval"],
)
def test_export(pairs, deployments, name, training):
    mode = "train" if training else "eval"
    reference, model, x = in_mode(pairs(name), training)
    deployed = deployments(name)
    ep, decomposed = deployed["export_" + mode]
    assert not bnext_targets(ep.graph)
    assert "aten.batch_norm.default" in fx_targets(ep.graph)

    assert not bnext_targets(decomposed.graph)
    bn_op = (
        "aten._native_batch_norm_legit_functional.default"
        if training
        else "aten._native_batch_norm_legit_no_training.default"
    )
    assert sum(str(n.target) == bn_op for n in decomposed.graph.nodes) == count_bn(model)

    with torch.no_grad():
        expected = reference(x)  # one step in training: the running statistics updated once
        program = decomposed.module()
        assert not program.load_state_dict(deployed["inputs"]["buffers_" + mode], strict=False).unexpected_keys
        assert_close(program(x), expected, msg="exported program")
    if training:
        compare_buffers(dict(program.named_buffers()), dict(reference.named_buffers()), "running statistics")

    # Saved and loaded where bnext is not: same output (and, in training, the same update).
    saved = deployed["without_bnext"]["export_" + mode]
    assert_close(saved["y"], expected, msg="saved program in a process without bnext")
    if training:
        compare_buffers(saved["buffers"], dict(reference.named_buffers()), "running statistics without bnext")


def test_export_train_momentum_none_keeps_update_op():
    """A training-mode export with momentum=None records bnext's ops, not torch's batch norm
    (bnext/functional.py sends only that case to the bnext ops: torch's rule reads
    float(num_batches_tracked), which export cannot trace). The decompositions remove the
    functional op, but the in-place running-statistics update (bnext.update_running_stats, under
    auto_functionalized) stays: such a program still needs bnext."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnext.BatchNorm2d(4, momentum=None)).train()
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    assert "bnext.batch_norm_forward.default" in fx_targets(ep.graph)
    decomposed = ep.run_decompositions(bnext.decompositions())
    assert "bnext.batch_norm_forward.default" not in fx_targets(decomposed.graph)
    kept = [n for n in decomposed.graph.nodes if "update_running_stats" in str(n.args) + str(n.target)]
    assert kept, "update_running_stats was decomposed: update this test and the README"
    # The program runs and counts the batch as the eager layer does.
    x = torch.randn(2, 3, 6, 6)
    eager = copy.deepcopy(model)
    program = decomposed.module()
    assert_close(program(x), eager(x))
    for (name, got), want in zip(program.named_buffers(), eager.buffers()):
        assert_close(got, want, msg=name)
    # torch's own layer does not export here at all (the README says so): if this starts to
    # pass, torch exports it and bnext should record torch's op there too.
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).train(),
                            (torch.randn(2, 3, 6, 6),))


# ------------------------------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("label", ["traced", "scripted"])
def test_torchscript(pairs, deployments, name, label):
    reference, model, x = in_mode(pairs(name), training=False)
    deployed = deployments(name)
    module = deployed[label]
    kinds = {n.kind() for n in module.inlined_graph.nodes()}
    assert "aten::batch_norm" in kinds
    assert not [k for k in kinds if k.startswith("bnext")]
    with torch.no_grad():
        expected = model(x)  # eager bnext
        # bnext's eval is torch's folded formula; float rounding is all that may differ.
        assert_close(module(x), expected, msg="vs eager bnext")
        assert_close(module(x), reference(x), msg="vs torch.nn")
        assert_close(torch.jit.load(str(deployed["path"] / f"{label}.pt"))(x), expected, msg="reloaded")
    assert_close(deployed["without_bnext"][label]["y"], expected, msg="in a process without bnext")


def test_torchscript_train_mode_updates_like_torch():
    """The scripted forward is torch's _BatchNorm.forward: training mode counts the batch and
    blends the running statistics as torch does (the small model: scripting resnet18 again would
    add seconds and no case)."""
    torch.manual_seed(0)
    reference = cnn().train()
    scripted = torch.jit.script(bnext.convert_model(copy.deepcopy(reference)))
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        assert_close(scripted(x), reference(x), msg="scripted training output")
    compare_buffers(dict(scripted.named_buffers()), dict(reference.named_buffers()), "scripted running statistics")


# ------------------------------------------------------------------------------------------------
# ONNX


def onnx_runtime():
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    return onnx, ort


def run_onnx(ort, path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


# Both exporters on the small model, the default (dynamo) one on resnet18 too.
@pytest.mark.parametrize(
    "name,dynamo",
    [("cnn", True), ("cnn", False), ("resnet18", True)],
    ids=["cnn-dynamo", "cnn-legacy", "resnet18-dynamo"],
)
def test_onnx(pairs, name, dynamo, tmp_path):
    onnx, ort = onnx_runtime()
    reference, model, x = in_mode(pairs(name), training=False)
    with torch.no_grad():
        expected = reference(x)
    path = tmp_path / "model.onnx"
    # Unoptimized first, to see the graph as exported: one standard BatchNormalization per layer.
    # (The exporters' optimizations fold an eval BN into the Conv or Gemm before it, for
    # torch.nn's BN as for bnext's; checked below.)
    if dynamo:
        program = torch.onnx.export(model, (x,), dynamo=True, optimize=False)
        program.save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False)
    graph = onnx.load(str(path)).graph
    op_types = [n.op_type for n in graph.node]
    assert op_types.count("BatchNormalization") == count_bn(model), op_types
    assert not [n for n in graph.node if n.domain not in ("", "ai.onnx")], "non-standard ONNX ops"
    assert_close(run_onnx(ort, path, x), expected, msg="onnxruntime, unoptimized export")

    # The exporter's defaults: optimized graph, same results.
    if dynamo:
        program.optimize()
        program.save(str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    torch.testing.assert_close(run_onnx(ort, path, x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# torch.compile


def small_cnn(momentum):
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4, momentum=momentum, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=momentum),
    )
    return bnext.convert_model(reference)


def train_steps(eager, model, compiled, steps=3):
    """Identical steps on the eager and the compiled model: outputs, input and parameter
    gradients, running statistics and num_batches_tracked after each step."""
    for step in range(steps):
        x = torch.randn(4, 3, 8, 8)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager.zero_grad()
        model.zero_grad()
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye, msg=f"step {step}: output")
        dy = torch.randn_like(ye)
        ye.backward(dy)
        yc.backward(dy)
        assert_close(xc.grad, xe.grad, msg=f"step {step}: input gradient")
        for (name, pe), (_, pc) in zip(eager.named_parameters(), model.named_parameters()):
            assert_close(pc.grad, pe.grad, msg=f"step {step}: gradient of {name}")
        compare_buffers(dict(model.named_buffers()), dict(eager.named_buffers()), f"step {step}")


def test_compile_fullgraph_runs_bnext_ops():
    """torch.compile keeps bnext's kernels (fake kernels and autograd formulas, not torch's BN):
    the graphs hold bnext ops and no aten batch norm, and compiled == eager bnext in training (3
    steps) and then in eval, on one compiled model."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    eager = small_cnn(0.1)
    model = copy.deepcopy(eager)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    train_steps(eager, model, compiled)
    forward, backward = backend.fw_graphs[-1].graph, backend.bw_graphs[-1].graph
    assert "bnext.batch_norm_forward.default" in fx_targets(forward)
    assert "bnext.batch_norm_backward.default" in fx_targets(backward)
    assert "bnext.update_running_stats" in fx_targets(backend.graphs[-1].graph)

    eager.eval()
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_close(compiled(x), eager(x), msg="eval output")
    assert "bnext.batch_norm_eval.default" in fx_targets(backend.fw_graphs[-1].graph)
    for graph in [g.graph for g in backend.fw_graphs + backend.bw_graphs]:
        assert not [t for t in fx_targets(graph) if "aten" in t and "batch_norm" in t], graph


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_inductor_gradients_with_running_stats(momentum):
    """DESIGN.md's inductor trap (pytorch/pytorch PR #197039): a value computed from a buffer,
    used in backward, with the buffer then updated in place. Training with running statistics
    tracked: compiled gradients equal eager ones over 3 steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    # One Conv-BN-ReLU block: the trap is per layer, and each layer adds inductor compile time.
    eager = bnext.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU()))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    train_steps(eager, model, compiled)
    assert int(model[1].num_batches_tracked) == 3
