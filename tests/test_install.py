"""bnext installs with pip: a wheel built from this tree holds the package and its compiled
extensions, nothing else, and the installed copy imports and runs from another directory.

The wheel build reuses the in-place build's objects (build/temp.*, compiled by ninja, which
`make test` has just run), so it costs a link, not a compile.
"""
import glob
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bnext

REPO = Path(__file__).resolve().parents[1]

# Run by the installed copy, from a directory outside the tree: it must be that copy that loads,
# and a layer must give torch's numbers, on the CPU kernels and on the emulated CUDA kernels.
CHECK = """
import os, sys, torch, bnext
from bnext.testing import emulate_cuda
assert os.path.dirname(bnext.__file__) == os.path.join(sys.argv[1], "bnext"), bnext.__file__
x = torch.randn(4, 3, 5, 5)
want = torch.nn.BatchNorm2d(3)(x)
torch.testing.assert_close(bnext.BatchNorm2d(3)(x), want)
with emulate_cuda():
    torch.testing.assert_close(bnext.BatchNorm2d(3)(x), want)
print("ok", bnext.build_info()["version"])
"""


def _build_env():
    """The environment of the in-place build, so that ninja finds every object up to date."""
    info = bnext.build_info()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["BNEXT_CUDA"] = "1" if info["cuda"] else "0"
    if info["cuda"]:
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(info["cuda_archs"])
    return env


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.mark.skipif(
    not glob.glob(str(REPO / "build" / "temp.*" / "build.ninja")),
    reason="no in-place build to reuse (make build): a wheel from scratch compiles every kernel again",
)
def test_wheel_installs_and_imports_from_another_directory(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
         cwd=REPO, env=_build_env(), timeout=900)
    (wheel,) = wheels.glob("bnext-*.whl")

    # The package's modules as they are in the tree (no module left over from an earlier build),
    # the two extensions, the metadata.
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "bnext").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == modules
    extensions = sorted(n.split(".")[0] for n in names if n.endswith(".so") or n.endswith(".pyd"))
    assert extensions == ["bnext/_C", "bnext/_simt"]
    assert all(n.startswith(("bnext/", "bnext-")) for n in names), sorted(names)

    _run(pip + ["install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)], timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = _run([sys.executable, "-c", CHECK, str(target)], cwd=elsewhere, env=env, timeout=300)
    assert out.stdout.strip() == f"ok {bnext.__version__}"
