"""Build bnext: `python setup.py build_ext --inplace` (what `make install` runs), or install it into
an environment that has torch: `pip install --no-build-isolation .` (or `-e .`). Every way of building
compiles into build/temp.* with ninja, so after one build the others only link (and recompile what
changed).

Environment:
  BNEXT_CUDA=0|1         force the CPU-only build (0) or the CUDA build (1); default: CUDA when torch
                         has CUDA and a CUDA toolkit is found.
  CUDA_HOME              the CUDA toolkit; otherwise resolved from the `nvcc` on PATH (following
                         wrapper scripts) or /usr/local/cuda.
  TORCH_CUDA_ARCH_LIST   GPU architectures; default "7.5;8.0;9.0" when no GPU is visible.
  MAX_JOBS               parallel compile jobs (ninja).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;9.0"


def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The real CUDA toolkit: CUDA_HOME, else the one behind `nvcc` on PATH, else /usr/local/cuda.

    The `nvcc` on PATH may be a wrapper script outside any toolkit (torch's own guess, the wrapper's
    parent directory, then lacks libcudart and linking fails), so follow symlinks and look inside
    small scripts for the nvcc they exec.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if not _is_toolkit(env):
            sys.exit(f"bnext setup: CUDA_HOME={env} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)")
        return env
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:
        seen.add(nvcc)
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if _is_toolkit(home):
            return home
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            break
        if not head.startswith(b"#!"):
            break
        m = re.search(rb"(/[^\s\"']+/bin/nvcc)\b", head)
        nvcc = m.group(1).decode() if m else None
    for home in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if _is_toolkit(home):
            return home
    return None


def want_cuda():
    flag = os.environ.get("BNEXT_CUDA")
    import torch

    if flag == "0":
        return None
    home = find_cuda_home()
    if flag == "1":
        if torch.version.cuda is None:
            sys.exit("bnext setup: BNEXT_CUDA=1 but this torch has no CUDA support")
        if home is None:
            sys.exit("bnext setup: BNEXT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return home
    if torch.version.cuda is None or home is None:
        return None
    return home


CUDA_HOME = want_cuda()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if CUDA_HOME:
    cpp_extension.CUDA_HOME = CUDA_HOME


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


# No -march flags: the build must run on any x86-64. csrc/cpu/kernels_<isa>.cpp switch the ISA per
# translation unit and csrc/cpu/isa.cpp picks the best variant the CPU has at run time.
# -Wno-psabi: the 64-byte vector types of the kernels warn about an ABI no caller depends on.
# -g0: no debug information (Python's default flags ask for it): the kernels are instantiated per
# ISA, dtype, activation and layout, and their debug information made the extension about 300 MB
# and its build markedly slower.
CXX_FLAGS = ["-O3", "-fopenmp-simd", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-psabi", "-g0"]
LINK_FLAGS = []
# at::parallel_for is a header template: without _OPENMP it compiles to a plain serial loop, so an
# extension built without -fopenmp runs every kernel on one thread whatever torch.set_num_threads
# says (docs/performance.md#threads-and-determinism). Where torch
# itself runs on OpenMP, compile with it; the extension then uses the libgomp.so.1 torch has
# already loaded (same soname), i.e. torch's thread pool and torch.set_num_threads.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    CXX_FLAGS.append("-fopenmp")
    LINK_FLAGS.append("-fopenmp")


def main_extension():
    sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    define_macros = []
    if CUDA_HOME:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        define_macros += [("BNEXT_WITH_CUDA", None), ("BNEXT_CUDA_ARCHS", '"' + archs + '"')]
        return cpp_extension.CUDAExtension(
            "bnext._C",
            sources,
            define_macros=define_macros,
            extra_link_args=LINK_FLAGS,
            extra_compile_args={
                "cxx": CXX_FLAGS,
                # bnext's own CUDA sources compile warning-free; keep them so.
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Werror", "all-warnings"],
            },
        )
    return cpp_extension.CppExtension(
        "bnext._C", sources, define_macros=define_macros, extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )


def extensions():
    exts = [main_extension()]
    # The CUDA kernels compiled as host C++ over the SIMT emulation layer (csrc/simt), when present.
    simt_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "simt", "*.cpp")))
    if simt_sources:
        exts.append(
            cpp_extension.CppExtension(
                "bnext._simt",
                simt_sources,
                # The same kernel sources as csrc/cuda, as host C++: warnings are errors here too.
                extra_compile_args={"cxx": ["-O2", "-pthread", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]},
                extra_link_args=["-pthread"],
            )
        )
    return exts


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Objects always in build/temp.<platform>-<python>, where the in-place build puts them: setuptools
    builds an editable install (pip install -e) in a temporary directory, which would compile every
    kernel again; ninja rebuilds there only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}")


class BuildPy(build_py):
    """Copies the package into build/lib afresh: setuptools never deletes files there, so a module
    renamed or removed in the tree would still be packed into every later wheel."""

    def run(self):
        shutil.rmtree(os.path.join(self.build_lib, "bnext"), ignore_errors=True)
        super().run()


setup(
    name="bnext",
    version="0.1.0",
    description="Fused BatchNorm kernels for PyTorch (CPU and CUDA), drop-in for nn.BatchNorm*d",
    packages=find_packages(include=["bnext", "bnext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
