"""`examples/demo.py --quick` end to end, as `make demo` runs it: exit status, picture, and the checks
it reports."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_output")
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", "demo.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"demo exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    with open(out / "results.json") as f:
        return out, proc.stdout, json.load(f)


def test_demo_writes_the_picture(quick_run):
    out, stdout, results = quick_run
    png = out / "demo.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert str(png) in stdout


def test_both_runs_learn_and_agree(quick_run):
    _, _, results = quick_run
    acc_torch, acc_bnext = results["torch"]["final_accuracy"], results["bnext"]["final_accuracy"]
    # 10 classes: chance is 10 %; three epochs reach ~97 %.
    assert acc_torch > 0.8 and acc_bnext > 0.8, (acc_torch, acc_bnext)
    # Training amplifies rounding differences, so the runs part after a few steps (the 1-ulp torch run
    # parts from torch the same way); a few test images of 450 may flip.
    assert abs(acc_torch - acc_bnext) <= 0.04, (acc_torch, acc_bnext)
    # Same weights, same first batch: the first losses differ only by the batch-norm kernels' rounding.
    assert results["loss_gap"]["first_step"] <= 1e-5, results["loss_gap"]


def test_checkpoint_and_compile_checks_hold(quick_run):
    _, _, results = quick_run
    ckpt = results["checkpoint"]
    assert ckpt["has_torch_batchnorm"]
    assert ckpt["same_class"] == ckpt["total"] == 450, ckpt
    assert ckpt["max_abs_logit_diff"] < 1e-3, ckpt
    comp = results["compile"]
    assert comp["same_class"] == comp["total"] == 450, comp
    assert comp["compiled_accuracy"] == comp["eager_accuracy"] == results["bnext"]["final_accuracy"], comp
    timing = results["timing"]
    assert all(timing[k] > 0 for k in ("torch_step_ms", "bnext_step_ms", "torch_bn_ms", "bnext_bn_ms")), timing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no CUDA device")
def test_cuda_without_a_device_fails_clearly(capsys):
    spec = importlib.util.spec_from_file_location("bnext_demo", os.path.join(REPO, "examples", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err
