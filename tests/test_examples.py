"""The examples run as written: the multi-process example of docs/sync.md (two CPU processes under
torchrun), and the small-batch layers' examples (examples/frozen_batchnorm.py, batch_renorm.py,
ghost_batchnorm.py, masked_batchnorm.py)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sync_torchrun_example():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [torchrun, "--nproc_per_node=2", "examples/sync_train.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch 1: loss" in proc.stdout
    assert "SyncBatchNorm running_var identical on all 2 processes: True" in proc.stdout


def _run_example(name):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", name)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_frozen_batchnorm_example():
    out = _run_example("frozen_batchnorm.py")
    assert "frozen layers: 3, running statistics unchanged by fine-tuning: True" in out
    assert "checkpoint loads into torchvision's FrozenBatchNorm2d, same predictions: True" in out


def test_batch_renorm_example():
    out = _run_example("batch_renorm.py")
    assert "bnext.BatchRenorm2d:" in out
    assert "final r_max=3.0, d_max=5.0; checkpoint keys as batch norm's: True" in out


def test_ghost_batchnorm_example():
    out = _run_example("ghost_batchnorm.py")
    assert "bnext.GhostBatchNorm1d (virtual batches of 128 rows, batches of 1024): eval accuracy" in out
    assert "num_batches_tracked counts virtual batches (150 x 8): True" in out
    assert "checkpoint loads into nn.BatchNorm1d, same predictions: True" in out


def test_masked_batchnorm_example():
    out = _run_example("masked_batchnorm.py")
    assert "eval accuracy on 512 new sequences:" in out
    assert "same logits alone and padded into a batch: True" in out
