"""The multi-process example of docs/sync.md runs as written (two CPU processes under torchrun)."""
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
